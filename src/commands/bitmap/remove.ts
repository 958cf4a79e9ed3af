import { Flags } from '@oclif/core';
import { BitmapCommand, forceFlag, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { BitmapChange } from '../../bitmap/ops.js';

export default class BitmapRemove extends BitmapCommand {
  static override summary = 'Remove a dirty bitmap, with its file and checkpoints.';

  static override description = `Deletes bitmap NAME, as qemu-img bitmap --remove does: its file (IMAGE.NAME.bitmap, or the bitmap file given) and its checkpoint files. With --control, the export stops recording it, stops offering qemu:dirty-bitmap:NAME, and its file is deleted.

A bitmap that does not exist is an error, as for qemu-img, unless --if-exists is given: then the command succeeds and changes nothing ("changed": false), which is what a script that wants the bitmap gone needs.`;

  static override examples = [
    { description: 'Remove bitmap b0 of a raw image', command: '<%= config.bin %> <%= command.id %> disk.img --name b0' },
    { description: 'Make sure it is gone, whether it was there or not', command: '<%= config.bin %> <%= command.id %> disk.img --name b0 --if-exists --json' },
    { description: 'Stop tracking and remove a bitmap of a running daemon', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0' },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag('the bitmap to remove (required, except for a bitmap file)'),
    'if-exists': Flags.boolean({ description: 'succeed, changing nothing, when there is no such bitmap', default: false }),
    force: forceFlag,
  };

  async run(): Promise<BitmapChange> {
    const { args, flags } = await this.parse(BitmapRemove);
    const change = await this.withStore(args.target, flags, async (store) => {
      const name = await this.requireName(store, flags.name);
      const result = await store.remove(name, { ifExists: flags['if-exists'] });
      if (!this.jsonEnabled()) this.log(result.changed ? `Removed bitmap "${name}" of ${store.description}.` : `${store.description} has no bitmap "${name}"; nothing to remove.`);
      return result;
    });
    return change;
  }
}
