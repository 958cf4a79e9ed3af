// The backup job: copy-before-write under overwrites of every shape (whole, partial-left,
// partial-right, adjacent granules, write-zeroes, trim) at several granularities while the
// background copy runs; the fleecing view; sync full/top/none/incremental; an incremental chain
// against a full backup taken at the same moments; copy-before-write error policies; error
// policies of the background copy; pause and cancel.
import { describe, expect, it } from 'vitest';
import type { BlockNode, Extent, IoOptions, WriteOptions, ZeroOptions } from '../../src/api/block.js';
import { MemoryNode } from '../../src/block/memory.js';
import { DirtyBitmap } from '../../src/bitmap/dirty-bitmap.js';
import { DirtyTrackingNode, volatileTracker } from '../../src/block/filters/tracking.js';
import type { JobEvent } from '../../src/jobs/job.js';
import { BackupJob, type BackupOptions } from '../../src/jobs/backup.js';
import { Gate, hookNode } from '../support/fault-node.js';
import { MiB, RandomWriter, TestDisk, firstDifference, randomBytes, readAll, recordFlushes, rng, seededSource } from './helpers.js';

function events(job: BackupJob): JobEvent[] {
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

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no end within ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

async function ticks(n: number): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve));
}

function until(cond: () => boolean, what: string, ms = 10_000): Promise<void> {
  return within(
    (async () => {
      while (!cond()) await new Promise((resolve) => setTimeout(resolve, 1));
    })(),
    ms,
    what,
  );
}

/** Wraps a node: counts, per granule, the target requests that changed it (write, write-zeroes, trim). */
function countingTarget(inner: BlockNode, granularity: number): BlockNode & { perGranule: Map<number, number>; ranges: Array<[number, number]> } {
  const perGranule = new Map<number, number>();
  const ranges: Array<[number, number]> = [];
  const note = (offset: number, length: number): void => {
    ranges.push([offset, offset + length]);
    for (let g = Math.floor(offset / granularity); g < Math.ceil((offset + length) / granularity); g++) perGranule.set(g, (perGranule.get(g) ?? 0) + 1);
  };
  return {
    driver: 'counting',
    description: `counting:${inner.description}`,
    size: inner.size,
    limits: inner.limits,
    caps: inner.caps,
    perGranule,
    ranges,
    read: (o: number, l: number, io?: IoOptions) => inner.read(o, l, io),
    write: (o: number, d: Buffer, w?: WriteOptions) => {
      note(o, d.length);
      return inner.write(o, d, w);
    },
    writeZeroes: (o: number, l: number, z?: ZeroOptions) => {
      note(o, l);
      return inner.writeZeroes!(o, l, z);
    },
    trim: (o: number, l: number, w?: WriteOptions) => {
      note(o, l);
      return inner.trim!(o, l, w);
    },
    flush: (io?: IoOptions) => inner.flush!(io),
    extents: (o: number, l: number, io?: IoOptions): Promise<Extent[]> => inner.extents!(o, l, io),
    close: async () => {},
  };
}

/** The overwrite shapes of the issue, in a stripe of 16 granules from granule `gi`: [offset, length, kind]. */
function shapes(gi: number, g: number): Array<[number, number, 'write' | 'zero' | 'trim']> {
  const base = gi * g;
  return [
    [base, g, 'write'], // whole granule
    [base + 2 * g, Math.max(1, g / 4), 'write'], // partial, left
    [base + 4 * g + (g * 3) / 4, g / 4, 'write'], // partial, right
    [base + 6 * g + g / 2, g, 'write'], // across two adjacent granules
    [base + 8 * g + 7, 1, 'write'], // one byte
    [base + 10 * g, 3 * g, 'zero'], // write-zeroes over three granules
    [base + 13 * g + 100, 2 * g, 'trim'], // unaligned trim over three granules
  ];
}

async function overwrite(node: BlockNode, expected: Buffer, r: () => number, [offset, length, kind]: [number, number, 'write' | 'zero' | 'trim']): Promise<void> {
  if (kind === 'write') {
    const data = randomBytes(r, length);
    data.copy(expected, offset);
    await node.write(offset, data);
  } else {
    expected.fill(0, offset, offset + length);
    if (kind === 'zero') await node.writeZeroes!(offset, length);
    else await node.trim!(offset, length);
  }
}

const SIZE = 16 * MiB;

/** A memory image of random data everywhere (so every copy reads and writes data). */
async function randomSource(size: number, seed: number): Promise<MemoryNode> {
  const node = new MemoryNode(size);
  await node.write(0, randomBytes(rng(seed), size));
  return node;
}

