// The mirror job: copies under a concurrent random writer (background and write-blocking),
// complete and cancel, pause, zeros, sync modes, error policies, and the model's findings.
import { createCipheriv } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { DirtyBitmap } from '../../src/bitmap/dirty-bitmap.js';
import type { JobEvent } from '../../src/jobs/job.js';
import { MirrorJob, type MirrorOptions } from '../../src/jobs/mirror.js';
import { MiB, RandomWriter, TestDisk, countDifferent, firstDifference, readAll, recordFlushes, rng, seededSource } from './helpers.js';

const SIZE = 64 * MiB;
// seeded runs per copy mode: 50 × 2 = the 100 runs of a 64 MiB export under a random
// writer (30% of its writes are 1 byte at an unaligned offset; see RandomWriter). About 0.7 s a
// run on 2 cores; BLKREP_MIRROR_RUNS changes it.
const RUNS = Number(process.env.BLKREP_MIRROR_RUNS ?? 50);

/**
 * As seededSource (data, allocated zeros and holes, sizes from rng(seed)), with the data from
 * AES-CTR keyed by the seed: as deterministic, 50 times faster (it was a third of a run's time).
 */
async function fastSeededSource(size: number, seed: number): Promise<MemoryNode> {
  const r = rng(seed);
  const key = Buffer.alloc(16);
  key.writeUInt32LE(seed >>> 0, 0);
  const stream = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  const node = new MemoryNode(size);
  for (let off = 0; off < size; ) {
    const len = Math.min(size - off, (1 + Math.floor(r() * 32)) * 64 * 1024 + Math.floor(r() * 3000));
    const kind = r();
    if (kind < 0.45) await node.write(off, stream.update(Buffer.alloc(len)));
    else if (kind < 0.55) await node.writeZeroes(off, len, { noHole: true });
    off += len;
  }
  return node;
}

/** A memory disk's content in one copy (readAll copies twice, 16 MiB at a time: 2× slower). */
async function snapshot(node: MemoryNode): Promise<Buffer> {
  const out = Buffer.allocUnsafe(node.size);
  await node.readInto(0, out);
  return out;
}

function events(job: MirrorJob): JobEvent[] {
  const out: JobEvent[] = [];
  job.on('event', (e: JobEvent) => out.push(e));
  return out;
}

function summary(evs: JobEvent[]): string[] {
  return evs.map((e) => {
    switch (e.event) {
      case 'status-change':
        return e.status;
      case 'ready':
        return `ready(${e.synced})`;
      case 'error':
        return `error(${e.side} ${e.operation} ${e.errno} ${e.action})`;
      case 'completed':
        return e.error ? `completed(${e.error.code})` : 'completed';
      case 'cancelled':
        return `cancelled(${e.consistent})`;
      case 'copy-mode':
        return `copy-mode(${e.to} ${e.reason})`;
    }
  });
}

