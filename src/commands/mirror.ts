import { Args, Flags } from '@oclif/core';
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { PersistentBitmap } from '../bitmap/persistent.js';
import { BlkrepCommand } from '../cli/base.js';
import { sizeFlag, secondsFlag, waitFlag, withBareWait } from '../cli/flags.js';
import type { ImageFormat } from '../block/open.js';
import { filterFlag, openImageWithFilters, parseFilters } from '../cli/image.js';
import type { Progress } from '../cli/progress.js';
import { ERROR_POLICIES, type ErrorPolicy, type JobEvent } from '../jobs/job.js';
import { BITMAP_MODES, COPY_MODES, DEFAULT_BUF_SIZE, DEFAULT_MAX_OPS, MirrorJob, mirrorMark as mark, type BitmapMode, type CopyMode, type MirrorMark, type MirrorSync } from '../jobs/mirror.js';
import { checkTargetEmpty } from '../jobs/target-check.js';
import { createTarget } from '../cli/create-target.js';
import { formatSize } from '../util/size.js';
import type { ControlEvent } from '../control/protocol.js';
import type { JobQuery } from '../cli/job-command.js';
import { controlPathFor } from '../cli/control-path.js';
import { absoluteImageSpec } from '../cli/socket-uri.js';
import { envFlag } from '../util/env.js';
// the control client, the job follower and the progress bar load only when used (--control; a
// terminal): an offline mirror starts without compiling them

export interface MirrorResult {
  source: string;
  target: string;
  sync: string;
  granularity: number;
  /** bytes the job processed (data copied and zero ranges written) */
  bytes: number;
  /** bytes of the disk */
  size: number;
  seconds: number;
  /** bytes per second */
  rate: number;
  /** target requests sent */
  targetRequests: number;
  errors: Array<{ side: string; operation: string; errno: string; action: string; offset: number; length: number; message: string }>;
  /** sync=bitmap: how the bitmap file loaded */
  bitmapLoad?: string;
}

/**
 * BLKREP_BENCH_PHASES=1 (bench/mirror): an offline mirror writes one line to stderr,
 * `blkrep-phases {...}`: for each moment, the ms since the process started (performance.now())
 * and the CPU ms the process used so far — run (the command starts: node and the modules
 * loaded), job (the images open: the job starts), copying (the scan done), flush (the first
 * consistency point's flush issued: everything copied), ready (that flush done), concluded,
 * closed (the images closed). Not part of the command's output.
 */
function benchPhases(): boolean {
  return envFlag('BLKREP_BENCH_PHASES');
}

export default class Mirror extends BlkrepCommand {
  static override summary = 'Copy an image onto another with the mirror job: offline, or live on an export of serve-nbd.';

