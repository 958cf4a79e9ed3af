// test-bitmap-persistent: the bitmap file — create, clean close/open cycles, recovery from the
// activity log after a (simulated) crash, group commit, eviction, checkpoints, enable/disable.
//
// A crash is simulated by copying the file while the bitmap is open: a process killed at that
// moment leaves exactly those bytes (the kernel keeps what was written). The real kill -9 test is
// crash.test.ts.
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { DirtyBitmap } from '../../src/bitmap/dirty-bitmap.js';
import { PersistentBitmap, type WriteTicket } from '../../src/bitmap/persistent.js';

const SEED = 0xb17_f11e;
const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
let counter = 0;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'blkrep-bitmap-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});
const fresh = (name = 'bm') => join(dir, `${name}-${++counter}.bitmap`);

/** What a kill -9 right now would leave on disk. */
function crashCopy(path: string): string {
  const copy = `${path}.crash-${++counter}`;
  copyFileSync(path, copy);
  return copy;
}

async function write(pb: PersistentBitmap, offset: number, length: number): Promise<void> {
  const t = await pb.beforeWrite(offset, length);
  pb.afterWrite(t);
}

/** every granule touched by the range is dirty */
function covers(b: DirtyBitmap, offset: number, length: number): boolean {
  return length === 0 || b.nextClean(offset, offset + length) < 0;
}

