import { startSpinner } from '../cli/spinner.js';
import { resolve } from 'node:path';
import { Args, Flags } from '@oclif/core';
import { BlkrepError } from '../api/errors.js';
import { BlkrepCommand } from '../cli/base.js';
import { sizeFlag, waitFlag, withBareWait } from '../cli/flags.js';
import { progressBar, type Progress } from '../cli/progress.js';
import { commitImage, type CommitResult } from '../image/commit.js';
import { ControlClient } from '../control/client.js';
import { controlPathFor } from '../cli/control-path.js';
import type { CommitJob } from '../jobs/commit.js';
import { ERROR_POLICIES, type ErrorPolicy, type JobEvent, type JobInfo } from '../jobs/job.js';
import { formatSize } from '../util/size.js';

/** blkrep commit --control: the job's query (at the start, or once it concluded with --wait). */
interface LiveCommitOutput {
  live: true;
  export: string | null;
  job: JobInfo;
  /** --wait: the overlay was made empty (complete); false after --keep (cancel once ready) */
  emptied?: boolean;
}

type CommitOutput = CommitResult & { errors: Array<{ side: string; operation: string; errno: string; action: string; offset: number; length: number; message: string }> };

export default class Commit extends BlkrepCommand {
  static override summary = "Write an overlay's data into its backing file, then empty the overlay.";

  static override description = `Writes every range the qcow2 OVERLAY allocates into its backing file, as OVERLAY reads it (zero clusters are written as zeros, so old backing data does not come back), flushes the backing file, then makes OVERLAY empty so reads fall through to the backing file again. --keep leaves OVERLAY as it is. Only allocated ranges move; several 1 MiB requests are in flight, and --speed (or --rate) limits the data copied per second. The backing file grows to OVERLAY's size if it is smaller.

With -b BASE the data goes into BASE further down OVERLAY's backing chain, and every layer between OVERLAY and BASE is committed too. As with qemu-img commit -b, this keeps OVERLAY (-b implies --keep): OVERLAY still reads the same afterwards, but the layers between it and BASE do not (the result lists them as intermediates); to drop them, run blkrep make-empty on them, deepest first, then on OVERLAY.

A crash or an interruption is harmless: until OVERLAY is emptied it shadows everything already written into the base, and the commit can be run again.

With --control PATH the commit runs in a serve-nbd daemon, on the image of its export --export NAME (a qcow2 overlay) while clients keep writing it: an active commit into the overlay's backing file (job type commit; with --base further down, the layers between must be empty: commit them first with --top). With --top LAYER a layer below the export's image is committed instead (and those down to above BASE), while the export goes on writing its image: an intermediate commit, which ends by itself and makes the committed layers empty. A secondary's failover, active over hidden over disk, is --top hidden.qcow2 then --base disk.img. Without --wait the command starts the job and prints it; blkrep job pause, resume, cancel and complete then work on it, and complete makes the overlay empty once the base has caught up (the writes wait meanwhile, then go on to the empty overlay). With --wait the command follows the job with a progress bar, completes it as soon as it is ready (with --keep it cancels it instead: the base is then a consistent copy and the overlay is kept), and exits when it has concluded.

The commit runs as a job (the engine of blkrep mirror): --on-source-error and --on-target-error choose what a read error of the overlay or a write error of the base does (report ends the commit, ignore retries the range later; stop, offline, ends it too, as nobody can resume it). A progress bar with the rate and the time left is shown on a terminal.`;