  static override description = `Runs a mirror job from SOURCE to TARGET and exits when TARGET is a consistent copy of SOURCE: everything copied, then the target flushed. The source is opened read-only; the target must exist and have the source's size.
A target that already holds data (an allocated, non-zero extent: SEEK_DATA for a file, the qcow2 allocation, NBD block status; its size alone does not count) is overwritten only with --existing, as QEMU's mode=existing: otherwise the command (live: the job start) fails with ERR_TARGET_NOT_EMPTY naming the target and where its data starts. A target that cannot report its allocation counts as holding data. --sync bitmap onto an earlier copy needs --existing. --create (offline) makes TARGET first, as qemu-img convert and QEMU's mode=absolute-paths do: a new image of the source's size in --target-format or the source's format (raw or qcow2); a TARGET that exists is never replaced (ERR_EXISTS), and --create with --existing is a usage error.
Ranges the source reports as zeros or holes are sent as write-zeroes (holes may be punched on the target), never as data, and so are granules of data that read as zeros. With --target-is-zero, zero ranges are not sent at all.
Up to --max-ops copy operations of up to --buf-size bytes are in flight at once. --speed limits the data rate.
Errors follow --on-source-error and --on-target-error: report (the default: stop with an error), ignore (retry the region later), stop or enospc (offline there is nobody to resume the job, so a stop ends it with an error too).
A progress bar with the rate and the time left is shown on a terminal. With --json the result is printed as JSON.

Live: with --control PATH [--export NAME] TARGET, the serve-nbd daemon behind PATH mirrors the export (a relative path in TARGET, also in an NBD URI's socket=, is taken from the current directory) while its clients keep writing it. The job copies (copy phase), then is ready (the target is in step), and from then on every new write follows. It runs until blkrep job complete (pivot: the export serves TARGET from then on; --no-pivot: a consistent copy is left) or blkrep job cancel. The command starts it and prints its id (--json: the job's query object); --wait ready or --wait done follows it (a progress bar on a terminal) and exits once it is ready or has concluded. --sync bitmap:NAME names a bitmap of the export; with --bitmap-mode on-success (the default) it is cleared once the target is a consistent copy (at complete, or at the cancel of a ready job), never leaves it alone, always is refused. When the export's image is a file, the job's state and dirty bitmap are kept beside it (IMAGE.job-ID.json, IMAGE.job-ID.dirty): after a crash or a restart the daemon loads the job paused, and blkrep job resume copies only what is still dirty.
Exit status: 0 done (live: started, or ready/done with --wait); 1 failure (ERR_TARGET_NOT_EMPTY; live: the job failed or was cancelled while waited for, ERR_JOB_EXISTS, ERR_JOB_ID, ERR_EXPORT_BUSY, the daemon not reachable); 2 usage error.`;

