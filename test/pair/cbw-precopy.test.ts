/**
 * CbwFilter.precopy (in-process, memory nodes): before a bitmap resync, the clusters it will
 * write are claimed, then copied into hidden in ascending order (plain writes, a flush per round,
 * then the bits), while the resync's writes go: a write to a claimed cluster waits for its round
 * and skips its FUA copy; copied clusters and overlapping runs are copied once; a failed copy sets
 * no bit and releases the claims left, whose writes copy them (and fail as a CBW failure).
 */
import { describe, expect, it } from 'vitest';
import type { BlkrepError } from '../../src/api/errors.js';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { CbwFilter } from '../../src/pair/cbw-filter.js';
import { Gate, hookNode, type OpRecord } from '../support/fault-node.js';

const C = 65536;

async function setup(hooks: Parameters<typeof hookNode>[1] = {}) {
  const disk = new MemoryNode(8 * C);
  for (let c = 0; c < 8; c++) await disk.write(c * C, Buffer.alloc(C, 0x10 + c));
  const hiddenMem = new MemoryNode(8 * C);
  const hidden = hookNode(hiddenMem, hooks);
  // what hidden had done when each disk write was issued
  const diskWrites: Array<{ cluster: number; hidden: OpRecord[] }> = [];
  const write = disk.write.bind(disk);
  disk.write = (offset, data, o) => {
    diskWrites.push({ cluster: Math.floor(offset / C), hidden: hidden.log.map((r) => ({ ...r })) });
    return write(offset, data, o);
  };
  const copyErrors: BlkrepError[] = [];
  const cbw = new CbwFilter(disk, completeNode(hidden), C, (e) => copyErrors.push(e));
  return { disk, hiddenMem, hidden, cbw, copyErrors, diskWrites };
}

const writes = (log: Array<{ op: string; offset: number; fua?: boolean }>) => log.filter((r) => r.op === 'write').map((r) => [r.offset / C, r.fua]);
const ops = (log: Array<{ op: string }>) => log.map((r) => r.op).filter((o) => o === 'write' || o === 'flush');
/** hidden's plain write of `cluster` completed, and a flush logged after it completed too */
const durable = (log: OpRecord[], cluster: number) => {
  const w = log.findIndex((r) => r.op === 'write' && r.offset === cluster * C && r.done);
  return w >= 0 && log.slice(w + 1).some((r) => r.op === 'flush' && r.done);
};

