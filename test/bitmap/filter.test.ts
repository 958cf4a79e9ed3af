// test-bitmap-filter: the dirty-tracking filter (order of operations, failures, flush, several
// bitmaps) and the qemu:dirty-bitmap:NAME meta context, in process and read by nbdinfo and
// written by qemu-io through an in-process NBD server.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BlockNode, Capabilities } from '../../src/api/block.js';
import { BlkrepError } from '../../src/api/errors.js';
import { DirtyBitmap } from '../../src/bitmap/dirty-bitmap.js';
import { DirtyTrackingNode, volatileTracker, type WriteTracker } from '../../src/block/filters/tracking.js';
import { dirtyBitmapContext } from '../../src/bitmap/meta-context.js';
import { PersistentBitmap } from '../../src/bitmap/persistent.js';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { startServer } from '../nbd/helpers.js';
import { hasTool, run, unixUri } from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
let counter = 0;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'blkrep-bitmap-filter-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** A tracker that logs what happens to it, and can be told to fail or hold. */
function spyTracker(events: string[], name: string, options: { fail?: boolean } = {}): WriteTracker<string> & { flushes: number } {
  const t = {
    flushes: 0,
    async beforeWrite(offset: number, length: number) {
      events.push(`${name}:before ${offset}+${length}`);
      if (options.fail) throw new BlkrepError('ERR_TEST', `${name} refuses`, { errno: 'EIO' });
      return `${offset}+${length}`;
    },
    afterWrite(ticket: string) {
      events.push(`${name}:after ${ticket}`);
    },
    async flush() {
      t.flushes++;
      events.push(`${name}:flush`);
    },
  };
  return t;
}

/** A memory node that logs its writes and can fail them. */
function spyNode(events: string[], size: number, options: { failWrites?: boolean } = {}): BlockNode {
  const mem = completeNode(new MemoryNode(size));
  const caps: Capabilities = { ...mem.caps };
  return {
    driver: 'spy',
    description: 'spy',
    size,
    limits: mem.limits,
    caps,
    read: (o, l) => mem.read(o, l),
    async write(o, d) {
      events.push(`node:write ${o}+${d.length}`);
      if (options.failWrites) throw new BlkrepError('ERR_TEST', 'media error', { errno: 'EIO' });
      await mem.write(o, d);
    },
    async writeZeroes(o, l) {
      events.push(`node:zero ${o}+${l}`);
      await mem.writeZeroes(o, l);
    },
    async trim(o, l) {
      events.push(`node:trim ${o}+${l}`);
      await mem.trim(o, l);
    },
    async flush() {
      events.push('node:flush');
    },
    close: () => mem.close(),
  };
}

