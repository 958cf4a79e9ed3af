/**
 * Helpers for the mirror tests: a seeded PRNG, a seeded source image, a random writer that keeps
 * the expected content, and a target with a volatile write cache, fault injection and checks.
 */
import { BlkrepError, type Errno } from '../../src/api/errors.js';
import type { BlockNode, Capabilities, Extent, IoOptions, WriteOptions, ZeroOptions } from '../../src/api/block.js';
import { MemoryNode } from '../../src/block/memory.js';
import { seededRandom } from '../../src/block/filters/error.js';

export const MiB = 1 << 20;

/** mulberry32, the generator of the error filter's seeded rate */
export const rng = seededRandom;

export function randomBytes(r: () => number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  let i = 0;
  for (; i + 4 <= n; i += 4) b.writeUInt32LE((r() * 2 ** 32) >>> 0, i);
  for (; i < n; i++) b[i] = (r() * 256) | 0;
  return b;
}

/** A memory image with data regions, zeroed-but-allocated regions and holes. */
export async function seededSource(size: number, seed: number): Promise<MemoryNode> {
  const r = rng(seed);
  const node = new MemoryNode(size);
  for (let off = 0; off < size; ) {
    const len = Math.min(size - off, (1 + Math.floor(r() * 32)) * 64 * 1024 + Math.floor(r() * 3000));
    const kind = r();
    if (kind < 0.45) await node.write(off, randomBytes(r, len));
    else if (kind < 0.55) await node.writeZeroes(off, len, { noHole: true });
    off += len;
  }
  return node;
}

export async function readAll(node: BlockNode): Promise<Buffer> {
  const out = Buffer.alloc(node.size);
  for (let off = 0; off < node.size; off += 16 * MiB) {
    const n = Math.min(16 * MiB, node.size - off);
    (await node.read(off, n)).copy(out, off);
  }
  return out;
}

export function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const step = 4096;
  for (let i = 0; i < a.length; i += step) {
    if (!a.subarray(i, i + step).equals(b.subarray(i, i + step))) {
      for (let j = i; j < i + step; j++) if (a[j] !== b[j]) return j;
    }
  }
  return a.length === b.length ? -1 : Math.min(a.length, b.length);
}

export function countDifferent(a: Buffer, b: Buffer): number {
  let n = 0;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) n++;
  return n;
}

/**
 * Random writes through `node` while started: up to `depth` at once, never two overlapping in
 * flight, so `expected` (the content the writes make) is exact whatever the order. 1-byte and
 * other unaligned writes, 4 KiB writes, up to 256 KiB writes, write-zeroes.
 */
export class RandomWriter {
  readonly expected: Buffer;
  writes = 0;
  private inFlight: Array<[number, number]> = [];
  private stopped = false;
  private loops: Array<Promise<void>> = [];
  errors: unknown[] = [];

  constructor(
    private readonly node: BlockNode,
    initial: Buffer,
    private readonly r: () => number,
    private readonly depth = 4,
    /** after each write, wait up to this many ms (a load the copy can keep up with) */
    private readonly gapMs = 2,
  ) {
    this.expected = Buffer.from(initial);
  }

  start(): this {
    for (let i = 0; i < this.depth; i++) this.loops.push(this.loop());
    return this;
  }

  private pickRange(): [number, number] {
    const size = this.node.size;
    const kind = this.r();
    const len = kind < 0.3 ? 1 : kind < 0.5 ? 1 + Math.floor(this.r() * 700) : kind < 0.8 ? 4096 : 1 + Math.floor(this.r() * 256 * 1024);
    const off = kind >= 0.5 && kind < 0.8 ? Math.floor((this.r() * (size - len)) / 4096) * 4096 : Math.floor(this.r() * (size - len));
    return [off, len];
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      let [off, len] = this.pickRange();
      while (this.inFlight.some(([a, b]) => a < off + len && off < b)) [off, len] = this.pickRange();
      const range: [number, number] = [off, off + len];
      this.inFlight.push(range);
      try {
        if (this.r() < 0.1) {
          this.expected.fill(0, off, off + len);
          await this.node.writeZeroes!(off, len);
        } else {
          const data = randomBytes(this.r, len);
          data.copy(this.expected, off);
          await this.node.write(off, data);
        }
        this.writes++;
      } catch (err) {
        this.errors.push(err);
        this.stopped = true;
      } finally {
        this.inFlight.splice(this.inFlight.indexOf(range), 1);
      }
      if (this.gapMs > 0 && this.r() < 0.5) await new Promise((resolve) => setTimeout(resolve, this.r() * this.gapMs));
      else await new Promise((resolve) => setImmediate(resolve));
    }
  }

  async waitWrites(n: number): Promise<void> {
    const goal = this.writes + n;
    while (this.writes < goal && !this.stopped) await new Promise((resolve) => setTimeout(resolve, 1));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
  }
}

export interface Fault {
  op: 'write' | 'writeZeroes' | 'flush' | 'read';
  errno: Errno;
  /** fail only requests overlapping [start, end) (not for flush) */
  range?: [number, number];
  /** how many more times (Infinity: until removed) */
  times: number;
}

/**
 * A target (or source) over memory with a volatile write cache: writes are visible at once but
 * stable only after a flush; crash() drops what is not stable. It counts requests, checks that
 * no two writes touching one granule are in flight at once, and injects faults.
 */
