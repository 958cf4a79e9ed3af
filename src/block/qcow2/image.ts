/**
 * The metadata of an open qcow2 image: header, L1/L2 mapping, refcounts, and the writeback cycle
 * that puts changes on disk in the order B.5 requires. The data path is in node.ts.
 *
 * Writeback cycle (flush(), FUA, close, or when the caches fill up). The cycle captures every
 * dirty table at one instant, then:
 *   1. writes refcount blocks, fsync          — new clusters are counted, their data is durable
 *   2. writes new refcount table entries, fsync (only after blocks were added; in two rounds
 *      when a new block is counted by another new block)
 *   3. writes L2 tables, fsync                — now pointing at counted, written clusters
 *   4. writes L1 entries, fsync (only after L2 tables were added)
 *   5. applies the refcount decrements of clusters whose last pointer it just removed (in memory;
 *      the next cycle writes them), after the requests that might still use them have finished.
 * Without changes a cycle costs nothing; overwrites of allocated clusters cost one fsync, new
 * allocations two.
 */
import { BlkrepError } from '../../api/errors.js';
import type { Qcow2Container } from './file.js';
import {
  AUTOCLEAR_BITMAPS,
  checkFeatures,
  COMPAT_LAZY_REFCOUNTS,
  corrupt,
  H,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  l1EntriesFor,
  MAX_BITMAP_DIRECTORY_BYTES,
  MAX_L1_BYTES,
  MAX_SNAPSHOT_TABLE_BYTES,
  parseBitmapDirectory,
  readHeader,
  parseSnapshots,
  unsupported,
  type BitmapInfo,
  type Qcow2Header,
  type SnapshotInfo,
} from './format.js';
import { Mutex, RangeLock, RequestGate } from './locks.js';
import { ClusterMap, Kind } from './mapping.js';
import { Refcounts, setRefcount } from './refcounts.js';
import { validateLayout } from './validate.js';

export interface ImageOptions {
  readOnly: boolean;
  /** bytes of L2 tables to cache (default 16 MiB) */
  l2CacheBytes?: number;
  /** bytes of refcount blocks to cache (default 4 MiB) */
  refcountCacheBytes?: number;
  /**
   * The caller edits the bitmaps itself and writes no guest data (bitmaps.ts): autoclear bit 0
   * is left as it is on a read-write open.
   */
  keepBitmaps?: boolean;
  /** where warnings go (a read-only open of an image with an unsound layout); default stderr */
  onWarning?: (message: string) => void;
  /** make-empty keeps the file's length for reuse (Qcow2Image.keepSpaceOnEmpty) */
  keepSpaceOnEmpty?: boolean;
}

function warnStderr(message: string): void {
  process.stderr.write(`blkrep: warning: ${message}\n`);
}

export const DEFAULT_L2_CACHE = 16 * 1024 * 1024;
export const DEFAULT_REFCOUNT_CACHE = 4 * 1024 * 1024;
/** writeback cycles of every image of this process (count, time): for BLKREP_CBW_STATS (cbw-filter.ts) */
export const cycleStats = { cycles: 0, ms: 0 };
/** a writeback cycle starts on its own once this many frees wait */
const FREES_BEFORE_WRITEBACK = 4096;

