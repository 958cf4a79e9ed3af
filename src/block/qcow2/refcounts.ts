/**
 * Refcounts (B.4) and cluster allocation, for read-write opens.
 *
 * The refcount table lives in memory whole (≤ 8 MiB); refcount blocks go through a TableCache.
 * Crash safety (B.5) rests on one property: a refcount block's contents in memory may be written
 * to disk at any moment. Increments are applied in memory when a cluster is allocated (before any
 * pointer to it exists); decrements only after the pointer's removal is durable. So writing a
 * block early leaks at worst. New refcount table entries are written (phase 2 of a writeback
 * cycle) only after the blocks they point to are durable; growing the table writes a new table
 * elsewhere and switches the header with synced writes.
 *
 * Every method that changes state must be called with the metadata mutex held.
 */
import { BlkrepError } from '../../api/errors.js';
import { TableCache, type Table } from './cache.js';
import type { Qcow2Container } from './file.js';
import { corrupt, H, MAX_OFFSET, MAX_REFTABLE_BYTES } from './format.js';

export interface RefcountOptions {
  file: Qcow2Container;
  path: string;
  clusterBits: number;
  refcountOrder: number;
  reftableOffset: number;
  reftableClusters: number;
  /** the whole table as read from disk */
  reftable: Buffer;
  cacheBytes: number;
}

export interface Allocation {
  /** first host cluster index of the run */
  cluster: number;
  /** the run was never written: it reads as zeros */
  fresh: boolean;
}

/** Entry i of a refcount block of width 2^order bits. */
export function getRefcount(buf: Buffer, i: number, order: number): number {
  switch (order) {
    case 0:
      return (buf[i >>> 3]! >>> (i & 7)) & 1;
    case 1:
      return (buf[i >>> 2]! >>> ((i & 3) * 2)) & 3;
    case 2:
      return (buf[i >>> 1]! >>> ((i & 1) * 4)) & 15;
    case 3:
      return buf[i]!;
    case 4:
      return buf.readUInt16BE(i * 2);
    case 5:
      return buf.readUInt32BE(i * 4);
    default: {
      const hi = buf.readUInt32BE(i * 8);
      // beyond 2^53 the count is treated as "very shared"; it is never changed
      return hi > 0x1fffff ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + buf.readUInt32BE(i * 8 + 4);
    }
  }
}

