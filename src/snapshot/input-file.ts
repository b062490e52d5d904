import fs from 'node:fs'

import {UffdError} from '../core/errors.js'
import {onFile} from '../sys/errors.js'

/**
 * Opens an input for reading and refuses anything but a regular file (or a block device, where
 * allowed). O_NONBLOCK makes open() return at once on a FIFO, which would otherwise wait for a
 * writer forever, deaf to SIGINT; checking the opened fd leaves no window for the path to be
 * swapped between the check and the open. O_NONBLOCK changes nothing for regular files and
 * block devices.
 */
export function openInput(path: string, options: {blockDevice?: boolean} = {}): {fd: number; stat: fs.Stats} {
  const fd = onFile(path, 'opening', () => fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK))
  try {
    const stat = onFile(path, 'reading', () => fs.fstatSync(fd))
    if (!stat.isFile() && !(options.blockDevice && stat.isBlockDevice())) throw new UffdError('NOT_A_FILE', `${path} is not a regular file (${kindOf(stat)})`)
    return {fd, stat}
  } catch (error) {
    fs.closeSync(fd)
    throw error
  }
}

/** The whole text of a regular file (a working set), refusing FIFOs and devices before reading. */
export function readInputText(path: string): string {
  const {fd} = openInput(path)
  try {
    return onFile(path, 'reading', () => fs.readFileSync(fd, 'utf8'))
  } finally {
    fs.closeSync(fd)
  }
}

/**
 * For inputs read by code that opens them itself: refuses what openInput would refuse, so that the
 * later open cannot block on a FIFO.
 */
export function checkInput(path: string, options: {blockDevice?: boolean} = {}): void {
  fs.closeSync(openInput(path, options).fd)
}

function kindOf(stat: fs.Stats): string {
  if (stat.isDirectory()) return 'a directory'
  if (stat.isFIFO()) return 'a FIFO'
  if (stat.isSocket()) return 'a socket'
  if (stat.isCharacterDevice()) return 'a character device'
  if (stat.isBlockDevice()) return 'a block device'
  return 'not a file'
}
