import { BitmapCommand, forceFlag, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { CheckpointInfo } from '../../bitmap/ops.js';
import { formatPercent } from '../../bitmap/dump-format.js';
import { formatSize } from '../../util/size.js';

export type CheckpointResult = CheckpointInfo & { name: string; changed: true; recording: number };

export default class BitmapCheckpoint extends BitmapCommand {
  static override summary = 'Freeze a dirty bitmap as checkpoint N and start recording N+1.';

  static override description = `In one atomic step with respect to writes, freezes the bits of bitmap NAME as checkpoint N (the number it was recording, 1 for a new bitmap) in the read-only file FILE.ckpt-N beside its bitmap file, and starts recording N+1 empty: a write that completed before is in N, one in flight is in both, a later one only in N+1. A crash at any moment leaves either no checkpoint and the bitmap as it was, or the checkpoint and a bitmap that may still hold some of N's regions, never fewer.

This is the primitive of incremental backups and resyncs: copy what checkpoint N says, while N+1 records what changes meanwhile. Each call makes a new checkpoint (it is not idempotent, as a snapshot is not). List them with blkrep bitmap checkpoints, read one with blkrep bitmap dump --checkpoint N, merge one back with blkrep bitmap merge --source-file FILE.ckpt-N. Bitmaps kept in memory have no checkpoints.`;

  static override examples = [
    { description: 'Checkpoint the bitmap of a running daemon and copy what it says', command: "<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0 --json | jq .number" },
    { description: 'Checkpoint an image\'s bitmap while nothing serves it', command: '<%= config.bin %> <%= command.id %> disk.img --name b0' },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag(),
    force: forceFlag,
  };

  async run(): Promise<CheckpointResult> {
    const { args, flags } = await this.parse(BitmapCheckpoint);
    return this.withStore(args.target, flags, async (store) => {
      const name = await store.resolve(flags.name);
      const info = await store.checkpoint(name);
      const result: CheckpointResult = { name, changed: true, ...info, recording: info.number + 1 };
      if (!this.jsonEnabled()) {
        this.log(`Checkpoint ${info.number} of bitmap "${name}" of ${store.description}: ${formatSize(info.dirtyBytes)} dirty (${formatPercent(info.size ? (100 * info.dirtyBytes) / info.size : 0)}), in ${info.path}.`);
        this.log(`Recording checkpoint ${info.number + 1}.`);
      }
      return result;
    });
  }
}