describe('backup: copy-before-write under overwrites while the background copy runs', () => {
  for (const g of [4096, 65536, 1 << 20]) {
    for (const sync of ['full', 'none'] as const) {
      it(`granularity ${g}, sync ${sync}: the target and the fleecing view hold only the old data, byte for byte`, async () => {
        const seed = g + (sync === 'full' ? 1 : 2);
        const size = Math.max(SIZE, 5 * 16 * g);
        const source = await seededSource(size, seed);
        const original = await readAll(source);
        const disk = new TestDisk(size, g);
        const target = countingTarget(disk, g);
        const job = new BackupJob({ source, target, sync, granularity: g, maxOps: 3, bufSize: Math.max(g, 256 * 1024) });
        const evs = events(job);
        const expected = Buffer.from(original);
        const r = rng(seed);
        job.start();
        // five stripes of 16 granules, each overwritten with every shape in sequence; the stripes
        // at once, concurrently with the background copy
        const stripes = size / (16 * g);
        const chosen = new Set<number>();
        while (chosen.size < 5) chosen.add(Math.floor(r() * stripes));
        const rounds: Array<Promise<void>> = [];
        const viewChecks: Array<Promise<void>> = [];
        for (const stripe of chosen) {
          rounds.push(
            (async () => {
              for (const s of shapes(stripe * 16, g)) {
                await overwrite(job.node, expected, r, s);
                // the view still shows the old data where this write went
                const [o, l] = s;
                viewChecks.push(
                  job.snapshotNode.read(o, l).then((b) => {
                    expect(b.equals(original.subarray(o, o + l)), `view at ${o}+${l}`).toBe(true);
                  }),
                );
              }
            })(),
          );
        }
        await Promise.all(rounds);
        await Promise.all(viewChecks);
        // the whole view, while the job is still live (sync none: always)
        if (job.status !== 'concluded') {
          const view = await readAll(job.snapshotNode);
          expect(firstDifference(view, original), 'fleecing view vs the start').toBe(-1);
        }
        if (sync === 'none') {
          // only the old content of what was overwritten went to the target
          for (const [a, b] of target.ranges) expect((await disk.disk.read(a, b - a)).equals(original.subarray(a, b))).toBe(true);
          await job.cancel();
          expect(summary(evs).slice(-3)).toEqual(['aborting', 'cancelled(false)', 'concluded']);
        } else {
          await within(job.whenConcluded(), 30_000, 'backup');
          expect(job.error).toBeUndefined();
          expect(firstDifference(await readAll(disk.disk), original), 'target vs the start').toBe(-1);
          expect(summary(evs)).toEqual(['running', 'waiting', 'pending', 'completed', 'concluded']);
          // the finished full backup is the snapshot too
          expect(firstDifference(await readAll(job.snapshotNode), original)).toBe(-1);
        }
        // the source has every write
        expect(firstDifference(await readAll(source), expected), 'source vs the writes').toBe(-1);
        // no granule was copied twice, and no two target writes on one granule were in flight at once
        expect([...target.perGranule.values()].filter((n) => n > 1)).toEqual([]);
        expect(disk.overlapViolations).toEqual([]);
        expect(job.stats.cbwCopies).toBeGreaterThan(0);
      });
    }
  }

  it('concurrent writers to one granule wait for one copy; the copy is never made after the overwrite', async () => {
    const g = 65536;
    const source = await seededSource(4 * MiB, 3);
    const original = await readAll(source);
    const gate = new Gate();
    const inner = new MemoryNode(4 * MiB);
    const target = hookNode(inner, { gate, gateOps: ['write', 'writeZeroes'] });
    const job = new BackupJob({ source, target, sync: 'none', granularity: g });
    job.start();
    gate.close();
    const at = 5 * g;
    const writes = [job.node.write(at, Buffer.alloc(10, 1)), job.node.write(at + 100, Buffer.alloc(10, 2)), job.node.writeZeroes!(at + 1000, 5000)];
    await gate.waitEntered(1);
    await ticks(20);
    // one copy is held at the gate; nothing reached the source yet
    expect(gate.entered).toBe(1);
    expect((await source.read(at, g)).equals(original.subarray(at, at + g))).toBe(true);
    expect(job.stats).toMatchObject({ cbwCopies: 1 });
    gate.open();
    await Promise.all(writes);
    const targetWrites = target.log.filter((x) => x.op === 'write' || x.op === 'writeZeroes');
    expect(targetWrites.map((x) => [x.offset, x.length])).toEqual([[at, g]]);
    expect((await inner.read(at, g)).equals(original.subarray(at, at + g))).toBe(true);
    expect((await job.snapshotNode.read(at, g)).equals(original.subarray(at, at + g))).toBe(true);
    await job.cancel();
  });

  it('a write waits for a background copy in flight on its granule instead of copying again', async () => {
    const g = 65536;
    const source = await seededSource(2 * MiB, 4);
    const original = await readAll(source);
    const gate = new Gate();
    const inner = new MemoryNode(2 * MiB);
    const target = hookNode(inner, { gate, gateOps: ['write', 'writeZeroes'] });
    gate.close();
    const job = new BackupJob({ source, target, sync: 'full', granularity: g, maxOps: 1, bufSize: 2 * MiB });
    job.start();
    await gate.waitEntered(1); // the one background op (the whole disk) is writing
    const w = job.node.write(g + 3, Buffer.from('new'));
    await ticks(20);
    expect(job.stats.cbwCopies).toBe(0);
    expect(job.stats.cbwWaits).toBe(1);
    expect((await source.read(g + 3, 3)).equals(original.subarray(g + 3, g + 6))).toBe(true);
    gate.open();
    await w;
    await within(job.whenConcluded(), 10_000, 'backup');
    expect(firstDifference(await readAll(inner), original)).toBe(-1);
    expect((await source.read(g + 3, 3)).toString()).toBe('new');
  });
});