export class TestDisk implements BlockNode {
  readonly driver = 'test-disk';
  readonly description = 'test-disk';
  readonly limits = { minimum: 1, preferred: 4096, maximum: 32 * MiB };
  readonly caps: Capabilities;
  readonly disk: MemoryNode;
  readonly stable: MemoryNode;
  /** unflushed ranges */
  private dirtyRanges: Array<[number, number]> = [];
  private inFlight: Array<[number, number]> = [];
  faults: Fault[] = [];
  counts = { write: 0, writeZeroes: 0, trim: 0, flush: 0, read: 0, extents: 0, writeBytes: 0, zeroBytes: 0 };
  overlapViolations: string[] = [];
  /** called after each write and flush has taken effect */
  onChange: (() => void) | undefined;
  /** hold every write/flush until released */
  holdAll = false;
  private held: Array<() => void> = [];

  constructor(
    readonly size: number,
    private readonly granularity = 65536,
    options: { cache?: boolean } = {},
  ) {
    this.disk = new MemoryNode(size);
    this.stable = new MemoryNode(size);
    this.volatile = options.cache ?? false;
    this.caps = { canWrite: true, canFlush: true, canFua: false, canTrim: true, canZero: true, canFastZero: false, canMultiConn: false, canExtents: true, canCache: false, cheapExtents: true };
  }
  private readonly volatile: boolean;

  static async from(node: BlockNode, granularity?: number, options: { cache?: boolean } = {}): Promise<TestDisk> {
    const d = new TestDisk(node.size, granularity, options);
    const all = await readAll(node);
    await d.disk.write(0, all);
    await d.stable.write(0, all);
    return d;
  }

  release(): void {
    this.holdAll = false;
    for (const h of this.held.splice(0)) h();
  }

  private async gate(): Promise<void> {
    if (this.holdAll) await new Promise<void>((resolve) => this.held.push(resolve));
  }

  private fault(op: Fault['op'], offset: number, length: number): void {
    const f = this.faults.find((x) => x.op === op && x.times > 0 && (!x.range || (x.range[0] < offset + Math.max(1, length) && offset < x.range[1])));
    if (!f) return;
    f.times--;
    throw new BlkrepError('ERR_INJECTED', `injected ${f.errno}: ${op} of ${length} bytes at offset ${offset}`, { errno: f.errno });
  }

  private async modifying(offset: number, length: number, run: () => Promise<void>): Promise<void> {
    const g = this.granularity;
    const range: [number, number] = [Math.floor(offset / g), Math.ceil((offset + length) / g)];
    const clash = this.inFlight.find(([a, b]) => a < range[1] && range[0] < b);
    if (clash) this.overlapViolations.push(`granules ${range[0]}..${range[1]} while ${clash[0]}..${clash[1]} in flight`);
    this.inFlight.push(range);
    try {
      await new Promise((resolve) => setImmediate(resolve));
      await this.gate();
      await run();
      this.dirtyRanges.push([offset, offset + length]);
      if (!this.volatile) await this.makeStable();
      this.onChange?.();
    } finally {
      this.inFlight.splice(this.inFlight.indexOf(range), 1);
    }
  }

  private async makeStable(): Promise<void> {
    for (const [a, b] of this.dirtyRanges.splice(0)) await this.stable.write(a, await this.disk.read(a, b - a));
  }

  read(offset: number, length: number): Promise<Buffer> {
    this.counts.read++;
    this.fault('read', offset, length);
    return this.disk.read(offset, length);
  }

  write(offset: number, data: Buffer, _o?: WriteOptions): Promise<void> {
    this.counts.write++;
    this.counts.writeBytes += data.length;
    const copy = Buffer.from(data);
    return this.modifying(offset, data.length, async () => {
      this.fault('write', offset, data.length);
      await this.disk.write(offset, copy);
    });
  }

  writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    this.counts.writeZeroes++;
    this.counts.zeroBytes += length;
    return this.modifying(offset, length, async () => {
      this.fault('writeZeroes', offset, length);
      await this.disk.writeZeroes(offset, length, o);
    });
  }

  trim(offset: number, length: number): Promise<void> {
    this.counts.trim++;
    return this.modifying(offset, length, async () => {
      await this.disk.writeZeroes(offset, length);
    });
  }

  async flush(_o?: IoOptions): Promise<void> {
    this.counts.flush++;
    await new Promise((resolve) => setImmediate(resolve));
    await this.gate();
    this.fault('flush', 0, 0);
    // everything written before the flush was called is stable; model: flush covers all landed writes
    await this.makeStable();
    this.onChange?.();
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    this.counts.extents++;
    return this.disk.extents(offset, length);
  }

  /** power loss: the cache is lost */
  async crash(): Promise<void> {
    this.dirtyRanges = [];
    await this.disk.write(0, await readAll(this.stable));
  }

  async close(): Promise<void> {}
}

/** The data bytes `target` had been sent when each of its flushes took effect (set as its onChange). */
export function recordFlushes(target: TestDisk): number[] {
  const at: number[] = [];
  let flushes = 0;
  target.onChange = () => {
    if (target.counts.flush === flushes) return;
    flushes = target.counts.flush;
    at.push(target.counts.writeBytes);
  };
  return at;
}
