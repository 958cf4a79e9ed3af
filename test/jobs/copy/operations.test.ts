/**
 * The copy engine's operations and consistency (src/jobs/copy/operations.ts, consistency.ts):
 * bytes copied, zeros as write-zeroes, errors tagged with side and operation, unstable bits.
 */
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../../src/block/memory.js';
import { completeNode } from '../../../src/block/node.js';
import { DirtyBitmap } from '../../../src/bitmap/dirty-bitmap.js';
import { copyOperation, CopyError, newCounters, type CopyIo } from '../../../src/jobs/copy/operations.js';
import { Consistency } from '../../../src/jobs/copy/consistency.js';
import { BufferPool } from '../../../src/jobs/copy/scheduler.js';
import { hookNode } from '../../support/fault-node.js';

const G = 65536;

async function pair(size: number) {
  const src = new MemoryNode(size);
  const dst = new MemoryNode(size);
  await dst.write(0, Buffer.alloc(size, 0xee)); // stale bytes everywhere
  return { src, dst };
}

function io(source: MemoryNode | ReturnType<typeof hookNode>, target: MemoryNode | ReturnType<typeof hookNode>, o: Partial<CopyIo> = {}): CopyIo {
  return {
    source: completeNode(source),
    target: completeNode(target),
    granularity: G,
    size: source.size,
    bufSize: 2 * G,
    buffers: new BufferPool(2 * G, 4),
    counters: newCounters(),
    signal: new AbortController().signal,
    ...o,
  };
}

describe('copyOperation', () => {
  it('copies data, sends holes and zero granules as write-zeroes, charges data only', async () => {
    const size = 8 * G;
    const { src, dst } = await pair(size);
    await src.write(0, Buffer.alloc(G, 1)); // data
    await src.write(G, Buffer.alloc(G, 0)); // data that reads as zeros
    await src.write(2 * G + 100, Buffer.alloc(G, 2)); // data across a granule boundary
    // 4G … 8G: a hole
    const target = hookNode(dst);
    const c = io(src, target);
    let charged = -1;
    await copyOperation(c, 0, size, (n) => (charged = n));
    expect((await dst.read(0, size)).equals(await src.read(0, size))).toBe(true);
    expect(charged).toBe(4 * G); // what the extents say is data; zeros cost nothing
    const ops = target.log.map((r) => [r.op, r.offset, r.length, r.noHole ?? null]);
    expect(ops).toEqual(
      expect.arrayContaining([
        ['writeZeroes', 4 * G, 4 * G, false], // the hole, may be punched
        ['writeZeroes', G, G, true], // read as zeros: written as zeros, not punched
        ['write', 0, G, null],
        ['write', 2 * G, 2 * G, null],
      ]),
    );
    expect(ops).toHaveLength(4);
    expect(c.counters).toEqual({ targetRequests: 4, dataBytes: 3 * G, zeroBytes: 5 * G });
  });

  it('skipZeros sends no zeros at all (a target known to read as zeros)', async () => {
    const { src } = await pair(4 * G);
    await src.write(G, Buffer.alloc(G, 7));
    const dst = new MemoryNode(4 * G);
    const target = hookNode(dst);
    await copyOperation(io(src, target, { skipZeros: true }), 0, 4 * G);
    expect(target.log.map((r) => [r.op, r.offset, r.length])).toEqual([['write', G, G]]);
    expect((await dst.read(0, 4 * G)).equals(await src.read(0, 4 * G))).toBe(true);
  });

  it('asks its source reads as bulk reads (a raw file tries them on the loop)', async () => {
    const { src, dst } = await pair(4 * G);
    await src.write(0, Buffer.alloc(4 * G, 5));
    const hints: Array<boolean | undefined> = [];
    const spied = completeNode(src);
    const readInto = spied.readInto.bind(spied);
    spied.readInto = (offset, target, o) => (hints.push(o?.bulk), readInto(offset, target, o));
    await copyOperation({ ...io(src, dst), source: spied }, 0, 4 * G);
    expect(hints).toEqual([true, true]);
    expect((await dst.read(0, 4 * G)).equals(await src.read(0, 4 * G))).toBe(true);
  });

  it('tags a failed read as source read and a failed write as target write', async () => {
    const { src, dst } = await pair(4 * G);
    await src.write(0, Buffer.alloc(4 * G, 3));
    const bad = hookNode(src, { failReads: [[G, G + 1]] });
    await expect(copyOperation(io(bad, dst), 0, 4 * G)).rejects.toMatchObject({ side: 'source', operation: 'read' });
    const badTarget = hookNode(dst, { failWrites: [[3 * G, 3 * G + 1]] });
    const err = await copyOperation(io(src, badTarget), 0, 4 * G).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CopyError);
    expect(err).toMatchObject({ side: 'target', operation: 'write' });
    expect((err as CopyError).inner).toMatchObject({ code: 'ERR_INJECTED', errno: 'EIO' });
  });
});

describe('Consistency', () => {
  it('a flush makes the copies issued before it stable; onStable skips granules dirty or locked again', async () => {
    const dirty = new DirtyBitmap(8 * G, { granularity: G });
    const locked = new DirtyBitmap(8 * G, { granularity: G });
    const reported: number[][] = [];
    const c = new Consistency({
      dirty,
      locked,
      onStable: (b) => {
        const bits: number[] = [];
        for (let i = 0; i < b.bits; i++) if (b.testBit(i)) bits.push(i);
        reported.push(bits);
      },
    });
    c.copied(0, 4);
    expect(c.unstableBytes).toBe(4 * G);
    expect(c.persistedView().dirtyGranules).toBe(4);
    let release!: () => void;
    const done: string[] = [];
    c.flush(() => new Promise<void>((r) => (release = r)), () => done.push('ok'), () => done.push('failed'));
    expect(c.flushing).toBe(true);
    expect(() => c.flush(async () => {}, () => {}, () => {})).toThrow(/in flight/);
    c.copied(6, 7); // after the issue: not covered by this flush
    dirty.setBits(1, 2); // written again
    locked.setBits(2, 3); // being copied again
    release();
    await new Promise((r) => setImmediate(r));
    expect(done).toEqual(['ok']);
    expect(reported).toEqual([[0, 3]]);
    expect(c.unstableBytes).toBe(G); // granule 6 waits for the next flush
    expect(c.flushing).toBe(false);
  });

  it('a failed flush puts every unstable granule back into dirty', async () => {
    const dirty = new DirtyBitmap(8 * G, { granularity: G });
    const c = new Consistency({ dirty });
    c.copied(0, 2);
    let fail!: (e: Error) => void;
    let why: unknown;
    c.flush(() => new Promise<void>((_, rej) => (fail = rej)), () => {}, (e) => (why = e));
    c.copied(5, 6);
    fail(new Error('EIO'));
    await new Promise((r) => setImmediate(r));
    expect((why as Error).message).toBe('EIO');
    expect([0, 1, 5].every((b) => dirty.testBit(b))).toBe(true);
    expect(dirty.dirtyGranules).toBe(3);
    expect(c.unstableBytes).toBe(0);
  });
});
