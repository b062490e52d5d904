import {closeFd, createUserfaultfd} from '../../src/sys/index.js'

/** Why the real-uffd tests cannot run on this machine, or undefined when they can. */
export function uffdUnavailableReason(): string | undefined {
  try {
    closeFd(createUserfaultfd())
    return undefined
  } catch (error) {
    return `cannot create a userfaultfd here (${(error as Error).message}); run as root on Linux with CONFIG_USERFAULTFD`
  }
}
