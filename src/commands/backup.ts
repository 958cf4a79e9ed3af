import { startSpinner } from '../cli/spinner.js';
import { createTarget } from '../cli/create-target.js';
import { Args, Flags } from '@oclif/core';
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { PersistentBitmap } from '../bitmap/persistent.js';
import { BlkrepCommand } from '../cli/base.js';
import { ControlClient } from '../control/client.js';
import { controlPathFor } from '../cli/control-path.js';
import { absoluteImageSpec, absolutePath } from '../cli/socket-uri.js';
import { resolveBackupBitmap } from '../cli/backup-bitmap.js';
import { sizeFlag, waitFlag, withBareWait } from '../cli/flags.js';
import { progressBar, type Progress } from '../cli/progress.js';
import type { ImageFormat } from '../block/open.js';
import { filterFlag, openImageWithFilters, parseFilters } from '../cli/image.js';
import {
  BACKUP_BITMAP_MODES, BACKUP_SYNC_MODES, BackupJob, CBW_ERROR_POLICIES, DEFAULT_BACKUP_BUF_SIZE, DEFAULT_BACKUP_MAX_OPS,
  type BackupBitmapMode, type BackupSync, type CbwErrorPolicy,
} from '../jobs/backup.js';
import { ERROR_POLICIES, type ErrorPolicy, type JobEvent, type JobInfo } from '../jobs/job.js';
import { formatSize } from '../util/size.js';

export interface BackupResult {
  source: string;
  target: string;
  sync: string;
  granularity: number;
  /** bytes the job processed (data copied and zero ranges written) */
  bytes: number;
  /** bytes of data written to the target */
  dataBytes: number;
  /** bytes of the disk */
  size: number;
  seconds: number;
  /** bytes per second */
  rate: number;
  /** target requests sent */
  targetRequests: number;
  errors: Array<{ side: string; operation: string; errno: string; action: string; offset: number; length: number; message: string }>;
  /** the bitmap file used (incremental, or full starting a chain) */
  bitmap?: string;
  /** how the bitmap file loaded */
  bitmapLoad?: string;
}

/** blkrep backup --control: the job's query (at the start, or once it concluded with --wait). */
export interface LiveBackupOutput {
  live: true;
  export: string | null;
  job: JobInfo;
  /** the fleecing export, when one was asked for: {export, uri, uris} on the daemon's listeners, or {export, socket, uri} on a socket of its own */
  fleecing?: unknown;
}

export default class Backup extends BlkrepCommand {
  static override summary = 'Make a point-in-time copy of an image: full, top, or incremental from a bitmap.';

  static override description = `Runs a backup job from SOURCE to TARGET and exits when TARGET holds SOURCE as it was when the job started, flushed. The source is opened read-only; the target must exist and have the source's size.
--sync full copies everything, top only what the top layer of the source holds, incremental only the regions dirty in --bitmap (a bitmap file, or the NAME of a bitmap beside SOURCE: SOURCE.NAME.bitmap), none nothing (copy-before-write only: meaningful on a live export, where the target fills with the old content of what is overwritten).
With --bitmap and --bitmap-mode on-success (the default), the regions copied are cleared from the bitmap when the backup succeeds, so the next incremental backup copies what changed since; --sync full --bitmap starts such a chain.
--create (offline) makes TARGET first, as qemu-img convert does: a new image of the source's size in --target-format or the source's format (raw or qcow2); a TARGET that exists is never replaced (ERR_EXISTS).
Ranges that read as zeros are sent as write-zeroes, never as data; with --target-is-zero they are not sent at all. --speed limits the data rate.
Errors follow --on-source-error and --on-target-error: report (the default), ignore (retry the region later), stop or enospc (offline nobody can resume the job: the command ends with an error). --on-cbw-error says what a failed copy-before-write does on a live export.
A progress bar with the rate and the time left is shown on a terminal. With --json the result is printed as JSON.
With --control PATH the backup runs in a serve-nbd daemon, of its export --export NAME, while clients keep writing it: the only argument is TARGET (opened by the daemon; a relative path, also in an NBD URI's socket=, is taken from the current directory), and --bitmap names a bitmap of the export. The export's writes go through a copy-before-write filter, so TARGET receives the export as it was when the job started. --fleecing-export NAME serves that point-in-time view read-only while the job runs, as export NAME of the daemon itself: on every listener it has (TCP, Unix socket), beside its other exports (nbdinfo --list shows it; it is removed, its clients disconnected, when the job concludes). With --fleecing-socket PATH it is served instead on a Unix socket of its own. Without --wait the command starts the job and prints it (blkrep job pause, resume, cancel work on it; a --sync none job runs until cancelled); with --wait it follows the job with a progress bar and exits when it has concluded.`;

