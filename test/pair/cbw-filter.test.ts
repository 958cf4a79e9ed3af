/**
 * The copy-before-write filter alone (in-process, memory nodes): the first write of an epoch to a
 * cluster copies its old content to hidden (FUA) before the disk is written; a failed copy fails
 * the request and leaves the disk unchanged (failure case 3); concurrent writers to one cluster
 * copy once; reset() starts a new epoch; the gate holds writes; disk writes are issued in arrival
 * order (overlapping ones completed in it), and a failure fails the requests queued behind it;
 * unordered (a sync primary), a request waits only for the earlier ones it overlaps.
 * Concurrent copies into a real qcow2 hidden disk share its syncs (group commit).
 */
import { join } from 'node:path';
import { truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { openSecondaryImages } from '../../src/pair/secondary-images.js';
import { makeTempDir } from '../support/spawn.js';
import { completeNode } from '../../src/block/node.js';
import { CbwFilter } from '../../src/pair/cbw-filter.js';
import { REPLICA_MAX_INFLIGHT } from '../../src/pair/data-token.js';
import { Gate, hookNode } from '../support/fault-node.js';
import type { BlkrepError } from '../../src/api/errors.js';

const C = 65536;

function setup(hooks: Parameters<typeof hookNode>[1] = {}) {
  const disk = new MemoryNode(8 * C);
  const hiddenMem = new MemoryNode(8 * C);
  const hidden = hookNode(hiddenMem, hooks);
  const errors: BlkrepError[] = [];
  const cbw = new CbwFilter(disk, completeNode(hidden), C, (e) => errors.push(e));
  return { disk, hiddenMem, hidden, cbw, errors };
}

async function fill(node: MemoryNode, byte: number): Promise<void> {
  await node.write(0, Buffer.alloc(node.size, byte));
}

describe('copy-before-write filter', () => {
  it('copies the old cluster to hidden (FUA) once per epoch, then writes the disk', async () => {
    const { disk, hiddenMem, hidden, cbw } = setup();
    await fill(disk, 0x11);
    await cbw.write(C + 100, Buffer.alloc(200, 0x22));
    expect((await hiddenMem.read(C, C)).equals(Buffer.alloc(C, 0x11))).toBe(true);
    expect((await disk.read(C + 100, 200)).equals(Buffer.alloc(200, 0x22))).toBe(true);
    expect(hidden.log.filter((r) => r.op === 'write')).toEqual([{ op: 'write', offset: C, length: C, fua: true, done: true }]);
    // the same cluster again in this epoch: no second copy (hidden keeps the checkpoint's data)
    await cbw.write(C, Buffer.alloc(C, 0x33));
    expect(hidden.log.filter((r) => r.op === 'write')).toHaveLength(1);
    expect((await hiddenMem.read(C, C)).equals(Buffer.alloc(C, 0x11))).toBe(true);
    // a write across two clusters copies both, as one run (one hidden write); zeroes and trims copy too
    await cbw.write(3 * C - 10, Buffer.alloc(20, 0x44));
    await cbw.writeZeroes(5 * C, 10);
    await cbw.trim(6 * C, C);
    expect(hidden.log.filter((r) => r.op === 'write').map((r) => [r.offset, r.length, r.fua])).toEqual([[C, C, true], [2 * C, 2 * C, true], [5 * C, C, true], [6 * C, C, true]]);
    expect((await hiddenMem.read(2 * C, 2 * C)).equals(Buffer.alloc(2 * C, 0x11))).toBe(true);
    expect(cbw.copiedClusters).toBe(5);
    // a new epoch copies again
    cbw.reset();
    await cbw.write(C, Buffer.alloc(10, 0x55));
    expect(hidden.log.filter((r) => r.op === 'write').map((r) => r.offset)).toEqual([C, 2 * C, 5 * C, 6 * C, C]);
    expect((await hiddenMem.read(C, C)).equals(Buffer.alloc(C, 0x33))).toBe(true);
  });

  it('a failed copy fails the request with ERR_PAIR_CBW and leaves the disk unchanged', async () => {
    const { disk, cbw, errors } = setup({ failWrites: [[2 * C, 3 * C]] });
    await fill(disk, 0x11);
    await expect(cbw.write(2 * C + 5, Buffer.alloc(100, 0x22))).rejects.toMatchObject({ code: 'ERR_PAIR_CBW', errno: 'EIO', details: { cluster: 2, offset: 2 * C, length: C } });
    expect((await disk.read(2 * C, C)).equals(Buffer.alloc(C, 0x11))).toBe(true);
    expect(errors.map((e) => e.code)).toEqual(['ERR_PAIR_CBW']);
    // a write spanning a good and the bad cluster fails whole: the disk is not written at all
    await expect(cbw.write(2 * C - 100, Buffer.alloc(200, 0x22))).rejects.toMatchObject({ code: 'ERR_PAIR_CBW', details: { cluster: 1, clusters: 2, offset: C, length: 2 * C } });
    expect(errors[1]!.message).toMatch(/^copy-before-write of clusters 1–2 \(bytes 65536–196608\) into the hidden disk failed: .*; the disk was not written$/);
    expect((await disk.read(C, 2 * C)).equals(Buffer.alloc(2 * C, 0x11))).toBe(true);
    // the two clusters were one run: neither bit is set, the next attempt copies both again
    expect(cbw.copiedClusters).toBe(0);
    await cbw.write(C, Buffer.alloc(10, 0x33));
    expect(cbw.copiedClusters).toBe(1);
  });

  it('a large write copies its fresh clusters in runs of adjacent clusters (up to 1 MiB each), skipping those copied', async () => {
    const disk = new MemoryNode(40 * C);
    const hiddenMem = new MemoryNode(40 * C);
    const hidden = hookNode(hiddenMem, {});
    const cbw = new CbwFilter(disk, completeNode(hidden), C, () => {});
    for (let c = 0; c < 40; c++) await disk.write(c * C, Buffer.alloc(C, c + 1));
    cbw.markCopied(4 * C, C);
    // clusters 1–33 (33 clusters less 100 bytes, written at C + 50): 4 is copied, so runs 1–3, 5–20 (16 = 1 MiB), 21–33
    await cbw.write(C + 50, Buffer.alloc(33 * C - 100, 0xee));
    expect(hidden.log.filter((r) => r.op === 'write').map((r) => [r.offset / C, r.length / C, r.fua])).toEqual([[1, 3, true], [5, 16, true], [21, 13, true]]);
    for (const c of [1, 2, 3, 5, 20, 21, 33]) expect((await hiddenMem.read(c * C, C)).equals(Buffer.alloc(C, c + 1))).toBe(true);
    expect((await hiddenMem.read(4 * C, C)).equals(Buffer.alloc(C, 0))).toBe(true);
    expect((await disk.read(C + 50, 33 * C - 100)).equals(Buffer.alloc(33 * C - 100, 0xee))).toBe(true);
    expect(cbw.copiedClusters).toBe(33);
  });

  it('a writer to a cluster of a run being copied waits for that run; a run does not take a cluster another copy holds', async () => {
    const gate = new Gate();
    const disk = new MemoryNode(8 * C);
    const hiddenMem = new MemoryNode(8 * C);
    const hidden = hookNode(hiddenMem, { gate, gateOps: ['write'] });
    const cbw = new CbwFilter(disk, completeNode(hidden), C, () => {});
    await disk.write(0, Buffer.alloc(8 * C, 0x11));
    gate.close();
    const a = cbw.write(3 * C, Buffer.alloc(10, 0x22)); // cluster 3 alone
    await gate.waitEntered(1);
    const b = cbw.write(C, Buffer.alloc(4 * C, 0x33)); // clusters 1–4: runs 1–2 and 4, cluster 3 waits for a
    await gate.waitEntered(3);
    const c = cbw.write(2 * C, Buffer.alloc(10, 0x44)); // in the run 1–2: waits for it, copies nothing
    for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
    expect((await disk.read(0, 8 * C)).equals(Buffer.alloc(8 * C, 0x11))).toBe(true);
    gate.open();
    await Promise.all([a, b, c]);
    expect(hidden.log.filter((r) => r.op === 'write').map((r) => [r.offset / C, r.length / C])).toEqual([[3, 1], [1, 2], [4, 1]]);
    expect((await hiddenMem.read(C, 4 * C)).equals(Buffer.alloc(4 * C, 0x11))).toBe(true);
    expect((await disk.read(2 * C, 10)).equals(Buffer.alloc(10, 0x44))).toBe(true);
    expect((await disk.read(3 * C, 10)).equals(Buffer.alloc(10, 0x33))).toBe(true);
  });

  it('concurrent writers to one cluster wait for one copy', async () => {
    const gate = new Gate();
    const { disk, hiddenMem, hidden, cbw } = setup({ gate, gateOps: ['write'] });
    await fill(disk, 0x11);
    gate.close();
    const a = cbw.write(4 * C, Buffer.alloc(10, 0x22));
    const b = cbw.write(4 * C + 100, Buffer.alloc(10, 0x33));
    await gate.waitEntered(1);
    // neither reached the disk while the copy is held
    expect((await disk.read(4 * C, 200)).equals(Buffer.alloc(200, 0x11))).toBe(true);
    gate.open();
    await Promise.all([a, b]);
    expect(hidden.log.filter((r) => r.op === 'write')).toHaveLength(1);
    expect((await hiddenMem.read(4 * C, C)).equals(Buffer.alloc(C, 0x11))).toBe(true);
    expect((await disk.read(4 * C, 10)).equals(Buffer.alloc(10, 0x22))).toBe(true);
    expect((await disk.read(4 * C + 100, 10)).equals(Buffer.alloc(10, 0x33))).toBe(true);
  });

  it(`a burst of ${REPLICA_MAX_INFLIGHT} first touches (the writer's window) allocates its cluster buffers once: the next epoch's burst reuses all of them`, async () => {
    // bench/pair async: with 64 spares each burst past 64 allocated fresh 64 KiB buffers (2480 in
    // 10 s) that only a major GC freed, most of the secondary's ArrayBuffers at its peak RSS
    const n = REPLICA_MAX_INFLIGHT;
    const disk = new MemoryNode(n * C);
    const gate = new Gate();
    const hidden = hookNode(new MemoryNode(n * C), { gate, gateOps: ['write'] });
    const cbw = new CbwFilter(disk, completeNode(hidden), C);
    for (let epoch = 0; epoch < 3; epoch++) {
      gate.close();
      // one write in each cluster: a copy of its own each (no runs), all held in hidden's write at once
      const writes = Array.from({ length: n }, (_, i) => cbw.write(i * C + 8, Buffer.alloc(8, 0x20 + epoch)));
      await gate.waitEntered((epoch + 1) * n);
      gate.open();
      await Promise.all(writes);
      expect(cbw.copiedClusters).toBe(n);
      expect(cbw.copyBuffers.allocated).toBe(n);
      cbw.reset();
    }
  });

  it('the gate holds new writes until released; hold() waits for those in flight', async () => {
    const gate = new Gate();
    const { disk, cbw } = setup({ gate, gateOps: ['write'] });
    gate.close();
    const inflight = cbw.write(0, Buffer.alloc(10, 0x22));
    await gate.waitEntered(1);
    let held = false;
    const holding = cbw.gate.hold().then(() => (held = true));
    await Promise.resolve();
    expect(held).toBe(false);
    gate.open();
    await inflight;
    await holding;
    let late = false;
    const w = cbw.write(C, Buffer.alloc(10, 0x33)).then(() => (late = true));
    await new Promise((r) => setImmediate(r));
    expect(late).toBe(false);
    expect((await disk.read(C, 10)).equals(Buffer.alloc(10, 0))).toBe(true);
    cbw.gate.release();
    await w;
    expect((await disk.read(C, 10)).equals(Buffer.alloc(10, 0x33))).toBe(true);
  });

  it('issues disk writes in arrival order: a request needing no copy waits for the one before it', async () => {
    const gate = new Gate();
    const { disk, cbw } = setup({ gate, gateOps: ['write'] });
    await fill(disk, 0x11);
    cbw.markCopied(2 * C, C);
    gate.close();
    const a = cbw.write(C, Buffer.alloc(10, 0x22)); // its copy into hidden is held
    const b = cbw.write(2 * C, Buffer.alloc(10, 0x33)); // nothing to copy, but it came after a
    await gate.waitEntered(1);
    for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
    expect((await disk.read(2 * C, 10)).equals(Buffer.alloc(10, 0x11))).toBe(true);
    gate.open();
    await Promise.all([a, b]);
    expect((await disk.read(C, 10)).equals(Buffer.alloc(10, 0x22))).toBe(true);
    expect((await disk.read(2 * C, 10)).equals(Buffer.alloc(10, 0x33))).toBe(true);
  });

  it('a failed request fails those queued behind it with ERR_PAIR_ORDER (disk not written); the next one after them is applied', async () => {
    const { disk, cbw, errors } = setup({ failWrites: [[C, 2 * C]] });
    await fill(disk, 0x11);
    cbw.markCopied(2 * C, 2 * C);
    const a = cbw.write(C, Buffer.alloc(10, 0x22));
    const b = cbw.write(2 * C, Buffer.alloc(10, 0x33));
    const c = cbw.writeZeroes(3 * C, 10);
    await expect(a).rejects.toMatchObject({ code: 'ERR_PAIR_CBW' });
    await expect(b).rejects.toMatchObject({ code: 'ERR_PAIR_ORDER', errno: 'EIO', details: { offset: 2 * C, length: 10 } });
    await expect(c).rejects.toMatchObject({ code: 'ERR_PAIR_ORDER', details: { offset: 3 * C, length: 10 } });
    expect((await disk.read(C, 3 * C)).equals(Buffer.alloc(3 * C, 0x11))).toBe(true);
    // only the copy failure is an event: the others were refused for it
    expect(errors.map((e) => e.code)).toEqual(['ERR_PAIR_CBW']);
    await cbw.write(2 * C, Buffer.alloc(10, 0x44));
    expect((await disk.read(2 * C, 10)).equals(Buffer.alloc(10, 0x44))).toBe(true);
  });

  it('issues a disk write once the one before it was issued; one overlapping a disk write in flight waits for it to complete', async () => {
    const gate = new Gate();
    const diskMem = new MemoryNode(8 * C);
    await fill(diskMem, 0x11);
    const disk = hookNode(diskMem, { gate, gateOps: ['write'] });
    const cbw = new CbwFilter(disk, completeNode(new MemoryNode(8 * C)), C);
    cbw.markCopied(0, 8 * C);
    gate.close();
    const a = cbw.write(C, Buffer.alloc(10, 0x22)); // held in the disk
    const b = cbw.write(3 * C, Buffer.alloc(10, 0x33)); // no overlap: issued meanwhile
    const c = cbw.write(C + 5, Buffer.alloc(10, 0x44)); // overlaps a: waits for a to complete
    await gate.waitEntered(2);
    for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
    expect(disk.log.filter((r) => r.op === 'write').map((r) => r.offset)).toEqual([C, 3 * C]);
    gate.open();
    await Promise.all([a, b, c]);
    expect(disk.log.filter((r) => r.op === 'write').map((r) => r.offset)).toEqual([C, 3 * C, C + 5]);
    expect((await diskMem.read(C, 15)).equals(Buffer.concat([Buffer.alloc(5, 0x22), Buffer.alloc(10, 0x44)]))).toBe(true);
  });

  it('unordered (a sync primary): a request needing no copy is written while an earlier one copies; one overlapping that earlier request waits for its disk write', async () => {
    const gate = new Gate();
    const { disk, cbw } = setup({ gate, gateOps: ['write'] });
    await fill(disk, 0x11);
    cbw.markCopied(2 * C, C);
    cbw.ordered = false;
    gate.close();
    const a = cbw.write(C, Buffer.alloc(10, 0x22)); // its copy into hidden is held
    const b = cbw.write(2 * C, Buffer.alloc(10, 0x33)); // nothing to copy, no overlap: not held by a
    const c = cbw.write(C + 5, Buffer.alloc(10, 0x44)); // overlaps a (same cluster): after a's disk write
    await gate.waitEntered(1);
    await b;
    expect((await disk.read(2 * C, 10)).equals(Buffer.alloc(10, 0x33))).toBe(true);
    for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
    expect((await disk.read(C, 15)).equals(Buffer.alloc(15, 0x11))).toBe(true);
    expect(cbw.writesInFlight).toBe(2);
    gate.open();
    await Promise.all([a, c]);
    expect((await disk.read(C, 15)).equals(Buffer.concat([Buffer.alloc(5, 0x22), Buffer.alloc(10, 0x44)]))).toBe(true);
    expect(cbw.writesInFlight).toBe(0);
  });

  it('unordered: a failed copy fails only its own request (no ERR_PAIR_ORDER); an overlapping later one copies and is applied', async () => {
    let failing = true;
    const diskMem = new MemoryNode(8 * C);
    await fill(diskMem, 0x11);
    const hiddenMem = new MemoryNode(8 * C);
    const hidden = completeNode(hiddenMem);
    const errors: BlkrepError[] = [];
    const failOnce = { ...hidden, write: (o: number, d: Buffer, w?: Parameters<MemoryNode['write']>[2]) => (failing ? Promise.reject(Object.assign(new Error('EIO'), { errno: 'EIO' })) : hidden.write(o, d, w)) };
    const cbw = new CbwFilter(diskMem, failOnce, C, (e) => errors.push(e));
    cbw.markCopied(2 * C, C);
    cbw.ordered = false;
    const a = cbw.write(C, Buffer.alloc(10, 0x22));
    const b = cbw.write(2 * C, Buffer.alloc(10, 0x33));
    await expect(a).rejects.toMatchObject({ code: 'ERR_PAIR_CBW' });
    await b;
    failing = false;
    await cbw.write(C + 5, Buffer.alloc(10, 0x44));
    expect((await diskMem.read(C, 15)).equals(Buffer.concat([Buffer.alloc(5, 0x11), Buffer.alloc(10, 0x44)]))).toBe(true);
    expect((await diskMem.read(2 * C, 10)).equals(Buffer.alloc(10, 0x33))).toBe(true);
    expect((await hiddenMem.read(C, C)).equals(Buffer.alloc(C, 0x11))).toBe(true);
    expect(errors.map((e) => e.code)).toEqual(['ERR_PAIR_CBW']);
  });

  it('a writer has its own order chain: a retired writer\'s failed request fails none of the new writer\'s writes, which are issued only after the retired writer\'s requests finished', async () => {
    const gate = new Gate();
    // hidden's writes are held at the gate; copies of cluster 1 fail once let through
    const { disk, cbw, errors } = setup({ gate, gateOps: ['write'], failWrites: [[C, 2 * C]] });
    await fill(disk, 0x11);
    cbw.markCopied(2 * C, 6 * C);
    // an old sync link's writer (unordered): its first touch of cluster 1 is held, then fails
    const sync = cbw.writer(false);
    gate.close();
    const a = sync.write(C, Buffer.alloc(10, 0x22));
    await sync.write(2 * C, Buffer.alloc(10, 0x33)); // no copy, no overlap: applied meanwhile
    await gate.waitEntered(1);
    // the link drops with a still queued; the primary reconnects async: a new writer
    const async1 = cbw.writer(true);
    const b = async1.write(3 * C, Buffer.alloc(10, 0x44)); // nothing to copy
    const c = async1.writeZeroes(4 * C, 10);
    for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
    // not issued while the retired writer's request is unfinished
    expect((await disk.read(3 * C, 2 * C)).equals(Buffer.alloc(2 * C, 0x11))).toBe(true);
    expect(cbw.writesInFlight).toBe(3);
    gate.open();
    await expect(a).rejects.toMatchObject({ code: 'ERR_PAIR_CBW' });
    // before, the chain spanned links: b failed with ERR_PAIR_ORDER for a's failure (and c behind it)
    await b;
    await c;
    expect((await disk.read(3 * C, 10)).equals(Buffer.alloc(10, 0x44))).toBe(true);
    expect((await disk.read(4 * C, 10)).equals(Buffer.alloc(10, 0))).toBe(true);
    expect((await disk.read(C, 10)).equals(Buffer.alloc(10, 0x11))).toBe(true);
    expect(errors.map((e) => e.code)).toEqual(['ERR_PAIR_CBW']);

    // within an async writer the chain holds: a failure fails its followers on that writer; the next writer's are applied
    gate.close();
    const d = async1.write(C + 1, Buffer.alloc(10, 0x55)); // copy held, fails
    const e = async1.write(5 * C, Buffer.alloc(10, 0x66)); // queued behind d
    await gate.waitEntered(2);
    const async2 = cbw.writer(true);
    const f = async2.write(6 * C, Buffer.alloc(10, 0x77));
    gate.open();
    await expect(d).rejects.toMatchObject({ code: 'ERR_PAIR_CBW' });
    await expect(e).rejects.toMatchObject({ code: 'ERR_PAIR_ORDER', details: { offset: 5 * C, length: 10 } });
    await f;
    expect((await disk.read(5 * C, 10)).equals(Buffer.alloc(10, 0x11))).toBe(true);
    expect((await disk.read(6 * C, 10)).equals(Buffer.alloc(10, 0x77))).toBe(true);
    expect(cbw.writesInFlight).toBe(0);
  });

  it('concurrent first-touch copies into a qcow2 hidden disk share its syncs (group commit), and hidden keeps every old cluster', async () => {
    const dir = await makeTempDir();
    const diskPath = join(dir, 'disk.img');
    const n = 32;
    await writeFile(diskPath, Buffer.alloc(0));
    await truncate(diskPath, 2 * n * C);
    const disk = new MemoryNode(2 * n * C);
    for (let c = 0; c < 2 * n; c++) await disk.write(c * C, Buffer.alloc(C, c + 1));
    // volatile: the hidden file counts the syncs the qcow2 driver asks for (the same calls strict makes)
    const images = await openSecondaryImages(diskPath, disk, { hiddenDurability: 'volatile' });
    try {
      const cbw = new CbwFilter(disk, images.hiddenNode, C);
      const before = images.hiddenFile.skippedSyncs;
      // a resync's burst: n writes to n distinct clusters (every other one), all in flight at once
      await Promise.all(Array.from({ length: n }, (_, i) => cbw.write(2 * i * C, Buffer.alloc(C, 0xee))));
      const syncs = images.hiddenFile.skippedSyncs - before;
      expect(cbw.copiedClusters).toBe(n);
      // one writeback cycle for new clusters is 2–4 syncs (data and refcounts, L2, L1); one per copy would be >= n
      expect(syncs).toBeGreaterThan(0);
      expect(syncs).toBeLessThanOrEqual(8);
      for (let i = 0; i < n; i++) {
        expect((await images.hiddenNode.read(2 * i * C, C)).equals(Buffer.alloc(C, 2 * i + 1))).toBe(true);
        expect((await disk.read(2 * i * C, C)).equals(Buffer.alloc(C, 0xee))).toBe(true);
      }
    } finally {
      await images.active.close();
      await images.hidden.close();
    }
  });
});