export class Qcow2Image {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly map: ClusterMap;
  /** undefined when read-only */
  readonly refcounts: Refcounts | undefined;
  readonly metaLock = new Mutex();
  readonly cycleLock = new Mutex();
  readonly gate: RequestGate = new GuardedGate(() => this.bitmapsGuard());
  readonly ranges = new RangeLock();
  /** host byte ranges whose last pointer was removed in memory: decremented after writeback */
  pendingFrees: Array<[number, number]> = [];
  /** data was written since the last fsync */
  unsynced = false;
  /**
   * Autoclear bit 0 waits to be cleared (a read-write open found an enabled, consistent bitmap):
   * before the first request, unless adoptBitmaps() says someone tracks them (src/bitmap/qcow2-live.ts).
   */
  private autoclearPending: Promise<void> | 'pending' | undefined;
  /**
   * Set when a write would have landed on metadata (QEMU's overlap check): the image is marked
   * corrupt on disk and nothing more is written to it; every later write and flush fails with it.
   */
  corruption: BlkrepError | undefined;
  private marking: Promise<void> | undefined;
  /**
   * make-empty (without bitmaps) keeps the file's length: the clusters it frees are reused by
   * the next allocations (from the first free one on) instead of being truncated away and
   * allocated again past the end of the file, so a file emptied over and over (the pair's hidden
   * disk, at each checkpoint) writes into blocks the filesystem has already allocated and
   * written (no block allocation at writeback, no truncate and its discards). The file
   * is cut back to what the last round of allocations reached (never below the metadata that
   * stays) only when that was under a quarter of it.
   */
  keepSpaceOnEmpty = false;
  private cycleRunning: Promise<void> | undefined;
  private cycleQueued: Promise<void> | undefined;