describe('backup under a random writer (unaligned, 1-byte, 4 KiB, up to 256 KiB writes, write-zeroes)', () => {
  const RUNS = Number(process.env.BLKREP_BACKUP_RUNS ?? 6);
  for (let run = 0; run < RUNS; run++) {
    const seed = 5000 + run * 7919;
    const g = [4096, 65536, 1 << 20][run % 3]!;
    it(`seed ${seed}, granularity ${g}: target == source at start; the view == start while the job runs; the source has every write`, async () => {
      const source = await seededSource(SIZE, seed);
      const original = await readAll(source);
      const disk = new TestDisk(SIZE, g);
      const target = countingTarget(disk, g);
      const job = new BackupJob({ source, target, granularity: g, maxOps: 4, bufSize: Math.max(g, 512 * 1024), speed: 32 * MiB });
      const writer = new RandomWriter(job.node, original, rng(seed), 4, 1);
      job.start();
      writer.start();
      await writer.waitWrites(100);
      // a view read of everything while writes go on
      const view = await readAll(job.snapshotNode);
      expect(firstDifference(view, original), 'view vs the start').toBe(-1);
      await within(job.whenConcluded(), 30_000, 'backup');
      await writer.stop();
      expect(writer.errors).toEqual([]);
      expect(job.error).toBeUndefined();
      expect(firstDifference(await readAll(disk.disk), original), 'target vs the start').toBe(-1);
      expect(firstDifference(await readAll(source), writer.expected), 'source vs the writes').toBe(-1);
      expect([...target.perGranule.values()].filter((n) => n > 1)).toEqual([]);
      expect(disk.overlapViolations).toEqual([]);
      expect(job.stats.cbwCopies).toBeGreaterThan(0);
    });
  }
});

