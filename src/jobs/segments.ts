/**
 * How a copy operation is shaped, shared by the jobs that copy (mirror, backup): a range of the
 * source as data segments and zero segments, from the source's extents. A zero segment is
 * granule-aligned (inward: a granule is zero only if it is wholly zero; the disk's end counts as
 * aligned), so it can go to the target as one write-zeroes (a hole: may be punched) and never
 * as data; everything else is data. Neighbouring segments of one kind are merged.
 */
import type { CompleteBlockNode, Extent } from '../api/block.js';
import type { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import { coalesceExtents } from '../block/node.js';

export interface Segment {
  offset: number;
  length: number;
  zero: boolean;
  /** a zero segment that is a hole throughout */
  hole: boolean;
}

export interface SegmentOptions {
  /** bytes per granule (power of two) */
  granularity: number;
  /** the disk's size */
  size: number;
  signal?: AbortSignal;
}

/** [offset, offset+length) of `node` as segments; one data segment when it has no extents. */
export async function copySegments(node: Pick<CompleteBlockNode, 'caps' | 'extents'>, offset: number, length: number, o: SegmentOptions): Promise<Segment[]> {
  if (!node.caps.canExtents) return [{ offset, length, zero: false, hole: false }];
  const end = offset + length;
  const runs: Array<{ start: number; end: number; zero: boolean; hole: boolean }> = [];
  let pos = offset;
  while (pos < end) {
    const got = coalesceExtents(await node.extents(pos, end - pos, o.signal ? { signal: o.signal } : undefined));
    if (got.length === 0) break;
    for (const e of got) {
      if (pos >= end) break;
      const n = Math.min(e.length, o.size - pos);
      if (n <= 0) break;
      runs.push({ start: pos, end: Math.min(pos + n, end), zero: e.zero, hole: e.hole });
      pos += n;
    }
  }
  // granule-aligned zero spans, inward; the rest data
  const g = o.granularity;
  const out: Segment[] = [];
  const push = (at: number, n: number, zero: boolean, hole: boolean): void => {
    if (n <= 0) return;
    const last = out[out.length - 1];
    if (last && last.zero === zero && last.offset + last.length === at && (!zero || last.hole === hole)) last.length += n;
    else out.push({ offset: at, length: n, zero, hole });
  };
  let at = offset;
  for (let i = 0; i < runs.length; i++) {
    const r = runs[i]!;
    if (!r.zero) continue;
    // merge consecutive zero runs
    let zEnd = r.end;
    let hole = r.hole;
    while (i + 1 < runs.length && runs[i + 1]!.zero) {
      i++;
      zEnd = runs[i]!.end;
      hole = hole && runs[i]!.hole;
    }
    const zStart = Math.ceil(r.start / g) * g;
    const zStop = zEnd === o.size ? zEnd : Math.floor(zEnd / g) * g;
    if (zStop <= zStart || zStart < at) continue;
    push(at, zStart - at, false, false);
    push(zStart, zStop - zStart, true, hole);
    at = zStop;
  }
  push(at, end - at, false, false);
  return out;
}

// ---- What mirror and backup share to plan their copy operations ----------------------------

/** most bytes one extents request asks when scanning the whole source */
export const EXTENTS_SCAN = 1 << 30;
/** most bytes one operation covers when the source reported them as zeros */
export const ZERO_OP_MAX = 1 << 30;
/** most zero regions remembered as hints for shaping operations */
const MAX_ZERO_HINTS = 1 << 20;

const ZEROS = Buffer.alloc(64 * 1024);

/** Whether `buf` is all zero bytes (memcmp against a zero buffer, 64 KiB at a time). */
export function isZero(buf: Buffer): boolean {
  const step = ZEROS.length;
  for (let i = 0; i < buf.length; i += step) {
    const n = Math.min(step, buf.length - i);
    if (buf.compare(ZEROS, 0, n, i, i + n) !== 0) return false;
  }
  return true;
}

/**
 * Regions the source reported as zeros at the start, kept sorted as [start, end) pairs (at most
 * MAX_ZERO_HINTS of them), so one operation can cover up to ZERO_OP_MAX of such a region. Only a
 * hint: an operation asks the extents again once its granules are locked.
 */
export class ZeroHints {
  private readonly h: number[] = [];

  /** Add [start, end); calls come in increasing order (a scan). */
  add(start: number, end: number): void {
    const h = this.h;
    if (h.length > 0 && h[h.length - 1] === start) h[h.length - 1] = end;
    else if (h.length < 2 * MAX_ZERO_HINTS) h.push(start, end);
  }

  /** The end of the hint holding `offset`, or -1. */
  endAt(offset: number): number {
    const h = this.h;
    let lo = 0;
    let hi = h.length / 2 - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (h[2 * mid + 1]! <= offset) lo = mid + 1;
      else if (h[2 * mid]! > offset) hi = mid - 1;
      else return h[2 * mid + 1]!;
    }
    return -1;
  }
}

