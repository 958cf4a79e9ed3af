/**
 * The extents of an image, as qemu-img map reports them: runs with depth (0 = the top layer),
 * present (allocated somewhere in the chain), zero (reads as zeros) and data.
 */
import type { BlockNode } from '../api/block.js';
import { chainSizes, nextSizeBoundary, unallocatedDepth } from './chain.js';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

export interface MapOptions {
  /** only [start, start+length) */
  start?: number;
  length?: number;
  signal?: AbortSignal;
  onProgress?(done: number, total: number): void;
}

/** How much one extents() call is asked for; nodes may answer less. */
const STEP = 1024 * 1024 * 1024;

export async function mapImage(node: BlockNode, options: MapOptions = {}): Promise<MapEntry[]> {
  const start = options.start ?? 0;
  const end = Math.min(node.size, start + (options.length ?? node.size));
  const out: MapEntry[] = [];
  const sizes = chainSizes(node);
  const push = (entry: MapEntry): void => {
    const last = out[out.length - 1];
    if (last && last.depth === entry.depth && last.present === entry.present && last.zero === entry.zero && last.data === entry.data) {
      last.length += entry.length;
    } else {
      out.push(entry);
    }
  };
  let pos = start;
  while (pos < end) {
    options.signal?.throwIfAborted();
    const want = Math.min(STEP, end - pos);
    const extents = node.extents && node.caps.canExtents ? await node.extents(pos, want) : [{ length: want, hole: false, zero: false }];
    if (extents.length === 0) throw new Error(`${node.description}: extents at offset ${pos} returned nothing`);
    for (const e of extents) {
      const n = Math.min(e.length, end - pos);
      if (n <= 0) break;
      if (e.depth === 0) {
        // Allocated nowhere: qemu-img puts the run at the deepest layer whose size covers it.
        for (let at = pos; at < pos + n; ) {
          const to = nextSizeBoundary(sizes, at, pos + n);
          push({ start: at, length: to - at, depth: unallocatedDepth(sizes, at), present: false, zero: e.zero, data: false });
          at = to;
        }
      } else {
        // Our depth: 1 = top layer, 2 = its backing … Nodes without layers (raw, memory, nbd)
        // are "present" everywhere at depth 0, as qemu-img map shows a raw file.
        push({
          start: pos,
          length: n,
          depth: e.depth === undefined ? 0 : e.depth - 1,
          present: true,
          zero: e.zero,
          data: !e.hole && !e.zero,
        });
      }
      pos += n;
      if (pos >= end) break;
    }
    options.onProgress?.(pos - start, end - start);
  }
  return out;
}