describe('persistent bitmap: create, close, open', () => {
  it('creates an empty, clean, enabled file and refuses to create it twice', async () => {
    const path = fresh();
    const pb = await PersistentBitmap.create(path, { size: 10 * MiB + 3, granularity: 64 * KiB });
    expect(pb.bitmap.dirtyGranules).toBe(0);
    expect(pb.enabled).toBe(true);
    expect(pb.epoch).toBe(1);
    await pb.close();
    const err = await PersistentBitmap.create(path, { size: 1 * MiB }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BlkrepError);
    expect((err as BlkrepError).code).toBe('ERR_BITMAP_EXISTS');
    const { bitmap, loadState } = await PersistentBitmap.open(path, { size: 10 * MiB + 3 });
    expect(loadState).toEqual({ state: 'clean' });
    expect(bitmap.bitmap.granularity).toBe(64 * KiB);
    await bitmap.close();
  });

  it('100 clean close/open cycles leave the bitmap identical (hash), with writes between some', async () => {
    const path = fresh();
    const size = 256 * MiB + 4096;
    let pb = await PersistentBitmap.create(path, { size, granularity: 4096, extentSize: 1 * MiB, hotExtents: 16 });
    const model = new DirtyBitmap(size, { granularity: 4096 });
    const rand = fc.sample(fc.tuple(fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 1, max: 3 * MiB })), { seed: SEED, numRuns: 400 });
    let r = 0;
    for (let cycle = 0; cycle < 100; cycle++) {
      if (cycle % 3 === 0) {
        for (let i = 0; i < 4; i++) {
          const [offset, len] = rand[r++]!;
          const length = Math.min(len, size - offset);
          await write(pb, offset, length);
          model.set(offset, length);
        }
        if (cycle % 9 === 0) {
          pb.clear(0, size / 2);
          model.clear(0, size / 2);
        }
      }
      const before = pb.hash();
      expect(before).toBe(model.hash());
      await pb.close();
      const opened = await PersistentBitmap.open(path, { size });
      expect(opened.loadState).toEqual({ state: 'clean' });
      pb = opened.bitmap;
      expect(pb.hash()).toBe(before);
    }
    await pb.close();
  });

  it('a read-only open changes nothing in the file, even an in-use one, and refuses writes', async () => {
    const path = fresh();
    const pb = await PersistentBitmap.create(path, { size: 64 * MiB });
    await write(pb, 5 * MiB, 100);
    const crashed = crashCopy(path);
    const before = readFileSync(crashed);
    const ro = await PersistentBitmap.open(crashed, { readOnly: true });
    expect(ro.loadState.state).toBe('recovered');
    expect(covers(ro.bitmap.bitmap, 5 * MiB, 100)).toBe(true);
    await expect(ro.bitmap.beforeWrite(0, 1)).rejects.toMatchObject({ code: 'ERR_BITMAP_READ_ONLY' });
    await ro.bitmap.close();
    expect(readFileSync(crashed).equals(before)).toBe(true);
    await pb.close();
  });

  it('covers a disk of 0 bytes and of one byte', async () => {
    for (const size of [0, 1]) {
      const path = fresh();
      const pb = await PersistentBitmap.create(path, { size, granularity: 512 });
      await write(pb, 0, size);
      await pb.close();
      const { bitmap, loadState } = await PersistentBitmap.open(path, { size });
      expect(loadState.state).toBe('clean');
      expect(bitmap.bitmap.dirtyBytes).toBe(size);
      await bitmap.close();
    }
  });

  it('after close every operation fails ERR_BITMAP_CLOSED', async () => {
    const pb = await PersistentBitmap.create(fresh(), { size: MiB });
    await pb.close();
    await expect(pb.beforeWrite(0, 1)).rejects.toMatchObject({ code: 'ERR_BITMAP_CLOSED', errno: 'ESHUTDOWN' });
    await expect(pb.flush()).rejects.toMatchObject({ code: 'ERR_BITMAP_CLOSED' });
    expect(() => pb.clear(0, 1)).toThrow(/closed/);
    await pb.close(); // idempotent
  });

  it('close waits for writes in flight and records them', async () => {
    const path = fresh();
    const pb = await PersistentBitmap.create(path, { size: 64 * MiB });
    const t = await pb.beforeWrite(3 * MiB, 10);
    const closing = pb.close();
    let closed = false;
    void closing.then(() => (closed = true));
    await new Promise((r) => setImmediate(r));
    expect(closed).toBe(false);
    pb.afterWrite(t);
    await closing;
    const { bitmap, loadState } = await PersistentBitmap.open(path);
    expect(loadState.state).toBe('clean');
    expect(covers(bitmap.bitmap, 3 * MiB, 10)).toBe(true);
    await bitmap.close();
  });

  it('enable and disable are stored; a disabled bitmap records nothing and logs nothing', async () => {
    const path = fresh();
    const pb = await PersistentBitmap.create(path, { size: 64 * MiB, enabled: false });
    await write(pb, 0, 4096);
    expect(pb.bitmap.dirtyGranules).toBe(0);
    expect(pb.info().activityLog.transactions).toBe(0);
    await pb.setEnabled(true);
    await write(pb, 0, 4096);
    expect(pb.bitmap.dirtyGranules).toBe(1);
    await pb.setEnabled(false);
    await pb.close();
    const { bitmap } = await PersistentBitmap.open(path);
    expect(bitmap.enabled).toBe(false);
    expect(bitmap.bitmap.dirtyGranules).toBe(1);
    await bitmap.close();
  });
});