  static override examples = [
    { description: 'A full backup of a disk image onto an NBD server', command: '<%= config.bin %> <%= command.id %> disk.img nbd+unix:///backup?socket=/run/backup.sock' },
    { description: 'Start an incremental chain: a full backup that clears the bitmap disk.img.daily.bitmap', command: '<%= config.bin %> <%= command.id %> disk.img full.img --sync full --bitmap daily' },
    { description: 'Into a new raw image of the source\'s size (refused if it exists)', command: '<%= config.bin %> <%= command.id %> disk.img backup.img --create' },
    { description: 'A backup onto a slow target (each write 20 ms later; see blkrep-filters(7))', command: '<%= config.bin %> <%= command.id %> disk.img full.img --target-filter delay:write=20' },
    { description: 'Then each day: what changed, into an overlay of the previous backup', command: '<%= config.bin %> <%= command.id %> disk.img inc1.qcow2 --sync incremental --bitmap daily' },
    { description: "A live export's point in time, while clients write it", command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --export disk /backup/disk.img --wait' },
    {
      description: 'Image fleecing: a read-only snapshot of a live export, costing only the old content of what is overwritten',
      command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --export disk /tmp/fleece.img --sync none --fleecing-export disk-snap',
    },
  ];

  static override args = {
    source: Args.string({ description: 'the image to back up (a path, nbd:// URI, or memory:SIZE); with --control, the only argument is TARGET', required: false }),
    target: Args.string({ description: 'the image to copy onto (same size as the source)', required: false }),
  };

  static override flags = {
    format: Flags.string({ char: 'f', description: 'format of the source (probed when not given)', options: ['raw', 'qcow2'], helpValue: 'FORMAT' }),
    'target-format': Flags.string({ char: 'F', description: 'format of the target (probed when not given)', options: ['raw', 'qcow2'], helpValue: 'FORMAT' }),
    filter: filterFlag('stack a filter on the source (error, delay; see blkrep-filters(7)); repeatable, the first outermost'),
    'target-filter': filterFlag('stack a filter on the target; repeatable, the first outermost'),
    sync: Flags.string({ description: 'what to copy: full, top (what the top layer of the source holds), none (copy-before-write only), incremental (the regions dirty in --bitmap)', options: [...BACKUP_SYNC_MODES], default: 'full' }),
    bitmap: Flags.string({ description: 'a bitmap file, or the NAME of a bitmap beside SOURCE (SOURCE.NAME.bitmap); with --control, the NAME of a bitmap of the export: the regions to copy (incremental), or the bitmap to clear (full)', helpValue: 'FILE|NAME' }),
    'bitmap-mode': Flags.string({ description: 'clear the copied regions from the bitmap on success, always, or never', options: [...BACKUP_BITMAP_MODES], default: 'on-success' }),
    granularity: sizeFlag({ description: "bytes per copy granule: a power of two from 512 to 64M (default 64K, or the bitmap's)", helpValue: 'SIZE' }),
    'buf-size': sizeFlag({ description: `most bytes one copy operation moves (default ${formatSize(DEFAULT_BACKUP_BUF_SIZE)})`, helpValue: 'SIZE' }),
    'max-ops': Flags.integer({ description: `copy operations in flight (default ${DEFAULT_BACKUP_MAX_OPS})`, min: 1, max: 1024, helpValue: 'N' }),
    speed: sizeFlag({ description: 'limit the data rate to SIZE bytes per second (0: no limit)', helpValue: 'SIZE' }),
    create: Flags.boolean({ description: "offline: create TARGET first (as qemu-img convert): the source's size, --target-format or the source's format; refused when TARGET exists (ERR_EXISTS)", default: false }),
    'target-is-zero': Flags.boolean({ description: 'the target reads as zeros: do not write the zero ranges', default: false }),
    'on-source-error': Flags.string({ description: 'what a source read error does', options: [...ERROR_POLICIES], default: 'report' }),
    'on-target-error': Flags.string({ description: 'what a target write error does', options: [...ERROR_POLICIES], default: 'report' }),
    'on-cbw-error': Flags.string({
      description: 'what a failed copy-before-write does: fail the guest write (the snapshot stays valid), or let it through and break the snapshot',
      options: [...CBW_ERROR_POLICIES],
      default: 'break-guest-write',
    }),
    connections: Flags.integer({ description: 'connections to an NBD source or target that allows several (multi-conn)', min: 1, max: 16, default: 4, helpValue: 'N' }),
    'no-progress': Flags.boolean({ description: 'no progress bar, even on a terminal', default: false }),
    'force-share': Flags.boolean({
      char: 'U',
      description: 'offline: open the source even when another process (QEMU, a blkrep serve-nbd) holds it for writing, sharing every permission as qemu-img convert -U does; the backup is then of a disk that may be changing',
      default: false,
    }),
    control: Flags.string({ char: 'c', description: "back up a live export: the serve-nbd daemon's control socket (a path, or a NAME for /run/blkrep/NAME.ctl as serve-nbd --control NAME)", helpValue: 'PATH|NAME' }),
    export: Flags.string({ description: 'with --control: the export to back up (default: the only one)', helpValue: 'NAME', dependsOn: ['control'] }),
    'job-id': Flags.string({ char: 'j', aliases: ['id'], description: 'with --control: the job id (default: backup0, backup1, ...)', helpValue: 'ID', dependsOn: ['control'] }),
    wait: waitFlag('with --control: follow the job and exit when it has concluded (done; a bare --wait is done; a backup has no ready state)', { dependsOn: ['control'] }),
    'fleecing-export': Flags.string({ description: "with --control: serve the point-in-time view read-only as export NAME of the daemon (on its listeners) while the job runs", helpValue: 'NAME', dependsOn: ['control'] }),
    'fleecing-socket': Flags.string({ description: "with --fleecing-export: serve it on this Unix socket of its own instead of the daemon's listeners", helpValue: 'PATH', dependsOn: ['fleecing-export'] }),
  };

  async run(): Promise<BackupResult | LiveBackupOutput> {
    const { args, flags } = await this.parse(Backup, withBareWait(this.argv));
    if (flags.wait === 'ready') this.usageError('a backup job has no ready state (it concludes once TARGET holds the point in time): use --wait done, or a bare --wait');
    const sync = flags.sync as BackupSync;
    if (flags.control !== undefined) {
      for (const f of ['filter', 'target-filter'] as const) if (flags[f] !== undefined) this.usageError(`--${f} is for an offline backup: a live backup's source is the export (give serve-nbd --filter)`);
      if (flags['force-share']) this.usageError('--force-share is for an offline backup: a live backup reads the export itself');
      if (flags.create) this.usageError('--create is for an offline backup: create a live backup\'s target with blkrep create first');
      if (args.source === undefined || args.target !== undefined) this.usageError('with --control, give only TARGET (the source is the export --export NAME)');
      if (sync === 'incremental' && flags.bitmap === undefined) this.usageError('--sync incremental needs --bitmap NAME: a bitmap of the export');
      if (flags.bitmap !== undefined && sync !== 'incremental' && sync !== 'full') this.usageError(`--bitmap is used with --sync incremental or full, not ${sync}`);
      return this.live(args.source, flags);
    }
    if (args.source === undefined || args.target === undefined) this.usageError('give SOURCE and TARGET (or --control PATH and TARGET)');
    if (sync === 'incremental' && flags.bitmap === undefined) this.usageError('--sync incremental needs --bitmap FILE|NAME: the regions to copy');
    if (flags.bitmap !== undefined && sync !== 'incremental' && sync !== 'full') this.usageError(`--bitmap is used with --sync incremental or full, not ${sync}`);
    const bitmapMode = flags['bitmap-mode'] as BackupBitmapMode;
    const sourceSpec: string = args.source;
    const targetSpec: string = args.target;

    parseFilters([...(flags.filter ?? []), ...(flags['target-filter'] ?? [])]);
    if (flags.create) {
      await createTarget(sourceSpec, targetSpec, { ...(flags['target-format'] ? { targetFormat: flags['target-format'] } : {}), ...(flags.format ? { sourceFormat: flags.format } : {}), forceShare: flags['force-share'], ...(flags.filter ? { filters: flags.filter } : {}) });
      // a new image reads as zeros
      flags['target-is-zero'] = true;
    }
    const open = (spec: string, readOnly: boolean, format: string | undefined, filters: string[] | undefined): Promise<BlockNode> =>
      openImageWithFilters(spec, { readOnly, ...(format ? { format: format as ImageFormat } : {}), nbd: { connections: flags.connections } }, filters);
    const source = await openImageWithFilters(sourceSpec, {
      readOnly: true,
      forceShare: flags['force-share'],
      ...(flags.format ? { format: flags.format as ImageFormat } : {}),
      nbd: { connections: flags.connections },
    }, flags.filter);
    const closers: Array<() => Promise<void>> = [() => source.close()];
    const closeAll = async (): Promise<void> => {
      for (const c of closers.reverse()) await c().catch(() => {});
    };
    let result: BackupResult;
    try {
      const target = await open(targetSpec, false, flags['target-format'], flags['target-filter']);
      closers.push(() => target.close());
      let bitmap: PersistentBitmap | undefined;
      let bitmapPath: string | undefined;
      let bitmapLoad: string | undefined;
      if (flags.bitmap !== undefined) {
        bitmapPath = await resolveBackupBitmap(flags.bitmap, sourceSpec);
        const opened = await PersistentBitmap.open(bitmapPath, { size: source.size, readOnly: bitmapMode === 'never' });
        bitmap = opened.bitmap;
        closers.push(() => opened.bitmap.close());
        bitmapLoad = opened.loadState.state;
        if (opened.loadState.state === 'all-dirty') this.logToStderr(`blkrep: warning: bitmap ${bitmapPath} cannot be trusted (${opened.loadState.reason}): copying everything`);
        else if (opened.loadState.state === 'recovered') this.logToStderr(`blkrep: bitmap ${bitmapPath} was in use when its writer stopped; recovered from its activity log`);
      }
      const job = new BackupJob({
        id: 'backup0',
        source,
        target,
        sync,
        ...(bitmap ? { bitmap, bitmapMode } : {}),
        ...(flags.granularity !== undefined ? { granularity: flags.granularity } : {}),
        ...(flags['buf-size'] !== undefined ? { bufSize: flags['buf-size'] } : {}),
        ...(flags['max-ops'] !== undefined ? { maxOps: flags['max-ops'] } : {}),
        ...(flags.speed !== undefined ? { speed: flags.speed } : {}),
        targetIsZero: flags['target-is-zero'],
        onSourceError: flags['on-source-error'] as ErrorPolicy,
        onTargetError: flags['on-target-error'] as ErrorPolicy,
        onCbwError: flags['on-cbw-error'] as CbwErrorPolicy,
      });
      result = await this.runJob(job, !flags['no-progress'], { sourceSpec, targetSpec, bitmapPath, bitmapLoad, size: source.size, policies: flags });
      if (bitmap && !bitmap.readOnly) await bitmap.flush();
    } finally {
      await closeAll();
    }
    if (!this.jsonEnabled()) {
      this.log(`Backed up ${formatSize(result.bytes)} of ${formatSize(result.size)} (${formatSize(result.dataBytes)} of data) in ${result.seconds.toFixed(1)} s (${formatSize(Math.round(result.rate))}/s).`);
    }
    return result;
  }

  private async live(
    target: string,
    flags: {
      control?: string;
      export?: string;
      'job-id'?: string;
      wait?: string;
      sync: string;
      bitmap?: string;
      'bitmap-mode': string;
      'target-format'?: string;
      granularity?: number;
      'buf-size'?: number;
      'max-ops'?: number;
      speed?: number;
      'target-is-zero': boolean;
      'on-source-error': string;
      'on-target-error': string;
      'on-cbw-error': string;
      connections: number;
      'fleecing-export'?: string;
      'fleecing-socket'?: string;
      'no-progress': boolean;
    },
  ): Promise<LiveBackupOutput> {
    const client = await ControlClient.connect(controlPathFor(flags.control!), { timeoutMs: 10_000 });
    try {
      const opt = <T>(key: string, v: T | undefined): Record<string, T> => (v === undefined ? {} : { [key]: v });
      let info = (await client.request('job-start', {
        type: 'backup',
        ...opt('export', flags.export),
        ...opt('id', flags['job-id']),
        // the daemon opens these in its own directory: a relative path is the caller's
        target: absoluteImageSpec(target),
        ...opt('targetFormat', flags['target-format']),
        sync: flags.sync,
        ...opt('bitmap', flags.bitmap),
        ...(flags.bitmap !== undefined ? { bitmapMode: flags['bitmap-mode'] } : {}),
        ...opt('granularity', flags.granularity),
        ...opt('bufSize', flags['buf-size']),
        ...opt('maxOps', flags['max-ops']),
        ...opt('speed', flags.speed),
        targetIsZero: flags['target-is-zero'],
        onSourceError: flags['on-source-error'],
        onTargetError: flags['on-target-error'],
        onCbwError: flags['on-cbw-error'],
        connections: flags.connections,
        ...opt('fleecingExport', flags['fleecing-export']),
        ...opt('fleecingSocket', flags['fleecing-socket'] === undefined ? undefined : absolutePath(flags['fleecing-socket'])),
      })) as JobInfo;
      const exportName = (info['export'] as string | null | undefined) ?? flags.export ?? null;
      const fleecing = info['fleecing'] as { uri?: string; uris?: string[] } | undefined;
      if (!flags.wait) {
        if (!this.jsonEnabled()) {
          this.log(`Started backup job ${info.id} of export "${exportName}" onto ${target} (sync ${flags.sync}).`);
          const at = fleecing?.uris?.length ? fleecing.uris : fleecing?.uri ? [fleecing.uri] : [];
          if (at.length) this.log(`Its point-in-time view is served read-only at ${at.join(' and ')} while it runs.`);
          if (flags.sync === 'none') this.log(`It runs until cancelled: blkrep job cancel ${info.id} --control ${flags.control}`);
        }
        return { live: true, export: exportName, job: info, ...(fleecing ? { fleecing } : {}) };
      }
      const id = info.id;
      const showProgress = !this.jsonEnabled() && !flags['no-progress'];
      let bar: Progress | undefined;
      // until the job reports how much it copies (and the bar takes over), a spinner says what is awaited
      const spinner = showProgress ? startSpinner(`job ${id}: waiting until ${flags.wait === 'ready' ? 'ready' : 'done'}…`, { enabled: true }) : undefined;
      try {
        for (;;) {
          info = (await client.request('job-query', { id })) as JobInfo;
          if (showProgress && info.length > 0) {
            spinner?.stop();
            bar ??= progressBar('backup', info.length, { enabled: true });
            bar.update(Math.min(info.offset, info.length));
          }
          if (info.status === 'concluded') break;
          await new Promise((resolve) => setTimeout(resolve, 200));
        }
      } finally {
        spinner?.stop();
        bar?.stop();
      }
      if (info.error) throw new BlkrepError(info.error.code, `backup job ${id} failed: ${info.error.message}`, { errno: info.error.errno });
      if (info['cancelled'] === true && flags.sync !== 'none') throw new BlkrepError('ERR_JOB_CANCELLED', `backup job ${id} was cancelled: ${target} is not a usable backup`, { errno: 'ESHUTDOWN', details: { id } });
      if (!this.jsonEnabled()) this.log(`Backed up export "${exportName}" onto ${target}: ${formatSize(info.offset)} copied.`);
      return { live: true, export: exportName, job: info, ...(fleecing ? { fleecing } : {}) };
    } finally {
      await client.close();
    }
  }

  private async runJob(
    job: BackupJob,
    progress: boolean,
    o: { sourceSpec: string; targetSpec: string; bitmapPath?: string; bitmapLoad?: string; size: number; policies: { 'on-source-error': string; 'on-target-error': string } },
  ): Promise<BackupResult> {
    const errors: BackupResult['errors'] = [];
    let stopReason: string | undefined;
    job.on('io-error', (e: Extract<JobEvent, { event: 'error' }>) => {
      errors.push({ side: e.side, operation: e.operation, errno: e.errno, action: e.action, offset: e.offset, length: e.length, message: e.message });
      if (!this.jsonEnabled()) this.logToStderr(`blkrep: ${e.side} ${e.operation} error (${e.errno}), ${e.action === 'ignore' ? 'will retry' : e.action === 'stop' ? 'stopping' : 'giving up'}: ${e.message}`);
      if (e.action === 'stop') {
        // offline nobody can resume a stopped job: end it
        stopReason ??= `${e.side} ${e.operation} error (${e.errno}) with policy ${e.side === 'source' ? o.policies['on-source-error'] : o.policies['on-target-error']}: ${e.message}`;
        setImmediate(() => void job.cancel({ force: true }).catch(() => {}));
      }
    });
    const onSignal = (): void => {
      stopReason ??= 'interrupted';
      void job.cancel({ force: true }).catch(() => {});
    };
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    const started = performance.now();
    let bar: Progress | undefined;
    const showProgress = !this.jsonEnabled() && progress;
    const ticker = setInterval(() => {
      const q = job.query();
      if (!showProgress || q.length === 0) return;
      bar ??= progressBar('backup', q.length, { enabled: true });
      bar.update(q.offset);
    }, 200);
    let noneEnded = false;
    try {
      job.start();
      if (job.sync === 'none') {
        // offline nothing writes the source: copy-before-write has nothing to do
        await new Promise((resolve) => setImmediate(resolve));
        noneEnded = true;
        await job.cancel().catch(() => {});
      }
      await job.whenConcluded();
    } finally {
      clearInterval(ticker);
      bar?.stop();
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
    if (job.error) throw job.error;
    if ((job.isHardCancelled && !noneEnded) || stopReason) {
      throw new BlkrepError('ERR_JOB_CANCELLED', `backup stopped before the target was complete: ${stopReason ?? 'cancelled'}`, { errno: 'EIO' });
    }
    const seconds = (performance.now() - started) / 1000;
    const q = job.query();
    return {
      source: o.sourceSpec,
      target: o.targetSpec,
      sync: job.sync,
      granularity: job.granularity,
      bytes: q.offset,
      dataBytes: job.stats.dataBytes,
      size: o.size,
      seconds: Math.round(seconds * 1000) / 1000,
      rate: seconds > 0 ? Math.round(q.offset / seconds) : 0,
      targetRequests: job.stats.targetRequests,
      errors,
      ...(o.bitmapPath ? { bitmap: o.bitmapPath } : {}),
      ...(o.bitmapLoad ? { bitmapLoad: o.bitmapLoad } : {}),
    };
  }
}