describe('backup: sync modes, zeros, the end', () => {
  it('full: zeros and holes go as write-zeroes, never as data; target-is-zero skips them; the stable target is flushed at the end', async () => {
    const source = await seededSource(SIZE, 11);
    const original = await readAll(source);
    const target = new TestDisk(SIZE, 65536, { cache: true });
    const job = new BackupJob({ source, target });
    job.start();
    await within(job.whenConcluded(), 20_000, 'backup');
    await target.crash();
    expect(firstDifference(await readAll(target.disk), original)).toBe(-1);
    let dataBytes = 0;
    for (const e of await source.extents(0, SIZE)) if (!e.zero) dataBytes += e.length;
    expect(target.counts.writeBytes).toBeLessThanOrEqual(dataBytes);
    expect(target.counts.writeBytes + target.counts.zeroBytes).toBe(SIZE);
    expect(job.query()).toMatchObject({ status: 'concluded', todoBytes: 0, copiedBytes: SIZE, offset: SIZE });

    const fresh = new TestDisk(SIZE);
    const z = new BackupJob({ source, target: fresh, targetIsZero: true });
    z.start();
    await z.whenConcluded();
    expect(fresh.counts.writeZeroes).toBe(0);
    expect(firstDifference(await readAll(fresh.disk), original)).toBe(-1);
  });

  it('write-back flushes: the target is flushed after each writebackBytes of data while copying; 0 turns them off', async () => {
    const source = await seededSource(16 * MiB, 21);
    const original = await readAll(source);
    for (const writebackBytes of [MiB, 0]) {
      const target = new TestDisk(16 * MiB, 65536, { cache: true });
      const job = new BackupJob({ source, target, maxOps: 4, writebackBytes });
      // the data bytes the target had been sent when each of its flushes took effect
      const atFlush = recordFlushes(target);
      job.start();
      await within(job.whenConcluded(), 20_000, 'backup');
      const total = target.counts.writeBytes;
      expect(total).toBeGreaterThan(4 * MiB); // the seeded source holds several MiB of data
      const during = atFlush.filter((n) => n < total);
      if (writebackBytes > 0) expect(during.length).toBeGreaterThanOrEqual(Math.floor(total / MiB / 2));
      else expect(during).toEqual([]);
      expect(job.query()).toMatchObject({ status: 'concluded', todoBytes: 0 });
      // the end's flush still came after the last write
      expect(atFlush[atFlush.length - 1]).toBe(total);
      await target.crash();
      expect(firstDifference(await readAll(target.disk), original)).toBe(-1);
    }
  });

  it('top: only what the top layer holds (allocation depth 1) is copied; the view errors for other written granules', async () => {
    const mem = await seededSource(8 * MiB, 12);
    const source: BlockNode = {
      driver: 'layered', description: 'layered', size: mem.size, limits: mem.limits,
      caps: { ...mem.caps, allocationDepth: true },
      read: mem.read.bind(mem), readInto: mem.readInto.bind(mem), write: mem.write.bind(mem), close: async () => {},
      extents: async (offset: number, length: number) => {
        if (offset < 2 * MiB) return [{ length: Math.min(length, 2 * MiB - offset), hole: false, zero: false, depth: 1 }];
        return [{ length, hole: false, zero: false, depth: 2 }];
      },
    };
    const original = await readAll(mem);
    const target = new TestDisk(8 * MiB);
    const gate = new Gate();
    const held = hookNode(target, { gate, gateOps: ['write'] });
    gate.close();
    const job = new BackupJob({ source, target: held, sync: 'top' });
    job.start();
    await gate.waitEntered(1);
    await job.node.write(5 * MiB, Buffer.from('below the top'));
    await expect(job.snapshotNode.read(5 * MiB, 10)).rejects.toMatchObject({ code: 'ERR_SNAPSHOT_STALE', errno: 'EIO' });
    expect((await job.snapshotNode.read(6 * MiB, 10)).equals(original.subarray(6 * MiB, 6 * MiB + 10))).toBe(true);
    gate.open();
    await within(job.whenConcluded(), 10_000, 'backup');
    expect(target.counts.writeBytes + target.counts.zeroBytes).toBe(2 * MiB);
    expect((await readAll(target.disk)).subarray(0, 2 * MiB).equals(original.subarray(0, 2 * MiB))).toBe(true);
  });

  it('none: runs until cancelled; the target fills only with the old content of what is overwritten', async () => {
    const source = await seededSource(4 * MiB, 13);
    const original = await readAll(source);
    const target = new MemoryNode(4 * MiB);
    const job = new BackupJob({ source, target, sync: 'none', granularity: 65536 });
    const evs = events(job);
    job.start();
    await ticks(50);
    expect(job.status).toBe('running');
    await job.node.write(3 * 65536 + 10, Buffer.alloc(70000, 7)); // granules 3 and 4
    expect((await target.extents(0, 4 * MiB)).filter((e) => !e.hole).reduce((n, e) => n + e.length, 0)).toBeLessThanOrEqual(2 * 65536);
    expect((await target.read(3 * 65536, 2 * 65536)).equals(original.subarray(3 * 65536, 5 * 65536))).toBe(true);
    expect(job.query()).toMatchObject({ sync: 'none', copiedBytes: 2 * 65536, cbwCopies: 1 });
    await job.cancel();
    expect(summary(evs)).toEqual(['running', 'aborting', 'cancelled(false)', 'concluded']);
    // after the job: copied granules still read from the target, the others cannot be served
    expect((await job.snapshotNode.read(3 * 65536, 65536)).equals(original.subarray(3 * 65536, 4 * 65536))).toBe(true);
    await expect(job.snapshotNode.read(0, 10)).rejects.toMatchObject({ code: 'ERR_SNAPSHOT_ENDED', errno: 'EIO' });
    // writes pass straight through now
    await job.node.write(0, Buffer.from('after'));
    expect((await source.read(0, 5)).toString()).toBe('after');
    expect((await target.read(0, 5)).equals(Buffer.alloc(5))).toBe(true);
  });

  it('refuses sizes that differ, a read-only target, bad options', () => {
    const a = new MemoryNode(MiB);
    expect(() => new BackupJob({ source: a, target: new MemoryNode(2 * MiB) })).toThrow(expect.objectContaining({ code: 'ERR_SIZE_MISMATCH' }));
    expect(() => new BackupJob({ source: a, target: new MemoryNode(MiB, { readOnly: true }) })).toThrow(expect.objectContaining({ code: 'ERR_READ_ONLY' }));
    expect(() => new BackupJob({ source: a, target: new MemoryNode(MiB), sync: 'incremental' })).toThrow(expect.objectContaining({ code: 'ERR_JOB_INVALID' }));
    expect(() => new BackupJob({ source: a, target: new MemoryNode(MiB), sync: 'top', bitmap: new DirtyBitmap(MiB) })).toThrow(expect.objectContaining({ code: 'ERR_JOB_INVALID' }));
    expect(() => new BackupJob({ source: a, target: new MemoryNode(MiB), granularity: 1000 })).toThrow();
    expect(() => new BackupJob({ source: a, target: new MemoryNode(MiB), onCbwError: 'shrug' as never })).toThrow(expect.objectContaining({ code: 'ERR_JOB_INVALID' }));
    expect(() => new BackupJob({ source: a, target: new MemoryNode(MiB), sync: 'incremental', bitmap: new DirtyBitmap(MiB, { granularity: 4096 }), granularity: 65536 })).toThrow(expect.objectContaining({ code: 'ERR_JOB_INVALID' }));
    expect(() => new BackupJob({ source: a, target: new MemoryNode(MiB), maxOps: 0 })).toThrow(expect.objectContaining({ code: 'ERR_JOB_INVALID' }));
    expect(() => new BackupJob({ source: a, target: new MemoryNode(MiB), writebackBytes: 1.5 })).toThrow(expect.objectContaining({ code: 'ERR_JOB_INVALID', message: expect.stringMatching(/write-back flush every 1.5 bytes/) }));
  });

  it('writes and view reads between start() and copy-before-write in place (the start scan) wait, then see the start', async () => {
    const mem = await randomSource(MiB, 15);
    const original = await readAll(mem);
    const gate = new Gate();
    const source = hookNode(mem, { gate, gateOps: ['extents'] });
    gate.close();
    const job = new BackupJob({ source, target: new MemoryNode(MiB), sync: 'full' });
    job.start();
    await gate.waitEntered(1); // the start scan asks the extents
    const write = job.node.write(100, Buffer.from('new'));
    const view = job.snapshotNode.read(0, 200);
    await ticks(20);
    expect((await mem.read(100, 3)).equals(original.subarray(100, 103))).toBe(true);
    gate.open();
    await write;
    expect((await view).equals(original.subarray(0, 200))).toBe(true);
    await within(job.whenConcluded(), 10_000, 'backup');
    expect((await readAll(job.target)).equals(original)).toBe(true);
  });

  it('the view\'s extents: zero where the start was zero (target for copied granules, source for the others), whatever was written since', async () => {
    const g = 65536;
    const source = await seededSource(8 * MiB, 16);
    const original = await readAll(source);
    const job = new BackupJob({ source, target: new MemoryNode(8 * MiB), sync: 'none', granularity: g });
    job.start();
    // overwrite zero and data regions alike: data into holes, zeros over data
    const r = rng(16);
    for (let i = 0; i < 40; i++) {
      const off = Math.floor(r() * (8 * MiB - 3 * g));
      if (i % 2) await job.node.write(off, randomBytes(r, 1 + Math.floor(r() * 2 * g)));
      else await job.node.writeZeroes!(off, 1 + Math.floor(r() * 2 * g));
    }
    expect(job.copiedBytes).toBeGreaterThan(0);
    let at = 0;
    let zeroSeen = 0;
    while (at < 8 * MiB) {
      const runs = await job.snapshotNode.extents!(at, 8 * MiB - at);
      expect(runs.length).toBeGreaterThan(0);
      for (const e of runs) {
        if (e.zero) {
          expect(original.subarray(at, at + e.length).every((b) => b === 0), `zero run at ${at}+${e.length}`).toBe(true);
          zeroSeen += e.length;
        }
        at += e.length;
      }
    }
    expect(at).toBe(8 * MiB);
    expect(zeroSeen).toBeGreaterThan(0);
    await job.cancel();
  });

  it('the fleecing view is read-only and reports the range', async () => {
    const source = await seededSource(MiB, 14);
    const job = new BackupJob({ source, target: new MemoryNode(MiB), sync: 'none' });
    await expect(job.snapshotNode.read(0, 1)).rejects.toMatchObject({ code: 'ERR_SNAPSHOT_PENDING' });
    job.start();
    expect(job.snapshotNode.caps.canWrite).toBe(false);
    await expect(job.snapshotNode.write(0, Buffer.alloc(1))).rejects.toMatchObject({ code: 'ERR_READ_ONLY', errno: 'EPERM' });
    await expect(job.snapshotNode.read(MiB - 1, 2)).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await job.cancel();
  });
});

