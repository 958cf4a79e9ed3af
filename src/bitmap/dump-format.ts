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
 * ASCII output built in 1 MiB buffers: numbers written digit by digit and constant pieces
 * copied byte by byte — several times faster than a template string per line.
 */
const CHUNK = 1 << 20;

class AsciiOut {
  private buf = Buffer.allocUnsafe(CHUNK);
  private o = 0;

  /** Room for `n` more bytes; returns the full chunk to emit first, if any. */
  reserve(n: number): Buffer | undefined {
    if (this.o + n <= this.buf.length) return undefined;
    return this.take(Math.max(CHUNK, n));
  }

  /** What has been written so far; the writer starts a new buffer. */
  take(next = CHUNK): Buffer {
    const out = this.buf.subarray(0, this.o);
    this.buf = Buffer.allocUnsafe(next);
    this.o = 0;
    return out;
  }

  bytes(b: Uint8Array): void {
    const buf = this.buf;
    let o = this.o;
    for (let i = 0; i < b.length; i++) buf[o++] = b[i]!;
    this.o = o;
  }

  /** A non-negative integer below 2^53, right-aligned in `width` columns (0: as it is). */
  num(n: number, width = 0): void {
    const buf = this.buf;
    let digits = 1;
    for (let p = 10; p <= n; p *= 10) digits++;
    for (let pad = width - digits; pad > 0; pad--) buf[this.o++] = 0x20;
    let o = this.o + digits;
    this.o = o;
    do {
      const q = Math.floor(n / 10);
      buf[--o] = 0x30 + (n - q * 10);
      n = q;
    } while (n > 0);
  }
}

const ascii = (s: string): Uint8Array => Buffer.from(s, 'latin1');
const J_OPEN = ascii('{ "offset": ');
const J_LENGTH = ascii(', "length": ');
const J_DIRTY = ascii(', "type": 1, "description": "dirty"}');
const J_CLEAN = ascii(', "type": 0, "description": "clean"}');
const J_SEP = ascii(',\n');
const NL = ascii('\n');
const TWO_SPACES = ascii('  ');

/**
 * `nbdinfo --map=qemu:dirty-bitmap:NAME --json` of [start, end): an array of
 * `{ "offset": N, "length": N, "type": 0|1, "description": "clean"|"dirty"}`, one per line.
 */
export function* nbdinfoJsonChunks(bitmap: DirtyBitmap, start: number, end: number, dirtyOnly: boolean): Generator<Buffer> {
  const out = new AsciiOut();
  let first = true;
  const entry = function* (offset: number, length: number, dirty: boolean): Generator<Buffer> {
    const full = out.reserve(128);
    if (full) yield full;
    if (!first) out.bytes(J_SEP);
    first = false;
    out.bytes(J_OPEN);
    out.num(offset);
    out.bytes(J_LENGTH);
    out.num(length);
    out.bytes(dirty ? J_DIRTY : J_CLEAN);
  };
  out.bytes(ascii('[\n'));
  let pos = start;
  if (end > start) {
    for (const r of bitmap.dirtyRuns(start, end - start)) {
      if (r.offset > pos && !dirtyOnly) yield* entry(pos, r.offset - pos, false);
      yield* entry(r.offset, r.length, true);
      pos = r.offset + r.length;
    }
    if (pos < end && !dirtyOnly) yield* entry(pos, end - pos, false);
  }
  const full = out.reserve(8);
  if (full) yield full;
  out.bytes(ascii('\n]\n'));
  yield out.take(0);
}

/** The dirty runs of [start, end) as a table: offset and length right-aligned. */
export function* runTableChunks(bitmap: DirtyBitmap, start: number, end: number): Generator<Buffer> {
  const w = Math.max(String(end).length, 6);
  const out = new AsciiOut();
  out.bytes(ascii(`${'Offset'.padStart(w)}  ${'Length'.padStart(w)}\n`));
  if (end > start) {
    for (const r of bitmap.dirtyRuns(start, end - start)) {
      const full = out.reserve(2 * w + 8);
      if (full) yield full;
      out.num(r.offset, w);
      out.bytes(TWO_SPACES);
      out.num(r.length, w);
      out.bytes(NL);
    }
  }
  yield out.take(0);
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
