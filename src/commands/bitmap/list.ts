import { BitmapCommand, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import { forceShareFlag } from '../../cli/image.js';
import { formatPercent } from '../../bitmap/dump-format.js';
import type { BitmapInfo } from '../../bitmap/ops.js';
import { formatSize } from '../../util/size.js';

export default class BitmapList extends BitmapCommand {
  static override summary = 'List the dirty bitmaps of an image, a bitmap file or a live export.';

  static override description = `Lists each bitmap: name, granularity, whether it records writes, how much is dirty, where it is kept, and how far it could be trusted when loaded (clean; recovered, after its writer stopped without closing it; or all-dirty, with the reason). With --control and no --export, the bitmaps of every export of the daemon.

With --json, an array of {name, export?, persistent, file, size, granularity, enabled, dirtyGranules, dirtyBytes, percent, epoch, frozen, loadState}, where loadState is {state: "clean"}, {state: "recovered", extentsReplayed, pagesDistrusted, alSequence} or {state: "all-dirty", fault, reason}.`;

  static override examples = [
    { description: 'The bitmaps of a raw image', command: '<%= config.bin %> <%= command.id %> disk.img' },
    { description: 'The bitmaps of every export of a running daemon, as JSON', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --json' },
  ];

  static override args = { target: targetArg };

  static override flags = { ...storeFlags, 'force-share': forceShareFlag() };

  async run(): Promise<BitmapInfo[]> {
    const { args, flags } = await this.parse(BitmapList);
    return this.withStore(args.target, flags, async (store) => {
      const list = await store.list();
      if (!this.jsonEnabled()) {
        if (list.length === 0) this.log(`${store.description} has no bitmaps.`);
        const live = list.some((b) => b.export !== undefined);
        for (const b of list) {
          const state = b.loadState.state === 'clean' ? '' : b.loadState.state === 'recovered' ? ', recovered' : `, ALL-DIRTY: ${b.loadState.reason}`;
          const who = live ? `export "${b.export}" ` : '';
          this.log(
            `${who}"${b.name}"  ${formatSize(b.size)} at ${formatSize(b.granularity)}  ${b.frozen ? 'frozen' : b.enabled ? 'enabled' : 'disabled'}  ` +
              `${formatSize(b.dirtyBytes)} dirty (${formatPercent(b.percent)})  ${b.file ?? 'in memory'}${b.epoch !== null ? `  recording checkpoint ${b.epoch}` : ''}${state}`,
          );
        }
      }
      return list;
    });
  }
}
