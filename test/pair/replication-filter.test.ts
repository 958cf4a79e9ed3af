/**
 * The replication filter against in-process secondaries (memory nodes with a gate and faults):
 * sync and async completion, write-order fidelity, a failing forward never failing the client's
 * write, queue overflow, the peer bitmap, a checkpoint's cut.
 */
import { join } from 'node:path';
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import type { WriteOptions } from '../../src/api/block.js';
import { PersistentBitmap } from '../../src/bitmap/persistent.js';
import { MemoryNode } from '../../src/block/memory.js';
import { DEFAULT_QUEUE_BYTES, MAX_SENDING, QUEUE_ENTRY_BYTES, ReplicationFilter, SLAB_BYTES, type ReplicationFilterOptions, type ReplicationProtocol } from '../../src/pair/replication-filter.js';
import { Gate, hookNode, type HookOptions } from '../support/fault-node.js';
import { makeTempDir, withTimeout } from '../support/spawn.js';

const SIZE = 16 << 20;
/** the queue-full tests: degrade at once (the default, block, waits for room) */
const PULL_AHEAD = { onCongestion: 'pull-ahead' } as const;
const G = 64 << 10;
/** the async queue's bookkeeping per queued write, bytes of heap (measured 271 to an ordered target) */
const MAX_HEAP_PER_QUEUED = 384;

function fill(byte: number, length: number): Buffer {
  return Buffer.alloc(length, byte);
}

async function setup(protocol: ReplicationProtocol, hooks: HookOptions = {}, queueBytes?: number, extra: Partial<ReplicationFilterOptions> = {}) {
  const dir = await makeTempDir();
  const local = new MemoryNode(SIZE);
  const remote = new MemoryNode(SIZE);
  const target = hookNode(remote, hooks);
  const peer = await PersistentBitmap.create(join(dir, 'peer.bitmap'), { size: SIZE, granularity: G });
  const degraded: Array<{ reason: string; code: string | undefined }> = [];
  const filter = new ReplicationFilter(local, {
    protocol,
    peerBitmap: peer,
    ...(queueBytes === undefined ? {} : { queueBytes }),
    onDegraded: (reason, error) => degraded.push({ reason, code: error?.code }),
    ...extra,
  });
  filter.attach(target);
  return { local, remote, target, peer, filter, degraded };
}

/** let queued microtasks and promise chains run (no timers) */
async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
}


/** Until cond() holds (5 s at most): the peer bitmap's activity log writes to its file before a write goes on. */
async function until(cond: () => boolean, what: string): Promise<void> {
  await withTimeout(
    (async () => {
      while (!cond()) await settle();
    })(),
    5000,
    what,
  );
}