  static override examples = [
    { description: 'Copy a disk image to an NBD server', command: '<%= config.bin %> <%= command.id %> disk.img nbd+unix:///disk?socket=/run/replica.sock' },
    { description: 'Into a new qcow2 image of the source\'s size (refused if it exists)', command: '<%= config.bin %> <%= command.id %> disk.img copy.qcow2 --create --target-format qcow2' },
    { description: 'Onto a fresh, all-zero target: skip the zeros', command: '<%= config.bin %> <%= command.id %> disk.img nbd://replica/disk --target-is-zero' },
    { description: 'Rehearse a flaky target: one write in ten fails (seeded), retried later', command: '<%= config.bin %> <%= command.id %> disk.img replica.img --target-filter error:ops=write,rate=0.1,seed=7 --on-target-error ignore' },
    { description: 'Only the regions a bitmap marks dirty, onto the earlier copy, at most 100 MiB/s', command: '<%= config.bin %> <%= command.id %> disk.img nbd://replica/disk --sync bitmap:disk.img.bitmap --existing --speed 100M' },
    { description: 'Live: mirror export "disk" of a running daemon onto a new disk, wait until it is in step, then pivot', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --export disk /var/lib/new.img --wait ready && <%= config.bin %> job complete mirror0 --control /run/blkrep/ctl.sock' },
  ];

  static override args = {
    source: Args.string({ description: 'the image to copy (a path, nbd:// URI, or memory:SIZE); left out with --control', required: false }),
    target: Args.string({ description: 'the image to copy onto (same size as the source)', required: false }),
  };

  static override flags = {
    format: Flags.string({ char: 'f', description: 'format of the source (probed when not given)', options: ['raw', 'qcow2'], helpValue: 'FORMAT' }),
    'target-format': Flags.string({ char: 'F', description: 'format of the target (probed when not given)', options: ['raw', 'qcow2'], helpValue: 'FORMAT' }),
    filter: filterFlag('stack a filter on the source (error, delay; see blkrep-filters(7)); repeatable, the first outermost'),
    'target-filter': filterFlag('stack a filter on the target; repeatable, the first outermost'),
    sync: Flags.string({
      description: 'what to copy: full, top (what the top layer of the source holds), none (nothing offline), bitmap:PATH (the regions dirty in the bitmap file PATH)',
      default: 'full',
      helpValue: 'MODE',
    }),
    'bitmap-mode': Flags.string({ description: 'sync bitmap: clear the copied regions from the bitmap on success, always, or never', options: [...BITMAP_MODES], default: 'on-success' }),
    granularity: sizeFlag({ description: 'bytes per dirty bit: a power of two from 512 to 64M (default 64K, or the bitmap\'s)', helpValue: 'SIZE' }),
    'buf-size': sizeFlag({ description: `most bytes one copy operation moves (default ${formatSize(DEFAULT_BUF_SIZE)})`, helpValue: 'SIZE' }),
    'max-ops': Flags.integer({ description: `copy operations in flight (default ${DEFAULT_MAX_OPS})`, min: 1, max: 1024, helpValue: 'N' }),
    speed: sizeFlag({ description: 'limit the data rate to SIZE bytes per second (0: no limit)', helpValue: 'SIZE' }),
    create: Flags.boolean({ description: "offline: create TARGET first (as qemu-img convert): the source's size, --target-format or the source's format; refused when TARGET exists (ERR_EXISTS)", default: false }),
    existing: Flags.boolean({
      description: 'TARGET may hold data already: mirror onto it, overwriting it (as QEMU mode=existing); without it a target with data is refused (ERR_TARGET_NOT_EMPTY)',
      default: false,
    }),
    'target-is-zero': Flags.boolean({ description: 'the target reads as zeros: do not write the zero ranges', default: false }),
    'copy-mode': Flags.string({ description: 'background, write-blocking or auto (they differ only when the source is written while the job runs)', options: [...COPY_MODES], default: 'background' }),
    'max-lag': secondsFlag({ description: 'copy mode auto: switch to write-blocking when no consistency point came for this many seconds (default 10)', helpValue: 'SECONDS' }),
    'on-source-error': Flags.string({ description: 'what a source read error does', options: [...ERROR_POLICIES], default: 'report' }),
    'on-target-error': Flags.string({ description: 'what a target write error does', options: [...ERROR_POLICIES], default: 'report' }),
    connections: Flags.integer({ description: 'connections to an NBD source or target that allows several (multi-conn)', min: 1, max: 16, default: 4, helpValue: 'N' }),
    'no-progress': Flags.boolean({ description: 'no progress bar, even on a terminal', default: false }),
    'force-share': Flags.boolean({
      char: 'U',
      description: 'offline: open the source even when another process (QEMU, a blkrep serve-nbd) holds it for writing, sharing every permission as qemu-img convert -U does; the copy is then of a disk that may be changing',
      default: false,
    }),
    control: Flags.string({ char: 'c', description: "live: mirror an export of the serve-nbd daemon behind this control socket (give only TARGET) (a path, or a NAME for /run/blkrep/NAME.ctl as serve-nbd --control NAME)", helpValue: 'PATH|NAME' }),
    export: Flags.string({ char: 'e', description: "live: the export to mirror (default: the daemon's only export)", helpValue: 'NAME' }),
    'job-id': Flags.string({ char: 'j', description: 'live: the job id (default mirror0, mirror1 ...)', helpValue: 'ID' }),
    wait: waitFlag('live: wait until the job is ready, or done (concluded), before exiting (a bare --wait is done)'),
    timeout: Flags.integer({ description: 'live: give up on the daemon (or the --wait) after this many seconds', min: 1, helpValue: 'SECONDS' }),
  };

  /** the moments of the phase split (BLKREP_BENCH_PHASES) */
  private readonly marks: Record<string, MirrorMark | undefined> = {};

  async run(): Promise<MirrorResult | JobQuery> {
    this.marks.run = mark();
    const { args, flags } = await this.parse(Mirror, withBareWait(this.argv));
    if (flags.control !== undefined) {
      for (const f of ['filter', 'target-filter'] as const) if (flags[f] !== undefined) this.usageError(`--${f} is for an offline mirror: a live mirror's source is the export (give serve-nbd --filter)`);
      if (flags['force-share']) this.usageError('--force-share is for an offline mirror: a live mirror reads the export itself');
      if (flags.create) this.usageError('--create is for an offline mirror: create a live mirror\'s target with blkrep create first');
      return this.live(args, flags);
    }
    for (const f of ['export', 'job-id', 'wait', 'timeout'] as const) if (flags[f] !== undefined) this.usageError(`--${f} is for a live mirror: give --control PATH too`);
    if (args.source === undefined || args.target === undefined) this.usageError('SOURCE and TARGET are required (or --control PATH and TARGET for a live mirror)');
    const { source: sourceSpec, target: targetSpec } = args as { source: string; target: string };
    let sync: MirrorSync;
    let bitmapPath: string | undefined;
    if (flags.sync.startsWith('bitmap:')) {
      sync = 'bitmap';
      bitmapPath = flags.sync.slice('bitmap:'.length);
      if (bitmapPath === '') this.usageError('--sync bitmap:PATH needs the path of a bitmap file');
    } else if (flags.sync === 'full' || flags.sync === 'top' || flags.sync === 'none') {
      sync = flags.sync;
    } else {
      this.usageError(`--sync ${flags.sync}: expected full, top, none or bitmap:PATH`);
    }
    if (flags.sync === 'bitmap') this.usageError('--sync bitmap needs the bitmap file: --sync bitmap:PATH');
    if (flags.create) {
      if (flags.existing) this.usageError('--create and --existing contradict each other: --create makes a new TARGET, --existing copies onto one that holds data');
      await createTarget(sourceSpec, targetSpec, { ...(flags['target-format'] ? { targetFormat: flags['target-format'] } : {}), ...(flags.format ? { sourceFormat: flags.format } : {}), forceShare: flags['force-share'], ...(flags.filter ? { filters: flags.filter } : {}) });
      // a new image reads as zeros
      flags['target-is-zero'] = true;
    }

    parseFilters([...(flags.filter ?? []), ...(flags['target-filter'] ?? [])]);
    const open = (spec: string, readOnly: boolean, format: string | undefined, filters: string[] | undefined, connections = flags.connections): Promise<BlockNode> =>
      openImageWithFilters(spec, { readOnly, ...(format ? { format: format as ImageFormat } : {}), nbd: { connections } }, filters);
    const bitmapMode = flags['bitmap-mode'] as BitmapMode;
    // the target (an NBD handshake) is opened while the source and then the bitmap file (it needs
    // the source's size) are; when one of them fails, the others that opened are closed again
    // a target that holds data is overwritten only with --existing; asked on a read-only open of
    // its own, so that the mirror's connection to it starts fresh; one NBD connection is enough
    // for its block status (each costs a handshake, and a server such as nbdkit starts its
    // threads for each: ~30 ms of nbdkit's CPU and ~0.1 s for the 3 more of --connections 4)
    if (!flags.existing) {
      const probe = await open(targetSpec, true, flags['target-format'], undefined, 1);
      try {
        await checkTargetEmpty(probe, targetSpec, false, 'Give --existing');
      } finally {
        await probe.close().catch(() => {});
      }
    }
    const sourceOpening = openImageWithFilters(sourceSpec, {
      readOnly: true,
      forceShare: flags['force-share'],
      ...(flags.format ? { format: flags.format as ImageFormat } : {}),
      nbd: { connections: flags.connections },
    }, flags.filter);
    const targetOpening = open(targetSpec, false, flags['target-format'], flags['target-filter']);
    const bitmapOpening =
      bitmapPath === undefined ? Promise.resolve(undefined) : sourceOpening.then((s) => PersistentBitmap.open(bitmapPath, { size: s.size, readOnly: bitmapMode === 'never' }));
    const [sourceR, targetR, bitmapR] = await Promise.allSettled([sourceOpening, targetOpening, bitmapOpening]);
    const closers: Array<() => Promise<void>> = [];
    if (sourceR.status === 'fulfilled') closers.push(() => sourceR.value.close());
    if (targetR.status === 'fulfilled') closers.push(() => targetR.value.close());
    if (bitmapR.status === 'fulfilled' && bitmapR.value) closers.push(() => bitmapR.value!.bitmap.close());
    const closeAll = async (): Promise<void> => {
      for (const c of closers.reverse()) await c().catch(() => {});
    };
    let result: MirrorResult;
    try {
      // the first failure in the order they were opened before: source, target, bitmap
      for (const r of [sourceR, targetR, bitmapR]) if (r.status === 'rejected') throw r.reason;
      const source = (sourceR as PromiseFulfilledResult<BlockNode>).value;
      const target = (targetR as PromiseFulfilledResult<BlockNode>).value;
      let bitmap: PersistentBitmap | undefined;
      let bitmapLoad: string | undefined;
      const opened = (bitmapR as PromiseFulfilledResult<Awaited<ReturnType<typeof PersistentBitmap.open>> | undefined>).value;
      if (opened) {
        bitmap = opened.bitmap;
        bitmapLoad = opened.loadState.state;
        if (opened.loadState.state === 'all-dirty') this.logToStderr(`blkrep: warning: bitmap ${bitmapPath} cannot be trusted (${opened.loadState.reason}): copying everything`);
        else if (opened.loadState.state === 'recovered') this.logToStderr(`blkrep: bitmap ${bitmapPath} was in use when its writer stopped; recovered from its activity log`);
      }
      result = await this.mirror(source, target, { ...flags, sync, bitmap, bitmapMode, bitmapLoad, sourceSpec, targetSpec, bitmapSpec: flags.sync });
      if (bitmap && !bitmap.readOnly) await bitmap.flush();
    } finally {
      await closeAll();
    }
    this.marks.closed = mark();
    if (benchPhases()) {
      const out: Record<string, { ms: number; cpuMs: number }> = {};
      const ms = Object.entries(this.marks).filter((e): e is [string, MirrorMark] => e[1] !== undefined).sort((a, b) => a[1].at - b[1].at);
      for (const [k, m] of ms) out[k] = { ms: Math.round(m.at), cpuMs: Math.round(m.cpuUs / 1000) };
      process.stderr.write(`blkrep-phases ${JSON.stringify(out)}\n`);
    }
    if (!this.jsonEnabled()) {
      this.log(`Mirrored ${formatSize(result.bytes)} of ${formatSize(result.size)} in ${result.seconds.toFixed(1)} s (${formatSize(Math.round(result.rate))}/s).`);
    }
    return result;
  }

  /** --control: start the job on the daemon; --wait: follow it. */
  private async live(
    args: { source?: string; target?: string },
    flags: Record<string, unknown> & { control?: string; sync: string; wait?: string; timeout?: number; 'no-progress': boolean },
  ): Promise<JobQuery> {
    if (args.target !== undefined) this.usageError('with --control, give only TARGET: the source is the export');
    const target = args.source;
    if (target === undefined) this.usageError('TARGET is required: the image or NBD URI to mirror the export onto');
    if (flags.format !== undefined) this.usageError('--format is the source image\'s: with --control the source is the export');
    // the daemon opens TARGET in its own directory: a relative path is the caller's
    const start: Record<string, unknown> = { type: 'mirror', target: absoluteImageSpec(target) };
    if (flags.sync.startsWith('bitmap:')) {
      start.sync = 'bitmap';
      start.bitmap = flags.sync.slice('bitmap:'.length);
      if (start.bitmap === '') this.usageError('--sync bitmap:NAME needs the name of a bitmap of the export');
    } else if (['full', 'top', 'none'].includes(flags.sync)) start.sync = flags.sync;
    else this.usageError(`--sync ${flags.sync}: expected full, top, none or bitmap:NAME`);
    const map: Array<[string, string, (v: unknown) => unknown]> = [
      ['export', 'export', (v) => v],
      ['job-id', 'id', (v) => v],
      ['target-format', 'targetFormat', (v) => v],
      ['granularity', 'granularity', (v) => v],
      ['buf-size', 'bufSize', (v) => v],
      ['max-ops', 'maxOps', (v) => v],
      ['speed', 'speed', (v) => v],
      ['copy-mode', 'copyMode', (v) => v],
      ['max-lag', 'maxLagMs', (v) => (v as number) * 1000],
      ['on-source-error', 'onSourceError', (v) => v],
      ['on-target-error', 'onTargetError', (v) => v],
      ['connections', 'connections', (v) => v],
    ];
    for (const [flag, key, conv] of map) if (flags[flag] !== undefined) start[key] = conv(flags[flag]);
    if (flags['target-is-zero'] === true) start.targetIsZero = true;
    if (flags.existing === true) start.existing = true;
    if (start.sync === 'bitmap' && flags['bitmap-mode'] !== 'on-success') start.bitmapMode = flags['bitmap-mode'];
    const timeoutMs = (flags.timeout ?? 10) * 1000;
    const [{ ControlClient }, { followJob }] = await Promise.all([import('../control/client.js'), import('../cli/job-command.js')]);
    const client = await ControlClient.connect(controlPathFor(flags.control!), { timeoutMs });
    try {
      const events: ControlEvent[] = [];
      const hook: { listener?: () => void } = {};
      if (flags.wait) {
        await client.subscribe(['job-ready', 'job-completed', 'job-cancelled'], (e) => {
          events.push(e);
          hook.listener?.();
        });
      }
      const q = (await client.request('job-start', start, { timeoutMs })) as JobQuery;
      if (!flags.wait) {
        if (!this.jsonEnabled()) this.log(`Started job ${q.id}: mirror of export "${q.export}" onto ${target}. Follow it with: blkrep job show ${q.id} --control ${flags.control}`);
        return q;
      }
      const follow = followJob(client, events, hook, q.id, flags.wait as 'ready' | 'done', { progress: !this.jsonEnabled() && !flags['no-progress'] });
      const limited = flags.timeout === undefined
        ? follow
        : Promise.race([
            follow,
            new Promise<never>((_, reject) =>
              setTimeout(() => reject(new BlkrepError('ERR_TIMEOUT', `job ${q.id} was not ${flags.wait} after ${flags.timeout} s (it goes on)`, { errno: 'EIO' })), timeoutMs).unref(),
            ),
          ]);
      await limited;
      const final = (await client.request('job-query', { id: q.id }, { timeoutMs })) as JobQuery;
      if (!this.jsonEnabled()) {
        this.log(flags.wait === 'ready' ? `Job ${q.id} is ready: the target is in step. Complete it with: blkrep job complete ${q.id} --control ${flags.control}` : `Job ${q.id} is done (${final.status}).`);
      }
      return final;
    } finally {
      await client.close().catch(() => {});
    }
  }

  private async mirror(
    source: BlockNode,
    target: BlockNode,
    o: {
      sync: MirrorSync;
      bitmap?: PersistentBitmap;
      bitmapMode: BitmapMode;
      bitmapLoad?: string;
      sourceSpec: string;
      targetSpec: string;
      bitmapSpec: string;
      granularity?: number;
      'buf-size'?: number;
      'max-ops'?: number;
      speed?: number;
      'target-is-zero': boolean;
      'copy-mode': string;
      'max-lag'?: number;
      'on-source-error': string;
      'on-target-error': string;
      'no-progress': boolean;
    },
  ): Promise<MirrorResult> {
    const showProgress = !this.jsonEnabled() && !o['no-progress'];
    const progressBar = showProgress ? (await import('../cli/progress.js')).progressBar : undefined;
    const job = new MirrorJob({
      id: 'mirror0',
      source,
      target,
      sync: o.sync,
      ...(o.bitmap ? { bitmap: o.bitmap, bitmapMode: o.bitmapMode } : {}),
      ...(o.granularity !== undefined ? { granularity: o.granularity } : {}),
      ...(o['buf-size'] !== undefined ? { bufSize: o['buf-size'] } : {}),
      ...(o['max-ops'] !== undefined ? { maxOps: o['max-ops'] } : {}),
      ...(o.speed !== undefined ? { speed: o.speed } : {}),
      targetIsZero: o['target-is-zero'],
      copyMode: o['copy-mode'] as CopyMode,
      ...(o['max-lag'] !== undefined ? { maxLagMs: o['max-lag'] * 1000 } : {}),
      onSourceError: o['on-source-error'] as ErrorPolicy,
      onTargetError: o['on-target-error'] as ErrorPolicy,
    });
    const errors: MirrorResult['errors'] = [];
    job.on('io-error', (e: Extract<JobEvent, { event: 'error' }>) => {
      errors.push({ side: e.side, operation: e.operation, errno: e.errno, action: e.action, offset: e.offset, length: e.length, message: e.message });
      if (!this.jsonEnabled()) this.logToStderr(`blkrep: ${e.side} ${e.operation} error (${e.errno}), ${e.action === 'ignore' ? 'will retry' : e.action === 'stop' ? 'stopping' : 'giving up'}: ${e.message}`);
      // offline nobody can resume a stopped job: end it
      if (e.action === 'stop') setImmediate(() => void job.cancel({ force: true }).catch(() => {}));
    });
    let stopReason: string | undefined;
    job.on('io-error', (e: Extract<JobEvent, { event: 'error' }>) => {
      if (e.action === 'stop') stopReason ??= `${e.side} ${e.operation} error (${e.errno}) with policy ${e.side === 'source' ? o['on-source-error'] : o['on-target-error']}: ${e.message}`;
    });
    const onSignal = (): void => {
      stopReason ??= 'interrupted';
      void job.cancel({ force: true }).catch(() => {});
    };
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    let bar: Progress | undefined;
    const started = performance.now();
    const ticker = setInterval(() => {
      const q = job.query();
      if (!progressBar || q.length === 0) return;
      bar ??= progressBar('mirror', q.length, { enabled: true });
      bar.update(q.offset);
    }, 200);
    try {
      // offline nothing writes the source: complete (no pivot) as soon as the target has caught up
      job.on('status-change', (e: Extract<JobEvent, { event: 'status-change' }>) => {
        if (e.status === 'ready') {
          this.marks.ready ??= mark();
          setImmediate(() => void job.complete({ pivot: false }).catch(() => {}));
        }
      });
      this.marks.job = mark();
      job.start();
      await job.whenConcluded();
      this.marks.concluded = mark();
      this.marks.copying = job.marks.copying;
      this.marks.flush = job.marks.pointIssued;
    } finally {
      clearInterval(ticker);
      bar?.stop();
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
    if (job.error) throw job.error;
    if (job.isHardCancelled || stopReason) {
      throw new BlkrepError('ERR_JOB_CANCELLED', `mirror stopped before the target was a consistent copy: ${stopReason ?? 'cancelled'}`, { errno: 'EIO' });
    }
    const seconds = (performance.now() - started) / 1000;
    const q = job.query();
    return {
      source: o.sourceSpec,
      target: o.targetSpec,
      sync: o.bitmap ? o.bitmapSpec : o.sync,
      granularity: job.granularity,
      bytes: q.offset,
      size: source.size,
      seconds: Math.round(seconds * 1000) / 1000,
      rate: seconds > 0 ? Math.round(q.offset / seconds) : 0,
      targetRequests: job.targetWrites,
      errors,
      ...(o.bitmapLoad ? { bitmapLoad: o.bitmapLoad } : {}),
    };
  }
}