  private constructor(
    readonly file: Qcow2Container,
    readonly path: string,
    readonly header: Qcow2Header,
    readonly readOnly: boolean,
    l1: Buffer,
    refcounts: Refcounts | undefined,
    readonly snapshots: SnapshotInfo[],
    public bitmaps: BitmapInfo[],
    l2CacheBytes: number,
  ) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.map = new ClusterMap(file, path, header.clusterBits, header.l1TableOffset, l1, l2CacheBytes);
    this.refcounts = refcounts;
    if (refcounts) refcounts.guard = (first, count) => this.guardAllocation(first, count);
    this.map.fail = (what, details) => this.signalCorruption(what, details);
  }

  static async open(file: Qcow2Container, options: ImageOptions): Promise<Qcow2Image> {
    const path = file.path;
    const readOnly = options.readOnly;
    const header = await readHeader(file);
    checkFeatures(path, header, readOnly);
    const cs = 2 ** header.clusterBits;

    const l1 = Buffer.alloc(header.l1Size * 8);
    if (l1.length > 0) await file.read(header.l1TableOffset, l1);

    let snapshots: SnapshotInfo[] = [];
    if (header.nbSnapshots > 0) {
      if (header.snapshotsOffset >= file.length) {
        throw corrupt(path, `snapshot table at ${header.snapshotsOffset} lies past the end of the file (${file.length} bytes)`, { snapshotsOffset: header.snapshotsOffset });
      }
      const table = Buffer.alloc(Math.min(MAX_SNAPSHOT_TABLE_BYTES, file.length - header.snapshotsOffset));
      await file.read(header.snapshotsOffset, table);
      snapshots = parseSnapshots(path, header, table);
    }

    let bitmaps: BitmapInfo[] = [];
    if (header.bitmaps) {
      const { directoryOffset, directorySize } = header.bitmaps;
      if (directorySize > MAX_BITMAP_DIRECTORY_BYTES || directoryOffset + directorySize > file.length) {
        throw corrupt(path, `bitmap directory at ${directoryOffset} of ${directorySize} bytes lies past the end of the file (${file.length} bytes)`, { directoryOffset, directorySize });
      }
      const dir = Buffer.alloc(directorySize);
      await file.read(directoryOffset, dir);
      bitmaps = parseBitmapDirectory(path, header.bitmaps, dir);
    }

    // the whole refcount table (≤ 8 MiB, parseHeader bounds it): its blocks are part of the layout
    const reftable = Buffer.alloc(header.refcountTableClusters * cs);
    await file.read(header.refcountTableOffset, reftable);
    const snapshotTableBytes = snapshots.reduce((n, s) => n + s.entryBytes, 0);
    validateLayout(path, { header, fileLength: file.length, l1, reftable, snapshots, snapshotTableBytes, bitmaps }, readOnly, options.onWarning ?? warnStderr);

    let refcounts: Refcounts | undefined;
    if (!readOnly) {
      refcounts = new Refcounts({
        file,
        path,
        clusterBits: header.clusterBits,
        refcountOrder: header.refcountOrder,
        reftableOffset: header.refcountTableOffset,
        reftableClusters: header.refcountTableClusters,
        reftable,
        cacheBytes: options.refcountCacheBytes ?? DEFAULT_REFCOUNT_CACHE,
      });
      await refcounts.init();
    }
    const image = new Qcow2Image(file, path, header, readOnly, l1, refcounts, snapshots, bitmaps, options.l2CacheBytes ?? DEFAULT_L2_CACHE);
    image.keepSpaceOnEmpty = options.keepSpaceOnEmpty ?? false;
    if (!readOnly && !options.keepBitmaps) await image.clearAutoclear();
    return image;
  }

  /**
   * The caller records every write into each enabled, consistent bitmap, marks them in use and
   * stores them at close (src/bitmap/qcow2-live.ts): autoclear bit 0 stays set. Only before the
   * first request; false when it is too late (the bit is gone or going).
   */
  adoptBitmaps(): boolean {
    if (this.autoclearPending === 'pending') this.autoclearPending = undefined;
    return this.autoclearPending === undefined && (this.header.autoclear & AUTOCLEAR_BITMAPS) !== 0n;
  }

  /**
   * Before any request or whole-image change (not close: nothing was written then): clear
   * autoclear bit 0 if it still waits to be.
   */
  private bitmapsGuard(): Promise<void> | undefined {
    if (this.autoclearPending === undefined) return undefined;
    if (this.autoclearPending === 'pending') this.autoclearPending = this.dropBitmapsBit();
    return this.autoclearPending;
  }

  private async dropBitmapsBit(): Promise<void> {
    const h = this.header;
    const next = h.autoclear & ~AUTOCLEAR_BITMAPS;
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(next);
    await this.file.write(H.autoclear, field);
    await this.file.sync();
    h.autoclear = next;
    h.bitmaps = undefined;
    this.bitmaps = [];
  }

  /**
   * A writer must clear the autoclear bits it does not understand (B.1). Bit 0 says the bitmaps
   * are consistent: we do not record writes into bitmaps, so it is cleared when a bitmap is
   * enabled ("auto", it would miss our writes) and kept when every bitmap is disabled or already
   * in use (our writes change nothing for those, as with QEMU). The extension itself is never
   * touched; QEMU drops it on its next header update once the bit is clear. With an enabled
   * bitmap, bit 0 is cleared before the first request (bitmapsGuard), so that a daemon that
   * tracks the bitmaps can keep it (adoptBitmaps).
   */
  private async clearAutoclear(): Promise<void> {
    const h = this.header;
    let keep = 0n;
    if (h.autoclear & AUTOCLEAR_BITMAPS && h.bitmaps) {
      keep |= AUTOCLEAR_BITMAPS;
      if (this.bitmaps.some((b) => b.enabled && !b.inUse)) this.autoclearPending = 'pending';
    }
    const next = h.autoclear & keep;
    if (next === h.autoclear) return;
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(next);
    await this.file.write(H.autoclear, field);
    await this.file.sync();
    h.autoclear = next;
    if (!(next & AUTOCLEAR_BITMAPS)) {
      h.bitmaps = undefined;
      this.bitmaps = [];
    }
  }

  get size(): number {
    return this.header.size;
  }

  /** The refcounts, or an error for writes to a read-only image. */
  get rc(): Refcounts {
    if (!this.refcounts) throw new BlkrepError('ERR_READ_ONLY', `${this.path} is open read-only`, { errno: 'EPERM' });
    return this.refcounts;
  }

  /**
   * The L2 table for L1 index i, created when missing and owned (COPIED) by the active L1, so its
   * entries may be changed in place. Callers re-acquire it with map.table() before changing it.
   */
  async ownedTable(i: number): Promise<void> {
    const { offset, copied } = this.map.l1Entry(i);
    if (offset !== 0 && copied) return;
    await this.metaLock.run(async () => {
      const now = this.map.l1Entry(i);
      if (now.offset === 0) {
        const a = await this.rc.allocate(1);
        const at = a.cluster * this.clusterSize;
        this.map.l2.add(at, Buffer.alloc(this.clusterSize));
        this.map.setL1(i, at, true);
        return;
      }
      if (!now.copied) {
        const count = await this.rc.refcount(now.offset / this.clusterSize);
        if (count !== 1) {
          throw unsupported(this.path, 'shared L2 table', `L2 table at ${now.offset} (L1 index ${i}) is shared (refcount ${count}); writing to shared tables is not supported`, {
            l1Index: i,
            refcount: count,
          });
        }
        this.map.setL1(i, now.offset, true);
      }
    });
  }

  /**
   * What metadata occupies host cluster `c`, or undefined (QEMU's overlap-check=cached: header,
   * L1, refcount table and blocks, active L2 tables, snapshot table and L1s, bitmap directory and
   * tables). `self` leaves out one kind: the table being written.
   */
  metadataAt(c: number, self?: 'l2' | 'refblock'): string | undefined {
    if (c === 0) return 'the header';
    const cs = this.clusterSize;
    const inside = (start: number, bytes: number): boolean => bytes > 0 && c >= Math.floor(start / cs) && c < Math.ceil((start + bytes) / cs);
    const h = this.header;
    if (inside(this.map.l1Offset, this.map.l1Size * 8)) return 'the L1 table';
    const rc = this.refcounts;
    if (rc && inside(rc.reftableOffset, rc.reftableClusters * cs)) return 'the refcount table';
    if (h.nbSnapshots > 0 && inside(h.snapshotsOffset, Math.max(1, this.snapshots.reduce((n, s) => n + s.entryBytes, 0)))) return 'the snapshot table';
    for (const s of this.snapshots) if (inside(s.l1TableOffset, s.l1Size * 8)) return `the L1 table of snapshot "${s.id}"`;
    if (h.bitmaps && inside(h.bitmaps.directoryOffset, h.bitmaps.directorySize)) return 'the bitmap directory';
    for (const b of this.bitmaps) if (inside(b.tableOffset, b.tableSize * 8)) return `the table of bitmap "${b.name}"`;
    if (self !== 'refblock' && rc?.isBlock(c)) return 'a refcount block';
    if (self !== 'l2' && this.map.isL2(c)) return 'an L2 table';
    return undefined;
  }

  /** A host cluster about to be written in place must be a data cluster inside the image. */
  checkDataCluster(host: number, l2Offset: number, index: number): void {
    const rc = this.refcounts;
    if (!rc) return;
    if (this.corruption) throw this.corruption;
    const c = host / this.clusterSize;
    const what = c >= rc.imageEnd ? `past the end of the image (${rc.imageEnd * this.clusterSize} bytes)` : this.metadataAt(c);
    if (what) {
      throw this.signalCorruption(`data cluster ${host} (L2 table at ${l2Offset}, index ${index}) points into ${what}: writing there was refused`, { host, l2Offset, index });
    }
  }

  /** Clusters [first, first+count) about to be allocated (their refcounts say free) must hold no metadata. */
  guardAllocation(first: number, count: number): void {
    if (this.corruption) throw this.corruption;
    for (let c = first; c < first + count; c++) {
      const what = this.metadataAt(c);
      if (what) {
        throw this.signalCorruption(`cluster ${c} (offset ${c * this.clusterSize}) holds ${what} but its refcount is 0: allocating it for new data was refused`, {
          cluster: c,
          offset: c * this.clusterSize,
          metadata: what,
        });
      }
    }
  }

  /** A metadata table about to be written back must not lie on other metadata. */
  private guardTable(offset: number, kind: 'l2' | 'refblock'): void {
    const what = this.metadataAt(offset / this.clusterSize, kind);
    if (what) {
      const name = kind === 'l2' ? 'an L2 table' : 'a refcount block';
      throw this.signalCorruption(`${name} at offset ${offset} lies on ${what}: writing it was refused`, { offset, metadata: what });
    }
  }

  /**
   * QEMU's qcow2_signal_corruption: mark the image corrupt on disk (incompatible bit 1, synced),
   * write nothing else to it from now on; returns the error for the request that found it.
   */
  signalCorruption(what: string, details: Record<string, unknown>): BlkrepError {
    if (this.readOnly) return corrupt(this.path, what, details, 'EIO');
    const err = corrupt(
      this.path,
      `${what}; the image is marked corrupt (incompatible feature bit 1) and nothing more is written to it; repair it with "blkrep check --repair all ${this.path}" or "qemu-img check -r all ${this.path}"`,
      details,
      'EIO',
    );
    if (!this.corruption) {
      this.corruption = err;
      this.marking = this.markCorrupt().catch(() => {
        // the in-memory state refuses writes whether or not the bit reached the disk
      });
    }
    return err;
  }

  private async markCorrupt(): Promise<void> {
    if (this.header.version !== 3) return;
    const next = this.header.incompatible | INCOMPAT_CORRUPT;
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(next);
    await this.file.write(H.incompatible, field);
    await this.file.sync();
    this.header.incompatible = next;
  }

  // -----------------------------------------------------------------------------------------------
  // writeback

  /** Make every completed write durable, with the metadata it needs. Concurrent calls share cycles. */
  flush(): Promise<void> {
    if (this.readOnly) return Promise.resolve();
    if (this.cycleQueued) return this.cycleQueued;
    if (!this.cycleRunning) return this.startCycle();
    this.cycleQueued = this.cycleRunning
      .catch(() => {})
      .then(() => {
        this.cycleQueued = undefined;
        return this.startCycle();
      });
    return this.cycleQueued;
  }

  private startCycle(): Promise<void> {
    const p = this.cycleLock.run(() => this.writeback());
    this.cycleRunning = p;
    p.catch(() => {}).finally(() => {
      if (this.cycleRunning === p) this.cycleRunning = undefined;
    });
    return p;
  }

  /** Start a cycle in the background when the caches are full of dirty tables. */
  maybeWriteback(): void {
    if (this.readOnly || this.cycleRunning || this.cycleQueued) return;
    const rc = this.rc;
    if (this.map.l2.overBudget || rc.blocks.overBudget || this.pendingFrees.length >= FREES_BEFORE_WRITEBACK) {
      this.flush().catch(() => {
        // the tables stay dirty; the next flush() reports the error
      });
    }
  }

  get dirty(): boolean {
    const rc = this.refcounts;
    if (!rc) return false;
    return this.unsynced || this.pendingFrees.length > 0 || this.map.dirtyL1.size > 0 || rc.dirtyReftable.size > 0 || this.map.l2.dirtyCount() > 0 || rc.blocks.dirtyCount() > 0;
  }

  /** One writeback cycle; the caller holds cycleLock. */
  async writeback(): Promise<void> {
    const t0 = performance.now();
    try {
      await this.writebackOnce();
    } finally {
      cycleStats.cycles++;
      cycleStats.ms += performance.now() - t0;
    }
  }

  private async writebackOnce(): Promise<void> {
    if (this.corruption) throw this.corruption;
    const rc = this.rc;
    const blocks = rc.captureBlocks();
    const reftable = rc.captureReftable();
    const l2 = this.map.l2.dirtyTables().map((t) => t.capture());
    const l1 = this.map.captureL1();
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    const data = this.unsynced;
    this.unsynced = false;
    const epoch = this.gate.advance();
    try {
      for (const c of blocks) this.guardTable(c.table.offset, 'refblock');
      for (const c of l2) this.guardTable(c.table.offset, 'l2');
      if (blocks.length > 0) await Promise.all(blocks.map((c) => c.table.write(this.file, c)));
      if (blocks.length > 0 || data) await this.file.sync();
      if (reftable.entries.length > 0) {
        await this.metaLock.run(() => rc.writeReftable(reftable));
        await this.file.sync();
      }
      if (l2.length > 0) {
        await Promise.all(l2.map((c) => c.table.write(this.file, c)));
        await this.file.sync();
      }
      if (l1.length > 0) {
        await this.map.writeL1(l1);
        await this.file.sync();
      }
    } catch (err) {
      for (const c of blocks) c.table.markDirty();
      rc.restoreReftable(reftable);
      for (const c of l2) c.table.markDirty();
      for (const [i] of l1) this.map.dirtyL1.add(i);
      this.pendingFrees.push(...frees);
      this.unsynced = true;
      throw err;
    }
    if (frees.length > 0) await this.applyFrees(frees, epoch);
    this.map.l2.trim();
    rc.blocks.trim();
  }

  /** Decrement the refcounts of freed ranges (their pointers are gone on disk). */
  private async applyFrees(frees: Array<[number, number]>, epoch: number): Promise<void> {
    await this.gate.drain(epoch);
    const rc = this.rc;
    const cs = this.clusterSize;
    await this.metaLock.run(async () => {
      const counts = new Map<number, number>();
      for (const [start, length] of frees) {
        for (let c = Math.floor(start / cs); c <= Math.floor((start + length - 1) / cs); c++) counts.set(c, (counts.get(c) ?? 0) + 1);
      }
      // A crafted entry can point into metadata (a compressed cluster on the header): the
      // metadata keeps its count and its bytes (QEMU would drop the count to 0 and leave a
      // corruption for check; punching it would destroy the header).
      const clusters = [...counts.keys()].filter((c) => this.metadataAt(c) === undefined).sort((a, b) => a - b);
      // Give the space back before the clusters can be reused (nothing reads them any more).
      const freed: number[] = [];
      for (const c of clusters) if ((await rc.refcount(c)) <= counts.get(c)!) freed.push(c);
      for (let i = 0; i < freed.length; ) {
        let j = i + 1;
        while (j < freed.length && freed[j] === freed[j - 1]! + 1) j++;
        await this.file.punch(freed[i]! * cs, (j - i) * cs);
        i = j;
      }
      for (const c of clusters) await rc.change(c, 1, -counts.get(c)!);
    });
  }

  /** Cycles until nothing is dirty (close, make-empty). The caller holds cycleLock. */
  async writebackAll(): Promise<void> {
    if (this.corruption) {
      await this.marking;
      return;
    }
    for (let i = 0; i < 4 && this.dirty; i++) await this.writeback();
  }

  // -----------------------------------------------------------------------------------------------
  // make-empty and resize (exclusive: no request in flight)

  /**
   * Every guest cluster unallocated (B.8). Without bitmaps: drop the L1 table and rebuild the
   * refcounts of what is left (header, L1, refcount table and blocks), then give the rest of the
   * file back. Crash safe without the dirty bit: the L1 is zeroed (and synced) first, so from then
   * on nothing but metadata is referenced and every refcount change is a decrement of a leak.
   * With bitmaps (whose clusters must stay): discard cluster by cluster, like QEMU's slow path.
   */
  async makeEmpty(): Promise<void> {
    await this.bitmapsGuard();
    await this.gate.exclusive(() =>
      this.cycleLock.run(async () => {
        if (this.header.hasBitmapsExtension) await this.emptySlow();
        else await this.emptyFast();
      }),
    );
  }

  private async emptySlow(): Promise<void> {
    for (let i = 0; i < this.map.l1Size; i++) {
      if (this.map.l1Entry(i).offset === 0) continue;
      await this.ownedTable(i);
      const t = (await this.map.table(i))!;
      for (let j = 0; j < this.map.l2Entries; j++) {
        const e = this.map.entry(t, j);
        if (e.kind === Kind.Unallocated) continue;
        const range = this.map.hostRange(e);
        if (range) this.pendingFrees.push(range);
        this.map.setEntry(t, j, Kind.Unallocated, 0);
      }
    }
    await this.writebackAll();
  }

  private async emptyFast(): Promise<void> {
    const rc = this.rc;
    const cs = this.clusterSize;
    const l1Bytes = this.map.l1Size * 8;
    const l1Offset = this.map.l1Offset;
    if (l1Bytes > 0 && l1Offset < this.file.length) {
      await this.file.write(l1Offset, Buffer.alloc(Math.min(l1Bytes, this.file.length - l1Offset)));
      await this.file.sync();
    }
    // what stays: header, L1, refcount table, and the refcount blocks that count them
    const live = new Set<number>([0]);
    const addRange = (offset: number, bytes: number): void => {
      for (let c = offset / cs; c < Math.ceil((offset + bytes) / cs); c++) live.add(c);
    };
    if (l1Bytes > 0) addRange(l1Offset, l1Bytes);
    addRange(rc.reftableOffset, rc.reftableClusters * cs);
    const kept = new Map<number, number>(); // reftable index → block offset
    for (let changed = true; changed; ) {
      changed = false;
      for (const c of [...live]) {
        const index = Math.floor(c / rc.perBlock);
        if (kept.has(index)) continue;
        const offset = rc.blockOffset(index);
        if (offset === 0) throw corrupt(this.path, `cluster ${c} holds metadata but has no refcount block (index ${index})`, { cluster: c, index }, 'EIO');
        kept.set(index, offset);
        live.add(offset / cs);
        changed = true;
      }
    }
    const reftable = Buffer.alloc(rc.reftable.length);
    const blocks = new Map<number, Buffer>();
    for (const [index, offset] of kept) {
      rc.reftable.copy(reftable, index * 8, index * 8, index * 8 + 8);
      blocks.set(offset, Buffer.alloc(cs));
    }
    for (const c of live) setRefcount(blocks.get(kept.get(Math.floor(c / rc.perBlock))!)!, c % rc.perBlock, rc.order, 1);
    await Promise.all([...[...blocks].map(([offset, buf]) => this.file.write(offset, buf)), this.file.write(rc.reftableOffset, reftable)]);
    await this.file.sync();

    const end = Math.max(...live) + 1;
    // From here on nothing but the live metadata is referenced (L1 zeroed, refcounts rebuilt,
    // both synced): every other cluster of the file may be reused or given back.
    let keep = end;
    if (this.keepSpaceOnEmpty) {
      const fileClusters = Math.ceil(this.file.length / cs);
      // rc.imageEnd: how far allocations reached since the last make-empty (since the open: the
      // whole file, as init() counts it)
      const reached = Math.max(end, rc.imageEnd);
      keep = reached * 4 < fileClusters ? reached : Math.max(end, fileClusters);
    }
    if (this.file.length > keep * cs) await this.file.truncate(keep * cs);
    if (!this.keepSpaceOnEmpty) {
      const sorted = [...live].sort((a, b) => a - b);
      for (let i = 0; i + 1 < sorted.length; i++) {
        if (sorted[i + 1]! > sorted[i]! + 1) await this.file.punch((sorted[i]! + 1) * cs, (sorted[i + 1]! - sorted[i]! - 1) * cs);
      }
    }

    this.map.l1.fill(0);
    this.map.invalidateL2Set();
    this.map.dirtyL1.clear();
    this.map.l2.clear();
    this.pendingFrees = [];
    this.unsynced = false;
    // imageEnd: every cluster from `end` on is free, so allocations fill the kept space from its
    // start; freshFrom: the kept clusters hold old bytes (not zeros)
    rc.reset({ reftableOffset: rc.reftableOffset, reftableClusters: rc.reftableClusters, reftable, imageEnd: end, freshFrom: keep });
    for (const [offset, buf] of blocks) {
      const t = rc.blocks.add(offset, buf);
      t.writtenGen = t.gen;
    }
  }

  /** Grow the virtual size (B.3: the L1 table grows when needed, QEMU's way). */
  async resize(size: number): Promise<void> {
    await this.bitmapsGuard();
    if (!Number.isSafeInteger(size) || size < this.header.size || size % 512 !== 0) {
      throw new BlkrepError('ERR_USAGE', `cannot resize ${this.path} from ${this.header.size} to ${size} bytes: only growing to a multiple of 512 is supported`, {
        errno: 'EINVAL',
        details: { size, current: this.header.size },
      });
    }
    const rc = this.rc;
    await this.gate.exclusive(() =>
      this.cycleLock.run(async () => {
        await this.writebackAll();
        const cs = this.clusterSize;
        const need = l1EntriesFor(size, this.clusterBits);
        if (need > this.map.l1Size) {
          if (need * 8 > MAX_L1_BYTES) {
            throw new BlkrepError('ERR_USAGE', `virtual size ${size} needs an L1 table of ${need * 8} bytes, above the limit of ${MAX_L1_BYTES}`, { errno: 'EINVAL' });
          }
          const a = await rc.allocate(Math.ceil((need * 8) / cs));
          await this.writebackAll(); // the new clusters are counted on disk before the header points there
          const l1 = Buffer.alloc(need * 8);
          this.map.l1.copy(l1);
          const at = a.cluster * cs;
          await this.file.write(at, l1);
          await this.file.sync();
          const fields = Buffer.alloc(12);
          fields.writeUInt32BE(need, 0);
          fields.writeBigUInt64BE(BigInt(at), 4);
          await this.file.write(H.l1Size, fields);
          await this.file.sync();
          const old = { offset: this.map.l1Offset, bytes: this.map.l1Size * 8 };
          this.map.l1 = l1;
          this.map.l1Offset = at;
          this.header.l1Size = need;
          this.header.l1TableOffset = at;
          if (old.bytes > 0) {
            const freed = await rc.change(old.offset / cs, Math.ceil(old.bytes / cs), -1);
            for (const c of freed) await this.file.punch(c * cs, cs);
          }
        }
        const field = Buffer.alloc(8);
        field.writeBigUInt64BE(BigInt(size));
        await this.file.write(H.size, field);
        await this.file.sync();
        this.header.size = size;
        await this.writebackAll();
      }),
    );
  }

  /** Everything `blkrep info` shows, shaped after `qemu-img info --output=json` where it can be. */
  info(): Record<string, unknown> {
    const h = this.header;
    const out: Record<string, unknown> = {
      format: 'qcow2',
      virtualSize: h.size,
      clusterSize: this.clusterSize,
      backingFile: h.backingFile,
      backingFormat: h.backingFormat,
      dirty: (h.incompatible & INCOMPAT_DIRTY) !== 0n,
      corrupt: (h.incompatible & INCOMPAT_CORRUPT) !== 0n,
      refcountBits: 2 ** h.refcountOrder,
      compat: h.version === 3 ? '1.1' : '0.10',
      lazyRefcounts: (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n,
      compressionType: 'zlib',
      extendedL2: false,
      fileLength: this.file.length,
      readOnly: this.readOnly,
    };
    if (this.snapshots.length > 0) {
      out.snapshots = this.snapshots.map((s) => ({ id: s.id, name: s.name, vmStateSize: s.vmStateSize, dateSeconds: s.dateSeconds, diskSize: s.diskSize }));
    }
    if (this.bitmaps.length > 0) out.bitmaps = this.bitmaps.map((b) => ({ name: b.name, granularity: b.granularity, flags: b.flags }));
    return out;
  }
}


/** A request gate that runs a guard (autoclear bit 0, above) before letting a request in. */
class GuardedGate extends RequestGate {
  constructor(private readonly guard: () => Promise<void> | undefined) {
    super();
  }
  override async begin(): Promise<number> {
    const g = this.guard();
    if (g) await g;
    return super.begin();
  }
}
