/**
 * Jobs on the serve-nbd daemon: the registry of job types, the daemon's JobManager, the `job-*`
 * control verbs, the relay of job events to control subscribers, and the job state files that
 * let a job survive a crash or a restart.
 *
 * ## Adding a job type
 *
 * 1. In a file of its own (e.g. `src/jobs/live-backup.ts`), call
 *
 *        registerJobType('backup', {
 *          summary: 'Copy a point-in-time view of the export onto a target …',
 *          args: LIVE_BACKUP_ARGS,   // z.strictObject({ target: arg.name().describe(…), … })
 *          start: async (ctx) => new BackupJob({ id: ctx.id, source: ctx.export.tracking, … }),
 *          load: async (ctx, saved) => …,   // optional: a job persisted by an earlier run
 *        });
 *
 *    `start` gets a JobContext: the job's id, the export (its name, image, the tracking filter
 *    every write of the export passes through, its bitmaps, and `switchFront()` / `switchImage()`
 *    to route the export through the job or onto another image), the `args` of the
 *    `job-start` request (already checked against the type's `args` schema: every field's type
 *    is right; checks of several fields together are the type's own), where its files go (`stateBase`), `publish()`, `onStop()`,
 *    `describe()` (fields added to the job's query) and `addExport()` (serve a node read-only
 *    as one more export of the daemon's own NBD server, on its listeners). It
 *    returns the job CREATED, not started: the registry adds it to the manager (which relays its
 *    events) and starts it. Throw badJobArg(…) or BlkrepError('ERR_JOB_INVALID', …) for args
 *    that do not fit together; close what you opened before throwing. The schema's fields and
 *    descriptions appear in blkrep-control(7) (run `npm run man`).
 * 2. Add `import './live-backup.js';` to `src/jobs/daemon-job-types.ts` — the one list of
 *    side-effect imports the daemon loads, so every type registers before the control socket
 *    answers.
 *
 * A type that persists its state writes `saveJobState()` to `jobStatePath(stateBase)` and is
 * given the saved state back in `load()` when the daemon starts again; it must come back
 * paused (ask for the pause before the registry starts it: `void job.pause()` on a created job).
 *
 * ## Events
 *
 * Every job event goes to control subscribers as `job-EVENT` with the job's `id`, `type` and
 * `export`: job-status-change, job-ready, job-copy-mode, job-error, job-completed,
 * job-cancelled. Jobs loaded from their state files at start are loaded before the control
 * socket answers (nobody could see an event): the daemon's listening line lists them.
 */
