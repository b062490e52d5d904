/**
 * The fault-around window: which image pages a fault installs with its own. Pure address math.
 *
 * A window that always spans the largest size pays for neighbours the guest may never touch:
 * an isolated fault decodes and copies every chunk of its window. So the window adapts, as the
 * kernel's readahead does: it starts at the smallest size (the smallest part of a chunk that
 * decodes on its own: a frame of a framed chunk, else the chunk, whose decode the faulting page
 * pays for anyway) and doubles each time a fault lands next to (or inside the reach of) the
 * window before it, up to the largest; a fault elsewhere starts again from the smallest.
 * Windows are aligned to their own size in image pages, so a grown window holds the smaller ones
 * before it, and are clipped to the faulting region.
 */

/** The window's bounds, in pages: equal for a fixed window. */
export interface WindowSizes {
  minPages: number
  maxPages: number
}

/** What the last fault of a client installed around itself: [first, end), in image pages, at a size of `pages`. */
export interface WindowHistory {
  pages: number
  first: number
  end: number
}

/** A client that has not faulted yet. */
export const NO_WINDOW: WindowHistory = {pages: 0, first: 0, end: 0}

/** Two sizes: the smallest and largest window, in bytes; a fixed window has both the same. */
export function windowSizes(minBytes: number, maxBytes: number, pageSize: number): WindowSizes {
  const maxPages = Math.max(1, Math.floor(maxBytes / pageSize))
  return {minPages: Math.min(maxPages, Math.max(1, Math.floor(minBytes / pageSize))), maxPages}
}

/**
 * The window for a fault on `page` of a region covering image pages [regionFirst, regionEnd),
 * after `last`: its bounds, and the history the next fault is judged against.
 */
export function nextWindow(last: WindowHistory, page: number, sizes: WindowSizes, regionFirst: number, regionEnd: number): WindowHistory {
  // Next to the last window, or within one window's length of it: the guest is working through
  // this part of memory (a sequential scan, a cluster, a structure bigger than one window).
  const near = last.pages > 0 && page >= last.first - last.pages && page < last.end + last.pages
  const pages = near ? Math.min(sizes.maxPages, last.pages * 2) : sizes.minPages
  const first = Math.max(regionFirst, page - (page % pages))
  const end = Math.min(regionEnd, page - (page % pages) + pages)
  return {pages, first, end}
}

/**
 * `window` grown to at least `pages` (aligned to that size, clipped to the region), for a fault
 * that has to decode more than its window anyway: it installs what it paid for.
 */
export function atLeast(window: WindowHistory, pages: number, page: number, regionFirst: number, regionEnd: number): WindowHistory {
  if (window.pages >= pages) return window
  const first = page - (page % pages)
  return {pages, first: Math.max(regionFirst, first), end: Math.min(regionEnd, first + pages)}
}

/** The largest window around `page`, clipped to its region: where zero runs are filled with a fault whatever its window (mapping zeros costs no decode and almost no copy). */
export function widestWindow(page: number, sizes: WindowSizes, regionFirst: number, regionEnd: number): {first: number; end: number} {
  const first = page - (page % sizes.maxPages)
  return {first: Math.max(regionFirst, first), end: Math.min(regionEnd, first + sizes.maxPages)}
}