describe('persistent bitmap: crash safety of the write path', () => {
  it('a write whose beforeWrite resolved is dirty after a crash, acknowledged or not, flushed or not', async () => {
    const path = fresh();
    const pb = await PersistentBitmap.create(path, { size: 1024 * MiB, granularity: 64 * KiB, extentSize: 4 * MiB, hotExtents: 8 });
    const t1 = await pb.beforeWrite(100 * MiB + 5, 70_000); // in flight at the crash
    await write(pb, 900 * MiB, 1); // acknowledged, not flushed
    const crashed = crashCopy(path);
    const { bitmap, loadState } = await PersistentBitmap.open(crashed, { size: 1024 * MiB });
    expect(loadState).toMatchObject({ state: 'recovered', pagesDistrusted: 0 });
    expect(covers(bitmap.bitmap, 100 * MiB + 5, 70_000)).toBe(true);
    expect(covers(bitmap.bitmap, 900 * MiB, 1)).toBe(true);
    // recovery stored what it replayed: a second crash right after the open loses nothing
    const again = await PersistentBitmap.open(crashCopy(crashed), { size: 1024 * MiB });
    expect(again.loadState.state).toBe('recovered');
    expect(again.bitmap.bitmap.equals(bitmap.bitmap)).toBe(true);
    await again.bitmap.close();
    await bitmap.close();
    pb.afterWrite(t1);
    await pb.close();
  });

  it('writes to hot extents cost no I/O; concurrent writes to cold extents share one transaction', async () => {
    const pb = await PersistentBitmap.create(fresh(), { size: 1024 * MiB, extentSize: 4 * MiB, hotExtents: 64 });
    await write(pb, 0, 4096);
    expect(pb.info().activityLog.transactions).toBe(1);
    for (let i = 0; i < 100; i++) await write(pb, (i * 4096) % (4 * MiB), 4096);
    expect(pb.info().activityLog.transactions).toBe(1);
    // 20 concurrent writes into 20 cold extents: the first starts a transaction, the other 19 share the next
    const tickets = await Promise.all(Array.from({ length: 20 }, (_, i) => pb.beforeWrite((i + 10) * 4 * MiB, 512)));
    expect(pb.info().activityLog.transactions).toBeLessThanOrEqual(3);
    tickets.forEach((t) => pb.afterWrite(t));
    await pb.close();
  });

  it('a sequential writer pays one activity-log transaction per 32 MiB (the look-ahead), and a crash still finds every write', async () => {
    const path = fresh();
    const size = 256 * MiB;
    const pb = await PersistentBitmap.create(path, { size }); // defaults: 4 MiB extents, 1024 hot
    // 1 MiB writes in order, eight in flight (as fio's 1 MiB sequential writes at QD8)
    const inflight: WriteTicket[] = [];
    for (let off = 0; off < 120 * MiB; off += MiB) {
      if (inflight.length === 8) pb.afterWrite(inflight.shift()!);
      inflight.push(pb.beforeWriteSync(off, MiB) ?? (await pb.beforeWrite(off, MiB)));
    }
    // extent 0 alone, then 1–8, 9–16, 17–24, 25–32: 5 transactions for 120 MiB (30 extents) instead of 30
    expect(pb.info().activityLog).toMatchObject({ transactions: 5, added: 33, ahead: 28, evictionSyncs: 0 });
    const { bitmap, loadState } = await PersistentBitmap.open(crashCopy(path), { size });
    expect(loadState.state).toBe('recovered');
    expect(covers(bitmap.bitmap, 0, 120 * MiB)).toBe(true); // in flight, acknowledged: all there
    expect(bitmap.bitmap.dirtyBytes).toBe(132 * MiB); // and the 3 extents ahead, never written (the crash's extra resync)
    await bitmap.close();
    inflight.forEach((t) => pb.afterWrite(t));
    // a write that starts where no recent one ended: its own extent only
    pb.afterWrite(await pb.beforeWrite(200 * MiB + 4096, MiB));
    expect(pb.info().activityLog).toMatchObject({ transactions: 6, added: 34, ahead: 28 });
    await pb.close();
  });

  it('keeps at most hotExtents hot, retires only extents whose bits are stored, and never misses a write (seeded)', async () => {
    const size = 256 * MiB;
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            { weight: 8, arbitrary: fc.record({ kind: fc.constant('write' as const), offset: fc.integer({ min: 0, max: size - 1 }), length: fc.integer({ min: 1, max: 3 * MiB }) }) },
            { weight: 1, arbitrary: fc.record({ kind: fc.constant('flush' as const) }) },
            { weight: 1, arbitrary: fc.record({ kind: fc.constant('crash' as const) }) },
          ),
          { minLength: 5, maxLength: 60 },
        ),
        fc.integer({ min: 1, max: 12 }),
        async (steps, hot) => {
          // in flight at most what leaves room for one more request (each pins ≤ perRequest extents)
          const perRequest = Math.max(1, Math.floor(hot / 4));
          const maxInflight = Math.floor((hot - perRequest) / perRequest);
          const path = fresh('evict');
          const pb = await PersistentBitmap.create(path, { size, granularity: 64 * KiB, extentSize: 1 * MiB, hotExtents: hot });
          const written: Array<[number, number]> = [];
          const inflight: WriteTicket[] = [];
          for (const s of steps) {
            if (s.kind === 'write') {
              const length = Math.min(s.length, size - s.offset);
              // leave some in flight for a while, as a real server does
              while (inflight.length > maxInflight) pb.afterWrite(inflight.shift()!);
              // the fast path first, as the filter takes it
              const t = pb.beforeWriteSync(s.offset, length) ?? (await pb.beforeWrite(s.offset, length));
              written.push([s.offset, length]);
              inflight.push(t);
              expect(pb.info().activityLog.hot).toBeLessThanOrEqual(hot);
            } else if (s.kind === 'flush') {
              await pb.flush();
            } else {
              const { bitmap } = await PersistentBitmap.open(crashCopy(path), { readOnly: true });
              for (const [o, l] of written) if (!covers(bitmap.bitmap, o, l)) expect.fail(`write ${o}+${l} missing after a crash`);
              await bitmap.close();
            }
          }
          inflight.forEach((t) => pb.afterWrite(t));
          await pb.close();
          rmSync(path);
        },
      ),
      { seed: SEED, numRuns: 25 },
    );
  });

  it('beforeWriteSync: a ticket at once for hot extents, in flight like any other; undefined with nothing changed for cold, huge, out-of-range or closed', async () => {
    const path = fresh();
    const pb = await PersistentBitmap.create(path, { size: 64 * MiB, granularity: 64 * KiB, extentSize: 4 * MiB, hotExtents: 8 });
    expect(pb.beforeWriteSync(5 * MiB, 4096)).toBeUndefined(); // extent 1 is cold
    expect(pb.info().activityLog).toMatchObject({ transactions: 0, hot: 0 });
    pb.afterWrite(await pb.beforeWrite(5 * MiB, 4096)); // now it is hot
    expect(pb.beforeWriteSync(0, 64 * MiB)).toBeUndefined(); // 16 extents: pre-marked, through beforeWrite
    expect(pb.beforeWriteSync(64 * MiB, 1)).toBeUndefined();
    await expect(pb.beforeWrite(64 * MiB, 1)).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    expect(pb.info().activityLog).toMatchObject({ transactions: 1, hot: 1 });

    const t = pb.beforeWriteSync(6 * MiB, 100)!;
    expect(t).toMatchObject({ offset: 6 * MiB, length: 100 });
    pb.clear(0, 64 * MiB);
    expect(covers(pb.bitmap, 6 * MiB, 100)).toBe(true); // under a write in flight: kept dirty
    expect(pb.bitmap.dirtyGranules).toBe(1);
    const crashed = await PersistentBitmap.open(crashCopy(path), { readOnly: true });
    expect(covers(crashed.bitmap.bitmap, 6 * MiB, 100)).toBe(true); // the log covers it
    await crashed.bitmap.close();
    const ck = await pb.checkpoint();
    expect(ck.dirtyGranules).toBe(1);
    pb.afterWrite(t);
    pb.afterWrite(t); // a second afterWrite of the same ticket changes nothing
    expect(pb.bitmap.dirtyGranules).toBe(1); // in N+1 as well
    expect(pb.info().activityLog.transactions).toBe(1);

    await pb.setEnabled(false);
    const d = pb.beforeWriteSync(40 * MiB, 1)!; // not recording: a ticket, no log, no bits
    expect(d).toBeDefined();
    pb.afterWrite(d);
    expect(covers(pb.bitmap, 40 * MiB, 1)).toBe(false);
    expect(pb.info().activityLog).toMatchObject({ transactions: 1, hot: 1 });
    await pb.close();
    expect(pb.beforeWriteSync(5 * MiB, 1)).toBeUndefined();
  });

  it('a huge request (e.g. trim of the disk) stores its bits before it may be issued', async () => {
    const path = fresh();
    const size = 1024 * MiB;
    const pb = await PersistentBitmap.create(path, { size, extentSize: 1 * MiB, hotExtents: 8 });
    const t = await pb.beforeWrite(0, size);
    expect(pb.info().activityLog.transactions).toBe(0);
    const { bitmap } = await PersistentBitmap.open(crashCopy(path), { readOnly: true });
    expect(bitmap.bitmap.dirtyBytes).toBe(size);
    await bitmap.close();
    pb.afterWrite(t);
    await pb.close();
  });

  it('clear() keeps granules under a write in flight dirty, so a flush cannot store them clean', async () => {
    const path = fresh();
    const size = 64 * MiB;
    const pb = await PersistentBitmap.create(path, { size, granularity: 64 * KiB, extentSize: 4 * MiB, hotExtents: 1 });
    await write(pb, 0, size / 2); // pre-marked, many extents
    await pb.flush();
    const t = await pb.beforeWrite(10 * MiB, 4096);
    pb.clear(0, size);
    expect(covers(pb.bitmap, 10 * MiB, 4096)).toBe(true);
    expect(pb.bitmap.dirtyGranules).toBe(1);
    await pb.flush();
    // the extent of the write in flight stays hot while it is in flight, even when another is needed
    const t2 = pb.beforeWrite(40 * MiB, 1);
    let second = false;
    void t2.then(() => (second = true));
    await new Promise((r) => setImmediate(r));
    expect(second).toBe(false);
    const { bitmap } = await PersistentBitmap.open(crashCopy(path), { readOnly: true });
    expect(covers(bitmap.bitmap, 10 * MiB, 4096)).toBe(true);
    await bitmap.close();
    pb.afterWrite(t);
    pb.afterWrite(await t2);
    await pb.close();
  });

  it('a data page torn by the crash is distrusted: all of its granules load dirty', async () => {
    const path = fresh();
    const pb = await PersistentBitmap.create(path, { size: 1024 * MiB, granularity: 512 });
    await write(pb, 0, 512);
    await pb.flush();
    const crashed = crashCopy(path);
    // tear: half of data page 0 is new garbage, its checksum is the old one
    const info = statSync(crashed);
    const buf = readFileSync(crashed);
    const dataOffset = info.size - Math.ceil((1024 * MiB) / 512 / 8 / 4096) * 4096;
    buf.fill(0x00, dataOffset, dataOffset + 2048);
    writeFileSync(crashed, buf);
    const { bitmap, loadState } = await PersistentBitmap.open(crashed, { readOnly: true });
    expect(loadState).toMatchObject({ state: 'recovered', pagesDistrusted: 1 });
    expect(covers(bitmap.bitmap, 0, 4096 * 8 * 512)).toBe(true);
    await bitmap.close();
    await pb.close();
  });
});

