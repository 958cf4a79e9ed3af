/**
 * Compare two images' contents, as qemu-img compare does: ranges that both report as zeros are
 * skipped without reading; when the sizes differ, the longer image's tail must read as zeros
 * (or, with `strict`, a size mismatch alone makes them different).
 */
import type { BlockNode, Extent } from '../api/block.js';

export interface CompareResult {
  identical: boolean;
  /** first byte offset at which the contents differ, or null */
  offset: number | null;
  sizeA: number;
  sizeB: number;
  /** why they differ, for people */
  reason: string | null;
  bytesCompared: number;
}

export interface CompareOptions {
  strict?: boolean;
  chunkSize?: number;
  signal?: AbortSignal;
  onProgress?(done: number, total: number): void;
}

const DEFAULT_CHUNK = 4 * 1024 * 1024;

/** Runs of [offset, offset+length) that read as zeros, per the node's extents. */
async function zeroRuns(node: BlockNode, offset: number, length: number): Promise<Array<[number, number]>> {
  if (!node.extents || !node.caps.canExtents || length === 0) return [];
  const out: Array<[number, number]> = [];
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const extents: Extent[] = await node.extents(pos, end - pos);
    if (extents.length === 0) break;
    for (const e of extents) {
      const n = Math.min(e.length, end - pos);
      if (n <= 0) break;
      if (e.zero) out.push([pos, n]);
      pos += n;
      if (pos >= end) break;
    }
  }
  return out;
}

function zeroCovers(runs: Array<[number, number]>, offset: number, length: number): boolean {
  for (const [o, n] of runs) if (o <= offset && o + n >= offset + length) return true;
  return false;
}

function firstNonZero(b: Buffer): number {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return i;
  return -1;
}

function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  // Narrow by halves with Buffer.compare (native), then scan the last few bytes.
  let lo = 0;
  let hi = a.length;
  while (hi - lo > 64) {
    const mid = lo + Math.floor((hi - lo) / 2);
    if (a.compare(b, lo, mid, lo, mid) !== 0) hi = mid;
    else lo = mid;
  }
  for (let i = lo; i < hi; i++) if (a[i] !== b[i]) return i;
  return -1;
}

export async function compareImages(a: BlockNode, b: BlockNode, options: CompareOptions = {}): Promise<CompareResult> {
  const chunk = options.chunkSize ?? DEFAULT_CHUNK;
  const common = Math.min(a.size, b.size);
  const total = Math.max(a.size, b.size);
  const result = (offset: number | null, reason: string | null, done: number): CompareResult => ({
    identical: offset === null && reason === null,
    offset,
    sizeA: a.size,
    sizeB: b.size,
    reason,
    bytesCompared: done,
  });
  if (options.strict && a.size !== b.size) return result(null, `image sizes differ: ${a.size} and ${b.size} bytes`, 0);

  for (let pos = 0; pos < common; pos += chunk) {
    options.signal?.throwIfAborted();
    const n = Math.min(chunk, common - pos);
    const [za, zb] = await Promise.all([zeroRuns(a, pos, n), zeroRuns(b, pos, n)]);
    if (!(zeroCovers(za, pos, n) && zeroCovers(zb, pos, n))) {
      const [da, db] = await Promise.all([
        zeroCovers(za, pos, n) ? Promise.resolve(Buffer.alloc(n)) : a.read(pos, n),
        zeroCovers(zb, pos, n) ? Promise.resolve(Buffer.alloc(n)) : b.read(pos, n),
      ]);
      const d = firstDifference(da, db);
      if (d >= 0) return result(pos + d, `contents differ at offset ${pos + d}`, pos + d);
    }
    options.onProgress?.(pos + n, total);
  }
  // The longer image's tail must read as zeros.
  const longer = a.size > b.size ? a : b;
  for (let pos = common; pos < longer.size; pos += chunk) {
    options.signal?.throwIfAborted();
    const n = Math.min(chunk, longer.size - pos);
    const z = await zeroRuns(longer, pos, n);
    if (!zeroCovers(z, pos, n)) {
      const i = firstNonZero(await longer.read(pos, n));
      if (i >= 0) return result(pos + i, `contents differ at offset ${pos + i}: only the ${longer === a ? 'first' : 'second'} image has data beyond ${common} bytes`, pos + i);
    }
    options.onProgress?.(pos + n, total);
  }
  return result(null, null, total);
}
