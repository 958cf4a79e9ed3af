import { BlkrepError } from '../api/errors.js';
import type { BlockNode, CompleteBlockNode, Extent, IoOptions, WriteOptions, ZeroOptions } from '../api/block.js';

const ZERO_CHUNK = 1 << 20;

/** Reject a request that does not lie inside the node, naming the numbers. */
export function checkRange(node: Pick<BlockNode, 'size' | 'description'>, offset: number, length: number, op: string): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > node.size) {
    throw new BlkrepError(
      'ERR_OUT_OF_RANGE',
      `${op} of ${length} bytes at offset ${offset} is beyond the end of ${node.description} (size ${node.size})`,
      { errno: op === 'write' || op === 'write-zeroes' ? 'ENOSPC' : 'EINVAL', details: { offset, length, size: node.size } },
    );
  }
}

/** set by nodes that are complete by construction: filters (src/block/filter.ts, on the prototype) and what completeNode() returns */
const COMPLETE = Symbol.for('blkrep.completeNode');

/**
 * Fill in what a node leaves out, as nbdkit's server does for plugins: zeroing by writing zeros,
 * trim as a no-op, FUA by a flush after the write, extents as one allocated run. A node that is
 * complete by construction (every filter) is returned as it is.
 */
export function completeNode(node: BlockNode): CompleteBlockNode {
  if ((node as { [COMPLETE]?: boolean })[COMPLETE] === true) return node as CompleteBlockNode;
  const flush = node.flush ? node.flush.bind(node) : async (_o?: IoOptions) => {};
  const emulateFua = !node.caps.canFua && node.caps.canFlush;
  const write = emulateFua
    ? async (offset: number, data: Buffer, o?: WriteOptions) => {
        await node.write(offset, data, o);
        if (o?.fua) await flush(o);
      }
    : node.write.bind(node);
  const writeZeroes = node.writeZeroes
    ? node.writeZeroes.bind(node)
    : async (offset: number, length: number, o?: ZeroOptions) => {
        if (o?.fast) throw new BlkrepError('ERR_NOT_FAST', 'fast zeroing is not supported by this image', { errno: 'ENOTSUP' });
        const zeros = Buffer.alloc(Math.min(length, ZERO_CHUNK));
        for (let done = 0; done < length; done += zeros.length) {
          const n = Math.min(zeros.length, length - done);
          await node.write(offset + done, n === zeros.length ? zeros : zeros.subarray(0, n), { signal: o?.signal });
        }
        if (o?.fua) await flush(o);
      };
  const trim = node.trim ? node.trim.bind(node) : async (_offset: number, _length: number, o?: WriteOptions) => {
    if (o?.fua) await flush(o);
  };
  const extents = node.extents
    ? node.extents.bind(node)
    : async (offset: number, length: number): Promise<Extent[]> => [{ length: Math.max(1, Math.min(length, node.size - offset)), hole: false, zero: false }];
  const cache = node.cache ? node.cache.bind(node) : async () => {};
  const complete: CompleteBlockNode = {
    driver: node.driver,
    description: node.description,
    size: node.size,
    limits: node.limits,
    caps: {
      ...node.caps,
      canFua: node.caps.canFua || emulateFua,
      canZero: node.caps.canWrite,
      canTrim: node.caps.canWrite && node.caps.canTrim,
      canFastZero: node.caps.canFastZero && node.writeZeroes !== undefined,
      canExtents: node.caps.canExtents && node.extents !== undefined,
      canCache: true,
    },
    read: node.read.bind(node),
    readInto: node.readInto
      ? node.readInto.bind(node)
      : async (offset: number, target: Buffer, o?: IoOptions) => {
          (await node.read(offset, target.length, o)).copy(target);
        },
    write,
    writeZeroes,
    trim,
    flush,
    extents,
    cache,
    close: node.close.bind(node),
    ...(node.fileRange ? { fileRange: node.fileRange.bind(node) } : {}),
  };
  // complete already: completed again (a filter over it, the export stack's slots) it stays one hop
  Object.defineProperty(complete, COMPLETE, { value: true });
  return complete;
}

/** Merge adjacent runs with the same status. */
export function coalesceExtents(extents: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    if (e.length === 0) continue;
    const last = out[out.length - 1];
    if (last && last.hole === e.hole && last.zero === e.zero && last.depth === e.depth) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}