describe('backup: an incremental chain', () => {
  it('full at t0, incremental at t1 and t2 (bitmap), writes all along: full+inc1+inc2 equals a full backup taken at t2', async () => {
    const g = 65536;
    const mem = await seededSource(SIZE, 21);
    const bitmap = new DirtyBitmap(SIZE, { granularity: g });
    // the guest writes through a tracking node that records into the bitmap
    const tracked = new DirtyTrackingNode(mem, [volatileTracker(bitmap)]);
    const r = rng(21);
    const writeSome = async (node: BlockNode, n: number): Promise<void> => {
      for (let i = 0; i < n; i++) {
        const len = 1 + Math.floor(r() * 3 * g);
        const off = Math.floor(r() * (SIZE - len));
        if (r() < 0.15) await node.writeZeroes!(off, len);
        else await node.write(off, randomBytes(r, len));
      }
    };
    bitmap.setAll(); // never backed up: everything dirty
    // t0: a full backup that also clears the bitmap (the chain's start); writes during it
    const full = new MemoryNode(SIZE);
    const atT0 = await readAll(mem);
    const j0 = new BackupJob({ source: tracked, target: full, sync: 'full', bitmap, maxOps: 2 });
    j0.start();
    await writeSome(j0.node, 30);
    await within(j0.whenConcluded(), 20_000, 'full backup');
    expect(j0.error).toBeUndefined();
    expect(firstDifference(await readAll(full), atT0)).toBe(-1);
    // what was written during the full backup stays dirty for the next incremental
    expect(bitmap.dirtyGranules).toBeGreaterThan(0);
    await writeSome(tracked, 40);

    // t1 and t2: incrementals into fresh targets, recording what each wrote
    const incs: Array<{ target: MemoryNode; ranges: Array<[number, number]> }> = [];
    let atT2: Buffer | undefined;
    let fullAtT2: MemoryNode | undefined;
    for (const t of [1, 2]) {
      const inner = new MemoryNode(SIZE);
      const target = countingTarget(inner, g);
      const dirtyBefore = bitmap.dirtyBytes;
      let job: BackupJob;
      let jFull: BackupJob | undefined;
      if (t === 2) {
        // a full backup at the same moment: stacked filters, both started before any write
        atT2 = await readAll(mem);
        fullAtT2 = new MemoryNode(SIZE);
        job = new BackupJob({ source: tracked, target, sync: 'incremental', bitmap, id: 'inc2' });
        jFull = new BackupJob({ source: job.node, target: fullAtT2, sync: 'full', id: 'full2' });
        job.start();
        jFull.start();
        await writeSome(jFull.node, 30);
      } else {
        job = new BackupJob({ source: tracked, target, sync: 'incremental', bitmap, id: 'inc1' });
        job.start();
        await writeSome(job.node, 30);
      }
      await within(job.whenConcluded(), 20_000, `incremental ${t}`);
      if (jFull) await within(jFull.whenConcluded(), 20_000, 'full at t2');
      expect(job.error).toBeUndefined();
      expect(job.query().todoBytesAtStart).toBe(dirtyBefore);
      incs.push({ target: inner, ranges: target.ranges });
      if (t === 1) await writeSome(tracked, 40);
    }
    // restore: the full backup, then each incremental's granules over it
    const restored = await readAll(full);
    for (const inc of incs) {
      for (const [a, b] of inc.ranges) (await inc.target.read(a, b - a)).copy(restored, a);
    }
    const fullT2 = await readAll(fullAtT2!);
    expect(firstDifference(fullT2, atT2!), 'full backup at t2 vs the source at t2').toBe(-1);
    expect(firstDifference(restored, fullT2), 'full+inc1+inc2 vs full at t2').toBe(-1);
  });

  it('a bitmap changed asynchronously (the bitmap of a daemon export): writes landing during the clear are filled in again', async () => {
    const g = 65536;
    const source = await seededSource(2 * MiB, 23);
    const bits = new DirtyBitmap(2 * MiB, { granularity: g });
    bits.fill(0, 2 * MiB);
    let job!: BackupJob;
    const calls: string[] = [];
    const sink = {
      clear: async (runs: Array<{ offset: number; length: number }>) => {
        calls.push(`clear ${runs.map((r) => `${r.offset}+${r.length}`).join(',')}`);
        for (const r of runs) bits.clear(r.offset, r.length);
        // a write through the front end while the clear is on its way (after the job computed it)
        await job.node.write(5 * g + 1, Buffer.from('late'));
        bits.fill(5 * g + 1, 4); // what the export's tracking filter records
        bits.clear(5 * g, g); // ... and a clear that raced it
      },
      fill: async (runs: Array<{ offset: number; length: number }>) => {
        calls.push(`fill ${runs.map((r) => `${r.offset}+${r.length}`).join(',')}`);
        for (const r of runs) bits.fill(r.offset, r.length);
      },
    };
    job = new BackupJob({ source, target: new MemoryNode(2 * MiB), sync: 'incremental', bitmap: bits.clone(), bitmapSink: sink, granularity: g });
    job.start();
    await job.node.write(3 * g, Buffer.from('during'));
    await within(job.whenConcluded(), 10_000, 'backup');
    expect(job.error).toBeUndefined();
    expect(calls).toEqual([`clear 0+${3 * g},${4 * g}+${28 * g}`, `fill ${5 * g}+${g}`]);
    expect([...bits.dirtyRuns()]).toEqual([
      { offset: 3 * g, length: g },
      { offset: 5 * g, length: g },
    ]);
  });

  it('bitmap modes: on-success keeps the bitmap when the job fails, always clears what was copied, never leaves it', async () => {
    const g = 65536;
    for (const mode of ['on-success', 'always', 'never'] as const) {
      const source = await seededSource(2 * MiB, 22);
      const bitmap = new DirtyBitmap(2 * MiB, { granularity: g });
      bitmap.fill(0, 2 * MiB);
      const disk = new TestDisk(2 * MiB);
      disk.faults.push({ op: 'write', errno: 'EIO', range: [MiB, 2 * MiB], times: Infinity });
      disk.faults.push({ op: 'writeZeroes', errno: 'EIO', range: [MiB, 2 * MiB], times: Infinity });
      const job = new BackupJob({ source, target: disk, sync: 'incremental', bitmap, bitmapMode: mode, maxOps: 1, bufSize: 65536 });
      job.start();
      await within(job.whenConcluded(), 10_000, `backup ${mode}`);
      expect(job.error?.errno).toBe('EIO');
      const copied = job.copiedBitmap();
      expect(copied.dirtyGranules).toBeGreaterThan(0);
      if (mode === 'always') {
        expect(bitmap.dirtyGranules).toBe(32 - copied.dirtyGranules);
        expect(bitmap.nextDirty(0)).toBe(copied.nextClean(0));
      } else {
        expect(bitmap.dirtyGranules).toBe(32);
      }
    }
  });
});

