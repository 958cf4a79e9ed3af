import { BitmapCommand, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { CheckpointInfo } from '../../bitmap/ops.js';
import { formatPercent } from '../../bitmap/dump-format.js';
import { formatSize } from '../../util/size.js';

export default class BitmapCheckpoints extends BitmapCommand {
  static override summary = 'List the checkpoints of a dirty bitmap.';

  static override description = `Lists the checkpoints made by blkrep bitmap checkpoint, oldest first: number, when it was frozen, how much of the disk it holds dirty, its file and the file's size. A checkpoint file that cannot be read is listed with its error. With --json, an array of {number, path, createdAt, size, granularity, dirtyGranules, dirtyBytes, fileBytes, error?}.`;

  static override examples = [
    { description: 'The checkpoints of bitmap b0 of a raw image', command: '<%= config.bin %> <%= command.id %> disk.img --name b0' },
    { description: 'The newest checkpoint\'s number, on a running daemon', command: "<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0 --json | jq '.[-1].number'" },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag(),
  };

  async run(): Promise<CheckpointInfo[]> {
    const { args, flags } = await this.parse(BitmapCheckpoints);
    return this.withStore(args.target, flags, async (store) => {
      const name = await store.resolve(flags.name);
      const list = await store.checkpoints(name);
      if (!this.jsonEnabled()) {
        if (list.length === 0) this.log(`Bitmap "${name}" of ${store.description} has no checkpoints.`);
        else {
          this.log(`${'N'.padStart(5)}  ${'Created'.padEnd(24)}  ${'Dirty'.padStart(12)}  ${'%'.padStart(7)}  ${'File size'.padStart(10)}  File`);
          for (const c of list) {
            if (c.error) {
              this.log(`${String(c.number).padStart(5)}  ${'?'.padEnd(24)}  ${'?'.padStart(12)}  ${'?'.padStart(7)}  ${formatSize(c.fileBytes).padStart(10)}  ${c.path}: ${c.error}`);
              continue;
            }
            const pct = c.size ? (100 * c.dirtyBytes) / c.size : 0;
            this.log(`${String(c.number).padStart(5)}  ${c.createdAt.padEnd(24)}  ${formatSize(c.dirtyBytes).padStart(12)}  ${formatPercent(pct).padStart(7)}  ${formatSize(c.fileBytes).padStart(10)}  ${c.path}`);
          }
        }
      }
      return list;
    });
  }
}
