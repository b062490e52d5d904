import {spawnSync} from 'node:child_process'

/**
 * A shaped link for bench/remote: a network namespace holding the "object store", joined to the
 * host by a veth pair, with a token-bucket filter (TBF) on the namespace's side limiting what the
 * server sends. This kernel has no netem, so latency is added by the server itself (per request).
 */
export const NETNS = 'uffd-bench'
export const HOST_ADDRESS = '10.213.7.1'
export const SERVER_ADDRESS = '10.213.7.2'
const HOST_LINK = 'ubh0'
const SERVER_LINK = 'ubn0'

function sh(args: string[], allowFailure = false): void {
  const r = spawnSync(args[0], args.slice(1), {encoding: 'utf8'})
  if (r.status !== 0 && !allowFailure) throw new Error(`${args.join(' ')} failed (${r.status}): ${r.stderr.trim()}`)
}

/** Makes the namespace and its link, unshaped; a leftover from an interrupted run is replaced. */
export function createLink(): void {
  removeLink()
  sh(['ip', 'netns', 'add', NETNS])
  sh(['ip', 'link', 'add', HOST_LINK, 'type', 'veth', 'peer', 'name', SERVER_LINK, 'netns', NETNS])
  sh(['ip', 'addr', 'add', `${HOST_ADDRESS}/24`, 'dev', HOST_LINK])
  sh(['ip', 'link', 'set', HOST_LINK, 'up'])
  sh(['ip', '-n', NETNS, 'addr', 'add', `${SERVER_ADDRESS}/24`, 'dev', SERVER_LINK])
  sh(['ip', '-n', NETNS, 'link', 'set', SERVER_LINK, 'up'])
  sh(['ip', '-n', NETNS, 'link', 'set', 'lo', 'up'])
}

/**
 * Limits the server's sending rate to `bitsPerSecond`. The bucket holds 10 ms of traffic (at
 * least 128 KiB): TBF must hold a whole GSO segment, and a bucket smaller than one timer tick of
 * traffic would cap the rate below the one asked for.
 */
export function shapeLink(bitsPerSecond: number): void {
  const burst = Math.max(128 * 1024, Math.round(bitsPerSecond / 8 / 100))
  sh(['ip', 'netns', 'exec', NETNS, 'tc', 'qdisc', 'replace', 'dev', SERVER_LINK, 'root', 'tbf', 'rate', `${bitsPerSecond}bit`, 'burst', String(burst), 'latency', '100ms'])
}

export function removeLink(): void {
  sh(['ip', 'link', 'del', HOST_LINK], true)
  sh(['ip', 'netns', 'del', NETNS], true)
}