describe('persistent bitmap: checkpoints', () => {
  it('freezes checkpoint N, records N+1 from empty, and lists checkpoints with times and sizes', async () => {
    const path = fresh('ck');
    const size = 128 * MiB;
    const pb = await PersistentBitmap.create(path, { size, granularity: 64 * KiB });
    await write(pb, 0, 1 * MiB);
    const inflight = await pb.beforeWrite(50 * MiB, 1); // in flight across the checkpoint: in both
    const c1 = await pb.checkpoint();
    expect(c1).toMatchObject({ number: 1, path: `${path}.ckpt-1`, size, granularity: 64 * KiB, dirtyBytes: 1 * MiB + 64 * KiB });
    expect(pb.epoch).toBe(2);
    expect(pb.bitmap.dirtyBytes).toBe(64 * KiB);
    pb.afterWrite(inflight);
    await write(pb, 100 * MiB, 1);
    const c2 = await pb.checkpoint();
    expect(c2.number).toBe(2);
    expect(c2.dirtyBytes).toBe(2 * 64 * KiB);
    const list = await pb.checkpoints();
    expect(list.map((c) => c.number)).toEqual([1, 2]);
    expect(list[0]!.fileBytes).toBeGreaterThan(0);
    expect(Date.parse(list[0]!.createdAt)).toBeGreaterThan(Date.now() - 60_000);
    const ck1 = await PersistentBitmap.open(c1.path, { readOnly: true, strict: true });
    expect(covers(ck1.bitmap.bitmap, 0, 1 * MiB)).toBe(true);
    expect(ck1.bitmap.info().frozen).toBe(true);
    await ck1.bitmap.close();
    await expect(PersistentBitmap.open(c1.path)).rejects.toMatchObject({ code: 'ERR_BITMAP_READ_ONLY' });
    await pb.close();
    const { bitmap } = await PersistentBitmap.open(path);
    expect(bitmap.epoch).toBe(3);
    expect(bitmap.bitmap.dirtyGranules).toBe(0);
    await bitmap.close();
  });

  it('a crash after the checkpoint file was written completes the checkpoint on load, losing nothing', async () => {
    const path = fresh('ck');
    const size = 64 * MiB;
    const pb = await PersistentBitmap.create(path, { size });
    await write(pb, 0, 4096);
    await pb.flush();
    const beforeCheckpoint = crashCopy(path);
    await pb.checkpoint();
    await write(pb, 32 * MiB, 4096);
    await pb.close();
    // the live file as it was before the checkpoint reset it, with the checkpoint file beside it
    copyFileSync(beforeCheckpoint, path);
    const { bitmap, loadState, checkpointCompleted } = await PersistentBitmap.open(path, { size });
    expect(loadState.state).toBe('recovered');
    expect(checkpointCompleted).toBe(1);
    expect(bitmap.epoch).toBe(2);
    expect(covers(bitmap.bitmap, 0, 4096)).toBe(true); // regions of N may stay dirty in N+1, never fewer
    await bitmap.close();
    expect(existsSync(`${path}.ckpt-1`)).toBe(true);
    expect((await PersistentBitmap.listCheckpoints(path)).map((c) => c.number)).toEqual([1]);
  });

  it('lists a damaged checkpoint with its error instead of failing the listing', async () => {
    const path = fresh('ck');
    const pb = await PersistentBitmap.create(path, { size: MiB });
    await pb.checkpoint();
    await pb.checkpoint();
    await pb.close();
    writeFileSync(`${path}.ckpt-1`, 'garbage');
    const list = await PersistentBitmap.listCheckpoints(path);
    expect(list.map((c) => [c.number, c.error === undefined])).toEqual([[1, false], [2, true]]);
    expect(list[0]!.error).toMatch(/cannot be trusted/);
  });
});

describe('persistent bitmap: temporary files', () => {
  it('removes temporaries of dead processes on a read-write open, keeps those of live ones', async () => {
    const path = fresh('tmp');
    const pb = await PersistentBitmap.create(path, { size: MiB });
    await pb.close();
    const base = path.slice(path.lastIndexOf('/') + 1);
    const deadPid = 2 ** 22 + 12345; // above pid_max on Linux by default: never alive
    const dead = join(dir, `.${base}.tmp-${deadPid}-0011aabb`);
    const live = join(dir, `.${base}.tmp-${process.pid}-0011aabb`);
    writeFileSync(dead, 'x');
    writeFileSync(live, 'x');
    const { bitmap } = await PersistentBitmap.open(path);
    expect(existsSync(dead)).toBe(false);
    expect(existsSync(live)).toBe(true);
    await bitmap.close();
    rmSync(live);
  });
});
