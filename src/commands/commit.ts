import { Args, Flags } from '@oclif/core';
import { BlkrepCommand } from '../cli/base.js';
import { sizeFlag } from '../cli/flags.js';
import { progressBar, type Progress } from '../cli/progress.js';
import { commitImage, type CommitResult } from '../image/commit.js';
import { formatSize } from '../util/size.js';

export default class Commit extends BlkrepCommand {
  static override summary = "Write an overlay's data into its backing file, then empty the overlay.";

  static override description = `Writes every range the qcow2 OVERLAY allocates into its backing file, as OVERLAY reads it (zero clusters are written as zeros, so old backing data does not come back), flushes the backing file, then makes OVERLAY empty so reads fall through to the backing file again. --keep leaves OVERLAY as it is. Only allocated ranges move; several 1 MiB requests are in flight, and --rate limits the data copied per second. The backing file grows to OVERLAY's size if it is smaller.

With -b BASE the data goes into BASE further down OVERLAY's backing chain, and every layer between OVERLAY and BASE is committed too. As with qemu-img commit -b, this keeps OVERLAY (-b implies --keep): OVERLAY still reads the same afterwards, but the layers between it and BASE do not (the result lists them as intermediates); to drop them, run blkrep make-empty on them, deepest first, then on OVERLAY.

A crash or an interruption is harmless: until OVERLAY is emptied it shadows everything already written into the base, and the commit can be run again.`;

  static override examples = [
    { description: 'Fold an overlay into its backing file', command: '<%= config.bin %> <%= command.id %> active.qcow2' },
    { description: 'Commit the whole chain above base.img, at most 100 MiB/s', command: '<%= config.bin %> <%= command.id %> active.qcow2 -b base.img --rate 100M' },
    { description: 'Keep the overlay; report as JSON', command: "<%= config.bin %> <%= command.id %> active.qcow2 --keep --json | jq '.dataBytes'" },
  ];

  static override args = {
    overlay: Args.string({ description: 'the qcow2 overlay to commit', required: true }),
  };

  static override flags = {
    base: Flags.string({ char: 'b', description: "commit into this image of OVERLAY's backing chain (default: its backing file); implies --keep", helpValue: 'BASE' }),
    rate: sizeFlag({ char: 'r', description: 'copy at most this many bytes of data per second (e.g. 50M)', helpValue: 'BYTES' }),
    keep: Flags.boolean({ char: 'd', description: 'do not make OVERLAY empty afterwards', default: false }),
    'no-progress': Flags.boolean({ description: 'no progress bar, even on a terminal', default: false }),
  };

  async run(): Promise<CommitResult> {
    const { args, flags } = await this.parse(Commit);
    if (flags.rate !== undefined && flags.rate <= 0) this.usageError(`--rate must be a positive number of bytes per second, not ${flags.rate}`);
    let bar: Progress | undefined;
    let result: CommitResult;
    try {
      result = await commitImage(args.overlay, {
        ...(flags.base === undefined ? {} : { base: flags.base }),
        ...(flags.rate === undefined ? {} : { rate: flags.rate }),
        keep: flags.keep,
        onProgress: (done, total) => {
          bar ??= progressBar('commit', total, { enabled: !this.jsonEnabled() && !flags['no-progress'] });
          bar.update(done);
        },
      });
    } finally {
      bar?.stop();
    }
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