describe('backup: copy-before-write errors', () => {
  it('break-guest-write: the guest write fails and does not reach the source; the snapshot stays valid; a later write copies', async () => {
    const g = 65536;
    const source = await randomSource(2 * MiB, 31);
    const original = await readAll(source);
    const inner = new MemoryNode(2 * MiB);
    const target = hookNode(inner, { failWrites: [[4 * g, 5 * g]] });
    const job = new BackupJob({ source, target, sync: 'none', granularity: g, onCbwError: 'break-guest-write' });
    const evs = events(job);
    job.start();
    await expect(job.node.write(4 * g + 1, Buffer.from('guest'))).rejects.toMatchObject({ errno: 'EIO' });
    expect((await source.read(4 * g, g)).equals(original.subarray(4 * g, 5 * g))).toBe(true);
    expect(summary(evs)).toEqual(['running', 'error(target cbw-write EIO ignore)']);
    expect(job.status).toBe('running');
    expect((await job.snapshotNode.read(4 * g, g)).equals(original.subarray(4 * g, 5 * g))).toBe(true);
    // the target works again: the next write copies first
    target.hooks.failWrites = [];
    await job.node.write(4 * g + 1, Buffer.from('guest'));
    expect((await inner.read(4 * g, g)).equals(original.subarray(4 * g, 5 * g))).toBe(true);
    expect((await job.snapshotNode.read(4 * g, g)).equals(original.subarray(4 * g, 5 * g))).toBe(true);
    expect((await source.read(4 * g + 1, 5)).toString()).toBe('guest');
    await job.cancel();
  });

  it('break-snapshot: the guest write goes on, the job fails ERR_SNAPSHOT_BROKEN, the view fails with EIO', async () => {
    const g = 65536;
    const source = await randomSource(2 * MiB, 32);
    const inner = new MemoryNode(2 * MiB);
    const target = hookNode(inner, { failWrites: [[4 * g, 5 * g]] });
    const job = new BackupJob({ source, target, sync: 'none', granularity: g, onCbwError: 'break-snapshot' });
    const evs = events(job);
    job.start();
    await job.node.write(4 * g + 1, Buffer.from('guest'));
    expect((await source.read(4 * g + 1, 5)).toString()).toBe('guest');
    await within(job.whenConcluded(), 5000, 'broken job');
    expect(job.error).toMatchObject({ code: 'ERR_SNAPSHOT_BROKEN', errno: 'EIO' });
    expect(summary(evs)).toEqual(['running', 'error(target cbw-write EIO report)', 'aborting', 'completed(ERR_SNAPSHOT_BROKEN)', 'concluded']);
    expect(job.snapshotState).toBe('broken');
    await expect(job.snapshotNode.read(0, 512)).rejects.toMatchObject({ code: 'ERR_SNAPSHOT_BROKEN', errno: 'EIO' });
    // writes pass straight through afterwards, nothing more goes to the target
    const before = target.log.length;
    await job.node.write(0, Buffer.from('later'));
    expect(target.log.length).toBe(before);
  });

  it('a source read error during copy-before-write is a cbw-read error', async () => {
    const g = 65536;
    const mem = await randomSource(MiB, 33);
    const source = hookNode(mem, { failReads: [[2 * g, 3 * g]] });
    const job = new BackupJob({ source, target: new MemoryNode(MiB), sync: 'none', granularity: g });
    const evs = events(job);
    job.start();
    await expect(job.node.write(2 * g, Buffer.from('x'))).rejects.toMatchObject({ errno: 'EIO' });
    expect(summary(evs)).toContain('error(source cbw-read EIO ignore)');
    await job.cancel();
  });
});