describe('DirtyTrackingNode', () => {
  it('logs before the write, records after it, for write, write-zeroes and trim; reads pass through', async () => {
    const events: string[] = [];
    const node = new DirtyTrackingNode(spyNode(events, 4 * MiB), [spyTracker(events, 'a')]);
    await node.write(4096, Buffer.alloc(512, 1));
    await node.writeZeroes(0, 100);
    await node.trim(MiB, MiB);
    await node.read(0, 4096);
    await node.extents(0, 4 * MiB);
    expect(events).toEqual([
      'a:before 4096+512', 'node:write 4096+512', 'a:after 4096+512',
      'a:before 0+100', 'node:zero 0+100', 'a:after 0+100',
      'a:before 1048576+1048576', 'node:trim 1048576+1048576', 'a:after 1048576+1048576',
    ]);
  });

  it('records a failed write (it may have changed part of the range) and passes the error on', async () => {
    const events: string[] = [];
    const bitmap = new DirtyBitmap(4 * MiB, { granularity: 4096 });
    const node = new DirtyTrackingNode(spyNode(events, 4 * MiB, { failWrites: true }), [volatileTracker(bitmap)]);
    await expect(node.write(8192, Buffer.alloc(10))).rejects.toMatchObject({ code: 'ERR_TEST' });
    expect([...bitmap.dirtyRuns()]).toEqual([{ offset: 8192, length: 4096 }]);
  });

  it('does not issue a write a tracker refused, and lets the other trackers finish theirs', async () => {
    const events: string[] = [];
    const node = new DirtyTrackingNode(spyNode(events, 4 * MiB), [spyTracker(events, 'a'), spyTracker(events, 'b', { fail: true })]);
    await expect(node.write(0, Buffer.alloc(1))).rejects.toThrow(/b refuses/);
    expect(events).toEqual(['a:before 0+1', 'b:before 0+1', 'a:after 0+1']);
  });

  it('refuses out-of-range requests before any tracker sees them', async () => {
    const events: string[] = [];
    const node = new DirtyTrackingNode(spyNode(events, 4 * MiB), [spyTracker(events, 'a')]);
    await expect(node.write(4 * MiB - 1, Buffer.alloc(2))).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE', errno: 'ENOSPC' });
    expect(events).toEqual([]);
  });

  it('waits for the activity log only on the first write into a cold extent; into a hot one the write is issued at once', async () => {
    const events: string[] = [];
    const pb = await PersistentBitmap.create(join(dir, `sync-${counter++}.bitmap`), { size: 4 * MiB, granularity: 4096, extentSize: MiB });
    const bitmap = new DirtyBitmap(4 * MiB, { granularity: 4096 });
    const single = new DirtyTrackingNode(spyNode(events, 4 * MiB), [pb]);
    try {
      const first = single.write(0, Buffer.alloc(512, 1));
      expect(events).toEqual([]); // extent 0 is cold: the write waits for a log transaction
      await first;
      expect(pb.info().activityLog.transactions).toBe(1);
      const hot = single.write(8192, Buffer.alloc(512, 2));
      expect(events).toEqual(['node:write 0+512', 'node:write 8192+512']); // issued inside write()
      await hot;
      const both = new DirtyTrackingNode(spyNode(events, 4 * MiB), [pb, volatileTracker(bitmap)]);
      const zero = both.writeZeroes(MiB - 4096, 8192); // extents 0 (hot) and 1 (cold)
      expect(events).toHaveLength(2);
      await zero;
      await both.trim(16384, 4096); // hot in both: no further transaction
      expect(events.slice(2)).toEqual([`node:zero ${MiB - 4096}+8192`, 'node:trim 16384+4096']);
      expect(pb.info().activityLog.transactions).toBe(2);
      expect([...pb.bitmap.dirtyRuns()]).toEqual([
        { offset: 0, length: 4096 }, { offset: 8192, length: 4096 }, { offset: 16384, length: 4096 }, { offset: MiB - 4096, length: 8192 },
      ]);
      expect([...bitmap.dirtyRuns()]).toEqual([{ offset: 16384, length: 4096 }, { offset: MiB - 4096, length: 8192 }]);
    } finally {
      await pb.close();
    }
  });

  it('flush resolves only when the image and every bitmap are flushed', async () => {
    const events: string[] = [];
    const a = spyTracker(events, 'a');
    const b = spyTracker(events, 'b');
    const node = new DirtyTrackingNode(spyNode(events, MiB), [a, b]);
    await node.flush();
    expect(events.sort()).toEqual(['a:flush', 'b:flush', 'node:flush']);
    node.removeTracker(b);
    await node.write(0, Buffer.alloc(1));
    expect(events.filter((e) => e.startsWith('b:'))).toEqual(['b:flush']);
    node.addTracker(b);
    node.addTracker(b);
    expect(node.trackerCount).toBe(2);
  });

  it('tracks into a persistent and a volatile bitmap at once; the persistent one survives reopen', async () => {
    const path = join(dir, `f-${++counter}.bitmap`);
    const size = 64 * MiB + 512;
    const pb = await PersistentBitmap.create(path, { size, granularity: 64 * KiB });
    const vol = new DirtyBitmap(size, { granularity: 512 });
    const node = new DirtyTrackingNode(new MemoryNode(size), [pb, volatileTracker(vol)]);
    await Promise.all([node.write(0, Buffer.alloc(4096, 7)), node.writeZeroes(size - 1, 1), node.trim(10 * MiB, 3 * MiB + 1)]);
    await node.flush();
    expect([...vol.dirtyRuns()]).toEqual([
      { offset: 0, length: 4096 },
      { offset: 10 * MiB, length: 3 * MiB + 512 },
      { offset: size - 512, length: 512 },
    ]);
    await pb.close();
    const { bitmap, loadState } = await PersistentBitmap.open(path, { size });
    expect(loadState.state).toBe('clean');
    expect([...bitmap.bitmap.dirtyRuns()]).toEqual([
      { offset: 0, length: 64 * KiB },
      { offset: 10 * MiB, length: 3 * MiB + 64 * KiB },
      { offset: 64 * MiB, length: 512 },
    ]);
    await bitmap.close();
  });
});

