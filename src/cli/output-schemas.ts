/**
 * The JSON contract of the CLI: what each command prints on stdout with --json, what an error
 * prints, and what an event line (blkrep events, serve-nbd --json) looks like. One envelope for
 * every command: the bare result (as qemu-img --output=json does), or on failure
 * {"error":{"code","message"}} and a non-zero exit. Keys are camelCase except where blkrep
 * mirrors qemu-img's own output (info, create, check: "virtual-size" …).
 *
 * The objects are open: a later version may add keys (scripts must ignore unknown ones), never
 * remove or retype one. schemas/*.json are generated from these (npm run schemas) and shipped
 * in the package; test/cli/json-contract.test.ts runs the commands and validates their output.
 */
import { z } from 'zod';

const int = z.number().int();
const bytes = z.number().int().nonnegative();
const obj = <T extends z.ZodRawShape>(shape: T) => z.object(shape).loose();

export const errorSchema = obj({ error: obj({ code: z.string().regex(/^ERR_[A-Z0-9_]+$/), message: z.string().min(1) }) }).describe('any command --json, on failure (exit 1 or 2)');

const loadState = obj({ state: z.enum(['clean', 'recovered', 'untrusted']) });

const bitmapInfo = obj({
  name: z.string(),
  export: z.string().optional(),
  persistent: z.boolean(),
  file: z.string().nullable(),
  size: bytes,
  granularity: bytes,
  enabled: z.boolean(),
  dirtyGranules: bytes,
  dirtyBytes: bytes,
  percent: z.number(),
  epoch: int.nullable(),
  frozen: z.boolean(),
});

const bitmapChange = obj({ name: z.string(), changed: z.boolean(), bitmap: bitmapInfo.nullable() });

const checkpointInfo = obj({ number: int, path: z.string(), createdAt: z.string(), size: bytes, granularity: bytes, dirtyGranules: bytes, dirtyBytes: bytes, error: z.string().optional() });

const jobStatus = z.enum(['created', 'running', 'paused', 'ready', 'waiting', 'pending', 'aborting', 'concluded']);
const jobInfo = obj({
  id: z.string(),
  type: z.string(),
  status: jobStatus,
  length: bytes,
  offset: bytes,
  speed: bytes,
  paused: z.boolean(),
  ioStatus: z.enum(['ok', 'failed', 'nospace']),
  eta: z.number().nullable(),
  rate: z.number().nonnegative(),
  ready: z.boolean(),
  autoFinalize: z.boolean(),
  autoDismiss: z.boolean(),
  export: z.string().nullable().optional(),
  error: obj({ code: z.string(), message: z.string() }).optional(),
});

const ioError = obj({ side: z.string(), operation: z.string(), errno: z.string(), action: z.string(), offset: bytes, length: bytes, message: z.string() });

const imageInfo = obj({
  'virtual-size': bytes,
  filename: z.string(),
  format: z.string(),
  'actual-size': bytes.optional(),
  'cluster-size': bytes.optional(),
  'backing-filename': z.string().optional(),
  'full-backing-filename': z.string().optional(),
  'backing-filename-format': z.string().optional(),
  'dirty-flag': z.boolean().optional(),
  'backing-chain': z.array(obj({ filename: z.string(), format: z.string() })).optional(),
});

const gi = obj({ current: z.string(), bitmap: z.string(), history: z.array(z.string()) });
const pairStatus = obj({
  role: z.enum(['primary', 'secondary']),
  peer: z.string().nullable(),
  protocol: z.enum(['sync', 'async']).nullable(),
  link: z.enum(['connecting', 'connected', 'degraded', 'resyncing', 'split-brain', 'none']),
  epoch: int,
  gi,
  diskState: z.enum(['UpToDate', 'Consistent', 'Outdated', 'Inconsistent', 'Failed']),
  queueBytes: bytes,
  bytesBehind: bytes,
  lastCheckpointAgeMs: z.number().nullable(),
  peerKind: z.enum(['blkrep', 'plain']).optional(),
});