function whenReady(job: MirrorJob, timeoutMs = 20_000): Promise<void> {
  if (job.status === 'ready') return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not ready after ${timeoutMs} ms: ${JSON.stringify(job.query())}`)), timeoutMs);
    const on = (e: JobEvent): void => {
      if (e.event === 'status-change' && e.status === 'ready') {
        clearTimeout(timer);
        job.off('event', on);
        resolve();
      } else if (e.event === 'status-change' && e.status === 'concluded') {
        clearTimeout(timer);
        reject(new Error(`concluded before ready: ${job.error?.message}`));
      }
    };
    job.on('event', on);
  });
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no end within ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

async function ticks(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve));
}

describe.each(['background', 'write-blocking'] as const)('mirror under a random writer, %s', (copyMode) => {
  for (let run = 0; run < RUNS; run++) {
    const seed = 1000 + run * 7919 + (copyMode === 'background' ? 0 : 1);
    it(`seed ${seed}: after complete 0 bytes differ; at the pivot source and target are equal`, async () => {
      const source = await fastSeededSource(SIZE, seed);
      const target = new TestDisk(SIZE);
      const job = new MirrorJob({
        source,
        target,
        copyMode,
        onConsistent: async () => {
          const [s, t] = [await snapshot(source), await snapshot(target.disk)];
          expect(firstDifference(s, t), 'source vs target at the consistency point').toBe(-1);
        },
        pivot: async () => {
          pivots++;
          // from here the writer writes the target itself: its writes may share granules
          violationsAtPivot = [...target.overlapViolations];
        },
      });
      let pivots = 0;
      let violationsAtPivot: string[] = ['pivot not reached'];
      const evs = events(job);
      const writer = new RandomWriter(job.node, await snapshot(source), rng(seed), 4);
      writer.start();
      job.start();
      await within(whenReady(job), 30_000, 'ready');
      await writer.waitWrites(200);
      await within(job.complete(), 30_000, 'complete');
      await writer.waitWrites(20); // now writing the target
      await writer.stop();
      expect(writer.errors).toEqual([]);
      expect(pivots).toBe(1);
      const t = await snapshot(target.disk);
      expect(t.equals(writer.expected) ? 0 : countDifferent(t, writer.expected), `bytes differing (first at ${firstDifference(t, writer.expected)})`).toBe(0);
      expect(violationsAtPivot).toEqual([]);
      const s = summary(evs);
      expect(s.slice(0, 3)).toEqual(['running', 'ready(true)', 'ready']);
      expect(s.slice(-4)).toEqual(['waiting', 'pending', 'completed', 'concluded']);
      expect(s.filter((x) => x.startsWith('error'))).toEqual([]);
      expect(job.query()).toMatchObject({ status: 'concluded', dirtyBytes: 0 });
    });
  }
});

describe('mirror', () => {
  it('cancel after ready: the target is a consistent copy as of the cancel, writes go on to the source', async () => {
    const source = await seededSource(SIZE, 5);
    const target = new TestDisk(SIZE);
    let atCancel: Buffer | undefined;
    const job = new MirrorJob({
      source,
      target,
      onConsistent: async (why) => {
        expect(why).toBe('cancel');
        atCancel = await readAll(source);
        expect(firstDifference(atCancel, await readAll(target.disk))).toBe(-1);
      },
    });
    const evs = events(job);
    const writer = new RandomWriter(job.node, await readAll(source), rng(5)).start();
    job.start();
    await whenReady(job);
    await writer.waitWrites(100);
    await within(job.cancel(), 20_000, 'cancel');
    await writer.waitWrites(10);
    await writer.stop();
    expect(atCancel).toBeDefined();
    // the stable target (after a crash of the target) is that copy too: the drain flushed it
    await target.crash();
    expect(firstDifference(await readAll(target.disk), atCancel!)).toBe(-1);
    expect(firstDifference(await readAll(source), writer.expected)).toBe(-1);
    expect(summary(evs).slice(-4)).toEqual(['waiting', 'pending', 'cancelled(true)', 'concluded']);
  });

  it('cancel before ready: aborting, cancelled(false), the tracker is gone', async () => {
    const source = await seededSource(SIZE, 6);
    const target = new TestDisk(SIZE);
    target.holdAll = true;
    const job = new MirrorJob({ source, target });
    const evs = events(job);
    job.start();
    await ticks(20);
    const cancelled = job.cancel();
    target.release();
    await within(cancelled, 10_000, 'cancel');
    expect(summary(evs)).toEqual(['running', 'aborting', 'cancelled(false)', 'concluded']);
    expect(job.tracking.trackerCount).toBe(0);
    await job.node.write(0, Buffer.from('after'));
    expect((await source.read(0, 5)).toString()).toBe('after');
  });

  it('complete --no-pivot keeps writing the source; complete before ready fails and keeps the job', async () => {
    const source = await seededSource(SIZE, 7);
    const target = new TestDisk(SIZE);
    let pivoted = false;
    const job = new MirrorJob({ source, target, pivot: async () => void (pivoted = true) });
    job.start();
    await expect(job.complete({ pivot: false })).rejects.toMatchObject({ code: 'ERR_JOB_STATE' });
    expect(job.status).toBe('running');
    await whenReady(job);
    await job.complete({ pivot: false });
    expect(pivoted).toBe(false);
    await job.node.write(100, Buffer.from('x'));
    expect((await source.read(100, 1)).toString()).toBe('x');
    expect((await target.disk.read(100, 1)).toString()).not.toBe('x');
  });

  it('pause stops progress: no target request while paused, copying goes on after resume', async () => {
    const source = await seededSource(SIZE, 8);
    const target = new TestDisk(SIZE);
    const job = new MirrorJob({ source, target, maxOps: 4 });
    const evs = events(job);
    job.start();
    while (target.counts.write + target.counts.writeZeroes < 20) await ticks(1);
    await job.pause();
    expect(job.status).toBe('paused');
    const before = { ...target.counts };
    const offset = job.query().offset;
    for (let i = 0; i < 50; i++) {
      await job.node.write(i * 100_000, Buffer.from('paused write'));
      await ticks(5);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(target.counts).toEqual(before);
    expect(job.query().offset).toBe(offset);
    job.resume();
    await whenReady(job);
    expect(target.counts.write).toBeGreaterThan(before.write);
    await job.complete();
    expect(firstDifference(await readAll(source), await readAll(target.disk))).toBe(-1);
    expect(summary(evs).slice(0, 3)).toEqual(['running', 'paused', 'running']);
  });

  it('write-blocking pauses too: writes while paused only mark dirty', async () => {
    const source = new MemoryNode(4 * MiB);
    const target = new TestDisk(4 * MiB);
    const job = new MirrorJob({ source, target, copyMode: 'write-blocking', sync: 'none' });
    job.start();
    await whenReady(job);
    const n = target.counts.write;
    await job.node.write(0, Buffer.alloc(65536, 1));
    expect(target.counts.write).toBe(n + 1); // on the target when the write completed
    expect(job.query().dirtyBytes).toBe(0);
    await job.pause();
    await job.node.write(65536, Buffer.alloc(65536, 2));
    expect(target.counts.write).toBe(n + 1);
    expect(job.query().dirtyBytes).toBe(65536);
    job.resume();
    await job.complete();
    expect(firstDifference(await readAll(source), await readAll(target.disk))).toBe(-1);
  });

  it('zeros and holes go as write-zeroes, never as data; target-is-zero skips them', async () => {
    const source = new MemoryNode(16 * MiB);
    await source.write(MiB + 5, Buffer.alloc(70_000, 7)); // data in granules 16..17
    await source.write(9 * MiB, Buffer.alloc(MiB, 0)); // allocated zeros
    for (const targetIsZero of [false, true]) {
      const target = new TestDisk(16 * MiB);
      await target.disk.write(0, Buffer.alloc(16 * MiB, 0xee)); // garbage to overwrite
      const job = new MirrorJob({ source, target, targetIsZero: targetIsZero });
      job.start();
      await whenReady(job);
      await job.complete();
      // data: the granules holding the 70 000 bytes, 65536-aligned: [1 MiB, 1 MiB + 128 KiB)
      expect(target.counts.writeBytes).toBe(2 * 65536);
      if (targetIsZero) {
        expect(target.counts.zeroBytes).toBe(MiB); // the allocated zeros: data by the extents, zeros when read
        expect(firstDifference(await readAll(source), (await readAll(target.disk)).fill(0, 0, MiB).fill(0, MiB + 128 * 1024))).toBe(-1);
      } else {
        expect(target.counts.zeroBytes).toBe(16 * MiB - 2 * 65536);
        expect(firstDifference(await readAll(source), await readAll(target.disk))).toBe(-1);
      }
    }
  });

  it('large zero regions go as few large write-zeroes; data written into them meanwhile is still copied, in buffer-sized windows', async () => {
    const source = new MemoryNode(64 * MiB);
    await source.write(0, Buffer.alloc(MiB, 1));
    await source.write(40 * MiB, Buffer.alloc(3 * MiB + 5, 2));
    const target = new TestDisk(64 * MiB);
    await target.disk.write(0, Buffer.alloc(64 * MiB, 0xee));
    target.holdAll = true;
    const job = new MirrorJob({ source, target, maxOps: 4 });
    job.start();
    await ticks(50);
    // into a region the start-up scan saw as zeros
    await job.node.write(20 * MiB + 7, Buffer.alloc(5 * MiB, 3));
    target.release();
    await whenReady(job);
    await job.complete();
    expect(firstDifference(await readAll(source), await readAll(target.disk))).toBe(-1);
    expect(target.counts.writeZeroes).toBeLessThan(40);
    expect(target.counts.writeBytes).toBeLessThanOrEqual(12 * MiB);
  });

  it('a data range that reads as zeros goes as write-zeroes (source without extents)', async () => {
    const mem = new MemoryNode(4 * MiB);
    await mem.write(0, Buffer.alloc(1000, 1));
    const source = { ...mem, driver: 'no-extents', description: 'x', size: mem.size, limits: mem.limits, caps: { ...mem.caps, canExtents: false }, read: mem.read.bind(mem), write: mem.write.bind(mem), close: async () => {} };
    const target = new TestDisk(4 * MiB);
    const job = new MirrorJob({ source, target });
    job.start();
    await whenReady(job);
    await job.complete();
    expect(target.counts.write).toBe(1);
    expect(target.counts.writeBytes).toBe(65536);
    expect(firstDifference(await readAll(mem), await readAll(target.disk))).toBe(-1);
  });

  it('sync none copies only new writes; sync bitmap only the bitmap\'s granules (and clears them on success)', async () => {
    const source = await seededSource(8 * MiB, 9);
    const target = new TestDisk(8 * MiB);
    const none = new MirrorJob({ source, target, sync: 'none' });
    none.start();
    await whenReady(none);
    await none.node.write(3 * MiB + 1, Buffer.from('abc'));
    await none.complete({ pivot: false });
    expect(target.counts.writeBytes + target.counts.zeroBytes).toBe(65536);
    expect((await target.disk.read(3 * MiB + 1, 3)).toString()).toBe('abc');

    const bitmap = new DirtyBitmap(8 * MiB, { granularity: 128 * 1024 });
    bitmap.set(0, 1);
    bitmap.set(5 * MiB, 200 * 1024);
    const target2 = new TestDisk(8 * MiB, 128 * 1024);
    const job = new MirrorJob({ source, target: target2, sync: 'bitmap', bitmap });
    expect(job.granularity).toBe(128 * 1024);
    job.start();
    await whenReady(job);
    await job.complete();
    expect(target2.counts.writeBytes + target2.counts.zeroBytes).toBe(3 * 128 * 1024);
    const s = await readAll(source);
    const t = await readAll(target2.disk);
    expect(t.subarray(0, 128 * 1024).equals(s.subarray(0, 128 * 1024))).toBe(true);
    expect(t.subarray(5 * MiB, 5 * MiB + 256 * 1024).equals(s.subarray(5 * MiB, 5 * MiB + 256 * 1024))).toBe(true);
    expect(bitmap.dirtyGranules).toBe(0);
  });

  it('bitmap mode: always clears what was copied even when the job fails; never leaves the bitmap alone', async () => {
    const source = await seededSource(4 * MiB, 18);
    for (const mode of ['always', 'never', 'on-success'] as const) {
      const bitmap = new DirtyBitmap(4 * MiB);
      bitmap.setAll();
      const target = new TestDisk(4 * MiB);
      // the second half fails: the first half is copied
      target.faults.push({ op: 'write', errno: 'EIO', times: Infinity, range: [2 * MiB, 4 * MiB] }, { op: 'writeZeroes', errno: 'EIO', times: Infinity, range: [2 * MiB, 4 * MiB] });
      const job = new MirrorJob({ source, target, sync: 'bitmap', bitmap, bitmapMode: mode, maxOps: 1 });
      job.start();
      await job.whenConcluded();
      expect(job.error?.code).toBe('ERR_INJECTED');
      const left = bitmap.dirtyBytes;
      if (mode === 'always') {
        expect(left).toBeLessThan(4 * MiB);
        expect(bitmap.isDirty(2 * MiB, 2 * MiB)).toBe(true);
      } else expect(left).toBe(4 * MiB);
    }
  });

  it('sync top copies only what the top layer holds (allocation depth 1)', async () => {
    const mem = await seededSource(8 * MiB, 10);
    const source = {
      driver: 'layered', description: 'layered', size: mem.size, limits: mem.limits,
      caps: { ...mem.caps, allocationDepth: true },
      read: mem.read.bind(mem), write: mem.write.bind(mem), close: async () => {},
      extents: async (offset: number, length: number) => {
        // top layer: the first 2 MiB; below: everything else
        if (offset < 2 * MiB) return [{ length: Math.min(length, 2 * MiB - offset), hole: false, zero: false, depth: 1 }];
        return [{ length, hole: false, zero: false, depth: 2 }];
      },
    };
    const target = new TestDisk(8 * MiB);
    const job = new MirrorJob({ source, target, sync: 'top' });
    job.start();
    await whenReady(job);
    await job.complete();
    expect(target.counts.writeBytes + target.counts.zeroBytes).toBe(2 * MiB);
  });

  it('refuses sizes that differ, a read-only target, bad options', () => {
    const s = new MemoryNode(MiB);
    expect(() => new MirrorJob({ source: s, target: new MemoryNode(2 * MiB) })).toThrow(expect.objectContaining({ code: 'ERR_SIZE_MISMATCH' }));
    expect(() => new MirrorJob({ source: s, target: new MemoryNode(MiB, { readOnly: true }) })).toThrow(expect.objectContaining({ code: 'ERR_READ_ONLY' }));
    expect(() => new MirrorJob({ source: s, target: new MemoryNode(MiB), granularity: 1000 })).toThrow(/granularity/);
    expect(() => new MirrorJob({ source: s, target: new MemoryNode(MiB), sync: 'bitmap' })).toThrow(/needs a bitmap/);
    expect(() => new MirrorJob({ source: s, target: new MemoryNode(MiB), maxOps: 0 })).toThrow(/copy operations/);
    expect(() => new MirrorJob({ source: s, target: new MemoryNode(MiB), copyMode: 'x' as never })).toThrow(/copy mode/);
    expect(() => new MirrorJob({ source: s, target: new MemoryNode(MiB), writebackBytes: -1 })).toThrow(expect.objectContaining({ code: 'ERR_JOB_INVALID', message: expect.stringMatching(/write-back flush every -1 bytes/) }));
  });

  it('speed limits the copy rate', async () => {
    const source = new MemoryNode(4 * MiB);
    await source.write(0, Buffer.alloc(4 * MiB, 1));
    const target = new TestDisk(4 * MiB);
    const job = new MirrorJob({ source, target, speed: 8 * MiB, bufSize: 256 * 1024 });
    const t0 = performance.now();
    job.start();
    await whenReady(job);
    const seconds = (performance.now() - t0) / 1000;
    // 4 MiB at 8 MiB/s: about 0.5 s (the first burst is free)
    expect(seconds).toBeGreaterThan(0.3);
    expect(seconds).toBeLessThan(3);
    await job.cancel();
  });

  it('write-blocking reaches consistency points under a writer that never pauses; background alone would not', async () => {
    const source = await seededSource(16 * MiB, 17);
    const target = new TestDisk(16 * MiB);
    const job = new MirrorJob({ source, target, copyMode: 'write-blocking' });
    const writer = new RandomWriter(job.node, await readAll(source), rng(17), 4, 0).start();
    job.start();
    await within(whenReady(job), 20_000, 'ready under load');
    const before = writer.writes;
    await writer.waitWrites(300);
    expect(writer.writes).toBeGreaterThan(before);
    await within(job.complete(), 20_000, 'complete under load');
    await writer.waitWrites(10);
    await writer.stop();
    expect(firstDifference(await readAll(target.disk), writer.expected)).toBe(-1);
  });

  it('auto copy mode switches to write-blocking when lagging and back when caught up, with events', async () => {
    const source = await seededSource(8 * MiB, 11);
    const target = new TestDisk(8 * MiB);
    const job = new MirrorJob({ source, target, copyMode: 'auto', maxLagMs: 40, speed: 4 * MiB });
    const evs = events(job);
    const writer = new RandomWriter(job.node, await readAll(source), rng(11), 2).start();
    job.start();
    await within(whenReady(job), 20_000, 'ready');
    await writer.stop();
    await job.complete();
    expect(firstDifference(await readAll(target.disk), writer.expected)).toBe(-1);
    const modes = summary(evs).filter((x) => x.startsWith('copy-mode'));
    expect(modes[0]).toBe('copy-mode(write-blocking lag)');
    expect(modes).toContain('copy-mode(background converged)');
  });
});

describe('mirror error policies (a target that injects errors)', () => {
  async function setup(options: Partial<MirrorOptions>, size = 4 * MiB) {
    const source = await seededSource(size, 12);
    const target = new TestDisk(size);
    const job = new MirrorJob({ source, target, ...options });
    return { source, target, job, evs: events(job) };
  }

  it('report: the job ends in error (aborting, completed with the error)', async () => {
    const { target, job, evs } = await setup({ onTargetError: 'report' });
    target.faults.push({ op: 'write', errno: 'EIO', times: 1, range: [MiB, MiB + 1] }, { op: 'writeZeroes', errno: 'EIO', times: 1, range: [MiB, MiB + 1] });
    job.start();
    await within(job.whenConcluded(), 10_000, 'job');
    expect(summary(evs)).toEqual(['running', expect.stringMatching(/^error\(target write(-zeroes)? EIO report\)$/), 'aborting', 'completed(ERR_INJECTED)', 'concluded']);
    expect(job.error?.code).toBe('ERR_INJECTED');
  });

  it('ignore: every error is an event, the region is retried, the copy ends equal', async () => {
    const { source, target, job, evs } = await setup({ onTargetError: 'ignore', onSourceError: 'ignore' });
    target.faults.push({ op: 'write', errno: 'EIO', times: 3, range: [0, 4 * MiB] }, { op: 'flush', errno: 'EIO', times: 1 });
    job.start();
    await within(whenReady(job), 10_000, 'ready');
    await job.complete();
    const s = summary(evs);
    expect(s.filter((x) => x === 'error(target write EIO ignore)')).toHaveLength(3);
    expect(s).toContain('error(target flush EIO ignore)');
    expect(firstDifference(await readAll(source), await readAll(target.disk))).toBe(-1);
  });

  it('stop: paused with io-status failed until resume; enospc: stop on ENOSPC, report on EIO', async () => {
    const { source, target, job, evs } = await setup({ onTargetError: 'enospc' });
    target.faults.push({ op: 'write', errno: 'ENOSPC', times: 1, range: [0, 4 * MiB] });
    job.start();
    await within(
      (async () => {
        while (job.status !== 'paused') await ticks(1);
      })(),
      10_000,
      'pause',
    );
    expect(job.query()).toMatchObject({ status: 'paused', ioStatus: 'nospace', paused: true });
    const n = target.counts.write;
    await new Promise((r) => setTimeout(r, 30));
    expect(target.counts.write).toBe(n);
    job.resume();
    await whenReady(job);
    target.faults.push({ op: 'flush', errno: 'EIO', times: 1 });
    await job.node.write(0, Buffer.from('again'));
    await within(job.whenConcluded(), 10_000, 'job');
    expect(summary(evs)).toEqual([
      'running', 'error(target write ENOSPC stop)', 'paused', 'running', 'ready(true)', 'ready',
      'error(target flush EIO report)', 'aborting', 'completed(ERR_INJECTED)', 'concluded',
    ]);
    void source;
  });

  it('a source read error is the source side', async () => {
    const source = await seededSource(4 * MiB, 13);
    const faulty = await TestDisk.from(source);
    faulty.faults.push({ op: 'read', errno: 'EIO', times: 1, range: [2 * MiB, 2 * MiB + 1] });
    const job = new MirrorJob({ source: faulty, target: new TestDisk(4 * MiB), onSourceError: 'stop' });
    const evs = events(job);
    job.start();
    while (job.status !== 'paused') await ticks(1);
    expect(job.query().ioStatus).toBe('failed');
    job.resume();
    await whenReady(job);
    await job.complete();
    expect(summary(evs)).toContain('error(source read EIO stop)');
  });

  it('an error while completing reaches a terminal state (report), within 10 s', async () => {
    const { target, job, evs } = await setup({ onTargetError: 'report' });
    job.start();
    await whenReady(job);
    target.faults.push({ op: 'flush', errno: 'EIO', times: Infinity });
    await job.node.write(5, Buffer.from('dirty again'));
    await within(job.complete().catch(() => {}), 10_000, 'complete');
    expect(job.status).toBe('concluded');
    expect(summary(evs).slice(-4)).toEqual(['error(target flush EIO report)', 'aborting', 'completed(ERR_INJECTED)', 'concluded']);
  });

  it('an error while completing with policy stop pauses (writes flow again); a forced cancel ends it', async () => {
    const { source, target, job } = await setup({ onTargetError: 'stop' });
    job.start();
    await whenReady(job);
    target.faults.push({ op: 'write', errno: 'EIO', times: Infinity });
    await job.node.write(5, Buffer.alloc(70_000, 3));
    const completing = job.complete().catch((e: unknown) => e);
    while (job.status !== 'paused') await ticks(1);
    // the drain held writes; paused, they reach the source again
    await within(job.node.write(9, Buffer.from('through')), 5000, 'write while stopped');
    expect((await source.read(9, 7)).toString()).toBe('through');
    await within(job.cancel({ force: true }), 10_000, 'cancel');
    expect(await completing).toBeDefined();
    expect(job.status).toBe('concluded');
  });

  it('a pivot that fails ends the job in error; writes go on to the source', async () => {
    const source = await seededSource(4 * MiB, 14);
    const job = new MirrorJob({ source, target: new TestDisk(4 * MiB), pivot: async () => Promise.reject(new Error('no pivot today')) });
    job.start();
    await whenReady(job);
    await expect(job.complete()).rejects.toThrow('no pivot today');
    await job.node.write(0, Buffer.from('src'));
    expect((await source.read(0, 3)).toString()).toBe('src');
  });
});

describe('the model\'s findings, checked on the implementation', () => {
  it('finding 1: at every moment a granule where the stable target differs from the source is dirty in persistedView()', async () => {
    const source = await seededSource(8 * MiB, 15);
    const target = new TestDisk(8 * MiB, 65536, { cache: true });
    const job = new MirrorJob({ source, target, maxOps: 8 });
    const violations: string[] = [];
    let checks = 0;
    const src = await readAll(source); // no writer: the source is stable
    target.onChange = () => {
      // runs synchronously after a target write or flush took effect (stable.* calls are sync in effect)
      void (async () => {
        const view = job.persistedView();
        const stable = await readAll(target.stable);
        checks++;
        for (let g = 0; g < view.bits; g++) {
          const a = g * 65536;
          if (!view.testBit(g) && !stable.subarray(a, a + 65536).equals(src.subarray(a, a + 65536))) violations.push(`granule ${g}`);
        }
      })();
    };
    job.start();
    await whenReady(job);
    await job.complete();
    expect(checks).toBeGreaterThan(10);
    expect(violations).toEqual([]);
    await target.crash();
    expect(firstDifference(await readAll(target.disk), src)).toBe(-1);
  });

  it('write-back flushes: the target is flushed after each writebackBytes of data while copying, not as a consistency point; 0 turns them off', async () => {
    const source = await seededSource(16 * MiB, 21);
    const src = await readAll(source);
    for (const writebackBytes of [MiB, 0]) {
      const target = new TestDisk(16 * MiB, 65536, { cache: true });
      const job = new MirrorJob({ source, target, maxOps: 4, writebackBytes });
      // the data bytes the target had been sent when each of its flushes took effect, and when the job became ready
      const atFlush = recordFlushes(target);
      let atReady = -1;
      job.on('event', (e: JobEvent) => {
        if (e.event === 'ready') atReady = target.counts.writeBytes;
      });
      job.start();
      await whenReady(job);
      await job.complete();
      const total = target.counts.writeBytes;
      expect(total).toBeGreaterThan(4 * MiB); // the seeded source holds several MiB of data
      const during = atFlush.filter((n) => n < total);
      if (writebackBytes > 0) {
        // one flush per MiB of data or so (one at a time: a flush still running defers the next)
        expect(during.length).toBeGreaterThanOrEqual(Math.floor(total / MiB / 2));
      } else {
        expect(during).toEqual([]);
      }
      // not a consistency point: ready came once everything was copied
      expect(atReady).toBe(total);
      await target.crash();
      expect(firstDifference(await readAll(target.disk), src)).toBe(-1);
    }
  });

  it('writebackSkipTail: no write-back flush once less than writebackBytes is left to copy (the consistency flush follows)', async () => {
    // 8 MiB of data copied 1 MiB at a time, one operation in flight, a write-back flush every 5 MiB:
    // the flush due after 5 MiB finds 3 MiB left (2 dirty, 1 in flight)
    const source = new MemoryNode(8 * MiB);
    await source.write(0, Buffer.alloc(8 * MiB, 0x6b));
    const src = await readAll(source);
    for (const writebackSkipTail of [false, true]) {
      const target = new TestDisk(8 * MiB, 65536, { cache: true });
      const job = new MirrorJob({ source, target, maxOps: 1, bufSize: MiB, writebackBytes: 5 * MiB, writebackSkipTail });
      const atFlush = recordFlushes(target);
      job.start();
      await whenReady(job);
      await job.complete();
      expect(target.counts.writeBytes).toBe(8 * MiB);
      // the flushes that took effect before the copy ended: the one issued at 5 MiB without the option, none with it
      expect(atFlush.filter((n) => n < 8 * MiB)).toHaveLength(writebackSkipTail ? 0 : 1);
      await target.crash();
      expect(firstDifference(await readAll(target.disk), src)).toBe(-1);
    }
  });

  it('finding 2: never two copies of one granule in flight, even when a granule is rewritten during its copy', async () => {
    const source = await seededSource(4 * MiB, 16);
    const target = new TestDisk(4 * MiB);
    const job = new MirrorJob({ source, target, maxOps: 16, bufSize: 65536 });
    const writer = new RandomWriter(job.node, await readAll(source), rng(16), 8).start();
    job.start();
    await whenReady(job);
    await writer.waitWrites(300);
    await writer.stop();
    await job.complete();
    expect(target.overlapViolations).toEqual([]);
    expect(firstDifference(await readAll(target.disk), writer.expected)).toBe(-1);
  });
});