describe('qemu:dirty-bitmap meta context', () => {
  it('gives the descriptors of part D: clean / dirty / clean at 64 KiB granularity', async () => {
    const b = new DirtyBitmap(4 * MiB, { granularity: 64 * KiB });
    b.set(2 * MiB, 64 * KiB);
    const ctx = dirtyBitmapContext('b0', b);
    expect(ctx.name).toBe('qemu:dirty-bitmap:b0');
    expect(await ctx.blockStatus(0, 4 * MiB)).toEqual([[2097152, 0], [65536, 1], [2031616, 0]]);
    // starts at the request offset, mid-granule, and ends at the request's end
    expect(await ctx.blockStatus(2 * MiB + 100, 200)).toEqual([[200, 1]]);
    expect(await ctx.blockStatus(2 * MiB - 1, 2)).toEqual([[1, 0], [1, 1]]);
    // a bound on descriptors shortens the reply, never lengthens it
    expect(await dirtyBitmapContext('b0', b, { maxDescriptors: 2 }).blockStatus(0, 4 * MiB)).toEqual([[2097152, 0], [65536, 1]]);
    // past the end the bitmap vouches for nothing: dirty
    expect(await ctx.blockStatus(4 * MiB, 512)).toEqual([[512, 1]]);
    expect(() => dirtyBitmapContext('', b)).toThrow(BlkrepError);
  });

  it('ends the last descriptor at the disk end when the size is not a multiple of the granularity', async () => {
    const b = new DirtyBitmap(64 * KiB * 3 + 1000, { granularity: 64 * KiB });
    b.set(64 * KiB * 3, 1);
    expect(await dirtyBitmapContext('x', b).blockStatus(0, b.size)).toEqual([[3 * 64 * KiB, 0], [1000, 1]]);
  });

  it.skipIf(!hasTool('nbdinfo') || !hasTool('qemu-io'))('nbdinfo --map reads it from our server after qemu-io writes through the filter', async () => {
    const path = join(dir, `nbd-${++counter}.bitmap`);
    const size = 4 * MiB;
    const pb = await PersistentBitmap.create(path, { size, granularity: 64 * KiB });
    const node = completeNode(new DirtyTrackingNode(new MemoryNode(size), [pb]));
    const server = await startServer({ exports: [{ name: 'disk', node }] });
    try {
      server.srv.findExport('disk')!.addMetaContext(dirtyBitmapContext('b0', pb.bitmap));
      const uri = unixUri(server.path, 'disk');
      const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 2M 64k', '-c', 'flush', uri], { timeoutMs: 15_000 });
      expect(io.code, io.stderr).toBe(0);
      const r = await run('nbdinfo', ['--map=qemu:dirty-bitmap:b0', '--json', uri], { timeoutMs: 15_000 });
      expect(r.code, r.stderr).toBe(0);
      const map = JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number; description: string }>;
      expect(map.map((e) => [e.offset, e.length, e.type, e.description])).toEqual([
        [0, 2097152, 0, 'clean'],
        [2097152, 65536, 1, 'dirty'],
        [2162688, 2031616, 0, 'clean'],
      ]);
      const list = await run('nbdinfo', ['--list', '--json', unixUri(server.path)], { timeoutMs: 15_000 });
      expect(list.stdout).toContain('qemu:dirty-bitmap:b0');
    } finally {
      await server.close();
      await pb.close();
    }
  });
});
