/**
 * Where a snapshot being written goes: appended to in order, never sought back into, then
 * committed (it appears, whole) or discarded (nothing appears). A local file is an AtomicFile
 * (temporary file, fsync, rename); an object in S3 is a multipart upload (src/remote/s3-upload.ts)
 * whose parts go out while later bytes are still being produced.
 */
export interface OutputSink {
  /** Where the output goes, as it prints (a path, or s3://BUCKET/KEY). */
  readonly destination: string
  /** Bytes appended so far: the offset the next append lands at. */
  readonly size: number
  /**
   * Appends `bytes` and returns the offset they land at. The sink may hold on to them until they
   * are sent, or copy them: callers do not change a buffer after appending it.
   */
  append(bytes: Uint8Array): number
  /**
   * Resolves once the sink can take more: an upload whose parts are still going out holds the
   * writer here, which bounds the memory a fast producer can fill. Rejects with the sink's
   * failure (a part that could not be sent), or when `signal` aborts.
   */
  drain(signal?: AbortSignal): Promise<void>
  /** Makes the output appear, complete, under its name. */
  commit(): void | Promise<void>
  /** Unless committed, makes sure nothing appears (and nothing is left pending); safe to call again. */
  discard(): void | Promise<void>
  /**
   * Bytes appended earlier, where the sink keeps them readable (a local file). An upload's bytes
   * are gone once sent, so it has no readBack; the writer's deduplication compares digests then.
   */
  readBack?(position: number, length: number): Buffer
}
