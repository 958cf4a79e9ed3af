// test-export-stack: the daemon's export stack (src/serve/export-stack.ts): the order of the
// slots, empty slots off the path, insertion and removal while writes are in flight (bytes,
// no lost or doubled request), a pivot and then an insertion, the errors, user filters on top.
import { describe, expect, it } from 'vitest';
import type { BlockNode, CompleteBlockNode, WriteOptions } from '../../src/api/block.js';
import { BlkrepError } from '../../src/api/errors.js';
import { Filter } from '../../src/block/filter.js';
import { FrontEnd } from '../../src/block/filters/front-end.js';
import { parseFilterSpec } from '../../src/block/filters/spec.js';
import { DirtyTrackingNode, type WriteTracker } from '../../src/block/filters/tracking.js';
import { MemoryNode } from '../../src/block/memory.js';
import { ExportStack, SLOTS, type MovableSlot } from '../../src/serve/export-stack.js';
import { Gate, hookNode } from '../support/fault-node.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;

/** A filter that notes every write it forwards (its name and offset) in a shared trace. */
class Mark extends Filter {
  readonly driver: string;
  writes = 0;
  constructor(
    name: string,
    next: BlockNode,
    private readonly trace: string[] = [],
  ) {
    super(next);
    this.driver = name;
  }
  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    this.writes++;
    this.trace.push(`${this.driver}@${offset}`);
    return this.next.write(offset, data, o);
  }
}

/** The nodes a request passes, from the stack's top down to the first node that is not a filter. */
function path(stack: ExportStack): string[] {
  const out: string[] = [];
  let n: CompleteBlockNode = stack.top;
  while (n instanceof Filter) {
    out.push(n.driver);
    n = n.next;
  }
  out.push(n.driver);
  return out;
}

function pattern(byte: number, length = 4 * KiB): Buffer {
  return Buffer.alloc(length, byte);
}

function caughtSync(fn: () => unknown): BlkrepError {
  try {
    fn();
  } catch (err) {
    return err as BlkrepError;
  }
  throw new Error('expected an error');
}

/** Every permutation of `xs`. */
function permutations<T>(xs: readonly T[]): T[][] {
  if (xs.length <= 1) return [[...xs]];
  return xs.flatMap((x, i) => permutations([...xs.slice(0, i), ...xs.slice(i + 1)]).map((p) => [x, ...p]));
}

/** Settle-count every promise: each must settle exactly once (a promise cannot settle twice, so this counts the callbacks). */
function counted(ps: Array<Promise<unknown>>): { settled: () => number } {
  let n = 0;
  for (const p of ps) {
    p.then(
      () => n++,
      () => n++,
    );
  }
  return { settled: () => n };
}