import { readdir, rename, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { z } from 'zod';
import { checkExportName, checkJobId } from '../util/names.js';
import { readOwnFile, replaceFile, UntrustedFileError } from '../util/safe-file.js';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import type { BlockNode } from '../api/block.js';
import type { ExportBitmaps } from '../bitmap/export-bitmaps.js';
import type { DirtyTrackingNode } from '../block/filters/tracking.js';
import type { ControlVerbRegistry as ControlServer } from '../api/control.js';
import { arg, NO_ARGS, parseVerbArgs, verb, type VerbSpec } from '../control/verb.js';
import type { Logger } from '../nbd/server.js';
import { Job, JobManager, type JobEvent, type JobInfo } from './job.js';

// ------------------------------------------------------------------------------- the contract

/** An export of the daemon, as a job sees it. */
export interface JobExport {
  readonly name: string;
  /** the image spec the export was started with (a path, memory:SIZE, an NBD URI) */
  readonly image: string;
  /** the image's file path when it is a regular file (job files go beside it), else undefined */
  readonly imagePath: string | undefined;
  readonly readOnly: boolean;
  readonly size: number;
  /** every write of the export passes through it (its bitmaps record them): a job's source */
  readonly tracking: DirtyTrackingNode;
  readonly bitmaps: ExportBitmaps;
  /** what the export forwards to now (above the tracking filter) */
  readonly front: BlockNode;
  /** the image under the tracking filter now (another one after a pivot) */
  readonly imageNode: BlockNode;
  /** Route the export's requests through `node` (a job's front end), or back to `tracking`. Resolves when the requests in flight on the old one finished. */
  switchFront(node: BlockNode): Promise<void>;
  /** Put `node` under the tracking filter in place of the image (a pivot): the export's bitmaps keep recording. */
  switchImage(node: BlockNode): Promise<void>;
  /** The daemon closes `node` when it stops (the export's image after a pivot). */
  keepOpen(node: BlockNode): void;
}

/** A read-only export a job added to the daemon's own NBD server (JobContext.addExport). */
export interface JobServedExport {
  readonly name: string;
  /** the URIs a client uses: one per listener of the daemon (TCP, Unix …) */
  readonly uris: string[];
  /**
   * Stop serving it: new connections no longer see it (LIST, INFO and GO), the clients attached
   * to it are disconnected. Idempotent; the node is not closed (it is the job's).
   */
  remove(reason?: string): void;
}

/** How the daemon serves a job's export: on its NbdServer, read-only. Throws ERR_EXPORT_EXISTS for a name in use. */
export type ServeJobExport = (name: string, node: BlockNode, description: string | undefined) => JobServedExport;

export interface JobContext {
  id: string;
  type: string;
  export: JobExport;
  /** the job-start request's args, less type, export and id */
  args: Record<string, unknown>;
  /** prefix of the job's files, `IMAGE.job-ID` beside a file image; undefined: nothing persists */
  stateBase: string | undefined;
  publish(event: string, fields: object): void;
  log: Logger;
  /**
   * What to do when the daemon stops while the job is not concluded (default: cancel with
   * force). A persistent job pauses and saves its state instead, to be loaded at the next start.
   */
  onStop(fn: () => Promise<void>): void;
  /** Fields the daemon adds to the job's query (job-query, job-list): target, state files … */
  describe(fn: () => Record<string, unknown>): void;
  /**
   * Serve `node` read-only as export `name` of the daemon's own NBD server, on every listener
   * the daemon has, until the returned export's remove() — or, at the latest, until the job
   * concludes. A name the server has already is refused (ERR_EXPORT_EXISTS); a daemon without an
   * NBD server for jobs (a test's) refuses with ERR_JOB_UNSUPPORTED.
   */
  addExport(name: string, node: BlockNode, description?: string): JobServedExport;
}

export interface SavedJobState {
  version: 1;
  id: string;
  type: string;
  export: string;
  status: string;
  /** incremented at every save */
  generation: number;
  savedAt: string;
  /** what the type needs to load it again (target, options …) */
  options: Record<string, unknown>;
}

export interface JobType {
  /** one line for blkrep-control(7): what a job of this type does */
  summary: string;
  /**
   * The schema of job-start's args for this type (less type, export and id): checked before
   * start() runs, which gets them parsed in `ctx.args`. A strict object refuses unknown fields.
   */
  args: z.ZodObject;
  /** A new job from a job-start request: created, not started. */
  start(ctx: JobContext): Promise<Job>;
  /** A job persisted by an earlier run of the daemon: created, with a pause asked for. */
  load?(ctx: JobContext, saved: SavedJobState, file: string): Promise<Job>;
}

const registry = new Map<string, JobType>();

/** Make a job type startable with `job-start {type}` (see the file comment). */
export function registerJobType(type: string, jobType: JobType): void {
  if (!/^[a-z][a-z0-9-]{0,31}$/.test(type)) throw new BlkrepError('ERR_INTERNAL', `job type "${type}" is not a lowercase name`);
  if (registry.has(type)) throw new BlkrepError('ERR_INTERNAL', `job type "${type}" is registered twice`);
  registry.set(type, jobType);
}

export function jobTypes(): string[] {
  return [...registry.keys()].sort();
}

/** A registered type's summary and argument schema (for blkrep-control(7)). */
export function jobTypeSpec(type: string): Pick<JobType, 'summary' | 'args'> | undefined {
  return registry.get(type);
}

// ------------------------------------------------------------------------------- state files

const STATE_MARK = '.job-';
const STATE_SUFFIX = '.json';

/** `IMAGE.job-ID` */
export function jobStateBase(imagePath: string, id: string): string {
  return `${imagePath}${STATE_MARK}${id}`;
}

/** `IMAGE.job-ID.json` */
export function jobStatePath(stateBase: string): string {
  return `${stateBase}${STATE_SUFFIX}`;
}

/**
 * Write `state` to `path` atomically and durably, mode 0600: a temporary file of a random name
 * (O_EXCL|O_NOFOLLOW), fsync, rename, fsync of the directory (util/safe-file.ts).
 */
export async function saveJobState(path: string, state: SavedJobState): Promise<void> {
  await replaceFile(path, `${JSON.stringify(state, null, 2)}\n`, { mode: 0o600, what: 'job state file' });
}

/** The job state files beside an image. */
export async function findJobStates(imagePath: string): Promise<string[]> {
  const prefix = `${basename(imagePath)}${STATE_MARK}`;
  let entries: string[];
  try {
    entries = await readdir(dirname(imagePath));
  } catch {
    return [];
  }
  return entries
    .filter((e) => e.startsWith(prefix) && e.endsWith(STATE_SUFFIX))
    .sort()
    .map((e) => join(dirname(imagePath), e));
}

/**
 * Read a job state file, trusting only one this daemon's user could have written: the image's
 * directory may be shared (/tmp, a group's directory), and a planted file would start a job the
 * operator never asked for. Opened O_NOFOLLOW|O_NONBLOCK (a symlink or a FIFO is refused, never
 * followed or waited on), then it must be a regular file owned by this user (or root) that no
 * other user may write.
 */
export async function readJobState(path: string): Promise<SavedJobState> {
  let state: SavedJobState;
  try {
    state = JSON.parse(await readOwnFile(path)) as SavedJobState;
  } catch (err) {
    if (err instanceof UntrustedFileError) throw untrusted(path, err.why);
    throw toBlkrepError(err, `cannot read job state file "${path}"`);
  }
  if (state?.version !== 1 || typeof state.id !== 'string' || typeof state.type !== 'string' || typeof state.options !== 'object') {
    throw new BlkrepError('ERR_JOB_INVALID', `job state file "${path}" is not a blkrep job state (version 1)`, { errno: 'EINVAL', details: { path } });
  }
  return state;
}

function untrusted(path: string, why: string): BlkrepError {
  return new BlkrepError('ERR_JOB_INVALID', `job state file "${path}" ${why}: not one this daemon wrote (it writes them mode 0600), not trusted`, { errno: 'EINVAL', details: { path } });
}

export async function removeJobFiles(stateBase: string, suffixes: string[]): Promise<void> {
  for (const s of [STATE_SUFFIX, ...suffixes]) await rm(`${stateBase}${s}`, { force: true });
}

// -------------------------------------------------------------------------------- the registry

function badRequest(message: string): BlkrepError {
  return new BlkrepError('ERR_BAD_REQUEST', message, { errno: 'EINVAL' });
}

// ------------------------------------------------------------------------------ the job verbs

const idArg = arg.name().describe('the job id, a string');
const byId = z.object({ id: idArg });
const QUERY = "the job's query";
const NOT_FOUND = ['ERR_JOB_NOT_FOUND'] as const;
const ID_AND_STATE = ['ERR_JOB_NOT_FOUND', 'ERR_JOB_STATE'] as const;
const STATUS_EVENTS = ['job-status-change'] as const;

/** The job verbs without their handlers: what blkrep-control(7) documents. */
export const JOB_VERB_SPECS = {
  'job-start': {
    name: 'job-start',
    summary: 'Start a job on an export. The other fields are the arguments of the job type (below).',
    args: z.looseObject({
      type: z.string({ error: 'must be a job type name' }).describe('the job type: mirror, backup, commit'),
      export: arg.string().optional().describe('the export; may be left out when the daemon serves one'),
      id: arg.name().optional().describe('the job id (default: the type and a number)'),
    }),
    result: QUERY,
    events: ['job-status-change', 'job-ready', 'job-copy-mode', 'job-error', 'job-completed', 'job-cancelled'],
    errors: ['ERR_JOB_INVALID', 'ERR_NO_EXPORT', 'ERR_JOB_EXISTS', 'ERR_EXPORT_BUSY', 'ERR_SHUTTING_DOWN', 'ERR_SIZE_MISMATCH'],
  },
  'job-list': {
    name: 'job-list',
    summary: 'The query of every job not concluded, of one export or of all.',
    args: z.object({ export: arg.string().optional().describe('only the jobs of this export') }),
    result: 'the queries, one per job',
  },
  'job-types': { name: 'job-types', summary: 'The job types job-start knows.', args: NO_ARGS, result: 'the type names, e.g. ["backup", "commit", "mirror"]' },
  'job-query': { name: 'job-query', summary: 'One job, also one concluded a short while ago.', args: byId, result: QUERY, errors: NOT_FOUND },
  'job-pause': { name: 'job-pause', summary: 'Pause a job; answers once it has paused.', args: byId, result: QUERY, events: STATUS_EVENTS, errors: ID_AND_STATE },
  'job-resume': { name: 'job-resume', summary: 'Resume a paused job.', args: byId, result: QUERY, events: STATUS_EVENTS, errors: ID_AND_STATE },
  'job-set-speed': {
    name: 'job-set-speed',
    summary: "Change a job's speed limit.",
    args: byId.extend({ speed: arg.number().describe('bytes per second, 0 = unlimited') }),
    result: QUERY,
    errors: ID_AND_STATE,
  },
  'job-set-copy-mode': {
    name: 'job-set-copy-mode',
    summary: "Change a mirror's copy mode.",
    args: byId.extend({ mode: arg.string().describe('background, write-blocking or auto') }),
    result: QUERY,
    events: ['job-copy-mode'],
    errors: [...ID_AND_STATE, 'ERR_JOB_UNSUPPORTED', 'ERR_JOB_INVALID'],
  },
  'job-complete': {
    name: 'job-complete',
    summary: 'Complete a ready job (a mirror drains, then pivots); answers once it has concluded.',
    args: byId.extend({ pivot: arg.bool().optional().describe('false: leave the export on its image') }),
    result: QUERY,
    events: [...STATUS_EVENTS, 'job-completed'],
    errors: ID_AND_STATE,
  },
  'job-cancel': {
    name: 'job-cancel',
    summary: 'Cancel a job; answers once it has concluded.',
    args: byId.extend({ force: arg.bool().optional().describe('true: stop at once, the target is not consistent') }),
    result: QUERY,
    events: [...STATUS_EVENTS, 'job-cancelled'],
    errors: ID_AND_STATE,
  },
} as const satisfies Record<string, VerbSpec>;

/** How many concluded jobs job-query still answers for. */
const KEEP_CONCLUDED = 32;

export interface DaemonJobsOptions {
  exports: Map<string, JobExport>;
  publish: (event: string, fields: object) => void;
  log?: Logger;
  /** serve a job's node as an export of the daemon's NBD server (JobContext.addExport) */
  serveExport?: ServeJobExport;
}

/** The daemon's jobs (one JobManager) and their control verbs. */
export class DaemonJobs {
  readonly manager = new JobManager();
  private readonly exports: Map<string, JobExport>;
  private readonly publish: (event: string, fields: object) => void;
  private readonly log: Logger;
  private readonly serveExport: ServeJobExport | undefined;
  /** job id → the exports it added to the daemon's server (removed when it concludes, at the latest) */
  private readonly served = new Map<string, Set<JobServedExport>>();
  /** job id → export name */
  private readonly exportOf = new Map<string, string>();
  /** export name → the job routing it */
  private readonly owner = new Map<string, string>();
  private readonly stoppers = new Map<string, () => Promise<void>>();
  private readonly describers = new Map<string, () => Record<string, unknown>>();
  private readonly concluded = new Map<string, Job>();
  private stopping = false;

  constructor(options: DaemonJobsOptions) {
    this.exports = options.exports;
    this.publish = options.publish;
    this.log = options.log ?? (() => {});
    this.serveExport = options.serveExport;
    this.manager.on('event', (e: JobEvent) => {
      const { event, ...fields } = e;
      this.publish(`job-${event}`, { ...fields, export: this.exportOf.get(e.id) ?? null });
    });
  }

  private findExport(name: unknown): JobExport {
    if (name === undefined) {
      if (this.exports.size === 1) return [...this.exports.values()][0]!;
      throw badRequest(`the daemon serves ${this.exports.size} exports: say which with "export" (${[...this.exports.keys()].map((n) => `"${n}"`).join(', ')})`);
    }
    if (typeof name !== 'string') throw badRequest('"export" must be a string');
    const e = this.exports.get(name);
    if (!e) throw new BlkrepError('ERR_NO_EXPORT', `the daemon has no export "${name}" (it has ${[...this.exports.keys()].map((n) => `"${n}"`).join(', ')})`, { errno: 'EINVAL', details: { export: name } });
    return e;
  }

  /** The image under an export's tracking filter now. */
  exportNode(name: string): BlockNode | undefined {
    return this.exports.get(name)?.imageNode;
  }

  /** A job by id: a live one, or one concluded recently (its verbs then fail ERR_JOB_STATE). */
  job(id: string): Job {
    if (this.manager.has(id)) return this.manager.get(id);
    const done = this.concluded.get(id);
    if (done) return done;
    return this.manager.get(id); // throws ERR_JOB_NOT_FOUND
  }

  private withDaemonFields(q: JobInfo): JobInfo {
    let extra: Record<string, unknown> = {};
    try {
      extra = this.describers.get(q.id)?.() ?? {};
    } catch {
      // a query never fails for the extras
    }
    return { ...q, ...extra, export: this.exportOf.get(q.id) ?? null };
  }

  query(id: string): JobInfo {
    return this.withDaemonFields(this.job(id).query());
  }

  list(exportName?: string): JobInfo[] {
    return this.manager
      .list()
      .map((q) => this.withDaemonFields(q))
      .filter((q) => exportName === undefined || q.export === exportName);
  }

  private context(id: string, type: string, exp: JobExport, args: Record<string, unknown>): JobContext {
    return {
      id,
      type,
      export: exp,
      args,
      stateBase: exp.imagePath === undefined ? undefined : jobStateBase(exp.imagePath, id),
      publish: this.publish,
      log: this.log,
      onStop: (fn) => this.stoppers.set(id, fn),
      describe: (fn) => this.describers.set(id, fn),
      addExport: (name, node, description) => {
        checkExportName(name);
        if (!this.serveExport) throw new BlkrepError('ERR_JOB_UNSUPPORTED', `this daemon cannot serve export "${name}" for job ${id}`, { errno: 'ENOTSUP', details: { id, export: name } });
        const served = this.serveExport(name, node, description);
        let set = this.served.get(id);
        if (!set) this.served.set(id, (set = new Set()));
        const own = set;
        own.add(served);
        return {
          name: served.name,
          get uris() {
            return served.uris;
          },
          remove: (reason) => {
            own.delete(served);
            served.remove(reason);
          },
        };
      },
    };
  }

  /** Remove what a job still serves on the daemon's server. */
  private unserve(id: string, reason: string): void {
    const set = this.served.get(id);
    this.served.delete(id);
    for (const s of set ?? []) s.remove(reason);
  }

  private adopt(job: Job, exp: JobExport): void {
    this.exportOf.set(job.id, exp.name);
    this.owner.set(exp.name, job.id);
    void job.whenConcluded().then(() => {
      if (this.owner.get(exp.name) === job.id) this.owner.delete(exp.name);
      this.unserve(job.id, `job ${job.id} concluded`);
      this.stoppers.delete(job.id);
      this.concluded.set(job.id, job);
      while (this.concluded.size > KEEP_CONCLUDED) this.concluded.delete(this.concluded.keys().next().value!);
    });
    this.manager.add(job);
  }

  /** job-start: {type, export?, id?, …args} → the job's query. */
  async start(raw: unknown): Promise<JobInfo> {
    if (this.stopping) throw new BlkrepError('ERR_SHUTTING_DOWN', 'the daemon is stopping', { errno: 'ESHUTDOWN' });
    const { type, export: exportName, id: wantedId, ...rest } = parseVerbArgs('job-start', JOB_VERB_SPECS['job-start'].args, raw);
    const jobType = registry.get(type);
    if (!jobType) throw new BlkrepError('ERR_JOB_INVALID', `no job type "${type}" (types: ${jobTypes().join(', ') || 'none'})`, { errno: 'EINVAL', details: { type } });
    const args = parseVerbArgs('job-start', jobType.args, rest, `job type ${type}`);
    const exp = this.findExport(exportName);
    // the id becomes part of the job's file names (IMAGE.job-ID.json)
    const id = wantedId === undefined ? this.manager.newId(type) : checkJobId(wantedId);
    if (this.manager.has(id)) throw new BlkrepError('ERR_JOB_EXISTS', `a job with id ${id} exists already`, { errno: 'EINVAL', details: { id } });
    const busy = this.owner.get(exp.name);
    if (busy !== undefined) {
      throw new BlkrepError('ERR_EXPORT_BUSY', `export "${exp.name}" is in use by job ${busy}: one job per export at a time`, { errno: 'EINVAL', details: { export: exp.name, job: busy } });
    }
    this.concluded.delete(id);
    this.describers.delete(id);
    let job: Job;
    try {
      job = await jobType.start(this.context(id, type, exp, args));
    } catch (err) {
      this.unserve(id, `job ${id} did not start`);
      throw err;
    }
    this.adopt(job, exp);
    return this.query(id);
  }

  /** At start: load every job state file beside each export's image, as a paused job. */
  async loadPersisted(): Promise<void> {
    for (const exp of this.exports.values()) {
      if (exp.imagePath === undefined) continue;
      for (const file of await findJobStates(exp.imagePath)) {
        try {
          const saved = await readJobState(file);
          // the id names the job's files: it must be the one in the file's own name
          checkJobId(saved.id);
          if (basename(file) !== basename(jobStatePath(jobStateBase(exp.imagePath, saved.id)))) {
            throw new BlkrepError('ERR_JOB_INVALID', `job state file ${file} holds job id "${saved.id}", which is not the one in its name`, { errno: 'EINVAL', details: { path: file, id: saved.id } });
          }
          const jobType = registry.get(saved.type);
          if (!jobType?.load) throw new BlkrepError('ERR_JOB_INVALID', `job type "${saved.type}" cannot be loaded from a state file`, { errno: 'EINVAL' });
          if (saved.export !== exp.name) this.log('warn', `job state file ${file} names export "${saved.export}"; loading it for export "${exp.name}" whose image it is beside`);
          if (this.owner.has(exp.name)) throw new BlkrepError('ERR_EXPORT_BUSY', `export "${exp.name}" already has job ${this.owner.get(exp.name)}`, { errno: 'EINVAL' });
          const job = await jobType.load(this.context(saved.id, saved.type, exp, {}), saved, file);
          this.adopt(job, exp);
          this.log('info', `job ${job.id} (${job.type} of export "${exp.name}") loaded from ${file}, paused: resume it with blkrep job resume ${job.id}`);
        } catch (err) {
          // Its files missed every write since: never load them later. Kept for a look, renamed.
          const kept = `${file}.failed`;
          await rename(file, kept).catch(() => {});
          this.log('warn', `job state file ${file} not loaded (${(err as Error).message}); renamed ${kept}: start the job anew`);
        }
      }
    }
  }

  /** Daemon stop: each job's onStop (persistent jobs pause and save), the others cancelled with force. */
  async shutdown(): Promise<void> {
    this.stopping = true;
    await Promise.all(
      this.manager.list().map(async (q) => {
        const job = this.manager.get(q.id);
        const stop = this.stoppers.get(q.id);
        try {
          if (stop) await stop();
          else if (job.status !== 'concluded') await job.cancel({ force: true });
        } catch (err) {
          this.log('warn', `job ${q.id}: ${(err as Error).message}`);
        }
      }),
    );
  }

  /** The job-* control verbs. */
  register(control: ControlServer): void {
    const on = <K extends keyof typeof JOB_VERB_SPECS>(name: K, handler: (args: z.output<(typeof JOB_VERB_SPECS)[K]['args']>) => unknown): void => {
      control.register(verb(JOB_VERB_SPECS[name] as VerbSpec, (a) => handler(a as z.output<(typeof JOB_VERB_SPECS)[K]['args']>)));
    };
    on('job-start', (a) => this.start(a));
    on('job-list', (a) => this.list(a.export));
    on('job-types', () => jobTypes());
    on('job-query', (a) => this.query(a.id));
    on('job-pause', async ({ id }) => {
      await this.job(id).pause();
      return this.query(id);
    });
    on('job-resume', ({ id }) => {
      this.job(id).resume();
      return this.query(id);
    });
    on('job-set-speed', ({ id, speed }) => {
      this.job(id).setSpeed(speed);
      return this.query(id);
    });
    on('job-set-copy-mode', ({ id, mode }) => {
      const job = this.job(id) as Job & { setCopyMode?: (m: string) => void };
      if (typeof job.setCopyMode !== 'function') throw new BlkrepError('ERR_JOB_UNSUPPORTED', `a ${job.type} job has no copy mode`, { errno: 'ENOTSUP', details: { id } });
      job.setCopyMode(mode);
      return this.query(id);
    });
    on('job-complete', async ({ id, pivot }) => {
      await this.job(id).complete(pivot === undefined ? {} : { pivot });
      return this.query(id);
    });
    on('job-cancel', async ({ id, force }) => {
      await this.job(id).cancel({ force: force === true });
      return this.query(id);
    });
  }
}

/**
 * A job-start argument that is wrong in a way its schema cannot say (a combination of fields):
 * ERR_BAD_REQUEST, EINVAL.
 */
export function badJobArg(message: string): BlkrepError {
  return badRequest(message);
}

/** A parsed object without its undefined fields (optional fields stay absent). */
export function definedFields<T extends object>(o: T): { [K in keyof T]: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as { [K in keyof T]: Exclude<T[K], undefined> };
}
