/**
 * How a copy operation is shaped, shared by the jobs that copy (mirror, backup): a range of the
 * source as data segments and zero segments, from the source's extents. A zero segment is
 * granule-aligned (inward: a granule is zero only if it is wholly zero; the disk's end counts as
 * aligned), so it can go to the target as one write-zeroes (a hole: may be punched) and never
 * as data; everything else is data. Neighbouring segments of one kind are merged.
 */
import type { CompleteBlockNode } from '../api/block.js';
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
export async function copySegments(node: CompleteBlockNode, offset: number, length: number, o: SegmentOptions): Promise<Segment[]> {
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
