import { Flags } from '@oclif/core';
import { BitmapCommand, forceFlag, nameFlag, storeFlags, summary, targetArg } from '../../cli/bitmap-command.js';
import type { BitmapChange } from '../../bitmap/ops.js';
import { sizeFlag } from '../../cli/flags.js';

export default class BitmapAdd extends BitmapCommand {
  static override summary = 'Add a dirty bitmap to an image, a bitmap file or a live export.';

  static override description = `Creates an empty dirty bitmap NAME, recording writes unless --disabled, as qemu-img bitmap --add does. On a raw image it is the file IMAGE.NAME.bitmap beside it, which serve-nbd loads whenever it serves the image; given a path that does not exist and --size, it is a bitmap file of its own. With --control, the bitmap is added to an export of a running serve-nbd and records its writes from this moment on (kept in IMAGE.NAME.bitmap, or --file, or in memory for in-memory images).

Add a bitmap to an image that serve-nbd is serving through --control, not offline: the running daemon does not record writes in a file it has not loaded, so an offline bitmap would miss them until the daemon is restarted.

Adding a bitmap that exists with the settings asked for succeeds and changes nothing ("changed": false), so a script may run it again; one that exists with other settings (granularity, enabled or disabled, size) is an error naming the difference.`;

  static override examples = [
    { description: 'A bitmap of a raw image, at the default granularity of 64 KiB', command: '<%= config.bin %> <%= command.id %> disk.img --name b0' },
    { description: 'A finer bitmap, not recording yet', command: '<%= config.bin %> <%= command.id %> disk.img --name b1 --granularity 4K --disabled' },
    { description: 'A bitmap file of its own, for a 10 GiB disk', command: '<%= config.bin %> <%= command.id %> /var/lib/blkrep/vdb.b0.bitmap --size 10G' },
    { description: 'Start tracking an export of a running daemon', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --export disk --name b0 --json' },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag('the new bitmap (required, except for a bitmap file, whose name is its own)'),
    granularity: sizeFlag({ char: 'g', description: 'bytes per bit: a power of two from 512 to 64M [default: 64K]', helpValue: 'SIZE' }),
    disabled: Flags.boolean({ description: 'do not record writes until enabled (blkrep bitmap enable)', default: false }),
    size: sizeFlag({ description: 'the size of the disk, for a new bitmap file given on its own', helpValue: 'SIZE' }),
    file: Flags.string({ description: 'with --control: keep the bitmap in FILE instead of beside the image', helpValue: 'FILE' }),
    'in-memory': Flags.boolean({ description: 'with --control: keep the bitmap in the daemon\'s memory only (lost when it stops)', default: false }),
    force: forceFlag,
  };

  async run(): Promise<BitmapChange> {
    const { args, flags } = await this.parse(BitmapAdd);
    if ((flags.file !== undefined || flags['in-memory']) && flags.control === undefined) this.usageError('--file and --in-memory are for a live export (--control)');
    if (flags.file !== undefined && flags['in-memory']) this.usageError('--file and --in-memory contradict each other');
    if (flags.size !== undefined && flags.control !== undefined) this.usageError('--size is for a new bitmap file; a live export\'s bitmaps cover the export');
    const g = flags.granularity;
    if (g !== undefined && (g < 512 || g > 64 * 1024 * 1024 || (g & (g - 1)) !== 0)) this.usageError(`--granularity ${g} is not a power of two between 512 and 64M`);
    const change = await this.withStore(args.target, flags, async (store) => {
      const name = await this.requireName(store, flags.name);
      return store.add(name, {
        ...(g === undefined ? {} : { granularity: g }),
        ...(flags.disabled ? { enabled: false } : {}),
        ...(flags.size === undefined ? {} : { size: flags.size }),
        ...(flags.file === undefined ? {} : { file: flags.file }),
        ...(flags['in-memory'] ? { persistent: false } : {}),
      });
    });
    if (!this.jsonEnabled()) {
      const b = change.bitmap!;
      const where = b.file ?? 'in memory';
      this.log(change.changed ? `Added bitmap "${change.name}" (${where}): ${summary(b)}.` : `Bitmap "${change.name}" (${where}) already exists as asked: ${summary(b)}; nothing changed.`);
    }
    return change;
  }
}
