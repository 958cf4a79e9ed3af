/**
 * CbwFilter.precopy (in-process, memory nodes): before a bitmap resync, the clusters it will
 * write are copied into hidden in one batch (plain writes, one flush, then the bits), so the
 * resync's writes skip their FUA copy; copied clusters and overlapping runs are copied once; the
 * deadline stops new copies (the writes copy the rest); a failed copy sets no bit.
 */
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { CbwFilter } from '../../src/pair/cbw-filter.js';
import { hookNode } from '../support/fault-node.js';

const C = 65536;

async function setup(hooks: Parameters<typeof hookNode>[1] = {}) {
  const disk = new MemoryNode(8 * C);
  for (let c = 0; c < 8; c++) await disk.write(c * C, Buffer.alloc(C, 0x10 + c));
  const hiddenMem = new MemoryNode(8 * C);
  const hidden = hookNode(hiddenMem, hooks);
  const cbw = new CbwFilter(disk, completeNode(hidden), C);
  return { disk, hiddenMem, hidden, cbw };
}

const writes = (log: Array<{ op: string; offset: number; fua?: boolean }>) => log.filter((r) => r.op === 'write').map((r) => [r.offset / C, r.fua]);
const ops = (log: Array<{ op: string }>) => log.map((r) => r.op).filter((o) => o === 'write' || o === 'flush');

describe('copy-before-write precopy', () => {
  it('copies the runs\' clusters without FUA, flushes once, then the writes skip their copy', async () => {
    const { disk, hiddenMem, hidden, cbw } = await setup();
    await cbw.write(6 * C, Buffer.alloc(10, 0xee)); // copied already this epoch (FUA)
    // runs in any order, overlapping, one inside a copied cluster, partial clusters
    const r = await cbw.precopy(
      [
        { offset: 3 * C + 7, length: 2 * C },
        { offset: C, length: 1 },
        { offset: 4 * C, length: 100 },
        { offset: 6 * C, length: C },
      ],
      { deadline: Date.now() + 60_000 },
    );
    expect(r).toEqual({ clusters: 4, bytes: 4 * C });
    expect(writes(hidden.log)).toEqual([[6, true], [1, false], [3, false], [4, false], [5, false]]);
    // the flush comes after every copy of the batch
    expect(ops(hidden.log)).toEqual(['write', 'write', 'write', 'write', 'write', 'flush']);
    for (const c of [1, 3, 4, 5]) expect((await hiddenMem.read(c * C, C)).equals(Buffer.alloc(C, 0x10 + c))).toBe(true);
    expect(cbw.copiedClusters).toBe(5);
    // the resync's writes to those clusters copy nothing more, and keep the checkpoint's data in hidden
    await cbw.write(3 * C, Buffer.alloc(3 * C, 0x99));
    expect(writes(hidden.log)).toHaveLength(5);
    expect((await disk.read(3 * C, 3 * C)).equals(Buffer.alloc(3 * C, 0x99))).toBe(true);
    expect((await hiddenMem.read(4 * C, C)).equals(Buffer.alloc(C, 0x14))).toBe(true);
    // a cluster outside the runs still copies with FUA
    await cbw.write(0, Buffer.alloc(1, 0x77));
    expect(writes(hidden.log).at(-1)).toEqual([0, true]);
  });

  it('nothing to copy: no write, no flush', async () => {
    const { hidden, cbw } = await setup();
    await cbw.write(2 * C, Buffer.alloc(1, 1));
    expect(await cbw.precopy([{ offset: 2 * C, length: C }], { deadline: Date.now() + 60_000 })).toEqual({ clusters: 0, bytes: 0 });
    expect(await cbw.precopy([], { deadline: Date.now() + 60_000 })).toEqual({ clusters: 0, bytes: 0 });
    expect(ops(hidden.log)).toEqual(['write']);
  });

  it('a deadline passed starts no copy: the writes copy with FUA as usual', async () => {
    const { hidden, cbw } = await setup();
    expect(await cbw.precopy([{ offset: 0, length: 8 * C }], { deadline: Date.now() - 1 })).toEqual({ clusters: 0, bytes: 0 });
    expect(cbw.copiedClusters).toBe(0);
    await cbw.write(C, Buffer.alloc(1, 1));
    expect(writes(hidden.log)).toEqual([[1, true]]);
  });

  it('a failed copy rejects and sets no bit: the writes copy again (and fail as a CBW failure)', async () => {
    const { disk, hidden, cbw } = await setup({ failWrites: [[2 * C, 3 * C]] });
    await expect(cbw.precopy([{ offset: 0, length: 4 * C }], { deadline: Date.now() + 60_000, depth: 1 })).rejects.toMatchObject({ errno: 'EIO' });
    expect(cbw.copiedClusters).toBe(0);
    expect(ops(hidden.log)).not.toContain('flush');
    await cbw.write(0, Buffer.alloc(1, 0x55));
    expect(writes(hidden.log).at(-1)).toEqual([0, true]);
    await expect(cbw.write(2 * C, Buffer.alloc(1, 0x55))).rejects.toMatchObject({ code: 'ERR_PAIR_CBW' });
    expect((await disk.read(2 * C, C)).equals(Buffer.alloc(C, 0x12))).toBe(true);
  });
});
