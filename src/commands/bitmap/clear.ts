import { Flags } from '@oclif/core';
import { BitmapCommand, forceFlag, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { BitmapChange } from '../../bitmap/ops.js';
import { parseRange } from '../../bitmap/ranges.js';

export default class BitmapClear extends BitmapCommand {
  static override summary = 'Mark a dirty bitmap clean, wholly or in ranges.';

  static override description = `Clears every bit of bitmap NAME, as qemu-img bitmap --clear does (it stays enabled or disabled as it was), or with --range only the granules lying wholly inside the ranges: a granule only partly inside keeps its bit, since a copy of part of it says nothing of the rest. On a live export, granules under a write in flight stay dirty.

Clearing a bitmap that is already clean there succeeds and changes nothing ("changed": false).`;

  static override examples = [
    { description: 'Everything has been copied: start afresh', command: '<%= config.bin %> <%= command.id %> disk.img --name b0' },
    { description: 'The first gigabyte has been copied', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0 --range 0:1G' },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag(),
    range: Flags.string({ charAliases: ['r'], description: 'clear only the granules wholly inside OFFSET:LENGTH (sizes take suffixes: 1G:64K)', helpValue: 'OFFSET:LENGTH', multiple: true, multipleNonGreedy: true }),
    force: forceFlag,
  };

  async run(): Promise<BitmapChange> {
    const { args, flags } = await this.parse(BitmapClear);
    const ranges = flags.range?.map(parseRange);
    return this.withStore(args.target, flags, async (store) => {
      const change = await store.clear(await store.resolve(flags.name), ranges);
      this.report(change, store, 'Cleared', 'Already clean');
      return change;
    });
  }
}