  static override examples = [
    { description: 'Fold an overlay into its backing file', command: '<%= config.bin %> <%= command.id %> active.qcow2' },
    { description: 'Commit the whole chain above base.img, at most 100 MiB/s', command: '<%= config.bin %> <%= command.id %> active.qcow2 -b base.img --speed 100M' },
    { description: "Commit a live export's overlay into its backing file, following it to the end", command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --export disk --wait' },
    { description: 'Start it only; complete it later with blkrep job complete', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --export disk --speed 50M --json' },
    { description: 'Retry ranges the base fails to write instead of giving up', command: '<%= config.bin %> <%= command.id %> hidden.qcow2 --on-target-error ignore' },
    { description: 'Keep the overlay; report as JSON', command: "<%= config.bin %> <%= command.id %> active.qcow2 --keep --json | jq '.dataBytes'" },
  ];

  static override args = {
    overlay: Args.string({ description: 'the qcow2 overlay to commit (not with --control)', required: false }),
  };

  static override flags = {
    base: Flags.string({ char: 'b', description: "commit into this image of OVERLAY's backing chain (default: its backing file); implies --keep", helpValue: 'BASE' }),
    rate: sizeFlag({ char: 'r', description: 'copy at most this many bytes of data per second (e.g. 50M); the same as --speed', helpValue: 'BYTES' }),
    speed: sizeFlag({ description: 'limit the data rate to SIZE bytes per second (0: no limit)', helpValue: 'SIZE', exclusive: ['rate'] }),
    'on-source-error': Flags.string({ description: 'what a read error of the overlay does', options: [...ERROR_POLICIES], default: 'report' }),
    'on-target-error': Flags.string({ description: 'what a write error of the base does', options: [...ERROR_POLICIES], default: 'report' }),
    keep: Flags.boolean({ char: 'd', description: 'do not make OVERLAY empty afterwards', default: false }),
    'no-progress': Flags.boolean({ description: 'no progress bar, even on a terminal', default: false }),
    control: Flags.string({ char: 'c', description: "commit a live export: the serve-nbd daemon's control socket (a path, or a NAME for /run/blkrep/NAME.ctl as serve-nbd --control NAME)", helpValue: 'PATH|NAME' }),
    export: Flags.string({ description: 'with --control: the export whose image is committed (default: the only one)', helpValue: 'NAME' }),
    'job-id': Flags.string({ char: 'j', aliases: ['id'], description: 'with --control: the job id (default: commit0, commit1, and so on)', helpValue: 'ID' }),
    top: Flags.string({ description: "with --control: commit this layer of the export's backing chain (and those down to above BASE) instead of the export's image: an intermediate commit, which ends by itself and makes them empty", helpValue: 'LAYER' }),
    wait: waitFlag('with --control: follow the job; ready: exit once it is ready (it keeps running); done (or a bare --wait): complete it once ready (cancel it with --keep), exit when it has concluded'),
  };

  async run(): Promise<CommitOutput | LiveCommitOutput> {
    const { args, flags } = await this.parse(Commit, withBareWait(this.argv));
    if (flags.rate !== undefined && flags.rate <= 0) this.usageError(`--rate must be a positive number of bytes per second, not ${flags.rate}`);
    if (flags.control !== undefined) {
      if (args.overlay !== undefined) this.usageError(`with --control the image of an export is committed: name it with --export, not as ${args.overlay}`);
      if (flags.keep && flags.wait !== 'done') this.usageError('--keep with --control needs --wait done (the job keeps the overlay when it is cancelled once ready)');
      return this.live(flags);
    }
    for (const f of ['export', 'id', 'top'] as const) if (flags[f] !== undefined) this.usageError(`--${f} needs --control`);
    if (flags.wait) this.usageError('--wait needs --control');
    if (args.overlay === undefined) this.usageError('the overlay to commit is missing (or give --control PATH --export NAME for a live export)');
    let bar: Progress | undefined;
    let ticker: NodeJS.Timeout | undefined;
    let job: CommitJob | undefined;
    let stopReason: string | undefined;
    const errors: CommitOutput['errors'] = [];
    const showProgress = !this.jsonEnabled() && !flags['no-progress'];
    const onSignal = (): void => {
      stopReason ??= 'interrupted';
      void job?.cancel({ force: true }).catch(() => {});
    };
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    let committed: CommitResult;
    try {
      committed = await commitImage(args.overlay!, {
        ...(flags.base === undefined ? {} : { base: flags.base }),
        ...(flags.rate === undefined ? {} : { rate: flags.rate }),
        ...(flags.speed === undefined ? {} : { speed: flags.speed }),
        keep: flags.keep,
        onSourceError: flags['on-source-error'] as ErrorPolicy,
        onTargetError: flags['on-target-error'] as ErrorPolicy,
        onJob: (j) => {
          job = j;
          j.on('io-error', (e: Extract<JobEvent, { event: 'error' }>) => {
            errors.push({ side: e.side, operation: e.operation, errno: e.errno, action: e.action, offset: e.offset, length: e.length, message: e.message });
            if (!this.jsonEnabled()) this.logToStderr(`blkrep: ${e.side === 'source' ? 'overlay' : 'base'} ${e.operation} error (${e.errno}), ${e.action === 'ignore' ? 'will retry' : e.action === 'stop' ? 'stopping' : 'giving up'}: ${e.message}`);
            // offline nobody can resume a stopped job: end it
            if (e.action === 'stop') {
              stopReason ??= `${e.side === 'source' ? 'overlay' : 'base'} ${e.operation} error (${e.errno}) with policy stop: ${e.message}`;
              setImmediate(() => void j.cancel({ force: true }).catch(() => {}));
            }
          });
          ticker = setInterval(() => {
            const q = j.query();
            if (!showProgress || q.length === 0) return;
            bar ??= progressBar('commit', q.length, { enabled: true });
            bar.update(q.offset);
          }, 200);
        },
      });
    } catch (err) {
      if (stopReason && err instanceof BlkrepError && err.code === 'ERR_JOB_CANCELLED') {
        throw new BlkrepError('ERR_JOB_CANCELLED', `commit stopped before the base held everything (the overlay still shadows what was written): ${stopReason}`, { errno: 'EIO' });
      }
      throw err;
    } finally {
      if (ticker) clearInterval(ticker);
      bar?.stop();
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
    const result: CommitOutput = { ...committed, errors };
    if (!this.jsonEnabled()) {
      const moved = `${formatSize(result.dataBytes)} of data and ${formatSize(result.zeroBytes)} of zeros`;
      this.log(`Committed ${args.overlay} into ${result.base} (${result.baseFormat}): ${moved} in ${result.seconds.toFixed(1)} s.`);
      if (result.baseGrownFrom !== null) this.log(`${result.base} grew from ${result.baseGrownFrom} bytes to the overlay's size.`);
      if (result.emptied) this.log(`${args.overlay} is now empty: it reads through to ${result.base}.`);
      else if (flags.base !== undefined && !flags.keep) this.log(`${args.overlay} is kept (-b implies --keep).`);
      if (result.intermediates.length > 0) {
        this.logToStderr(`blkrep: warning: ${result.intermediates.join(', ')} no longer read${result.intermediates.length === 1 ? 's' : ''} as before the commit (everything above ${result.base} was committed into it)`);
      }
    }
    return result;
  }

  /** blkrep commit --control: a commit job in the daemon. */
  private async live(flags: {
    control?: string;
    export?: string;
    'job-id'?: string;
    base?: string;
    top?: string;
    rate?: number;
    speed?: number;
    keep: boolean;
    wait?: string;
    'on-source-error': string;
    'on-target-error': string;
    'no-progress': boolean;
  }): Promise<LiveCommitOutput> {
    const client = await ControlClient.connect(controlPathFor(flags.control!), { timeoutMs: 10_000 });
    try {
      const speed = flags.speed ?? flags.rate;
      // the daemon resolves paths against its own directory: send them absolute
      const abs = (spec: string): string => (/^[a-z][a-z0-9+.-]*:/i.test(spec) ? spec : resolve(spec));
      let info = (await client.request('job-start', {
        type: 'commit',
        ...(flags.export === undefined ? {} : { export: flags.export }),
        ...(flags['job-id'] === undefined ? {} : { id: flags['job-id'] }),
        ...(flags.base === undefined ? {} : { base: abs(flags.base) }),
        ...(flags.top === undefined ? {} : { top: abs(flags.top) }),
        ...(flags.keep ? { keep: true } : {}),
        ...(speed === undefined ? {} : { speed }),
        onSourceError: flags['on-source-error'],
        onTargetError: flags['on-target-error'],
      })) as JobInfo;
      const exportName = (info['export'] as string | null | undefined) ?? flags.export ?? null;
      if (!flags.wait) {
        if (!this.jsonEnabled()) {
          this.log(`Started commit job ${info.id} of export "${exportName}" (${info['top']} into ${info['base']}).`);
          if (info['active'] === false) this.log(`It ends by itself once ${info['base']} holds everything; it then makes ${(info['makeEmpty'] as string[]).join(', ')} empty.`);
          else this.log(`Once it is ready: blkrep job complete ${info.id} --control ${flags.control} (the overlay is then made empty).`);
        }
        return { live: true, export: exportName, job: info };
      }
      const id = info.id;
      const showProgress = !this.jsonEnabled() && !flags['no-progress'];
      let bar: Progress | undefined;
      // until the job reports how much it copies (and the bar takes over), a spinner says what is awaited
      const spinner = showProgress ? startSpinner(`job ${id}: waiting until ${flags.wait === 'ready' ? 'ready' : 'done'}…`, { enabled: true }) : undefined;
      let emptied: boolean | undefined;
      try {
        for (;;) {
          info = (await client.request('job-query', { id })) as JobInfo;
          if (showProgress && info.length > 0) {
            spinner?.stop();
            bar ??= progressBar('commit', info.length, { enabled: true });
            bar.update(Math.min(info.offset, info.length));
          }
          if (info.status === 'concluded') {
            // an intermediate commit ends by itself, having emptied the layers it committed
            if (info['active'] === false && !info.error) emptied = ((info['makeEmpty'] as unknown[] | undefined)?.length ?? 0) > 0;
            break;
          }
          if (info.status === 'ready' && flags.wait === 'ready') return { live: true, export: exportName, job: info };
          if (info.status === 'ready') {
            // complete resolves (or fails) once the job has concluded; cancel of a ready job too
            await client.request(flags.keep ? 'job-cancel' : 'job-complete', { id });
            emptied = !flags.keep;
            info = (await client.request('job-query', { id })) as JobInfo;
            break;
          }
          await new Promise((resolve) => setTimeout(resolve, 200));
        }
      } finally {
        spinner?.stop();
        bar?.stop();
      }
      if (info.error) throw new BlkrepError(info.error.code, `commit job ${id} failed: ${info.error.message}`, { errno: info.error.errno });
      if (emptied === undefined) throw new BlkrepError('ERR_JOB_CANCELLED', `commit job ${id} was cancelled before the base had caught up (the overlay still shadows what was written)`, { errno: 'ESHUTDOWN', details: { id } });
      if (!this.jsonEnabled()) {
        if (info['active'] === false) this.log(`Committed ${info['top']} of export "${exportName}" into ${info['base']}; ${(info['makeEmpty'] as string[]).join(', ')} made empty.`);
        else this.log(emptied ? `Committed the image of export "${exportName}" into ${info['base']}: the overlay is empty, writes go on to it.` : `The base ${info['base']} of export "${exportName}" is a consistent copy; the overlay was kept (--keep).`);
      }
      return { live: true, export: exportName, job: info, emptied };
    } finally {
      await client.close();
    }
  }
}