describe('export stack: slots', () => {
  it('holds its slots in one order whatever the order of insertion, and a write passes them top to bottom', async () => {
    const movable = ['front', 'tracking', 'replication', 'cbw'] as const;
    for (const order of permutations(movable)) {
      const image = new MemoryNode(SIZE);
      const stack = new ExportStack(image, { name: 'disk' });
      const trace: string[] = [];
      for (const slot of order) await stack.insert(slot, (below) => new Mark(slot, below, trace));
      expect(stack.layers()).toEqual([...movable.map((slot) => ({ slot, driver: slot })), { slot: 'image', driver: 'memory' }]);
      expect(path(stack)).toEqual(['export-stack', ...movable, 'memory']);
      await stack.top.write(8 * KiB, pattern(0x5a));
      expect(trace).toEqual(movable.map((s) => `${s}@${8192}`));
      expect(await image.read(8 * KiB, 4 * KiB)).toEqual(pattern(0x5a));
    }
  });

  it('an empty slot is not on the path: the entry links straight to the next occupied slot', async () => {
    const image = new MemoryNode(SIZE);
    const stack = new ExportStack(image, { name: 'disk' });
    expect(path(stack)).toEqual(['export-stack', 'memory']);
    await stack.insert('cbw', (below) => new Mark('cbw', below));
    expect(path(stack)).toEqual(['export-stack', 'cbw', 'memory']);
    // the image's node is completed once: a filter over it is not given another adapter
    expect((stack.node('cbw') as Filter).next).toBe(stack.node('image'));
    await stack.insert('front', (below) => new Mark('front', below));
    expect(path(stack)).toEqual(['export-stack', 'front', 'cbw', 'memory']);
    await stack.remove('cbw');
    expect(path(stack)).toEqual(['export-stack', 'front', 'memory']);
    await stack.remove('front');
    expect(path(stack)).toEqual(['export-stack', 'memory']);
    expect(SLOTS).toEqual(['front', 'tracking', 'replication', 'cbw', 'pivot', 'image']);
  });

  it("user filters (--filter) sit above the front slot; the stack announces the image's size, limits and caps", async () => {
    const image = new MemoryNode(SIZE);
    const stack = new ExportStack(image, { name: 'disk', filters: [parseFilterSpec('delay:write=0'), parseFilterSpec('error:ops=trim,every=1')] });
    await stack.insert('front', (below) => new Mark('front', below));
    expect(path(stack)).toEqual(['delay', 'error', 'export-stack', 'front', 'memory']);
    await stack.top.write(0, pattern(7));
    expect(await image.read(0, 4 * KiB)).toEqual(pattern(7));
    await expect(stack.top.trim(0, 4 * KiB)).rejects.toMatchObject({ errno: 'EIO' });
    expect(stack.top.size).toBe(SIZE);
    expect(stack.top.limits).toEqual(image.limits);
    expect(stack.top.caps).toEqual(image.caps);
  });
});

