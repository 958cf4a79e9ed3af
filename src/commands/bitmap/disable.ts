import { BitmapCommand, forceFlag, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { BitmapChange } from '../../bitmap/ops.js';

export default class BitmapDisable extends BitmapCommand {
  static override summary = 'Stop a dirty bitmap recording writes.';

  static override description = `Sets bitmap NAME not recording, as qemu-img bitmap --disable does: writes are no longer recorded in it, while its bits stay and may still be cleared, filled, merged and dumped. A bitmap already disabled stays so and nothing changes ("changed": false).`;

  static override examples = [
    { description: 'Disable bitmap b0 of a raw image', command: '<%= config.bin %> <%= command.id %> disk.img --name b0' },
    { description: 'The same on a running daemon, for a script', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0 --json' },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag(),
    force: forceFlag,
  };

  async run(): Promise<BitmapChange> {
    const { args, flags } = await this.parse(BitmapDisable);
    return this.withStore(args.target, flags, async (store) => {
      const change = await store.setEnabled(await store.resolve(flags.name), false);
      this.report(change, store, 'Disabled', 'Already disabled');
      return change;
    });
  }
}
