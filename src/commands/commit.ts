import { Args, Flags } from '@oclif/core';
import { BlkrepError } from '../api/errors.js';
import { BlkrepCommand } from '../cli/base.js';
import { sizeFlag } from '../cli/flags.js';
import { progressBar, type Progress } from '../cli/progress.js';
import { commitImage, type CommitResult } from '../image/commit.js';
import type { CommitJob } from '../jobs/commit.js';
import { ERROR_POLICIES, type ErrorPolicy, type JobEvent } from '../jobs/job.js';
import { formatSize } from '../util/size.js';

type CommitOutput = CommitResult & { errors: Array<{ side: string; operation: string; errno: string; action: string; offset: number; length: number; message: string }> };

export default class Commit extends BlkrepCommand {
  static override summary = "Write an overlay's data into its backing file, then empty the overlay.";

  static override description = `Writes every range the qcow2 OVERLAY allocates into its backing file, as OVERLAY reads it (zero clusters are written as zeros, so old backing data does not come back), flushes the backing file, then makes OVERLAY empty so reads fall through to the backing file again. --keep leaves OVERLAY as it is. Only allocated ranges move; several 1 MiB requests are in flight, and --speed (or --rate) limits the data copied per second. The backing file grows to OVERLAY's size if it is smaller.

With -b BASE the data goes into BASE further down OVERLAY's backing chain, and every layer between OVERLAY and BASE is committed too. As with qemu-img commit -b, this keeps OVERLAY (-b implies --keep): OVERLAY still reads the same afterwards, but the layers between it and BASE do not (the result lists them as intermediates); to drop them, run blkrep make-empty on them, deepest first, then on OVERLAY.

A crash or an interruption is harmless: until OVERLAY is emptied it shadows everything already written into the base, and the commit can be run again.

The commit runs as a job (the engine of blkrep mirror): --on-source-error and --on-target-error choose what a read error of the overlay or a write error of the base does (report ends the commit, ignore retries the range later; stop, offline, ends it too, as nobody can resume it). A progress bar with the rate and the time left is shown on a terminal.`;

  static override examples = [
    { description: 'Fold an overlay into its backing file', command: '<%= config.bin %> <%= command.id %> active.qcow2' },
    { description: 'Commit the whole chain above base.img, at most 100 MiB/s', command: '<%= config.bin %> <%= command.id %> active.qcow2 -b base.img --speed 100M' },
    { description: 'Retry ranges the base fails to write instead of giving up', command: '<%= config.bin %> <%= command.id %> hidden.qcow2 --on-target-error ignore' },
    { description: 'Keep the overlay; report as JSON', command: "<%= config.bin %> <%= command.id %> active.qcow2 --keep --json | jq '.dataBytes'" },
  ];

  static override args = {
    overlay: Args.string({ description: 'the qcow2 overlay to commit', required: true }),
  };

  static override flags = {
    base: Flags.string({ char: 'b', description: "commit into this image of OVERLAY's backing chain (default: its backing file); implies --keep", helpValue: 'BASE' }),
    rate: sizeFlag({ char: 'r', description: 'copy at most this many bytes of data per second (e.g. 50M); the same as --speed', helpValue: 'BYTES' }),
    speed: sizeFlag({ description: 'limit the data rate to SIZE bytes per second (0: no limit)', helpValue: 'SIZE', exclusive: ['rate'] }),
    'on-source-error': Flags.string({ description: 'what a read error of the overlay does', options: [...ERROR_POLICIES], default: 'report' }),
    'on-target-error': Flags.string({ description: 'what a write error of the base does', options: [...ERROR_POLICIES], default: 'report' }),
    keep: Flags.boolean({ char: 'd', description: 'do not make OVERLAY empty afterwards', default: false }),
    'no-progress': Flags.boolean({ description: 'no progress bar, even on a terminal', default: false }),
  };

  async run(): Promise<CommitOutput> {
    const { args, flags } = await this.parse(Commit);
    if (flags.rate !== undefined && flags.rate <= 0) this.usageError(`--rate must be a positive number of bytes per second, not ${flags.rate}`);
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
      committed = await commitImage(args.overlay, {
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
}
