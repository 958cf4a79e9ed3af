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
  onCongestion: z.enum(['block', 'pull-ahead']).optional(),
  congestion: obj({ waits: int, waitedMs: z.number().nonnegative(), maxWaitMs: z.number().nonnegative(), waiting: int, episodes: int, overLimit: int }).optional(),
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
  // empty for a secondary until its primary connects (the replica export appears then); status lists its listen addresses
  uris: z.array(z.string()).describe('an NBD URI per listen address and export; empty for a secondary (serve-nbd --secondary) until a primary connects'),
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
 * The events, one schema each (blkrep events --json, the control socket's events): every line
 * has `event` and `time` (ISO 8601), and with --now `now: true` on the lines that tell the current
 * state. Fields that only some lines carry are optional. An event the daemon learns of through the
 * pair link (from the secondary) carries `from: "secondary"`.
 */
const time = z.string().describe('ISO 8601, UTC');
/** the primary's checkpoint steps, ms: drain, both flushes, the secondary's CHECKPOINT→DONE, writes held, the epoch write after the release */
const primaryCheckpointSteps = obj({ preflushMs: z.number(), drainMs: z.number(), flushMs: z.number(), secondaryMs: z.number(), heldMs: z.number(), stateMs: z.number() });
const ev = <N extends string, T extends z.ZodRawShape>(name: N, shape: T, description: string) =>
  obj({ event: z.literal(name), time, now: z.literal(true).optional(), ...shape }).describe(description);
const jobBase = { id: z.string(), type: z.string(), export: z.string().nullable() };
const errFields = { code: z.string(), message: z.string() };
const pathView = obj({ path: z.string(), state: z.string(), lastBeatAgoMs: bytes.nullable(), phi: z.number().nullable() });
const linkView = obj({ state: z.string(), lastBeatAgoMs: bytes.nullable() });
const peerEvent = { peer: z.string(), from: z.string(), silentMs: bytes.nullable(), paths: z.array(pathView), link: linkView.optional() };

export const EVENT_SCHEMAS = {
  'job-status-change': ev('job-status-change', { ...jobBase, status: jobStatus, previous: jobStatus.nullable() }, 'a job changed status (--now: previous null)'),
  'job-ready': ev('job-ready', { ...jobBase, synced: z.boolean() }, 'a mirror or commit is in step: job complete pivots'),
  'job-copy-mode': ev('job-copy-mode', { ...jobBase, from: z.string(), to: z.string(), reason: z.string() }, 'a mirror switched between background and write-blocking'),
  'job-error': ev('job-error', { ...jobBase, side: z.string(), operation: z.string(), errno: z.string(), action: z.string(), offset: bytes, length: bytes, message: z.string() }, 'an I/O error of a job, and what the job did (action)'),
  'job-completed': ev('job-completed', { ...jobBase, length: bytes, offset: bytes, speed: z.number(), error: obj({ ...errFields, errno: z.string() }).optional() }, 'a job ended (error: it failed)'),
  'job-cancelled': ev('job-cancelled', { ...jobBase, length: bytes, offset: bytes, speed: z.number(), consistent: z.boolean() }, 'a job was cancelled'),
  'bitmap-added': ev('bitmap-added', { export: z.string(), name: z.string(), file: z.string().nullable(), persistent: z.boolean(), granularity: bytes, enabled: z.boolean() }, 'bitmap add'),
  'bitmap-removed': ev('bitmap-removed', { export: z.string(), name: z.string(), file: z.string().nullable() }, 'bitmap remove'),
  'bitmap-cleared': ev('bitmap-cleared', { export: z.string(), name: z.string(), ranges: bytes.nullable(), dirtyBytes: bytes }, 'bitmap clear (ranges: how many, null: all)'),
  'bitmap-enabled': ev('bitmap-enabled', { export: z.string(), name: z.string() }, 'bitmap enable'),
  'bitmap-disabled': ev('bitmap-disabled', { export: z.string(), name: z.string() }, 'bitmap disable'),
  'bitmap-merged': ev('bitmap-merged', { export: z.string(), name: z.string(), source: z.unknown(), dirtyBytes: bytes }, 'bitmap merge'),
  'bitmap-filled': ev('bitmap-filled', { export: z.string(), name: z.string(), dirtyBytes: bytes }, 'bitmap fill'),
  'bitmap-checkpoint': ev('bitmap-checkpoint', { export: z.string(), name: z.string(), number: int, path: z.string().nullable(), dirtyBytes: bytes }, 'bitmap checkpoint'),
  connection: ev('connection', { id: int, peer: z.string() }, 'an NBD client connected'),
  disconnect: ev('disconnect', { id: int, peer: z.string(), export: z.string().nullable(), reason: z.string() }, 'an NBD client went away'),
  refused: ev('refused', { peer: z.string(), reason: z.string() }, 'an NBD connection was refused before the handshake'),
  reload: ev('reload', { what: z.array(z.string()), failed: z.unknown() }, 'SIGHUP: what was re-read'),
  shutdown: ev('shutdown', { pid: int }, 'the daemon is stopping'),
  'tls-expiry': ev('tls-expiry', { notAfter: z.string().optional(), warnings: z.array(z.string()) }, 'the TLS certificate expires soon'),
  fence: ev('fence', { peer: z.string(), verdict: z.string(), exitCode: int.nullable(), signal: z.string().nullable(), proceed: z.boolean(), durationMs: z.number(), policy: z.string(), cause: z.enum(['peer-dead', 'link-lost']).optional() }, 'the fence hook ran'),
  'replication-connected': ev('replication-connected', { export: z.string(), peer: z.string(), protocol: z.enum(['sync', 'async']), peerKind: z.string().optional(), role: z.literal('secondary').optional(), rule: z.unknown().optional(), action: z.string().optional() }, 'the pair link is up and forwarding'),
  'replication-degraded': ev('replication-degraded', { export: z.string(), peer: z.string().optional(), role: z.literal('secondary').optional(), reason: z.string(), code: z.string().optional(), diskState: z.string().optional() }, 'forwarding stopped; the peer bitmap keeps what the secondary misses'),
  'replication-congested': ev('replication-congested', { export: z.string(), peer: z.string(), queueBytes: bytes, limit: bytes }, 'async, on-congestion block: the queue is full and writes wait for room'),
  'replication-uncongested': ev('replication-uncongested', { export: z.string(), peer: z.string(), queueBytes: bytes, limit: bytes, waits: int, waitedMs: z.number().nonnegative(), ms: z.number().nonnegative() }, 'no write waits for room and the queue is at most half full again: how many waited, how long in all'),
  'primary-io-error': ev('primary-io-error', { export: z.string(), op: z.enum(['write', 'write-zeroes', 'trim']), offset: int, length: int, code: z.string(), errno: z.string().optional(), message: z.string() }, "a write failed on the primary's disk: the client got its errno; the region stays in the peer bitmap"),
  'replication-plain': ev('replication-plain', { export: z.string(), peer: z.string() }, 'the target is a plain NBD server: no checkpoints'),
  'resync-started': ev('resync-started', { export: z.string(), peer: z.string(), bytes, full: z.boolean() }, 'the primary copies what the secondary misses'),
  'resync-done': ev('resync-done', { export: z.string(), peer: z.string(), bytes, dirtyBytes: bytes, ms: z.number() }, 'the resync finished'),
  'pair-refused': ev('pair-refused', { export: z.string(), peer: z.string(), ...errFields, decision: z.unknown().optional(), rule: z.unknown().optional() }, 'the peer refused the pair (or this node refused the peer)'),
  checkpoint: ev(
    'checkpoint',
    {
      export: z.string(),
      epoch: int,
      ms: z.number(),
      role: z.literal('secondary').optional(),
      steps: z.union([obj({ hold: z.number(), flush: z.number(), committing: z.number(), empty: z.number(), committed: z.number() }), primaryCheckpointSteps]).optional(),
    },
    'a checkpoint was committed, with the step times of the node that publishes it (the primary: preflushMs, drainMs, flushMs, secondaryMs, heldMs, stateMs; the secondary: hold, flush, committing, empty, committed)',
  ),
  'restore-point-lost': ev('restore-point-lost', { export: z.string(), reason: z.string() }, 'a host crash lost the secondary\'s volatile hidden disk: Inconsistent until a full resync'),
  'checkpoint-failed': ev('checkpoint-failed', { export: z.string(), n: int, ...errFields, epoch: int.optional() }, 'a checkpoint failed (on the secondary: `epoch`, the epoch it holds)'),
  'failover-started': ev('failover-started', { export: z.string(), role: z.literal('primary').optional(), to: z.string().optional(), epoch: int.optional(), retry: z.boolean().optional() }, 'a failover began'),
  'failover-done': ev('failover-done', { export: z.string(), role: z.literal('primary').optional(), to: z.string().optional(), epoch: int, bytes: bytes.optional(), ms: z.number() }, 'a failover finished'),
  'failover-failed': ev('failover-failed', { export: z.string(), to: z.string(), epoch: int, step: z.string(), ...errFields }, 'a failover failed at a step'),
  'split-brain': ev('split-brain', { export: z.string(), peer: z.string(), rule: z.unknown(), policy: z.unknown(), keeps: z.unknown(), resolved: z.boolean(), explanation: z.unknown() }, 'the generations say split brain; the policy and what it keeps'),
  salvage: ev('salvage', { export: z.string(), path: z.string(), bytes }, 'the regions a resync overwrites were saved as a qcow2 overlay'),
  'cbw-failed': ev('cbw-failed', { export: z.string(), from: z.literal('secondary'), ...errFields }, 'the secondary could not keep the old data of a write (relayed by the primary)'),
  'secondary-failed': ev('secondary-failed', { export: z.string(), from: z.literal('secondary'), ...errFields }, 'the secondary failed its disk (relayed by the primary)'),
  'peer-alive': ev('peer-alive', peerEvent, 'heartbeat: the peer answers'),
  'peer-suspect': ev('peer-suspect', peerEvent, 'heartbeat: the peer is late'),
  'peer-dead': ev('peer-dead', peerEvent, 'heartbeat: the peer is silent past the limit'),
  'heartbeat-paths-down': ev('heartbeat-paths-down', { peer: z.string(), paths: z.array(pathView), link: linkView }, 'heartbeat: every heartbeat path is dead but the peer answers on the pair link (not declared dead)'),
  'heartbeat-paths-up': ev('heartbeat-paths-up', { peer: z.string(), paths: z.array(pathView), link: linkView }, 'heartbeat: a heartbeat path is heard again after heartbeat-paths-down'),
  'peer-outdated': ev('peer-outdated', { peer: z.string(), export: z.string(), generation: z.string(), incarnation: z.string() }, 'heartbeat: a paired export of the peer reports its disk Outdated (beat version 2)'),
  'lease-acquired': ev('lease-acquired', { key: z.string(), revision: int, ttlS: z.number() }, 'heartbeat-etcd: this node holds the lease'),
  'lease-lost': ev('lease-lost', { key: z.string(), reason: z.string() }, 'heartbeat-etcd: the lease is gone'),
  'io-suspended': ev('io-suspended', { reason: z.string(), cause: z.enum(['no-quorum', 'peer-dead', 'link-lost']) }, 'writes are held (quorum lost, --fencing: the peer dead or the data link lost)'),
  'io-resumed': ev('io-resumed', { by: z.string(), waiting: bytes }, 'held writes go on'),
  demoted: ev('demoted', { reason: z.string(), refusedWaiting: bytes }, 'this primary stepped down'),
  'failover-deferred': ev('failover-deferred', { peer: z.string(), checkpoint: z.unknown() }, 'auto failover waits for a checkpoint in flight'),
  'auto-failover': ev('auto-failover', { peer: z.string(), failedOver: z.boolean(), fence: z.string().nullable(), code: z.string().nullable(), reason: z.string().nullable() }, 'the heartbeat decided on a failover, and whether it happened'),
} as const;

/**
 * One event line (blkrep events --json, the control socket's events, serve-nbd's listening and
 * stopped lines): each known event by its own schema (EVENT_SCHEMAS, schemas/events/NAME.json).
 */
export const eventSchema = z.union([listening, obj({ event: z.literal('stopped'), pid: int }), ...Object.values(EVENT_SCHEMAS)]);

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
    clock: obj({ synchronized: z.boolean().nullable(), source: z.string() }),
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
  for (const [name, schema] of Object.entries(EVENT_SCHEMAS)) files.push({ file: `events/${name}.json`, schema, title: `blkrep events --json: the event "${name}"` });
  return files;
}

/** The JSON Schema (draft 2020-12) of one file, with its title, as the file's text. */
export function jsonSchemaText(entry: { file: string; schema: z.ZodType; title: string }): string {
  const body = z.toJSONSchema(entry.schema, { target: 'draft-2020-12', unrepresentable: 'any' }) as Record<string, unknown>;
  const { $schema, ...rest } = body;
  return `${JSON.stringify({ $schema, title: entry.title, ...rest }, null, 2)}\n`;
}
