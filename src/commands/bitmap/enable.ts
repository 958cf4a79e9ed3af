import { BitmapCommand, forceFlag, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { BitmapChange } from '../../bitmap/ops.js';

export default class BitmapEnable extends BitmapCommand {
  static override summary = 'Make a dirty bitmap record writes again.';

  static override description = `Sets bitmap NAME recording, as qemu-img bitmap --enable does: writes through serve-nbd are recorded in it from now on. A bitmap already enabled stays so and nothing changes ("changed": false).`;

  static override examples = [
    { description: 'Enable bitmap b0 of a raw image', command: '<%= config.bin %> <%= command.id %> disk.img --name b0' },
    { description: 'The same on a running daemon, for a script', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0 --json' },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag(),
    force: forceFlag,
  };

  async run(): Promise<BitmapChange> {
    const { args, flags } = await this.parse(BitmapEnable);
    return this.withStore(args.target, flags, async (store) => {
      const change = await store.setEnabled(await store.resolve(flags.name), true);
      this.report(change, store, 'Enabled', 'Already enabled');
      return change;
    });
  }
}