export function setRefcount(buf: Buffer, i: number, order: number, value: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 >>> order;
      const shift = (i % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      const at = Math.floor(i / perByte);
      buf[at] = (buf[at]! & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3:
      buf[i] = value;
      return;
    case 4:
      buf.writeUInt16BE(value, i * 2);
      return;
    case 5:
      buf.writeUInt32BE(value, i * 4);
      return;
    default:
      buf.writeUInt32BE(Math.floor(value / 0x100000000), i * 8);
      buf.writeUInt32BE(value >>> 0, i * 8 + 4);
  }
}

export class Refcounts {
  readonly file: Qcow2Container;
  readonly path: string;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly order: number;
  readonly maxRefcount: number;
  /** refcounts per block */
  readonly perBlock: number;
  readonly blocks: TableCache;
  reftableOffset: number;
  reftableClusters: number;
  reftable: Buffer;
  /** bumped when the table moves, so a writeback cycle does not write entries to the old one */
  reftableGen = 0;
  /** reftable indices changed in memory, not yet written */
  readonly dirtyReftable = new Set<number>();
  /** every cluster from here on has refcount 0 */
  imageEnd = 0;
  /** every cluster from here on was never written: it reads as zeros */
  freshFrom = 0;
  /**
   * Called with every run about to be allocated (and the area a grown table takes): throws when
   * it holds metadata (the image's overlap check, image.ts).
   */
  guard: ((first: number, count: number) => void) | undefined;
  private blockSet: { table: Buffer; set: Set<number> } | undefined;
  /** every cluster below this has refcount > 0 */
  private hint = 0;
  /** no run of `n` free clusters lies below `from` (until something is freed) */
  private tail = { n: Infinity, from: 0 };

  constructor(o: RefcountOptions) {
    this.file = o.file;
    this.path = o.path;
    this.clusterBits = o.clusterBits;
    this.clusterSize = 2 ** o.clusterBits;
    this.order = o.refcountOrder;
    this.maxRefcount = o.refcountOrder === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** o.refcountOrder) - 1;
    this.perBlock = (this.clusterSize * 8) >>> o.refcountOrder;
    this.reftableOffset = o.reftableOffset;
    this.reftableClusters = o.reftableClusters;
    this.reftable = o.reftable;
    this.blocks = new TableCache(o.file, this.clusterSize, Math.max(o.cacheBytes, 4 * this.clusterSize));
  }

  get reftableEntries(): number {
    return this.reftable.length / 8;
  }

  /** Offset of refcount block `index`, 0 when absent. */
  blockOffset(index: number): number {
    if (index >= this.reftableEntries) return 0;
    const hi = this.reftable.readUInt32BE(index * 8);
    const lo = this.reftable.readUInt32BE(index * 8 + 4);
    const offset = hi * 0x100000000 + ((lo & ~0x1ff) >>> 0);
    if (offset === 0) return 0;
    if (hi > 0x1fffff || offset % this.clusterSize !== 0) {
      throw corrupt(this.path, `refcount block offset ${offset} (refcount table index ${index}) is not cluster aligned or too large`, { index, offset }, 'EIO');
    }
    return offset;
  }

  /** Host cluster c holds a refcount block. */
  isBlock(c: number): boolean {
    if (!this.blockSet || this.blockSet.table !== this.reftable) {
      const set = new Set<number>();
      for (let i = 0; i < this.reftableEntries; i++) {
        const hi = this.reftable.readUInt32BE(i * 8) & 0x00ffffff;
        const offset = hi * 0x100000000 + ((this.reftable.readUInt32BE(i * 8 + 4) & ~0x1ff) >>> 0);
        if (offset !== 0) set.add(Math.floor(offset / this.clusterSize));
      }
      this.blockSet = { table: this.reftable, set };
    }
    return this.blockSet.set.has(c);
  }

  private setBlockOffset(table: Buffer, index: number, offset: number): void {
    this.blockSet = undefined;
    table.writeUInt32BE(Math.floor(offset / 0x100000000), index * 8);
    table.writeUInt32BE(offset >>> 0, index * 8 + 4);
  }

  /** Find where the image ends (called once when opening read-write). */
  async init(): Promise<void> {
    let end = Math.ceil((this.reftableOffset + this.reftableClusters * this.clusterSize) / this.clusterSize);
    let lastCounted = 0;
    for (let index = this.reftableEntries - 1; index >= 0; index--) {
      const offset = this.blockOffset(index);
      if (offset === 0) continue;
      end = Math.max(end, offset / this.clusterSize + 1);
      if (lastCounted === 0) {
        const block = await this.block(offset);
        for (let i = this.perBlock - 1; i >= 0; i--) {
          if (getRefcount(block.buf, i, this.order) !== 0) {
            lastCounted = index * this.perBlock + i + 1;
            break;
          }
        }
      }
    }
    const fileClusters = Math.ceil(this.file.length / this.clusterSize);
    this.imageEnd = Math.max(end, lastCounted, fileClusters);
    this.freshFrom = this.imageEnd;
  }

  /** A block from the cache, guaranteed to be the cached one when this resolves. */
  private async block(offset: number): Promise<Table> {
    for (;;) {
      const t = this.blocks.peek(offset) ?? (await this.blocks.get(offset));
      if (this.blocks.peek(offset) === t) return t;
    }
  }

  async refcount(cluster: number): Promise<number> {
    const offset = this.blockOffset(Math.floor(cluster / this.perBlock));
    if (offset === 0) return 0;
    const t = await this.block(offset);
    return getRefcount(t.buf, cluster % this.perBlock, this.order);
  }

  /**
   * Add `delta` to the refcounts of clusters [first, first+count). Increments need the blocks to
   * exist (allocate() creates them); a decrement of a count that is already 0 is skipped (that is
   * a leak-safe answer to a corrupt image). Returns the clusters whose count became 0.
   */
  async change(first: number, count: number, delta: number): Promise<number[]> {
    const freed: number[] = [];
    let c = first;
    const end = first + count;
    while (c < end) {
      const index = Math.floor(c / this.perBlock);
      const blockEnd = Math.min(end, (index + 1) * this.perBlock);
      const offset = this.blockOffset(index);
      if (offset === 0) {
        if (delta > 0) throw new BlkrepError('ERR_INTERNAL', `qcow2: no refcount block for cluster ${c} (index ${index})`);
        c = blockEnd;
        continue;
      }
      const t = await this.block(offset);
      const from = c % this.perBlock;
      for (; c < blockEnd; c++) {
        const i = c % this.perBlock;
        const v = getRefcount(t.buf, i, this.order);
        if (delta < 0 && v === 0) continue;
        const next = v + delta;
        if (next > this.maxRefcount) {
          throw corrupt(this.path, `refcount of cluster ${c} would exceed ${this.maxRefcount} (${2 ** this.order}-bit refcounts)`, { cluster: c }, 'EIO');
        }
        setRefcount(t.buf, i, this.order, next);
        if (next === 0) {
          freed.push(c);
          if (c < this.hint) this.hint = c;
          this.tail = { n: Infinity, from: 0 };
        } else if (c >= this.imageEnd) {
          this.imageEnd = c + 1;
        }
      }
      // the bytes of entries [from, to): 2^order bits each
      const bits = 2 ** this.order;
      t.touch(Math.floor((from * bits) / 8), Math.ceil((((c - 1) % this.perBlock) + 1) * bits / 8));
    }
    return freed;
  }

  /**
   * Allocate `n` contiguous clusters with refcount 1 (plus whatever refcount blocks they need,
   * placed right after them). The caller must hold the metadata mutex.
   */
  async allocate(n: number): Promise<Allocation> {
    let extra = 0;
    for (let attempt = 0; attempt < 1000; attempt++) {
      const p = await this.findFree(n + extra);
      const end = p + n + extra;
      if (end * this.clusterSize > MAX_OFFSET) {
        throw new BlkrepError('ERR_NO_SPACE', `qcow2 image ${this.path} cannot grow past 2^53 bytes`, { errno: 'ENOSPC' });
      }
      const lastIndex = Math.floor((end - 1) / this.perBlock);
      if (lastIndex >= this.reftableEntries) {
        await this.grow(end);
        continue;
      }
      const missing: number[] = [];
      for (let index = Math.floor(p / this.perBlock); index <= lastIndex; index++) if (this.blockOffset(index) === 0) missing.push(index);
      if (missing.length > extra) {
        extra = missing.length;
        continue;
      }
      // Refcount blocks for the run go right after it, in the order QEMU places them: a block
      // for index i goes to the next cluster q; when q lies in another missing block's range,
      // that block comes next (q+1) and counts q.
      const wanted = new Set(missing);
      const placed = new Map<number, number>();
      let slot = p + n;
      const place = (index: number): void => {
        if (placed.has(index)) return;
        const q = slot++;
        placed.set(index, q);
        const home = Math.floor(q / this.perBlock);
        if (home !== index && wanted.has(home)) place(home);
      };
      for (let index = Math.floor(p / this.perBlock); index <= Math.floor((p + n - 1) / this.perBlock); index++) if (wanted.has(index)) place(index);
      for (const index of missing) place(index);
      // Each new block must be counted by itself, by an existing block, or by a new block that
      // counts itself: then writing the table entries in two rounds (image.ts) never exposes a
      // block whose own count is not on disk. QEMU's order can make two new blocks count each
      // other (at a range boundary); then every block whose range holds a slot takes its first
      // slot (counting itself), and the others fill the remaining slots.
      const selfCounted = (index: number): boolean => Math.floor(placed.get(index)! / this.perBlock) === index;
      const sound = [...placed].every(([index, q]) => {
        const home = Math.floor(q / this.perBlock);
        return home === index || !wanted.has(home) || selfCounted(home);
      });
      if (!sound) {
        const slots = Array.from({ length: placed.size }, (_, i) => p + n + i);
        const taken = new Set<number>();
        placed.clear();
        for (const q of slots) {
          const home = Math.floor(q / this.perBlock);
          if (wanted.has(home) && !placed.has(home)) {
            placed.set(home, q);
            taken.add(q);
          }
        }
        const free = slots.filter((q) => !taken.has(q));
        for (const index of missing) if (!placed.has(index)) placed.set(index, free.shift()!);
      }
      this.guard?.(p, n + placed.size);
      for (const [index, q] of placed) {
        const offset = q * this.clusterSize;
        this.blocks.add(offset, Buffer.alloc(this.clusterSize));
        this.setBlockOffset(this.reftable, index, offset);
        this.dirtyReftable.add(index);
      }
      const used = n + placed.size;
      await this.change(p, used, 1);
      const fresh = p >= this.freshFrom;
      this.freshFrom = Math.max(this.freshFrom, p + used);
      this.imageEnd = Math.max(this.imageEnd, p + used);
      return { cluster: p, fresh };
    }
    throw new BlkrepError('ERR_INTERNAL', `qcow2: could not place ${n} clusters in ${this.path}`);
  }

  /** The first run of `n` clusters with refcount 0 at or after the hint. */
  private async findFree(n: number): Promise<number> {
    // Runs of `tail.n` clusters or more were last found only at `tail.from` (the free space at
    // the end): start there, rather than rescanning a fragmented image for every large write.
    const fromTail = n >= this.tail.n && this.tail.from > this.hint;
    let c = fromTail ? this.tail.from : this.hint;
    let runStart = -1;
    let runLength = 0;
    let allUsed = !fromTail;
    while (c < this.imageEnd) {
      const index = Math.floor(c / this.perBlock);
      const blockEnd = Math.min(this.imageEnd, (index + 1) * this.perBlock);
      const offset = this.blockOffset(index);
      if (offset === 0) {
        if (runStart < 0) runStart = c;
        runLength += blockEnd - c;
        if (allUsed) {
          this.hint = c;
          allUsed = false;
        }
        if (runLength >= n) return runStart;
        c = blockEnd;
        continue;
      }
      const t = await this.block(offset);
      for (; c < blockEnd; c++) {
        if (getRefcount(t.buf, c % this.perBlock, this.order) === 0) {
          if (allUsed) {
            this.hint = c;
            allUsed = false;
          }
          if (runStart < 0) runStart = c;
          if (++runLength >= n) return runStart;
        } else {
          runStart = -1;
          runLength = 0;
        }
      }
    }
    if (allUsed) this.hint = this.imageEnd;
    const at = runStart >= 0 ? runStart : this.imageEnd;
    // no run of n lies below `at`; smaller runs may, so only a smaller or equal n narrows it
    if (n <= this.tail.n) this.tail = { n, from: at };
    return at;
  }

  /** Capture dirty blocks and reftable entries for a writeback cycle. */
  captureBlocks() {
    return this.blocks.dirtyTables().map((t) => t.capture());
  }

  captureReftable(): { gen: number; entries: Array<[number, Buffer]> } {
    const entries: Array<[number, Buffer]> = [];
    for (const index of this.dirtyReftable) entries.push([index, Buffer.from(this.reftable.subarray(index * 8, index * 8 + 8))]);
    this.dirtyReftable.clear();
    return { gen: this.reftableGen, entries };
  }

  /** Write captured reftable entries (their blocks are durable). Caller holds the mutex. */
  /**
   * Write captured reftable entries (their blocks are durable), each only once the block that
   * counts the block it points to is reachable: entries of blocks counted by themselves or by
   * blocks already in the table first, then a sync, then the entries of blocks counted by those.
   * The caller holds the mutex and syncs after the last round.
   */
  async writeReftable(captured: { gen: number; entries: Array<[number, Buffer]> }): Promise<void> {
    if (captured.gen !== this.reftableGen) return; // the table moved: the new one has them all
    let remaining = captured.entries;
    while (remaining.length > 0) {
      const pending = new Set(remaining.map(([index]) => index));
      const homeOf = (bytes: Buffer): number => Math.floor(Number(bytes.readBigUInt64BE(0) & ~0x1ffn) / this.clusterSize / this.perBlock);
      let round = remaining.filter(([index, bytes]) => homeOf(bytes) === index || !pending.has(homeOf(bytes)));
      if (round.length === 0) round = remaining; // cannot happen with allocate()'s placement
      await Promise.all(round.map(([index, bytes]) => this.file.write(this.reftableOffset + index * 8, bytes)));
      remaining = remaining.filter((e) => !round.includes(e));
      if (remaining.length > 0) await this.file.sync();
    }
  }

  /** Put captured entries back after a failed cycle. */
  restoreReftable(captured: { gen: number; entries: Array<[number, Buffer]> }): void {
    if (captured.gen !== this.reftableGen) return;
    for (const [index] of captured.entries) this.dirtyReftable.add(index);
  }

  /** Write every dirty refcount block now (always safe, see the file comment). */
  async writeAllBlocks(): Promise<void> {
    await Promise.all(this.captureBlocks().map((c) => c.table.write(this.file, c)));
  }

  /**
   * Grow the refcount table so that clusters below `coverEnd` can be counted: a new table and
   * the blocks it needs, in an area at the end of the image that they describe themselves;
   * then switch the header (synced) and free the old table.
   */
  private async grow(coverEnd: number): Promise<void> {
    const cs = this.clusterSize;
    const perCluster = cs / 8;
    const old = { offset: this.reftableOffset, clusters: this.reftableClusters, entries: this.reftableEntries };
    // The new table copies the in-memory entries: their blocks must be on disk first.
    await this.writeAllBlocks();
    await this.file.sync();

    const areaStart = Math.max(this.imageEnd, coverEnd);
    const roundUp = (entries: number): number => Math.ceil(entries / perCluster) * perCluster;
    let entries = roundUp(Math.max(Math.ceil(coverEnd / this.perBlock), old.entries + Math.ceil(old.entries / 2)));
    let newBlocks: number[] = [];
    for (;;) {
      const tableClusters = entries / perCluster;
      // the area: new blocks then the table; blocks for every index covering it that has none
      let blocks: number[] = [];
      for (let k = 0; k < 8; k++) {
        const areaEnd = areaStart + blocks.length + tableClusters;
        const next: number[] = [];
        for (let index = Math.floor(areaStart / this.perBlock); index <= Math.floor((areaEnd - 1) / this.perBlock); index++) {
          if (index >= old.entries || this.blockOffset(index) === 0) next.push(index);
        }
        if (next.length === blocks.length) break;
        blocks = next;
      }
      const areaEnd = areaStart + blocks.length + tableClusters;
      const needed = roundUp(Math.max(Math.ceil(areaEnd / this.perBlock), Math.ceil(coverEnd / this.perBlock)));
      if (needed <= entries) {
        newBlocks = blocks;
        break;
      }
      entries = needed;
    }
    if (entries * 8 > MAX_REFTABLE_BYTES) {
      throw new BlkrepError('ERR_NO_SPACE', `qcow2 image ${this.path}: the refcount table would need ${entries * 8} bytes, above the limit of ${MAX_REFTABLE_BYTES}`, {
        errno: 'ENOSPC',
      });
    }
    const tableClusters = entries / perCluster;
    const tableStart = areaStart + newBlocks.length;
    const areaEnd = tableStart + tableClusters;
    this.guard?.(areaStart, areaEnd - areaStart);

    const table = Buffer.alloc(entries * 8);
    this.reftable.copy(table);
    const fresh = new Map<number, Buffer>();
    newBlocks.forEach((index, j) => {
      const offset = (areaStart + j) * cs;
      this.setBlockOffset(table, index, offset);
      fresh.set(index, Buffer.alloc(cs));
    });
    // count the area: in its own new blocks, or in existing ones (written below)
    const touched = new Set<Table>();
    for (let c = areaStart; c < areaEnd; c++) {
      const index = Math.floor(c / this.perBlock);
      const buf = fresh.get(index);
      if (buf) {
        setRefcount(buf, c % this.perBlock, this.order, 1);
      } else {
        const t = await this.block(this.blockOffset(index));
        setRefcount(t.buf, c % this.perBlock, this.order, 1);
        t.touch();
        touched.add(t);
      }
    }
    await Promise.all([
      ...[...touched].map((t) => t.write(this.file, t.capture())),
      ...newBlocks.map((index, j) => this.file.write((areaStart + j) * cs, fresh.get(index)!)),
      this.file.write(tableStart * cs, table),
    ]);
    await this.file.sync();
    const fields = Buffer.alloc(12);
    fields.writeBigUInt64BE(BigInt(tableStart * cs), 0);
    fields.writeUInt32BE(tableClusters, 8);
    await this.file.write(H.refcountTableOffset, fields);
    await this.file.sync();

    // switched: the new blocks join the cache clean, the old table is free
    this.reftable = table;
    this.reftableOffset = tableStart * cs;
    this.reftableClusters = tableClusters;
    this.reftableGen++;
    this.dirtyReftable.clear();
    newBlocks.forEach((index, j) => {
      const t = this.blocks.add((areaStart + j) * cs, fresh.get(index)!);
      t.writtenGen = t.gen;
    });
    this.imageEnd = Math.max(this.imageEnd, areaEnd);
    this.freshFrom = Math.max(this.freshFrom, areaEnd);
    const freed = await this.change(old.offset / cs, old.clusters, -1);
    for (const c of freed) await this.file.punch(c * cs, cs);
  }

  /** Replace the whole refcount state (make-empty). */
  reset(state: { reftableOffset: number; reftableClusters: number; reftable: Buffer; imageEnd: number; freshFrom: number }): void {
    this.blocks.clear();
    this.reftableOffset = state.reftableOffset;
    this.reftableClusters = state.reftableClusters;
    this.reftable = state.reftable;
    this.reftableGen++;
    this.dirtyReftable.clear();
    this.imageEnd = state.imageEnd;
    this.freshFrom = state.freshFrom;
    this.hint = 0;
    this.tail = { n: Infinity, from: 0 };
  }
}