describe('export stack: changes while writes are in flight', () => {
  it('insert: writes in flight finish on the old path, new ones take the filter; insert resolves when the old ones finished', async () => {
    const gate = new Gate();
    const image = hookNode(new MemoryNode(SIZE), { gate, gateOps: ['write'] });
    const stack = new ExportStack(image, { name: 'disk' });
    await stack.insert('tracking', (below) => new DirtyTrackingNode(below));
    gate.close();
    const before = [0, 1, 2, 3].map((k) => stack.top.write(k * 64 * KiB, pattern(0x10 + k)));
    await gate.waitEntered(4);
    let inserted = false;
    const replication = stack.insert('replication', (below) => new Mark('replication', below)).then((n) => {
      inserted = true;
      return n;
    });
    const after = [4, 5, 6].map((k) => stack.top.write(k * 64 * KiB, pattern(0x10 + k)));
    await gate.waitEntered(7);
    const c = counted([...before, ...after]);
    await Promise.resolve();
    expect(inserted).toBe(false);
    gate.open();
    await Promise.all([...before, ...after]);
    const filter = (await replication) as Mark;
    expect(inserted).toBe(true);
    expect(filter.writes).toBe(3);
    await Promise.resolve();
    expect(c.settled()).toBe(7);
    // every write reached the image once: none lost, none doubled
    expect(image.log.filter((r) => r.op === 'write').map((r) => r.offset)).toEqual([0, 1, 2, 3, 4, 5, 6].map((k) => k * 64 * KiB));
    for (let k = 0; k < 7; k++) expect(await image.read(k * 64 * KiB, 4 * KiB)).toEqual(pattern(0x10 + k));
  });

  it('remove: writes in the removed filter finish through it, new ones skip it; remove resolves after the old ones and hands the filter back', async () => {
    const gate = new Gate();
    const image = hookNode(new MemoryNode(SIZE), { gate, gateOps: ['write'] });
    const stack = new ExportStack(image, { name: 'disk' });
    const trace: string[] = [];
    await stack.insert('tracking', (below) => new Mark('tracking', below, trace));
    const cbw = (await stack.insert('cbw', (below) => new Mark('cbw', below, trace))) as Mark;
    gate.close();
    const before = [0, 1].map((k) => stack.top.write(k * MiB, pattern(0x20 + k)));
    await gate.waitEntered(2);
    let removed: BlockNode | undefined;
    const removing = stack.remove('cbw').then((n) => (removed = n));
    const after = [2, 3].map((k) => stack.top.write(k * MiB, pattern(0x20 + k)));
    await gate.waitEntered(4);
    await Promise.resolve();
    expect(removed).toBeUndefined();
    gate.open();
    await Promise.all([...before, ...after, removing]);
    expect(removed).toBe(cbw);
    expect(cbw.writes).toBe(2);
    expect(trace).toEqual(['tracking@0', `cbw@0`, `tracking@${MiB}`, `cbw@${MiB}`, `tracking@${2 * MiB}`, `tracking@${3 * MiB}`]);
    expect(image.log.filter((r) => r.op === 'write')).toHaveLength(4);
    for (let k = 0; k < 4; k++) expect(await image.read(k * MiB, 4 * KiB)).toEqual(pattern(0x20 + k));
  });

  it('a write waiting for its bitmap when a filter is inserted under the tracking filter goes where it would have gone', async () => {
    const image = new MemoryNode(SIZE);
    const stack = new ExportStack(image, { name: 'disk' });
    const tracking = (await stack.insert('tracking', (below) => new DirtyTrackingNode(below))) as DirtyTrackingNode;
    // a tracker whose beforeWrite waits (a persistent bitmap storing its activity log)
    let letGo: () => void = () => {};
    const held = new Promise<void>((resolve) => (letGo = resolve));
    const slow: WriteTracker<number> = { beforeWrite: () => held.then(() => 1), afterWrite: () => {}, flush: () => Promise.resolve() };
    tracking.addTracker(slow);
    const early = stack.top.write(0, pattern(0x31));
    const replication = stack.insert('replication', (below) => new Mark('replication', below));
    const late = stack.top.write(64 * KiB, pattern(0x32));
    letGo();
    await Promise.all([early, late]);
    const filter = (await replication) as Mark;
    expect(filter.writes).toBe(1);
    expect(await image.read(0, 4 * KiB)).toEqual(pattern(0x31));
    expect(await image.read(64 * KiB, 4 * KiB)).toEqual(pattern(0x32));
  });

  it('random inserts, replaces and removes among 400 concurrent writes: every write lands once, bytes as written', async () => {
    // seeded: the same interleaving every run
    let seed = 0x9e3779b9;
    const rand = (n: number): number => {
      seed = (seed * 1664525 + 1013904223) >>> 0;
      return seed % n;
    };
    const gate = new Gate();
    const image = hookNode(new MemoryNode(SIZE), { gate, gateOps: ['write'] });
    const stack = new ExportStack(image, { name: 'disk' });
    const slots: MovableSlot[] = ['front', 'tracking', 'replication', 'cbw'];
    const expected = Buffer.alloc(SIZE);
    const writes: Array<Promise<void>> = [];
    const changes: Array<Promise<unknown>> = [];
    const filters: Mark[] = [];
    for (let i = 0; i < 400; i++) {
      if (i % 7 === 0) gate.close();
      if (i % 7 === 3) gate.open();
      const slot = slots[rand(slots.length)]!;
      const op = rand(3);
      if (op === 0 && !stack.has(slot)) changes.push(stack.insert(slot, (below) => filters[filters.push(new Mark(slot, below)) - 1]!));
      else if (op === 1) changes.push(stack.replace(slot, (below) => filters[filters.push(new Mark(slot, below)) - 1]!));
      else if (op === 2 && stack.has(slot)) changes.push(stack.remove(slot));
      // writes of 4 KiB at one of 1024 places: later writes to a place are issued after the earlier one finished
      const place = rand(1024);
      const data = pattern(i & 0xff);
      data.writeUInt32LE(i, 0);
      const prev = writes[place] ?? Promise.resolve();
      writes[place] = prev.then(() => stack.top.write(place * 4 * KiB, data));
      data.copy(expected, place * 4 * KiB);
    }
    gate.open();
    const all = writes.filter((w) => w !== undefined);
    const c = counted(all);
    await Promise.all([...all, ...changes]);
    await Promise.resolve();
    expect(c.settled()).toBe(all.length);
    expect(image.log.filter((r) => r.op === 'write')).toHaveLength(400);
    expect(filters.reduce((n, f) => n + f.writes, 0)).toBeGreaterThan(0);
    expect((await image.read(0, SIZE)).equals(expected)).toBe(true);
  });
});

