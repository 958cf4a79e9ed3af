/**
 * The source's extents asked ahead (src/jobs/copy/extents-ahead.ts): one request per window,
 * the same segments as asking per operation, and a write overlapping a window or a request in
 * flight makes the next operation ask again (a mirror under a live writer copies what the write
 * put into a hole).
 */
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../../src/block/memory.js';
import { completeNode } from '../../../src/block/node.js';
import { DirtyBitmap } from '../../../src/bitmap/dirty-bitmap.js';
import { ExtentsAhead } from '../../../src/jobs/copy/extents-ahead.js';
import { MirrorJob } from '../../../src/jobs/mirror.js';
import { copySegments } from '../../../src/jobs/segments.js';
import { Gate, hookNode } from '../../support/fault-node.js';

const G = 65536;
const SIZE = 8 << 20;

/** data at granules 0-3, 10, 40-41 and 100; allocated zeros at 20-23; holes elsewhere */
async function sparseSource(): Promise<MemoryNode> {
  const m = new MemoryNode(SIZE);
  for (const [g, n] of [[0, 4], [10, 1], [40, 2], [100, 1]] as const) await m.write(g * G, Buffer.alloc(n * G, 0x5a + g));
  await m.writeZeroes(20 * G, 4 * G, { noHole: true });
  return m;
}

describe('ExtentsAhead', () => {
  it('answers the operations of a window from one request, with the segments a request per operation gives', async () => {
    const inner = await sparseSource();
    const src = hookNode(inner);
    const ahead = new ExtentsAhead(completeNode(src), SIZE);
    const direct = completeNode(inner);
    for (let at = 0; at < SIZE; at += 3 * G) {
      const len = Math.min(3 * G, SIZE - at);
      const o = { granularity: G, size: SIZE };
      expect(await copySegments(ahead, at, len, o)).toEqual(await copySegments(direct, at, len, o));
    }
    expect(src.log.filter((r) => r.op === 'extents').length).toBe(1);
    expect(ahead.requests).toBe(1);
  });

  it('asks again after a write overlapping the window, and sees it', async () => {
    const inner = await sparseSource();
    const src = hookNode(inner);
    const ahead = new ExtentsAhead(completeNode(src), SIZE);
    const o = { granularity: G, size: SIZE };
    expect(await copySegments(ahead, 60 * G, G, o)).toEqual([{ offset: 60 * G, length: G, zero: true, hole: true }]);
    await inner.write(60 * G, Buffer.alloc(G, 1));
    // a write elsewhere than the window's range does not drop it
    ahead.invalidate(SIZE, G);
    expect(ahead.requests).toBe(1);
    ahead.invalidate(60 * G, G);
    expect(await copySegments(ahead, 60 * G, G, o)).toEqual([{ offset: 60 * G, length: G, zero: false, hole: false }]);
    expect(ahead.requests).toBe(2);
  });

  it('neither keeps nor lets later operations join a request that a write overlapped while in flight', async () => {
    const inner = await sparseSource();
    const gate = new Gate();
    gate.close();
    const src = hookNode(inner, { gate, gateOps: ['extents'] });
    const ahead = new ExtentsAhead(completeNode(src), SIZE);
    const o = { granularity: G, size: SIZE };
    const first = copySegments(ahead, 50 * G, G, o);
    await gate.waitEntered(1);
    // the write lands and completes while the request is held: it may not have seen it
    await inner.write(70 * G, Buffer.alloc(G, 2));
    ahead.invalidate(70 * G, G);
    const later = copySegments(ahead, 70 * G, G, o);
    await gate.waitEntered(2);
    gate.open();
    expect(await first).toEqual([{ offset: 50 * G, length: G, zero: true, hole: true }]);
    expect(await later).toEqual([{ offset: 70 * G, length: G, zero: false, hole: false }]);
    // the second asked only its own granule (a write had dropped what was ahead), and is kept
    expect(await copySegments(ahead, 70 * G, G, o)).toEqual([{ offset: 70 * G, length: G, zero: false, hole: false }]);
    expect(ahead.requests).toBe(2);
    // the first answer was not kept: an operation in its range outside the second's asks again
    expect(await copySegments(ahead, 80 * G, G, o)).toEqual([{ offset: 80 * G, length: G, zero: true, hole: true }]);
    expect(ahead.requests).toBe(3);
  });
});

describe('mirror with extents asked ahead', () => {
  it('sync bitmap of scattered granules: one extents request for the disk, bytes equal', async () => {
    const inner = await sparseSource();
    const src = hookNode(inner);
    const dst = new MemoryNode(SIZE);
    await dst.write(0, Buffer.alloc(SIZE, 0xee));
    const bitmap = new DirtyBitmap(SIZE, { granularity: G });
    for (const g of [0, 3, 10, 21, 40, 55, 100, 127]) bitmap.setBits(g, g + 1);
    const job = new MirrorJob({ source: src, target: dst, sync: 'bitmap', bitmap, bitmapMode: 'never', granularity: G, bufSize: G });
    const ready = new Promise((resolve) => job.once('ready', resolve));
    job.start();
    await ready;
    await job.complete({ pivot: false });
    expect(src.log.filter((r) => r.op === 'extents').length).toBe(1);
    for (const g of [0, 3, 10, 21, 40, 55, 100, 127]) {
      const want = await inner.read(g * G, G);
      expect((await dst.read(g * G, G)).equals(want)).toBe(true);
    }
    // not in the bitmap: not copied
    expect((await dst.read(1 * G, G)).equals(Buffer.alloc(G, 0xee))).toBe(true);
  });

  it('a write into a hole the window holds, completed before that granule is copied, is copied', async () => {
    const inner = await sparseSource();
    const src = hookNode(inner);
    const gate = new Gate();
    gate.close();
    const dst = hookNode(new MemoryNode(SIZE), { gate, gateOps: ['write'] });
    await inner.read(0, G);
    const bitmap = new DirtyBitmap(SIZE, { granularity: G });
    bitmap.setBits(0, 1);
    bitmap.setBits(60, 61);
    const job = new MirrorJob({ source: src, target: dst, sync: 'bitmap', bitmap, bitmapMode: 'never', granularity: G, bufSize: G, maxOps: 1 });
    const ready = new Promise((resolve) => job.once('ready', resolve));
    job.start();
    // the first operation (granule 0, data) asked the extents of the disk and waits at the target
    await gate.waitEntered(1);
    expect(src.log.filter((r) => r.op === 'extents').length).toBe(1);
    const data = Buffer.alloc(G, 0x77);
    await job.node.write(60 * G, data);
    gate.open();
    await ready;
    await job.complete({ pivot: false });
    expect((await dst.read(60 * G, G)).equals(data)).toBe(true);
    expect((await dst.read(0, G)).equals(await inner.read(0, G))).toBe(true);
    expect(src.log.filter((r) => r.op === 'extents').length).toBe(2);
  });
});
