/**
 * How `bitmap dump` shows a bitmap: the runs in nbdinfo's JSON (byte for byte what
 * `nbdinfo --map=qemu:dirty-bitmap:NAME --json` prints), a table of dirty runs, and a one-line
 * picture of the disk. Written for size: a 1 TiB disk at 64 KiB granularity has up to 16 Mi
 * granules, so everything is built as a few big strings, never an object per run.
 */
import { formatSize } from '../util/size.js';
import type { DirtyBitmap } from './dirty-bitmap.js';

/** Totals of the dirty runs of [start, end). */
export interface RangeTotals {
  runs: number;
  bytes: number;
  percent: number;
}

export function rangeTotals(bitmap: DirtyBitmap, start: number, end: number): RangeTotals {
  let runs = 0;
  let bytes = 0;
  if (start === 0 && end === bitmap.size) {
    bytes = bitmap.dirtyBytes;
    for (const _ of bitmap.dirtyRuns()) runs++;
  } else if (end > start) {
    for (const r of bitmap.dirtyRuns(start, end - start)) {
      runs++;
      bytes += r.length;
    }
  }
  return { runs, bytes, percent: end > start ? (100 * bytes) / (end - start) : 0 };
}

/**
 * `nbdinfo --map=qemu:dirty-bitmap:NAME --json` of [start, end): an array of
 * `{ "offset": N, "length": N, "type": 0|1, "description": "clean"|"dirty"}`, one per line.
 */
export function* nbdinfoJsonChunks(bitmap: DirtyBitmap, start: number, end: number, dirtyOnly: boolean): Generator<string> {
  const lines: string[] = [];
  let first = true;
  let pos = start;
  const CHUNK = 65536;
  yield '[\n';
  if (end > start) {
    for (const [length, dirty] of bitmap.statusRuns(start, end - start)) {
      if (dirty || !dirtyOnly) {
        lines.push(`${first ? '' : ',\n'}{ "offset": ${pos}, "length": ${length}, "type": ${dirty ? 1 : 0}, "description": "${dirty ? 'dirty' : 'clean'}"}`);
        first = false;
        if (lines.length >= CHUNK) yield lines.splice(0).join('');
      }
      pos += length;
    }
  }
  lines.push('\n]\n');
  yield lines.join('');
}

/** The dirty runs of [start, end) as a table: offset and length right-aligned. */
export function* runTableChunks(bitmap: DirtyBitmap, start: number, end: number): Generator<string> {
  const w = Math.max(String(end).length, 6);
  const pad = ' '.repeat(w);
  const col = (n: number): string => {
    const s = String(n);
    return s.length >= w ? s : pad.slice(s.length) + s;
  };
  const lines: string[] = [`${'Offset'.padStart(w)}  ${'Length'.padStart(w)}\n`];
  if (end > start) {
    for (const r of bitmap.dirtyRuns(start, end - start)) {
      lines.push(`${col(r.offset)}  ${col(r.length)}\n`);
      if (lines.length >= 65536) yield lines.splice(0).join('');
    }
  }
  yield lines.join('');
}

/** Characters of the picture: clean, then up to 1/8, 2/8 … all dirty. */
export const PICTURE_CLEAN = '·';
export const PICTURE_LEVELS = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/**
 * `columns` cells, each a slice of [start, end): how dirty it is, in eighths (any dirty byte
 * shows; only a fully dirty slice is a full block).
 */
export function picture(bitmap: DirtyBitmap, start: number, end: number, columns = 64): string {
  const length = end - start;
  if (length <= 0) return '';
  const cells = Math.max(1, Math.min(columns, length));
  const dirty = new Float64Array(cells);
  const cellBytes = length / cells;
  for (const r of bitmap.dirtyRuns(start, length)) {
    let a = r.offset - start;
    const b = a + r.length;
    while (a < b) {
      const i = Math.min(cells - 1, Math.floor(a / cellBytes));
      const cellEnd = i === cells - 1 ? length : (i + 1) * cellBytes;
      const to = Math.min(b, cellEnd);
      dirty[i]! += to - a;
      a = to;
    }
  }
  let out = '';
  for (let i = 0; i < cells; i++) {
    const cellLength = (i === cells - 1 ? length : (i + 1) * cellBytes) - i * cellBytes;
    const f = dirty[i]! / cellLength;
    if (f <= 0) out += PICTURE_CLEAN;
    else if (f >= 1 - 1e-12) out += PICTURE_LEVELS[7];
    else out += PICTURE_LEVELS[Math.min(6, Math.floor(f * 8))];
  }
  return out;
}

/** "1.00%", "<0.01%", "0%", "100%". */
export function formatPercent(p: number): string {
  if (p === 0) return '0%';
  if (p === 100) return '100%';
  if (p < 0.01) return '<0.01%';
  if (p > 99.99) return '>99.99%';
  return `${p.toFixed(2)}%`;
}

/** "10.2 GiB (10995116277 bytes)", or "0 B". */
export function sizeWithBytes(bytes: number): string {
  return bytes < 1024 ? formatSize(bytes) : `${formatSize(bytes)} (${bytes} bytes)`;
}