const offlineCopy = {
  source: z.string(),
  target: z.string(),
  sync: z.string(),
  granularity: bytes,
  bytes,
  size: bytes,
  seconds: z.number().nonnegative(),
  rate: z.number().nonnegative(),
  targetRequests: bytes,
  errors: z.array(ioError),
};

const liveJob = obj({ live: z.literal(true), export: z.string().nullable(), job: jobInfo });

const listening = obj({
  event: z.literal('listening'),
  uris: z.array(z.string()).min(1),
  pid: int,
  bitmaps: z.array(obj({ export: z.string(), name: z.string(), file: z.string().nullable(), state: z.string() })).optional(),
  jobs: z.array(obj({ id: z.string(), type: z.string(), export: z.string().nullable(), status: z.string() })).optional(),
  tls: obj({ mode: z.enum(['off', 'on', 'require']) }).optional(),
  metrics: z.string().optional(),
});

const exportStatus = obj({
  name: z.string(),
  // a secondary's replica export without a link is listed with present: false and little else
  size: bytes.optional(),
  readOnly: z.boolean().optional(),
  connections: bytes.optional(),
  requests: z.record(z.string(), bytes).optional(),
  bytesRead: bytes.optional(),
  bytesWritten: bytes.optional(),
  tls: z.enum(['off', 'on', 'require']),
  pair: pairStatus.optional(),
});

const failoverResult = obj({ role: z.enum(['primary', 'secondary']), dryRun: z.boolean(), to: z.enum(['checkpoint', 'latest']), epoch: int, gi, bytes, ms: z.number().nonnegative(), explanation: z.string() });

/**
 * One event line (blkrep events --json, the control socket's events, serve-nbd's stopped line):
 * an object with `event` and, from the daemon, `time`. The job events carry `id` and `type`.
 */
export const eventSchema = z.union([
  listening,
  obj({ event: z.literal('stopped'), pid: int }),
  obj({ event: z.enum(['job-created', 'job-status-change', 'job-ready', 'job-completed', 'job-cancelled', 'job-error']), time: z.string(), id: z.string(), type: z.string().optional() }),
  obj({ event: z.string().regex(/^[a-z][a-z0-9-]*$/), time: z.string() }),
]);