describe('export stack: pivot', () => {
  it('a pivot cuts the image off; a filter inserted after it sits over the target; removing the pivot links the image back', async () => {
    const image = new MemoryNode(SIZE);
    const target = new MemoryNode(SIZE);
    const stack = new ExportStack(image, { name: 'disk' });
    const tracking = (await stack.insert('tracking', (below) => new DirtyTrackingNode(below))) as DirtyTrackingNode;
    await stack.top.write(0, pattern(0x41));
    await stack.replace('pivot', () => target);
    expect(stack.image).toBe(target);
    expect(stack.layers()).toEqual([
      { slot: 'tracking', driver: 'dirty-tracking' },
      { slot: 'pivot', driver: 'memory' },
    ]);
    await stack.top.write(4 * KiB, pattern(0x42));
    const cbw = (await stack.insert('cbw', (below) => new Mark('cbw', below))) as Mark;
    expect(tracking.next).toBe(cbw);
    expect(cbw.next).toBe(stack.node('pivot'));
    await stack.top.write(8 * KiB, pattern(0x43));
    expect(cbw.writes).toBe(1);
    expect(await target.read(4 * KiB, 8 * KiB)).toEqual(Buffer.concat([pattern(0x42), pattern(0x43)]));
    expect(await image.read(4 * KiB, 8 * KiB)).toEqual(Buffer.alloc(8 * KiB));
    expect(await image.read(0, 4 * KiB)).toEqual(pattern(0x41));
    // a second pivot replaces the first
    const second = new MemoryNode(SIZE);
    await stack.replace('pivot', () => second);
    await stack.top.write(12 * KiB, pattern(0x44));
    expect(cbw.writes).toBe(2);
    expect(await second.read(12 * KiB, 4 * KiB)).toEqual(pattern(0x44));
    await stack.remove('pivot');
    expect(stack.image).toBe(image);
    await stack.top.write(16 * KiB, pattern(0x45));
    expect(await image.read(16 * KiB, 4 * KiB)).toEqual(pattern(0x45));
    expect(path(stack)).toEqual(['export-stack', 'dirty-tracking', 'cbw', 'memory']);
  });

  it("a job's front end in the front slot: reads through it, writes through the job, out again with remove", async () => {
    const image = new MemoryNode(SIZE);
    const stack = new ExportStack(image, { name: 'disk' });
    const tracking = (await stack.insert('tracking', (below) => new DirtyTrackingNode(below))) as DirtyTrackingNode;
    const seen: string[] = [];
    const job = {
      frontWrite: (op: string, offset: number, _length: number, _o: unknown, data?: Buffer) => {
        seen.push(`${op}@${offset}`);
        return tracking.write(offset, data!);
      },
      frontFlush: () => tracking.flush(),
    };
    const front = new FrontEnd('mirror', tracking, job);
    await stack.insert('front', () => front);
    expect(stack.opened('front')).toBe(front);
    await stack.top.write(0, pattern(0x51));
    expect(seen).toEqual(['write@0']);
    expect(await stack.top.read(0, 4 * KiB)).toEqual(pattern(0x51));
    await stack.remove('front');
    await stack.top.write(4 * KiB, pattern(0x52));
    expect(seen).toEqual(['write@0']);
    expect(await image.read(0, 8 * KiB)).toEqual(Buffer.concat([pattern(0x51), pattern(0x52)]));
  });
});

