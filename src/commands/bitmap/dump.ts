import { forceShareFlag } from '../../cli/image.js';
import { onStdoutError, writeStdout } from '../../cli/stdio.js';
import { Flags } from '@oclif/core';
import { BitmapCommand, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { DirtyBitmap } from '../../bitmap/dirty-bitmap.js';
import {
  formatPercent, nbdinfoJsonChunks, picture, PICTURE_CLEAN, PICTURE_LEVELS, rangeTotals, runTableChunks, sizeWithBytes,
} from '../../bitmap/dump-format.js';
import { describeLoadState, type BitmapInfo, type LoadState } from '../../bitmap/ops.js';
import { sizeFlag } from '../../cli/flags.js';
import { formatSize } from '../../util/size.js';

/** What --summary --json prints. */
export interface DumpSummary {
  name: string;
  export?: string;
  file: string | null;
  persistent: boolean;
  /** the checkpoint shown, or null for the bitmap itself */
  checkpoint: number | null;
  size: number;
  granularity: number;
  enabled: boolean;
  frozen: boolean;
  epoch: number | null;
  loadState: LoadState;
  /** the range summed: [start, start+length) */
  start: number;
  length: number;
  /** dirty runs, dirty bytes and their share of the range */
  runs: number;
  dirtyBytes: number;
  percent: number;
}

export default class BitmapDump extends BitmapCommand {
  static override summary = 'Show the dirty regions of a dirty bitmap.';

  static override description = `Prints the bitmap's dirty runs (offset and length in bytes), the totals (runs, bytes, share of the disk), and a one-line picture of the disk in 64 cells, each showing how much of its slice is dirty: a middle dot for a clean slice, then the block characters from lower one eighth block (up to an eighth dirty) to full block (all of it dirty); any dirty byte shows.

With --json, the runs are printed exactly as nbdinfo --map=qemu:dirty-bitmap:NAME --json prints them, clean and dirty runs alternating over the whole range: [{ "offset": N, "length": N, "type": 1, "description": "dirty"}, ...] with type 0 and "clean" for clean runs (--dirty-only leaves those out). --summary prints only the totals; with --json, an object {name, file, persistent, checkpoint, size, granularity, enabled, frozen, epoch, loadState, start, length, runs, dirtyBytes, percent}.

--start and --length limit everything to a range. --checkpoint N shows checkpoint N instead of the bitmap. A bitmap file marked in use (a daemon has it open, or its writer died) is shown as it would be recovered; one that cannot be trusted is shown all dirty, and stderr says why.`;

  static override examples = [
    { description: 'The dirty regions of bitmap b0 of a raw image', command: '<%= config.bin %> <%= command.id %> disk.img --name b0' },
    { description: 'Only the totals and the picture', command: '<%= config.bin %> <%= command.id %> disk.img --summary' },
    { description: 'The bitmap of a running daemon, as nbdinfo prints it', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0 --json' },
    { description: 'How many bytes checkpoint 3 holds dirty', command: "<%= config.bin %> <%= command.id %> disk.img --name b0 --checkpoint 3 --summary --json | jq .dirtyBytes" },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    'force-share': forceShareFlag(),
    name: nameFlag(),
    summary: Flags.boolean({ description: 'only the totals (and the picture)', default: false }),
    'dirty-only': Flags.boolean({ description: 'with --json: leave the clean runs out', default: false }),
    start: sizeFlag({ description: 'from this offset', helpValue: 'OFFSET' }),
    length: sizeFlag({ description: 'this many bytes', helpValue: 'LENGTH' }),
    checkpoint: Flags.integer({ description: 'show checkpoint N of the bitmap', min: 1, helpValue: 'N' }),
  };

  async run(): Promise<DumpSummary | undefined> {
    const { args, flags } = await this.parse(BitmapDump);
    const json = this.jsonEnabled();
    const { info, bitmap, checkpoint, where } = await this.withStore(args.target, flags, async (store) => {
      const name = await store.resolve(flags.name);
      if (flags.checkpoint !== undefined) {
        const ck = await store.readCheckpoint(name, flags.checkpoint);
        const base = (await store.list()).find((b) => b.name === name);
        const info: BitmapInfo = {
          name,
          ...(base?.export === undefined ? {} : { export: base.export }),
          persistent: true,
          file: ck.info.path,
          size: ck.bitmap.size,
          granularity: ck.bitmap.granularity,
          enabled: false,
          dirtyGranules: ck.bitmap.dirtyGranules,
          dirtyBytes: ck.bitmap.dirtyBytes,
          percent: ck.bitmap.size ? (100 * ck.bitmap.dirtyBytes) / ck.bitmap.size : 0,
          epoch: null,
          frozen: true,
          loadState: { state: 'clean' },
        };
        return { info, bitmap: ck.bitmap, checkpoint: flags.checkpoint as number | null, where: store.description };
      }
      const r = await store.read(name, { ...(flags.start === undefined ? {} : { start: flags.start }), ...(flags.length === undefined ? {} : { length: flags.length }) });
      return { ...r, checkpoint: null, where: store.description };
    });
    const start = flags.start ?? 0;
    if (start > bitmap.size) this.usageError(`--start ${start} is beyond the end of the disk (size ${bitmap.size})`);
    const end = Math.min(bitmap.size, start + (flags.length ?? bitmap.size));
    if (info.loadState.state === 'all-dirty') this.logToStderr(`blkrep: bitmap "${info.name}" (${info.file}): ${describeLoadState(info.loadState)}`);

    if (json && !flags.summary) {
      writeOut(nbdinfoJsonChunks(bitmap, start, end, flags['dirty-only']));
      return undefined;
    }
    const t = rangeTotals(bitmap, start, end);
    const summary: DumpSummary = {
      name: info.name,
      ...(info.export === undefined ? {} : { export: info.export }),
      file: info.file,
      persistent: info.persistent,
      checkpoint,
      size: bitmap.size,
      granularity: bitmap.granularity,
      enabled: info.enabled,
      frozen: info.frozen,
      epoch: info.epoch,
      loadState: info.loadState,
      start,
      length: end - start,
      runs: t.runs,
      dirtyBytes: t.bytes,
      percent: t.percent,
    };
    if (json) return summary;
    this.printHeader(summary, where, bitmap, start, end);
    if (!flags.summary) {
      this.log('');
      writeOut(runTableChunks(bitmap, start, end));
    }
    return summary;
  }

  private printHeader(s: DumpSummary, where: string, bitmap: DirtyBitmap, start: number, end: number): void {
    const what = s.checkpoint === null ? `Bitmap "${s.name}"` : `Checkpoint ${s.checkpoint} of bitmap "${s.name}"`;
    this.log(`${what} of ${where}${s.file === null ? ' (in memory)' : where.endsWith(s.file) ? '' : ` (${s.file})`}`);
    const state = s.frozen ? 'frozen' : s.enabled ? 'enabled' : 'disabled';
    const recording = s.epoch !== null ? `, recording checkpoint ${s.epoch}` : '';
    this.log(`  disk ${sizeWithBytes(s.size)}, granularity ${formatSize(s.granularity)}, ${state}${recording}`);
    if (s.loadState.state !== 'clean') this.log(`  loaded: ${describeLoadState(s.loadState)}`);
    const range = start === 0 && end === s.size ? '' : ` in ${start}..${end} (${formatSize(end - start)})`;
    this.log(`  dirty${range}: ${s.runs} run${s.runs === 1 ? '' : 's'}, ${sizeWithBytes(s.dirtyBytes)}, ${formatPercent(s.percent)}`);
    const pic = picture(bitmap, start, end);
    if (pic) {
      const cells = pic.length;
      this.log(`  [${pic}]`);
      const left = formatSize(start);
      const right = formatSize(end);
      this.log(`   ${left}${' '.repeat(Math.max(1, cells - left.length - right.length))}${right}`);
      this.log(`  one cell: ${formatSize(Math.round((end - start) / cells))}; ${PICTURE_CLEAN} clean, ${PICTURE_LEVELS[0]} to ${PICTURE_LEVELS[7]}: up to 1/8 … all of it dirty`);
    }
  }
}

/** Write big output in a few chunks; a reader that goes away (| head) ends the command quietly. */
function writeOut(chunks: Iterable<Buffer>): void {
  onStdoutError((err) => {
    if (err.code === 'EPIPE') process.exit(0);
  });
  for (const c of chunks) writeStdout(c);
}