/** Each command's --json result on success, by command id (topics spelled with spaces); events: each line. */
export const OUTPUT_SCHEMAS: Record<string, z.ZodType> = {
  backup: z.union([obj({ ...offlineCopy, dataBytes: bytes, bitmap: z.string().optional(), bitmapLoad: z.string().optional() }), liveJob.extend({ fleecing: z.unknown().optional() })]),
  'bitmap add': bitmapChange,
  'bitmap checkpoint': checkpointInfo.extend({ name: z.string(), changed: z.literal(true), recording: int }),
  'bitmap checkpoints': z.array(checkpointInfo),
  'bitmap clear': bitmapChange,
  'bitmap disable': bitmapChange,
  'bitmap dump': obj({ name: z.string(), file: z.string().nullable(), persistent: z.boolean(), checkpoint: int.nullable(), size: bytes, granularity: bytes, enabled: z.boolean(), frozen: z.boolean(), epoch: int.nullable(), loadState, start: bytes, length: bytes, runs: bytes, dirtyBytes: bytes, percent: z.number() }),
  'bitmap enable': bitmapChange,
  'bitmap fill': bitmapChange,
  'bitmap list': z.array(bitmapInfo),
  'bitmap merge': bitmapChange,
  'bitmap remove': bitmapChange,
  check: obj({ filename: z.string(), format: z.literal('qcow2'), 'check-errors': bytes, 'total-clusters': bytes, messages: z.array(z.string()) }),
  checkpoint: obj({ export: z.string(), epoch: int }),
  commit: z.union([
    obj({ changed: z.boolean(), image: z.string(), base: z.string(), baseFormat: z.string(), intermediates: z.array(z.string()), dataBytes: bytes, zeroBytes: bytes, baseGrownFrom: bytes.nullable(), emptied: z.boolean(), errors: z.array(ioError) }),
    liveJob.extend({ emptied: z.boolean().optional() }),
  ]),
  'config check': obj({ file: z.string(), valid: z.literal(true), values: z.record(z.string(), z.unknown()), argv: z.array(z.string()) }),
  compare: obj({ identical: z.boolean(), offset: bytes.nullable(), sizeA: bytes, sizeB: bytes, reason: z.string().nullable(), bytesCompared: bytes }),
  create: imageInfo.extend({ changed: z.boolean() }),
  demo: obj({ dir: z.string(), kept: z.boolean(), size: bytes, protocol: z.enum(['sync', 'async']), epoch: int, failoverVerified: z.boolean(), failbackVerified: z.boolean(), steps: z.array(obj({ id: z.string(), title: z.string(), ms: z.number(), detail: z.string() })) }),
  failover: failoverResult,
  info: z.union([imageInfo, z.array(imageInfo)]),
  'job cancel': jobInfo,
  'job complete': jobInfo,
  'job list': z.array(jobInfo),
  'job pause': jobInfo,
  'job resume': jobInfo,
  'job set-copy-mode': jobInfo,
  'job set-speed': jobInfo,
  'job show': jobInfo,
  'make-empty': obj({ changed: z.boolean(), seconds: z.number().nonnegative(), images: z.array(obj({ filename: z.string(), format: z.literal('qcow2'), changed: z.boolean(), backingFilename: z.string().nullable(), freedBytes: int })) }),
  map: z.array(obj({ start: bytes, length: bytes, depth: int, present: z.boolean(), zero: z.boolean(), data: z.boolean() })),
  mirror: z.union([obj({ ...offlineCopy, bitmapLoad: z.string().optional() }), jobInfo]),
  replicate: pairStatus,
  'resume-io': obj({ resumed: z.boolean(), waiting: int }),
  'serve-nbd': listening,
  setup: obj({
    changed: z.boolean(),
    role: z.enum(['primary', 'secondary']),
    name: z.string(),
    config: z.string(),
    unit: z.string(),
    files: z.array(obj({ path: z.string(), changed: z.boolean() })),
    disk: obj({ path: z.string(), size: bytes }),
    warnings: z.array(z.string()),
    next: z.array(z.string()),
  }),
  status: obj({
    pid: int,
    startedAt: z.string(),
    uptimeSeconds: bytes,
    shuttingDown: z.boolean(),
    buffers: obj({ limit: bytes, used: bytes, allowance: bytes, waiting: bytes }),
    connections: z.array(obj({ id: int, peer: z.string(), export: z.string().nullable(), state: z.string() })),
    exports: z.array(exportStatus),
    listeners: z.array(obj({ address: z.string() })),
    control: z.string().nullable(),
    bitmaps: z.array(bitmapInfo),
    tls: obj({ mode: z.enum(['off', 'on', 'require']) }),
  }),
  events: eventSchema,
  version: obj({ name: z.string(), version: z.string(), node: z.string(), platform: z.string(), arch: z.string(), native: obj({ loaded: z.boolean() }), plugins: z.array(obj({ name: z.string(), version: z.string() })) }),
};

/** Every schema file shipped in schemas/: name → schema. */
export function schemaFiles(): Array<{ file: string; schema: z.ZodType; title: string }> {
  const files = Object.entries(OUTPUT_SCHEMAS).map(([id, schema]) => ({ file: `${id.replaceAll(' ', '-')}.json`, schema, title: id === 'events' ? 'blkrep events --json: each line (also serve-nbd --json lines, control socket events)' : `blkrep ${id} --json` }));
  files.push({ file: 'error.json', schema: errorSchema, title: 'blkrep COMMAND --json, on failure' });
  return files;
}

/** The JSON Schema (draft 2020-12) of one file, with its title, as the file's text. */
export function jsonSchemaText(entry: { file: string; schema: z.ZodType; title: string }): string {
  const body = z.toJSONSchema(entry.schema, { target: 'draft-2020-12', unrepresentable: 'any' }) as Record<string, unknown>;
  const { $schema, ...rest } = body;
  return `${JSON.stringify({ $schema, title: entry.title, ...rest }, null, 2)}\n`;
}
