/**
 * The JSON file formats uffd reads, as JSON Schema built with TypeBox: the code validates with
 * these objects and docs/schemas/*.json is generated from them (scripts/schemas.ts), so the
 * published schema cannot drift from what is accepted. Pure: no I/O.
 */
import {type TSchema, Type} from '@sinclair/typebox'
import {Value} from '@sinclair/typebox/value'

/** `errorMessage` on a schema replaces TypeBox's generic message (it names the expectation). */
const count = (errorMessage = 'expected a non-negative integer') => Type.Integer({minimum: 0, errorMessage})
const positive = () => Type.Integer({minimum: 1, errorMessage: 'expected a positive integer'})
const ms = () => Type.Number({minimum: 0, errorMessage: 'expected a non-negative number'})
const nullable = <T extends TSchema>(t: T) => Type.Union([t, Type.Null()])

export const WorkingSetSchema = Type.Object(
  {
    kind: Type.Literal('uffd-working-set'),
    version: Type.Literal(1),
    snapshot: Type.Object({logicalSize: positive(), pageSize: positive(), headerCrc: Type.Integer({minimum: 0, maximum: 0xffffffff, errorMessage: 'expected a 32-bit unsigned integer'})}),
    runs: positive(),
    pages: Type.Array(count()),
    firstTouchMs: Type.Array(ms()),
  },
  {$id: 'https://uffd.dev/schemas/working-set.json', title: 'uffd working set (.ws)', description: 'Pages a resume touched, in first-touch order: uffd resume --record, uffd working-set merge.'},
)

export const ResumeReportSchema = Type.Object(
  {
    kind: Type.Literal('uffd-resume-stats'),
    version: Type.Literal(1),
    snapshot: Type.String(),
    // The other snapshots one handler served (--also), each on its own socket; absent otherwise.
    also: Type.Optional(Type.Array(Type.String())),
    startedAt: Type.String(),
    durationMs: ms(),
    clients: Type.Object({served: count(), ended: count()}),
    faults: Type.Object({total: count(), data: count(), zero: count(), removed: count(), alreadyPresent: count()}),
    pages: Type.Object({copied: count(), zeroed: count(), faultAround: count(), prefetched: count(), byHelper: Type.Optional(count()), toKernel: Type.Optional(count())}),
    workingSetChunks: count(),
    // Optional: reports written before staging existed have no such field.
    staged: Type.Optional(nullable(Type.Object({units: count(), bytes: count(), ms: ms()}))),
    ioctls: Type.Object({copy: count(), zeropage: count(), eexist: count(), eagain: count()}),
    bytes: Type.Object({copied: count(), decompressed: count()}),
    // framesDecoded (chunks' frames decoded on their own), storedUnitsDecoded, storedUnitsShared: optional, reports written before they were counted have none.
    chunks: Type.Object({decoded: count(), framesDecoded: Type.Optional(count()), storedUnitsDecoded: Type.Optional(count()), storedUnitsShared: Type.Optional(count()), cacheHits: count(), cacheMisses: count(), hitRate: nullable(Type.Number({minimum: 0, maximum: 1}))}),
    events: Type.Object({remove: count(), removedPages: count(), unmap: count(), remap: count(), fork: count()}),
    // min: optional, reports written before it was kept have none.
    latencyUs: Type.Object({p50: nullable(ms()), p90: nullable(ms()), p99: nullable(ms()), min: Type.Optional(nullable(ms())), max: nullable(ms()), mean: nullable(ms())}),
    timeToFirstFaultMs: nullable(ms()),
    timeToLastFaultMs: nullable(ms()),
    timeToMemoryCompleteMs: nullable(ms()),
    timeToWorkingSetMs: nullable(ms()),
    prefetchHits: Type.Optional(nullable(Type.Object({copiedPages: count(), hits: count(), wasted: count(), sampledAtMs: ms()}))),
    // Only for snapshots served from object storage.
    remote: Type.Optional(
      Type.Object({
        location: Type.String(),
        requests: count(),
        bytesFetched: count(),
        extentsFetched: count(),
        retries: count(),
        badResponses: count(),
        diskHits: count(),
        waits: count(),
        waitMs: ms(),
        maxWaitMs: ms(),
        latencyMs: Type.Object({p50: nullable(ms()), p90: nullable(ms()), p99: nullable(ms())}),
        cacheDir: Type.String(),
        evictedBytes: count(),
        cacheWriteErrors: count(),
        memoryHandovers: Type.Optional(count()),
        claimWaits: Type.Optional(count()),
      }),
    ),
  },
  {$id: 'https://uffd.dev/schemas/resume-stats.json', title: 'uffd resume statistics (--stats-file)', description: 'What a resume did: written by uffd resume --stats-file, read by uffd stats.'},
)

/** The published schemas, by file name under docs/schemas/. */
export const PUBLISHED_SCHEMAS: Record<string, TSchema> = {
  'working-set.json': WorkingSetSchema,
  'resume-stats.json': ResumeReportSchema,
}

/** A schema as plain JSON Schema text (TypeBox's symbol keys are not JSON and drop out). */
export function schemaJson(schema: TSchema): string {
  return JSON.stringify({$schema: 'https://json-schema.org/draft/2020-12/schema', ...schema}, null, 2) + '\n'
}

/**
 * The first problem of `value` against `schema`, as `source: field: what was expected` (the
 * field as a.b[3]), or undefined when it is valid.
 */
export function schemaProblem(schema: TSchema, value: unknown, source: string): string | undefined {
  const first = Value.Errors(schema, value).First()
  if (!first) return undefined
  const field = first.path
    .split('/')
    .slice(1)
    .map((p) => p.replaceAll('~1', '/').replaceAll('~0', '~'))
    .reduce((out, p) => (/^\d+$/.test(p) ? `${out}[${p}]` : out ? `${out}.${p}` : p), '')
  const custom = (first.schema as {errorMessage?: unknown}).errorMessage
  const expected = typeof custom === 'string' ? custom : first.message.charAt(0).toLowerCase() + first.message.slice(1)
  return `${source}: ${field || '(top level)'}: ${expected}`
}