/**
 * Walk the extents of the whole of `node` (EXTENTS_SCAN bytes a request), calling `run` for each
 * extent clipped to the disk. Stops early when aborted or when the node answers nothing.
 */
export async function scanExtents(node: CompleteBlockNode, size: number, signal: AbortSignal, run: (offset: number, length: number, e: Extent) => void): Promise<void> {
  let offset = 0;
  while (offset < size) {
    if (signal.aborted) return;
    const runs = await node.extents(offset, Math.min(EXTENTS_SCAN, size - offset), { signal });
    if (runs.length === 0) break;
    for (const e of runs) {
      const length = Math.min(e.length, size - offset);
      if (length <= 0) break;
      run(offset, length, e);
      offset += length;
    }
  }
}

/** The first granule in [from, to) dirty in `todo` and clean in `locked`, or -1. */
function findFree(todo: DirtyBitmap, locked: DirtyBitmap, from: number, to: number): number {
  let b = from;
  while (b < to) {
    const d = todo.nextDirtyBit(b, to);
    if (d < 0) return -1;
    if (!locked.testBit(d)) return d;
    const c = locked.nextCleanBit(d, to);
    if (c < 0) return -1;
    b = c;
  }
  return -1;
}

export interface RunPlan {
  /** granules to copy: dirty in `todo`, not being copied (clean in `locked`) */
  todo: DirtyBitmap;
  locked: DirtyBitmap;
  /** where the sweep goes on from (a granule) */
  cursor: number;
  granularity: number;
  size: number;
  /** most bytes of data one operation moves */
  bufSize: number;
  hints: ZeroHints;
}

/**
 * The next operation of a sweep over the disk: granules [first, end) from the cursor on (then
 * from the start), all to do and none locked, at most bufSize bytes, or up to ZERO_OP_MAX inside
 * a zero hint; and where the sweep goes on. Changes nothing.
 */
export function nextRun(p: RunPlan): { first: number; end: number; cursor: number } | undefined {
  const bits = p.todo.bits;
  if (p.todo.dirtyGranules === 0) return undefined;
  let first = findFree(p.todo, p.locked, p.cursor, bits);
  if (first < 0) first = findFree(p.todo, p.locked, 0, Math.min(p.cursor, bits));
  if (first < 0) return undefined;
  const g = p.granularity;
  let end = Math.min(bits, first + Math.max(1, Math.floor(p.bufSize / g)));
  const hint = p.hints.endAt(first * g);
  if (hint > 0) {
    const hintBits = hint === p.size ? bits : Math.floor(hint / g);
    end = Math.max(end, Math.min(bits, hintBits, first + Math.max(1, Math.floor(ZERO_OP_MAX / g))));
  }
  const clean = p.todo.nextCleanBit(first, end);
  if (clean >= 0) end = clean;
  const taken = p.locked.nextDirtyBit(first, end);
  if (taken >= 0) end = taken;
  return { first, end, cursor: end >= bits ? 0 : end };
}