describe('copy-before-write precopy', () => {
  it('copies the runs\' clusters without FUA, flushes after them, then the writes skip their copy', async () => {
    const { disk, hiddenMem, hidden, cbw } = await setup();
    await cbw.write(6 * C, Buffer.alloc(10, 0xee)); // copied already this epoch (FUA)
    // runs in any order, overlapping, one inside a copied cluster, partial clusters
    const p = await cbw.precopy([
      { offset: 3 * C + 7, length: 2 * C },
      { offset: C, length: 1 },
      { offset: 4 * C, length: 100 },
      { offset: 6 * C, length: C },
    ]);
    expect(p.claimed).toBe(4);
    const r = await p.done;
    // no writer came while the copies went
    expect(r).toMatchObject({ clusters: 4, bytes: 4 * C, waited: 0 });
    expect(writes(hidden.log)).toEqual([[6, true], [1, false], [3, false], [4, false], [5, false]]);
    // a flush per round, the last after every copy
    expect(ops(hidden.log).filter((o) => o === 'flush')).toHaveLength(r.rounds);
    expect(ops(hidden.log).at(-1)).toBe('flush');
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
    const a = await cbw.precopy([{ offset: 2 * C, length: C }]);
    expect(a.claimed).toBe(0);
    expect(await a.done).toEqual({ clusters: 0, bytes: 0, rounds: 0, waited: 0 });
    expect(await (await cbw.precopy([])).done).toEqual({ clusters: 0, bytes: 0, rounds: 0, waited: 0 });
    expect(ops(hidden.log)).toEqual(['write']);
  });

  it('a write to a claimed cluster not copied yet waits for its round, then lands after the flush, without a copy of its own', async () => {
    const gate = new Gate();
    const { disk, hiddenMem, hidden, cbw, diskWrites } = await setup({ gate, gateOps: ['flush'] });
    gate.close();
    const p = await cbw.precopy([{ offset: 2 * C, length: 3 * C }], { depth: 1 });
    expect(p.claimed).toBe(3);
    // the resync's writes, in its order: clusters 2 and 4 (claimed), 7 (not claimed: its own FUA copy)
    const w2 = cbw.write(2 * C, Buffer.alloc(C, 0xa2));
    const w4 = cbw.write(4 * C + 10, Buffer.alloc(20, 0xa4));
    const w7 = cbw.write(7 * C, Buffer.alloc(C, 0xa7));
    await gate.waitEntered(1);
    // a flush waits at the gate: nothing of the disk is written, no write copied a claimed cluster itself
    expect(diskWrites).toEqual([]);
    expect(writes(hidden.log).filter(([c]) => c !== 7)).toEqual(writes(hidden.log).filter(([c, fua]) => c !== 7 && fua === false));
    gate.open();
    const [, , , r] = await Promise.all([w2, w4, w7, p.done]);
    // the writes to 2 and 4 waited for their claims (7 was not claimed: it waited for nothing of the precopy's)
    expect(r.waited).toBe(2);
    expect(diskWrites.map((w) => w.cluster)).toEqual([2, 4, 7]);
    // each disk write was issued after its cluster's copy and a flush after it were done
    for (const w of diskWrites.slice(0, 2)) expect(durable(w.hidden, w.cluster)).toBe(true);
    expect(writes(hidden.log).filter(([c]) => c !== 7)).toEqual([[2, false], [3, false], [4, false]]);
    expect(writes(hidden.log).filter(([c]) => c === 7)).toEqual([[7, true]]);
    expect((await disk.read(2 * C, C)).equals(Buffer.alloc(C, 0xa2))).toBe(true);
    expect((await disk.read(4 * C + 10, 20)).equals(Buffer.alloc(20, 0xa4))).toBe(true);
    for (const c of [2, 3, 4, 7]) expect((await hiddenMem.read(c * C, C)).equals(Buffer.alloc(C, 0x10 + c))).toBe(true);
  });

  it('a failed copy rejects, sets no bit for it or the claims left; their writes copy with FUA, and fail as a CBW failure where the hidden disk fails', async () => {
    const gate = new Gate();
    const { disk, hiddenMem, hidden, cbw, copyErrors, diskWrites } = await setup({ failWrites: [[2 * C, 3 * C]], gate, gateOps: ['write'] });
    // the copies' hidden writes wait: the resync's writes are queued on the claims first
    gate.close();
    const p = await cbw.precopy([{ offset: 0, length: 4 * C }], { depth: 1 });
    expect(p.claimed).toBe(4);
    const w3 = cbw.write(3 * C, Buffer.alloc(C, 0xb3));
    const w2 = cbw.write(2 * C, Buffer.alloc(C, 0xb2));
    w2.catch(() => {});
    gate.open();
    await expect(p.done).rejects.toMatchObject({ errno: 'EIO' });
    // clusters 0 and 1 were copied and flushed before the failure
    expect(cbw.copiedBefore(0, 2 * C)).toBeNull();
    await w3;
    await expect(w2).rejects.toMatchObject({ code: 'ERR_PAIR_CBW' });
    expect(copyErrors.map((e) => e.code)).toEqual(['ERR_PAIR_CBW']);
    // the precopy's copies of 0, 1, 2 (failed), none of 3; then 2 and 3 with FUA by their writes
    expect(writes(hidden.log).slice(0, 3)).toEqual([[0, false], [1, false], [2, false]]);
    expect(writes(hidden.log).slice(3).sort()).toEqual([[2, true], [3, true]]);
    expect(diskWrites.map((w) => w.cluster)).toEqual([3]);
    expect((await disk.read(3 * C, C)).equals(Buffer.alloc(C, 0xb3))).toBe(true);
    expect((await hiddenMem.read(3 * C, C)).equals(Buffer.alloc(C, 0x13))).toBe(true);
    expect((await disk.read(2 * C, C)).equals(Buffer.alloc(C, 0x12))).toBe(true);
    expect(cbw.copiedClusters).toBe(3);
  });

  it('stop() ends the copies: the claims left are released, their writes copy them', async () => {
    const { hidden, cbw } = await setup();
    let n = 0;
    const p = await cbw.precopy([{ offset: 0, length: 8 * C }], { depth: 1, stop: () => ++n > 2 });
    await expect(p.done).rejects.toMatchObject({ code: 'ERR_PAIR_LINK_DOWN' });
    expect(cbw.copiedClusters).toBe(2);
    await cbw.write(5 * C, Buffer.alloc(1, 1));
    expect(writes(hidden.log)).toEqual([[0, false], [1, false], [5, true]]);
  });

  it('claims at most `limit` clusters, the lowest', async () => {
    const { hidden, cbw } = await setup();
    const p = await cbw.precopy([{ offset: 0, length: 8 * C }], { limit: 3 });
    expect(p.claimed).toBe(3);
    expect(await p.done).toMatchObject({ clusters: 3 });
    expect(writes(hidden.log)).toEqual([[0, false], [1, false], [2, false]]);
  });
});