/** Until the async queue is empty (5 s at most). */
async function drained(filter: { queueBytes: number }): Promise<void> {
  await withTimeout(
    (async () => {
      while (filter.queueBytes > 0) await settle();
    })(),
    5000,
    'the queue to drain',
  );
}
describe('replication filter, sync', () => {
  it('completes a write only once the secondary replied; both disks hold the bytes', async () => {
    const gate = new Gate();
    const { local, remote, filter, peer } = await setup('sync', { gate, gateOps: ['write'] });
    gate.close();
    let done = false;
    const w = filter.write(G, fill(0x11, 8192)).then(() => (done = true));
    await gate.waitEntered(1);
    await settle();
    expect(done).toBe(false);
    expect((await local.read(G, 8192)).equals(fill(0x11, 8192))).toBe(true);
    gate.open();
    await w;
    expect((await remote.read(G, 8192)).equals(fill(0x11, 8192))).toBe(true);
    // replied but not yet flushed on the secondary: the granule stays in the peer bitmap
    expect(peer.bitmap.isDirty(G, 8192)).toBe(true);
    await filter.flush();
    expect(peer.bitmap.dirtyBytes).toBe(0);
    await peer.close();
  });

  it('forwards FUA as FUA and a FLUSH as a FLUSH; reads stay local', async () => {
    const { target, filter, peer } = await setup('sync');
    await filter.write(0, fill(0x22, 4096), { fua: true });
    await filter.flush();
    await filter.read(0, 4096);
    expect(target.log.map((r) => [r.op, r.fua ?? false])).toEqual([
      ['write', true],
      ['flush', false],
    ]);
    await peer.close();
  });

  it('a failing forward never fails the write: the filter degrades, the region is in the peer bitmap', async () => {
    const { local, remote, filter, peer, degraded, target } = await setup('sync', { failWrites: [[2 * G, 3 * G]] });
    await filter.write(0, fill(0x11, 4096));
    await filter.flush();
    await expect(filter.write(2 * G, fill(0x33, 4096))).resolves.toBeUndefined();
    expect(filter.mode).toBe('degraded');
    expect(degraded).toHaveLength(1);
    expect(degraded[0]!.reason).toMatch(/^forward-failed: ERR_INJECTED: /);
    expect(degraded[0]!.code).toBe('ERR_INJECTED');
    expect((await local.read(2 * G, 4096)).equals(fill(0x33, 4096))).toBe(true);
    // later writes go to the local disk only, and are tracked
    const forwarded = target.log.length;
    await filter.write(5 * G, fill(0x44, 4096));
    expect(target.log.length).toBe(forwarded);
    expect((await remote.read(5 * G, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    expect([...peer.bitmap.dirtyRuns()]).toEqual([
      { offset: 2 * G, length: G },
      { offset: 5 * G, length: G },
    ]);
    await peer.close();
  });

  it('a local write error fails the request (the disk\'s error), replication goes on', async () => {
    const dir = await makeTempDir();
    const local = hookNode(new MemoryNode(SIZE), { failWrites: [[0, G]] });
    const remote = new MemoryNode(SIZE);
    const peer = await PersistentBitmap.create(join(dir, 'peer.bitmap'), { size: SIZE, granularity: G });
    const filter = new ReplicationFilter(local, { protocol: 'sync', peerBitmap: peer });
    filter.attach(remote);
    const err = await filter.write(0, fill(1, 512)).catch((e: unknown) => e);
    expect((err as BlkrepError).code).toBe('ERR_INJECTED');
    expect(filter.mode).toBe('forwarding');
    // the secondary may hold it: the granule is in the peer bitmap
    expect(peer.bitmap.isDirty(0, 512)).toBe(true);
    await peer.close();
  });

  it('refuses a secondary of another size with ERR_PAIR_SIZE', async () => {
    const filter = new ReplicationFilter(new MemoryNode(SIZE), { protocol: 'sync' });
    expect(() => filter.attach(new MemoryNode(SIZE + 4096))).toThrow(expect.objectContaining({ code: 'ERR_PAIR_SIZE' }));
  });
});

describe('replication filter, async', () => {
  it('completes after the local write; a write issued after another completed is sent only once that one was replied', async () => {
    const gate = new Gate();
    const { remote, target, filter, peer } = await setup('async', { gate, gateOps: ['write'] });
    gate.close();
    await filter.write(0, fill(0xa1, 4096)); // completes without the secondary
    await gate.waitEntered(1);
    await filter.write(0, fill(0xa2, 4096)); // depends on the first: a new barrier group
    await settle();
    expect(target.log.filter((r) => r.op === 'write')).toHaveLength(1);
    expect(filter.queueBytes).toBe(8192);
    gate.open();
    await drained(filter);
    expect(target.log.filter((r) => r.op === 'write')).toHaveLength(2);
    expect((await remote.read(0, 4096)).equals(fill(0xa2, 4096))).toBe(true);
    await peer.close();
  });

  it('to an ordered target (a blkrep secondary) a dependent write is sent before the reply to the one before; a FLUSH waits for every reply', async () => {
    const gate = new Gate();
    const { remote, target, filter, peer } = await setup('async', { gate, gateOps: ['write'] });
    filter.attach(target, { ordered: true });
    gate.close();
    await filter.write(0, fill(0xa1, 4096));
    await filter.write(G, fill(0xa2, 4096)); // depends on the first: sent at once all the same
    await filter.write(0, fill(0xa3, 4096));
    await gate.waitEntered(3);
    expect(target.log.filter((r) => r.op === 'write').map((r) => r.offset)).toEqual([0, G, 0]);
    await filter.flush(); // the local flush; the forwarded one waits for the replies
    await settle();
    expect(target.log.map((r) => r.op)).toEqual(['write', 'write', 'write']);
    gate.open();
    await withTimeout(
      (async () => {
        while (!target.log.some((r) => r.op === 'flush' && r.done)) await settle();
      })(),
      5000,
      'the forwarded flush',
    );
    expect(target.log.map((r) => r.op)).toEqual(['write', 'write', 'write', 'flush']);
    expect(filter.queueBytes).toBe(0);
    expect((await remote.read(0, 4096)).equals(fill(0xa3, 4096))).toBe(true);
    expect((await remote.read(G, 4096)).equals(fill(0xa2, 4096))).toBe(true);
    // the flush made them stable on the secondary: the peer bitmap is clean
    expect([...peer.bitmap.dirtyRuns()]).toEqual([]);
    await peer.close();
  });

  it('to an ordered target at most MAX_SENDING forwards are in flight; the rest follow in order as replies come', async () => {
    const gate = new Gate();
    const { remote, target, filter, peer } = await setup('async', { gate, gateOps: ['write'] });
    filter.attach(target, { ordered: true });
    gate.close();
    const n = MAX_SENDING + 100;
    // every write lands on the same 4 KiB: the last one sent must be the last one written
    for (let i = 0; i < n; i++) await filter.write(0, fill(i & 0xff, 4096));
    await settle();
    expect(gate.entered).toBe(MAX_SENDING);
    gate.open();
    await drained(filter);
    expect(target.log.filter((r) => r.op === 'write').length).toBe(n);
    expect((await remote.read(0, 4096)).equals(fill((n - 1) & 0xff, 4096))).toBe(true);
    await peer.close();
  });

  it("to an ordered target a checkpoint's cut still sends nothing written after it until release", async () => {
    const { target, filter, peer } = await setup('async');
    filter.attach(target, { ordered: true });
    await filter.write(0, fill(1, 4096));
    await filter.cut();
    expect(target.log.map((r) => r.op)).toEqual(['write', 'flush']);
    await filter.write(G, fill(2, 4096));
    await filter.write(2 * G, fill(3, 4096));
    await settle();
    expect(target.log.map((r) => r.op)).toEqual(['write', 'flush']);
    filter.release();
    await drained(filter);
    expect(target.log.map((r) => [r.op, r.offset])).toEqual([
      ['write', 0],
      ['flush', 0],
      ['write', G],
      ['write', 2 * G],
    ]);
    await peer.close();
  });

  it('writes in flight together form one group and are sent together', async () => {
    const gate = new Gate();
    const localGate = new Gate();
    const dir = await makeTempDir();
    const local = hookNode(new MemoryNode(SIZE), { gate: localGate, gateOps: ['write'] });
    const target = hookNode(new MemoryNode(SIZE), { gate, gateOps: ['write'] });
    const peer = await PersistentBitmap.create(join(dir, 'peer.bitmap'), { size: SIZE, granularity: G });
    const filter = new ReplicationFilter(local, { protocol: 'async', peerBitmap: peer });
    filter.attach(target);
    localGate.close();
    gate.close();
    const a = filter.write(0, fill(1, 4096));
    const b = filter.write(G, fill(2, 4096));
    await localGate.waitEntered(2);
    localGate.open();
    await Promise.all([a, b]);
    await gate.waitEntered(2);
    expect(target.log.filter((r) => r.op === 'write').map((r) => r.offset).sort((x, y) => x - y)).toEqual([0, G]);
    gate.open();
    await peer.close();
  });

  it('a full queue degrades replication; every write still succeeds and is in the peer bitmap', async () => {
    const gate = new Gate();
    const { filter, peer, degraded, local } = await setup('async', { gate, gateOps: ['write'] }, 1 << 20, PULL_AHEAD);
    gate.close();
    for (let i = 0; i < 4; i++) await expect(filter.write(i * (512 << 10), fill(0x10 + i, 512 << 10))).resolves.toBeUndefined();
    expect(filter.mode).toBe('degraded');
    expect(degraded.map((d) => [d.reason, d.code])).toEqual([['queue-full', 'ERR_PAIR_QUEUE_FULL']]);
    expect(filter.queueBytes).toBe(0);
    expect([...peer.bitmap.dirtyRuns()]).toEqual([{ offset: 0, length: 2 << 20 }]);
    for (let i = 0; i < 4; i++) expect((await local.read(i * (512 << 10), 512 << 10)).equals(fill(0x10 + i, 512 << 10))).toBe(true);
    // the forward that was in flight when the queue was dropped completes later: it no longer counts
    gate.open();
    await settle();
    expect(filter.queueBytes).toBe(0);
    await peer.close();
  });

  it('the queue retains at most its bound in payload memory (whole slabs counted), reuses a slab once every copy in it was replied, and frees all of it on degrade', async () => {
    const gate = new Gate();
    const limit = 4 * SLAB_BYTES;
    const { filter, peer, degraded, local, remote } = await setup('async', { gate, gateOps: ['write'] }, limit, PULL_AHEAD);
    gate.close();
    // 512-byte writes share one slab: a copy each would be an ArrayBuffer each (a pooled one would
    // keep a whole 8 KiB pool slab per write, 16× its size)
    for (let i = 0; i < 256; i++) await filter.write(i * 4096, fill(0x20 + (i % 16), 512));
    expect(filter.queueBytes).toBe(256 * 512);
    expect(filter.retainedBytes).toBe(SLAB_BYTES);
    gate.open();
    await drained(filter);
    // replied: the slab holds no copy and is kept, empty, for the next ones; nothing else is held
    expect(filter.retainedBytes).toBe(SLAB_BYTES);
    for (let i = 0; i < 256; i++) await filter.write(i * 4096, fill(0x30 + (i % 16), 512));
    await drained(filter);
    expect(filter.retainedBytes).toBe(SLAB_BYTES);
    // the reused slab's copies reached the secondary intact
    expect((await remote.read(0, 1 << 20)).equals(await local.read(0, 1 << 20))).toBe(true);
    gate.close();
    // past the bound: 4 KiB writes until the queue degrades; its buffers and the bookkeeping of
    // its writes (QUEUE_ENTRY_BYTES each) never hold more than the bound, and fill it but for one write
    let maxRetained = 0;
    let queuedWrites = 0;
    for (let i = 0; filter.mode === 'forwarding'; i++) {
      await filter.write((i % 1024) * 4096, fill(0x40, 4096));
      if (filter.mode === 'forwarding') queuedWrites++;
      maxRetained = Math.max(maxRetained, filter.retainedBytes);
      expect(i).toBeLessThan(1024);
    }
    expect(degraded.map((d) => d.code)).toEqual(['ERR_PAIR_QUEUE_FULL']);
    const held = maxRetained + queuedWrites * QUEUE_ENTRY_BYTES;
    expect(held).toBeLessThanOrEqual(limit);
    expect(held).toBeGreaterThan(limit - 4096 - QUEUE_ENTRY_BYTES);
    // whole slabs while they fit, then copies of their own
    expect(maxRetained).toBe(3 * SLAB_BYTES + (queuedWrites - 3 * (SLAB_BYTES / 4096)) * 4096);
    expect(filter.queueBytes).toBe(0);
    expect(filter.retainedBytes).toBe(0);
    gate.open();
    await settle();
    expect(filter.retainedBytes).toBe(0);
    await peer.close();
  });

  it('a queue of small writes is bounded by their bookkeeping too: each counts its payload and QUEUE_ENTRY_BYTES', async () => {
    const gate = new Gate();
    const limit = 1 << 20;
    const { filter, peer, degraded } = await setup('async', { gate, gateOps: ['write'] }, limit, PULL_AHEAD);
    gate.close();
    // 512-byte payloads: 1 MiB / (512 + 512) = 1024 writes fit, not the 2048 the payloads alone would allow
    let queuedWrites = 0;
    for (let i = 0; filter.mode === 'forwarding'; i++) {
      await filter.write(i * 512, fill(0x60, 512));
      if (filter.mode === 'forwarding') queuedWrites++;
      expect(i).toBeLessThan(2048);
    }
    expect(queuedWrites).toBe(limit / (512 + QUEUE_ENTRY_BYTES));
    expect(degraded.map((d) => d.code)).toEqual(['ERR_PAIR_QUEUE_FULL']);
    // every write, queued or not, is in the peer bitmap: 1025 × 512 bytes, in 64 KiB granules
    expect([...peer.bitmap.dirtyRuns()]).toEqual([{ offset: 0, length: 9 * G }]);
    gate.open();
    await settle();
    await peer.close();
  });

  it('a write larger than the whole queue fits when it is alone in it; a second one overflows', async () => {
    const gate = new Gate();
    const limit = 1 << 20;
    const { filter, peer, degraded, local, remote } = await setup('async', { gate, gateOps: ['write'] }, limit, PULL_AHEAD);
    gate.close();
    await filter.write(0, fill(0x71, 2 << 20));
    expect(filter.mode).toBe('forwarding');
    expect(filter.queueBytes).toBe(2 << 20);
    expect(filter.retainedBytes).toBe(2 << 20);
    gate.open();
    await drained(filter);
    expect((await remote.read(0, 2 << 20)).equals(await local.read(0, 2 << 20))).toBe(true);
    expect(filter.retainedBytes).toBe(0);
    gate.close();
    await filter.write(0, fill(0x72, 2 << 20));
    await filter.write(4 << 20, fill(0x73, 4096));
    expect(degraded.map((d) => d.code)).toEqual(['ERR_PAIR_QUEUE_FULL']);
    expect(filter.retainedBytes).toBe(0);
    gate.open();
    await settle();
    await peer.close();
  });

  it('a slab stays alive while one copy in it waits for its reply; a payload over a quarter slab gets a slab of its own, freed on its reply', async () => {
    const gate = new Gate();
    const { filter, peer, local, remote, target } = await setup('async', { gate, gateOps: ['write'] });
    filter.attach(target, { ordered: true });
    gate.close();
    // a slab's worth of 4 KiB writes and one more: the first slab is full, the 65th opens a second
    for (let i = 0; i <= SLAB_BYTES / 4096; i++) await filter.write(i * 4096, fill(0x50 + (i % 32), 4096));
    expect(filter.retainedBytes).toBe(2 * SLAB_BYTES);
    const big = SLAB_BYTES / 2;
    await filter.write(4 << 20, fill(0x77, big));
    expect(filter.retainedBytes).toBe(2 * SLAB_BYTES + big);
    gate.open();
    await drained(filter);
    // the big one is freed; the full slab is kept for the next one, the current one for reuse
    expect(filter.retainedBytes).toBe(2 * SLAB_BYTES);
    expect(filter.slabStats).toEqual({ allocated: 2, reused: 0, exact: 1 });
    expect((await remote.read(0, 8 << 20)).equals(await local.read(0, 8 << 20))).toBe(true);
    await peer.close();
  });

  it('emptied slabs are used again, kept only while they fit under the bound beside the slabs in use; a degrade frees them', async () => {
    // bench/pair async, a full queue: a primary dropped 20 slabs a second, each kept until a major GC
    const gate = new Gate();
    const limit = 8 * SLAB_BYTES;
    const { filter, peer, local, remote } = await setup('async', { gate, gateOps: ['write'] }, limit, PULL_AHEAD);
    const perSlab = SLAB_BYTES / 4096;
    let maxRetained = 0;
    for (let round = 0; round < 4; round++) {
      gate.close();
      // six slabs' worth of 4 KiB writes, held: six slabs in use (their bookkeeping fits beside them)
      for (let i = 0; i < 6 * perSlab; i++) {
        await filter.write(((round * 6 * perSlab + i) % 4096) * 4096, fill(0x10 + round, 4096));
        maxRetained = Math.max(maxRetained, filter.retainedBytes);
      }
      expect(filter.mode).toBe('forwarding');
      gate.open();
      await drained(filter);
      // replied: five kept for reuse and the current one, all under the bound
      expect(filter.retainedBytes).toBe(6 * SLAB_BYTES);
    }
    expect(maxRetained).toBeLessThanOrEqual(limit);
    // six allocated in the first round, every later slab taken from the kept ones
    expect(filter.slabStats).toEqual({ allocated: 6, reused: 15, exact: 0 });
    expect((await remote.read(0, 16 << 20)).equals(await local.read(0, 16 << 20))).toBe(true);
    // a degrade frees them all
    gate.close();
    for (let i = 0; filter.mode === 'forwarding'; i++) {
      await filter.write((i % 4096) * 4096, fill(0x60, 4096));
      expect(filter.retainedBytes).toBeLessThanOrEqual(limit);
      expect(i).toBeLessThan(4096);
    }
    expect(filter.retainedBytes).toBe(0);
    gate.open();
    await settle();
    expect(filter.retainedBytes).toBe(0);
    await peer.close();
  });

  it(`the queue's bookkeeping is at most ${MAX_HEAP_PER_QUEUED} bytes of heap per queued write (payloads aside), ordered target, ${MAX_SENDING} in flight`, async () => {
    // measured 244 (plain) / 271 (ordered) bytes: a barrier group, an item, the peer bitmap's
    // ticket; before the slabs, 404 / 439 (a Buffer per payload copy, optional fields added to items)
    v8.setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const gate = new Gate();
    const n = 16384;
    // 16384 writes of 512 bytes and their bookkeeping: 16 MiB (the default queue, 8 MiB, holds half)
    const { filter, peer, local, target } = await setup('async', { gate, gateOps: ['write'] }, 16 << 20);
    filter.attach(target, { ordered: true });
    // the local disk's pages exist before: only the queue's growth is measured
    for (let i = 0; i < n; i++) await local.write(i * 512, fill(1, 512));
    gate.close();
    for (let i = 0; i < 64; i++) await filter.write(i * 512, fill(2, 512));
    const heap = (): number => {
      gc();
      gc();
      return process.memoryUsage().heapUsed;
    };
    const before = heap();
    let next = 64;
    const writer = async (): Promise<void> => {
      while (next < n) await filter.write(next++ * 512, fill(3, 512));
    };
    await Promise.all(Array.from({ length: 32 }, writer));
    const perWrite = (heap() - before) / (n - 64);
    expect(filter.queueBytes).toBe(n * 512);
    expect(perWrite).toBeLessThan(MAX_HEAP_PER_QUEUED);
    gate.open();
    await drained(filter);
    await peer.close();
  });

  it("a checkpoint's cut sends nothing written after it until release, and flushes both", async () => {
    const { target, filter, peer } = await setup('async');
    await filter.write(0, fill(1, 4096));
    await filter.cut();
    const before = target.log.map((r) => r.op);
    expect(before).toEqual(['write', 'flush']);
    await filter.write(G, fill(2, 4096));
    await settle();
    expect(target.log.map((r) => r.op)).toEqual(before);
    filter.release();
    await drained(filter);
    expect(target.log.map((r) => [r.op, r.offset])).toEqual([
      ['write', 0],
      ['flush', 0],
      ['write', G],
    ]);
    await peer.close();
  });
});

describe('replication filter, async, on congestion block (the default)', () => {
  it('a write that does not fit waits for room instead of degrading; every write completes once replies come, the secondary gets them all, the episode is reported', async () => {
    const gate = new Gate();
    const changes: Array<{ state: string; waits: number }> = [];
    const { remote, local, target, filter, peer, degraded } = await setup('async', { gate, gateOps: ['write'] }, 1 << 20, {
      onCongestionChange: (state, info) => changes.push({ state, waits: info.waits }),
    });
    filter.attach(target, { ordered: true });
    gate.close();
    const done: boolean[] = [];
    const writes = Array.from({ length: 8 }, (_, i) => filter.write(i * (256 << 10), fill(0x50 + i, 256 << 10)).then(() => (done[i] = true)));
    await until(() => filter.congestion.waiting === 5, 'five writes waiting');
    await settle();
    // 3 × 256 KiB and their bookkeeping fit in 1 MiB; the 4th would not: it and the ones after it wait
    expect(done.filter(Boolean)).toHaveLength(3);
    expect(filter.mode).toBe('forwarding');
    expect(filter.congestion).toMatchObject({ waits: 5, waiting: 5, episodes: 1, overLimit: 0 });
    expect(changes).toEqual([{ state: 'started', waits: 0 }]);
    gate.open();
    await withTimeout(Promise.all(writes), 5000, 'the waiting writes');
    await drained(filter);
    expect(degraded).toEqual([]);
    expect(filter.congestion).toMatchObject({ waits: 5, waiting: 0, episodes: 1 });
    expect(changes).toEqual([
      { state: 'started', waits: 0 },
      { state: 'ended', waits: 5 },
    ]);
    expect((await remote.read(0, 2 << 20)).equals(await local.read(0, 2 << 20))).toBe(true);
    await filter.flush();
    expect(peer.bitmap.dirtyBytes).toBe(0);
    await peer.close();
  });

  it('the default queue is 8 MiB (DRBD\'s max-buffers): 1820 writes of 4 KiB fit with their bookkeeping, the 1821st waits', async () => {
    const gate = new Gate();
    const { remote, local, target, filter, peer, degraded } = await setup('async', { gate, gateOps: ['write'] });
    filter.attach(target, { ordered: true });
    gate.close();
    expect(DEFAULT_QUEUE_BYTES).toBe(8 << 20);
    expect(filter.queueLimit).toBe(8 << 20);
    let done = 0;
    const writes = Array.from({ length: 1830 }, (_, i) => filter.write(i * 4096, fill(0x60 + (i % 32), 4096)).then(() => void done++));
    await until(() => done + filter.congestion.waiting === 1830, 'every write queued or waiting');
    await settle();
    // 28 whole slabs of 64 writes (7 MiB), then exact copies while 4096 + 512 bytes still fit:
    // 7 MiB + 4096 × (j + 1) + 512 × (1793 + j) ≤ 8 MiB for j ≤ 27, so 1792 + 28 writes
    expect(done).toBe(1820);
    expect(filter.congestion.waiting).toBe(10);
    expect(filter.queueBytes).toBe(1820 * 4096);
    gate.open();
    await withTimeout(Promise.all(writes), 5000, 'the waiting writes');
    await drained(filter);
    expect(degraded).toEqual([]);
    expect((await remote.read(0, 1830 * 4096)).equals(await local.read(0, 1830 * 4096))).toBe(true);
    await peer.close();
  });

  it('a secondary that replies to nothing for congestionTimeoutMs while a write waits degrades (congestion-timeout, ERR_PAIR_TIMEOUT): the waiting writes complete, their regions are in the peer bitmap', async () => {
    const gate = new Gate();
    const { filter, peer, degraded, local } = await setup('async', { gate, gateOps: ['write'] }, 1 << 20, { congestionTimeoutMs: 200 });
    gate.close();
    const writes = Array.from({ length: 6 }, (_, i) => filter.write(i * (256 << 10), fill(0x60 + i, 256 << 10)));
    await withTimeout(Promise.all(writes), 5000, 'the writes, released by the congestion timeout');
    expect(filter.mode).toBe('degraded');
    expect(degraded.map((d) => [d.reason, d.code])).toEqual([['congestion-timeout', 'ERR_PAIR_TIMEOUT']]);
    expect(filter.congestion).toMatchObject({ waits: 3, waiting: 0 });
    expect([...peer.bitmap.dirtyRuns()]).toEqual([{ offset: 0, length: 6 * (256 << 10) }]);
    for (let i = 0; i < 6; i++) expect((await local.read(i * (256 << 10), 256 << 10)).equals(fill(0x60 + i, 256 << 10))).toBe(true);
    gate.open();
    await settle();
    await peer.close();
  });

  it("a write from before a checkpoint's cut that finds the queue full of writes after the cut is let in over the limit (the cut's drain waits for it, nothing after the cut is sent): no deadlock", async () => {
    const dir = await makeTempDir();
    const local = new MemoryNode(SIZE);
    const HELD = 15 << 20;
    let letGo!: () => void;
    const held = new Promise<void>((r) => (letGo = r));
    let holding = false;
    const write = local.write.bind(local);
    local.write = async (offset: number, data: Buffer, o?: WriteOptions) => {
      if (offset === HELD) {
        holding = true;
        await held;
      }
      return write(offset, data, o);
    };
    const remote = new MemoryNode(SIZE);
    const peer = await PersistentBitmap.create(join(dir, 'peer.bitmap'), { size: SIZE, granularity: G });
    const degraded: string[] = [];
    const filter = new ReplicationFilter(local, { protocol: 'async', peerBitmap: peer, queueBytes: 1 << 20, congestionTimeoutMs: 60_000, onDegraded: (reason) => degraded.push(reason) });
    filter.attach(remote, { ordered: true });
    const before = filter.write(HELD, fill(0x71, 4096));
    await until(() => holding, 'the write before the cut in its local write');
    const cut = filter.cut();
    // after the cut: 3 × 340 KiB fill the queue (queued, not sent)
    for (let i = 0; i < 3; i++) await filter.write(i * (1 << 20), fill(0x72 + i, 340 << 10));
    expect(filter.queueBytes).toBe(3 * (340 << 10));
    letGo();
    await withTimeout(Promise.all([before, cut]), 5000, "the cut's drain");
    expect(filter.congestion).toMatchObject({ waits: 1, overLimit: 1, waiting: 0 });
    expect((await remote.read(HELD, 4096)).equals(fill(0x71, 4096))).toBe(true);
    // nothing after the cut reached the secondary before the release
    expect((await remote.read(0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    filter.release();
    await drained(filter);
    expect((await remote.read(0, 3 << 20)).equals(await local.read(0, 3 << 20))).toBe(true);
    expect(degraded).toEqual([]);
    await peer.close();
  });
});

describe('replication filter, before a resync', () => {
  it("quiesce: a degraded write still on its way to the disk has set its bits before the resync's mirror may copy the bitmap; new writes wait until release", async () => {
    const dir = await makeTempDir();
    const gate = new Gate();
    const local = new MemoryNode(SIZE);
    const peer = await PersistentBitmap.create(join(dir, 'peer.bitmap'), { size: SIZE, granularity: G });
    const filter = new ReplicationFilter(hookNode(local, { gate, gateOps: ['write'] }), { protocol: 'async', peerBitmap: peer });
    filter.attach(new MemoryNode(SIZE));
    filter.degrade('queue-full');
    gate.close();
    const w1 = filter.write(3 * G, fill(0x31, G));
    await gate.waitEntered(1);
    // the bits are set when the write completes, not before
    expect(peer.bitmap.isDirty(3 * G, G)).toBe(false);
    let quiet = false;
    const q = filter.quiesce().then((release) => ((quiet = true), release));
    let w2done = false;
    const w2 = filter.write(5 * G, fill(0x52, G)).then(() => (w2done = true));
    await settle();
    expect(quiet).toBe(false);
    expect(gate.entered).toBe(1); // the new write waits before the disk
    gate.open();
    await w1;
    const release = await q;
    expect(peer.bitmap.isDirty(3 * G, G)).toBe(true);
    await settle();
    expect(w2done).toBe(false);
    release();
    await w2;
    expect(peer.bitmap.isDirty(5 * G, G)).toBe(true);
    expect((await local.read(5 * G, G)).equals(fill(0x52, G))).toBe(true);
    await peer.close();
  });
});

describe('replication filter, sync cut', () => {
  it('holds new writes during the cut, lets them go at release', async () => {
    const { target, filter, peer } = await setup('sync');
    await filter.cut();
    let done = false;
    const w = filter.write(0, fill(9, 4096)).then(() => (done = true));
    await settle();
    expect(done).toBe(false);
    expect(target.log.map((r) => r.op)).toEqual(['flush', 'flush']); // the pre-flush before the hold, then the cut's flush;
    filter.release();
    await w;
    expect(target.log.map((r) => r.op)).toEqual(['flush', 'flush', 'write']);
    await peer.close();
  });

  it('a cut while degraded fails with ERR_PAIR_LINK_DOWN', async () => {
    const { filter, peer } = await setup('sync');
    filter.degrade('test');
    await expect(filter.cut()).rejects.toMatchObject({ code: 'ERR_PAIR_LINK_DOWN' });
    await peer.close();
  });
});

describe('reconnect backoff', () => {
  it('is 100 ms × 2^k, at most 10 s, jittered ±20 %', async () => {
    const { backoffDelay } = await import('../../src/pair/primary.js');
    expect([0, 1, 2, 3, 6, 7, 20].map((k) => backoffDelay(k, () => 0.5))).toEqual([100, 200, 400, 800, 6400, 10_000, 10_000]);
    expect(backoffDelay(0, () => 0)).toBe(80);
    expect(backoffDelay(0, () => 1)).toBe(120);
    expect(backoffDelay(10, () => 0)).toBe(8000);
    expect(backoffDelay(10, () => 1)).toBe(12_000);
  });
});