describe('export stack: errors', () => {
  it('a slot it does not have, the fixed image slot, a busy or empty slot, a node that cannot sit there: each a coded error that changes nothing', async () => {
    const image = new MemoryNode(SIZE);
    const stack = new ExportStack(image, { name: 'disk' });
    const tracking = (await stack.insert('tracking', (below) => new DirtyTrackingNode(below))) as DirtyTrackingNode;
    const before = stack.layers();

    let e = caughtSync(() => stack.insert('bogus' as MovableSlot, (below) => new Mark('x', below)));
    expect(e).toMatchObject({ code: 'ERR_STACK_SLOT', errno: 'EINVAL', message: 'export "disk" has no slot "bogus" (slots, top to bottom: front, tracking, replication, cbw, pivot, image)' });
    e = caughtSync(() => stack.remove('image' as MovableSlot));
    expect(e).toMatchObject({ code: 'ERR_STACK_SLOT', message: 'slot "image" of export "disk" is fixed: a new image goes into slot "pivot", above it' });
    e = caughtSync(() => stack.insert('tracking', (below) => new Mark('x', below)));
    expect(e).toMatchObject({ code: 'ERR_STACK_SLOT_BUSY', message: 'slot "tracking" of export "disk" holds dirty-tracking already: remove it first, or replace it', details: { slot: 'tracking', driver: 'dirty-tracking' } });
    e = caughtSync(() => stack.remove('cbw'));
    expect(e).toMatchObject({ code: 'ERR_STACK_SLOT_EMPTY', message: 'slot "cbw" of export "disk" is empty: nothing to remove' });
    e = caughtSync(() => stack.insert('front', () => new MemoryNode(SIZE)));
    expect(e).toMatchObject({ code: 'ERR_STACK_BAD_NODE', message: 'slot "front" of export "disk" takes a filter (src/block/filter.ts), not a memory node: the stack relinks it when the slots under it change' });
    e = caughtSync(() => stack.insert('front', () => tracking));
    expect(e).toMatchObject({ code: 'ERR_STACK_BAD_NODE', message: 'the dirty-tracking node for slot "front" of export "disk" is in its slot "tracking" already: a node sits in one slot' });
    e = caughtSync(() => stack.replace('pivot', () => new MemoryNode(SIZE / 2)));
    expect(e).toMatchObject({ code: 'ERR_SIZE_MISMATCH', message: `cannot put memory:${SIZE / 2} of ${SIZE / 2} bytes into slot "pivot" of export "disk" of ${SIZE} bytes`, details: { size: SIZE, newSize: SIZE / 2 } });

    expect(stack.layers()).toEqual(before);
    expect(path(stack)).toEqual(['export-stack', 'dirty-tracking', 'memory']);
    await stack.top.write(0, pattern(0x61));
    expect(await image.read(0, 4 * KiB)).toEqual(pattern(0x61));
  });

  it('closes nothing: the image stays open after the top is closed and slots are removed', async () => {
    const image = new MemoryNode(SIZE);
    let closes = 0;
    const close = image.close.bind(image);
    image.close = () => {
      closes++;
      return close();
    };
    const stack = new ExportStack(image, { name: 'disk', filters: [parseFilterSpec('delay:write=0')] });
    await stack.insert('tracking', (below) => new DirtyTrackingNode(below));
    await stack.insert('replication', (below) => new Mark('replication', below));
    await stack.remove('replication');
    await stack.top.close();
    expect(closes).toBe(0);
    await stack.top.write(0, pattern(0x71));
    expect(await image.read(0, 4 * KiB)).toEqual(pattern(0x71));
  });
});
