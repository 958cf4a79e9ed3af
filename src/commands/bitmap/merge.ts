import { Flags } from '@oclif/core';
import { BitmapCommand, forceFlag, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { BitmapChange } from '../../bitmap/ops.js';

export default class BitmapMerge extends BitmapCommand {
  static override summary = 'Merge one dirty bitmap into another.';

  static override description = `ORs the bits of a source bitmap into bitmap NAME, as qemu-img bitmap --merge SOURCE [-b SOURCE_FILE] does: a region dirty in either is dirty afterwards. The source is bitmap SOURCE of the same target, or, with --source-file, of another one: a bitmap file (a checkpoint file too), a qcow2 image (its bitmap SOURCE), or a raw image whose bitmap SOURCE is IMAGE.SOURCE.bitmap. The two must cover disks of the same size; their granularities may differ (every granule of NAME that a dirty region of the source touches becomes dirty).

Merging bits that are already there succeeds and changes nothing ("changed": false).`;

  static override examples = [
    { description: 'Merge bitmap b1 into b0, both of a raw image', command: '<%= config.bin %> <%= command.id %> disk.img --name b0 --source b1' },
    { description: 'Merge checkpoint 3 back into a live bitmap', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0 --source-file disk.img.b0.bitmap.ckpt-3' },
    { description: 'Merge the bitmap b0 of another image', command: '<%= config.bin %> <%= command.id %> disk.img --name b0 --source b0 --source-file other.img' },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag('the bitmap merged into (default: the only one there is)'),
    source: Flags.string({ charAliases: ['s'], aliases: ['merge'], description: 'the bitmap merged from: of the same target, or of --source-file', helpValue: 'SOURCE' }),
    'source-file': Flags.string({ char: 'b', description: 'take the source from this bitmap file, qcow2 image or raw image', helpValue: 'FILE' }),
    force: forceFlag,
  };

  async run(): Promise<BitmapChange> {
    const { args, flags } = await this.parse(BitmapMerge);
    if (flags.source === undefined && flags['source-file'] === undefined) this.usageError('say what to merge: --source SOURCE and/or --source-file FILE');
    return this.withStore(args.target, flags, async (store) => {
      const name = await store.resolve(flags.name);
      const change = await store.merge(name, {
        ...(flags.source === undefined ? {} : { name: flags.source }),
        ...(flags['source-file'] === undefined ? {} : { file: flags['source-file'] }),
      });
      this.report(change, store, 'Merged', 'Nothing new to merge');
      return change;
    });
  }
}