describe('backup: error policies, pause, cancel', () => {
  const base = async (extra: Partial<BackupOptions>) => {
    const source = await randomSource(4 * MiB, 41);
    const original = await readAll(source);
    const disk = new TestDisk(4 * MiB);
    const job = new BackupJob({ source, target: disk, maxOps: 2, bufSize: 256 * 1024, ...extra });
    return { source, original, disk, job, evs: events(job) };
  };

  it('report: the job ends in error (aborting, completed with the error); the view is broken', async () => {
    const { disk, job, evs } = await base({});
    disk.faults.push({ op: 'write', errno: 'EIO', range: [MiB, MiB + 1], times: 1 });
    job.start();
    await within(job.whenConcluded(), 10_000, 'backup');
    expect(job.error?.errno).toBe('EIO');
    const s = summary(evs);
    expect(s[0]).toBe('running');
    expect(s).toContain('error(target write EIO report)');
    expect(s.slice(-3)).toEqual(['aborting', 'completed(ERR_INJECTED)', 'concluded']);
    await expect(job.snapshotNode.read(0, 1)).rejects.toMatchObject({ code: 'ERR_SNAPSHOT_BROKEN' });
  });

  it('ignore: the region is retried and the backup ends equal to the start', async () => {
    const { disk, job, evs, original } = await base({ onTargetError: 'ignore', onSourceError: 'ignore' });
    disk.faults.push({ op: 'write', errno: 'EIO', range: [MiB, MiB + 1], times: 3 });
    job.start();
    await within(job.whenConcluded(), 10_000, 'backup');
    expect(job.error).toBeUndefined();
    expect(summary(evs).filter((x) => x.startsWith('error'))).toEqual(Array(3).fill('error(target write EIO ignore)'));
    expect(firstDifference(await readAll(disk.disk), original)).toBe(-1);
  });

  it('stop: paused with io-status failed; copy-before-write goes on while stopped; resume finishes', async () => {
    const { disk, job, evs, original } = await base({ onTargetError: 'stop' });
    disk.faults.push({ op: 'write', errno: 'ENOSPC', range: [MiB, MiB + 1], times: 1 });
    job.start();
    await until(() => job.status === 'paused', 'paused');
    expect(job.query()).toMatchObject({ ioStatus: 'nospace', paused: true });
    // a write still copies its old content first
    await job.node.write(3 * MiB + 5, Buffer.from('while stopped'));
    job.resume();
    await within(job.whenConcluded(), 10_000, 'backup');
    expect(job.error).toBeUndefined();
    expect(summary(evs)).toContain('error(target write ENOSPC stop)');
    expect(firstDifference(await readAll(disk.disk), original)).toBe(-1);
  });

  it('a source read error is the source side', async () => {
    const mem = await randomSource(2 * MiB, 42);
    const source = hookNode(mem, { failReads: [[MiB, MiB + 1]] });
    const job = new BackupJob({ source, target: new MemoryNode(2 * MiB) });
    const evs = events(job);
    job.start();
    await within(job.whenConcluded(), 10_000, 'backup');
    expect(summary(evs)).toContain('error(source read EIO report)');
  });

  it('pause: no background copy while paused, copy-before-write still works; resume completes', async () => {
    const { disk, job, original } = await base({ maxOps: 1, bufSize: 65536 });
    job.start();
    await job.pause();
    expect(job.status).toBe('paused');
    const before = disk.counts.write + disk.counts.writeZeroes;
    await ticks(50);
    expect(disk.counts.write + disk.counts.writeZeroes).toBe(before);
    await job.node.write(2 * MiB + 10, Buffer.from('paused write'));
    expect(disk.counts.write + disk.counts.writeZeroes).toBeGreaterThan(before);
    expect((await job.snapshotNode.read(2 * MiB + 10, 12)).equals(original.subarray(2 * MiB + 10, 2 * MiB + 22))).toBe(true);
    job.resume();
    await within(job.whenConcluded(), 10_000, 'backup');
    expect(firstDifference(await readAll(disk.disk), original)).toBe(-1);
  });

  it('cancel: aborting, cancelled(false); writes go straight to the source afterwards', async () => {
    const { disk, job, evs, source } = await base({});
    disk.holdAll = true;
    job.start();
    await ticks(20);
    const cancelled = job.cancel();
    disk.release();
    await within(cancelled, 10_000, 'cancel');
    expect(summary(evs)).toEqual(['running', 'aborting', 'cancelled(false)', 'concluded']);
    const before = disk.counts.write;
    await job.node.write(0, Buffer.from('after'));
    expect((await source.read(0, 5)).toString()).toBe('after');
    expect(disk.counts.write).toBe(before);
  });

  it('speed limits the data rate of the background copy', async () => {
    const source = new MemoryNode(4 * MiB);
    await source.write(0, randomBytes(rng(43), 4 * MiB));
    const job = new BackupJob({ source, target: new MemoryNode(4 * MiB), speed: 8 * MiB, bufSize: 256 * 1024 });
    const t0 = performance.now();
    job.start();
    await within(job.whenConcluded(), 10_000, 'backup');
    const seconds = (performance.now() - t0) / 1000;
    // 4 MiB at 8 MiB/s, with a 100 ms burst: at least ~0.35 s
    expect(seconds).toBeGreaterThan(0.3);
  });
});
