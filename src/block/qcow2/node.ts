/**
 * qcow2 — a qcow2 v3 image as a block node, over its file and an optional backing node (any
 * driver). Reads fall through unallocated clusters to the backing node (zeros past its end);
 * writes allocate clusters, copying the uncovered part of a partial cluster from what it showed
 * before (backing data, zeros, the old or compressed cluster).
 *
 * Concurrency: requests run concurrently. Writes to clusters that are allocated and owned
 * (COPIED) go straight to the file; anything that changes the mapping of a guest cluster holds a
 * range lock on it, and allocation holds the metadata mutex. Metadata is written back in ordered
 * cycles (image.ts), so flush() costs one or two fsyncs whatever the number of writes before it.
 */
import type { BlockNode, Capabilities, Extent, IoOptions, WriteOptions, ZeroOptions } from '../../api/block.js';
import { BlkrepError } from '../../api/errors.js';
import { MAX_PAYLOAD } from '../memory.js';
import type { ImageLock, LockPerms } from '../image-lock.js';
import type { SparseOps } from '../native.js';
import { checkRange, coalesceExtents } from '../node.js';
import { openImage, registerImageFormat } from '../formats.js';
import { resolveBackingSpec } from './backing-spec.js';
import { createQcow2, type Qcow2CreateOptions } from './create.js';

export { resolveBackingSpec } from './backing-spec.js';
import { HostFile, type Qcow2Container } from './file.js';
import { Qcow2Image } from './image.js';
import { Kind, type Entry } from './mapping.js';
import { isQcow2Header } from './probe.js';

export interface Qcow2OpenOptions {
  readOnly?: boolean;
  /**
   * The backing node. Default: open the image the header names (relative to the image's
   * directory, in the format its backing-format extension names) with `openBacking`.
   * null = no backing node, whatever the header says (unallocated clusters read as zeros).
   */
  backing?: BlockNode | null;
  /** opens a backing image read-only; default: openImage() (src/block/open.ts), through formats.ts */
  openBacking?: (spec: string, format: string | undefined) => Promise<BlockNode>;
  native?: SparseOps | null;
  /** the image lock on the file (src/block/image-lock.ts); default: a qcow2 image's; null: none */
  lock?: LockPerms | null;
  l2CacheBytes?: number;
  refcountCacheBytes?: number;
  /** where warnings go (a read-only open of an image whose layout is unsound); default stderr */
  onWarning?: (message: string) => void;
  /**
   * make-empty keeps the file's length and later allocations reuse it (Qcow2Image.keepSpaceOnEmpty;
   * the pair's hidden disk); default: the file is cut back to its metadata, as QEMU leaves it
   */
  keepSpaceOnEmpty?: boolean;
}

/** extents() stops after this many clusters (it may describe less than asked) */
const EXTENT_SCAN_CLUSTERS = 1 << 20;

export class Qcow2Node implements BlockNode {
  readonly driver = 'qcow2';
  readonly description: string;
  readonly limits = { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD };
  readonly caps: Capabilities;
  private readonly cs: number;
  private readonly l2e: number;
  private closing: Promise<void> | undefined;
  private closed = false;

  private constructor(
    readonly image: Qcow2Image,
    readonly backing: BlockNode | undefined,
  ) {
    this.description = image.path;
    this.cs = image.clusterSize;
    this.l2e = image.map.l2Entries;
    const rw = !image.readOnly;
    this.caps = {
      canWrite: rw,
      canFlush: true,
      canFua: rw,
      canTrim: rw,
      canZero: rw,
      canFastZero: rw,
      canMultiConn: true,
      canExtents: true,
      canCache: true,
      cheapExtents: backing === undefined || backing.caps.cheapExtents === true,
      allocationDepth: true,
    };
  }

  /**
   * Create a qcow2 v3 image as `qemu-img create -f qcow2` would (the file is replaced if it
   * exists). Opening it is a separate step.
   */
  static create(path: string, options: Qcow2CreateOptions = {}): Promise<void> {
    return createQcow2(path, options);
  }

  /** Open a qcow2 file, and its backing chain unless told otherwise. */
  static async open(path: string, options: Qcow2OpenOptions = {}): Promise<Qcow2Node> {
    const readOnly = options.readOnly ?? false;
    const file = await HostFile.open(path, {
      readOnly,
      ...(options.native === undefined ? {} : { native: options.native }),
      ...(options.lock === undefined ? {} : { lock: options.lock }),
    });
    return Qcow2Node.openContainer(file, options);
  }

  /** Open a qcow2 image in any container (tests use an in-memory one). Closes it on failure. */
  static async openContainer(file: Qcow2Container, options: Qcow2OpenOptions = {}): Promise<Qcow2Node> {
    let image: Qcow2Image;
    try {
      image = await Qcow2Image.open(file, {
        readOnly: options.readOnly ?? file.readOnly,
        ...(options.l2CacheBytes === undefined ? {} : { l2CacheBytes: options.l2CacheBytes }),
        ...(options.refcountCacheBytes === undefined ? {} : { refcountCacheBytes: options.refcountCacheBytes }),
        ...(options.onWarning === undefined ? {} : { onWarning: options.onWarning }),
        ...(options.keepSpaceOnEmpty === undefined ? {} : { keepSpaceOnEmpty: options.keepSpaceOnEmpty }),
      });
    } catch (err) {
      await file.close().catch(() => {});
      throw err;
    }
    let backing: BlockNode | undefined;
    try {
      if (options.backing !== undefined) {
        backing = options.backing ?? undefined;
      } else if (image.header.backingFile !== undefined) {
        const spec = resolveBackingSpec(file.path, image.header.backingFile);
        const opener = options.openBacking ?? defaultOpener;
        try {
          backing = await opener(spec, image.header.backingFormat);
        } catch (err) {
          const why = err instanceof Error ? err.message : String(err);
          throw new BlkrepError('ERR_BACKING', `cannot open the backing file "${image.header.backingFile}" of ${file.path} (as ${spec}): ${why}`, {
            errno: err instanceof BlkrepError ? err.errno : 'EIO',
            cause: err,
            details: { path: file.path, backing: image.header.backingFile, spec },
          });
        }
      }
    } catch (err) {
      await file.close().catch(() => {});
      throw err;
    }
    return new Qcow2Node(image, backing);
  }

  get size(): number {
    return this.image.size;
  }

  get readOnly(): boolean {
    return this.image.readOnly;
  }

  /** the lock held on the image file (undefined without the addon or in a test container) */
  get imageLock(): ImageLock | undefined {
    return this.image.file.imageLock;
  }

  // -----------------------------------------------------------------------------------------------
  // reads

  async read(offset: number, length: number, o?: IoOptions): Promise<Buffer> {
    const out = Buffer.allocUnsafe(length);
    await this.readInto(offset, out, o);
    return out;
  }

  async readInto(offset: number, target: Buffer, o?: IoOptions): Promise<void> {
    checkRange(this, offset, target.length, 'read');
    o?.signal?.throwIfAborted();
    const epoch = await this.begin();
    try {
      await this.readRange(offset, target);
    } finally {
      this.image.gate.end(epoch);
    }
  }

  private async readRange(offset: number, target: Buffer): Promise<void> {
    const { cs, l2e } = this;
    const map = this.image.map;
    const jobs: Array<Promise<void>> = [];
    const end = offset + target.length;
    // the piece being coalesced: kind, guest start, host start, length
    let kind = -1;
    let start = 0;
    let host = 0;
    let length = 0;
    const emit = (): void => {
      if (length === 0) return;
      const dst = target.subarray(start - offset, start - offset + length);
      if (kind === Kind.Normal) jobs.push(this.image.file.read(host, dst));
      else if (kind === Kind.Unallocated) jobs.push(this.readBacking(start, dst));
      else dst.fill(0);
      length = 0;
    };
    let pos = offset;
    while (pos < end) {
      const g = Math.floor(pos / cs);
      const l1i = Math.floor(g / l2e);
      let t = map.cachedTable(l1i);
      if (t === null) t = await map.table(l1i);
      let k: Kind;
      let h = 0;
      let n: number;
      let e: Entry | undefined;
      if (t === undefined) {
        k = Kind.Unallocated;
        n = Math.min(end, (l1i + 1) * l2e * cs) - pos;
      } else {
        e = map.entry(t, g % l2e);
        k = e.kind === Kind.ZeroAlloc ? Kind.ZeroPlain : e.kind;
        n = Math.min(cs - (pos - g * cs), end - pos);
        h = e.host + (pos - g * cs);
      }
      if (k === Kind.Compressed) {
        emit();
        const within = pos - g * cs;
        const dst = target.subarray(pos - offset, pos - offset + n);
        const entry = e!;
        jobs.push(map.decompress(entry).then((data) => void data.copy(dst, 0, within, within + n)));
      } else if (length > 0 && k === kind && (k !== Kind.Normal || host + length === h)) {
        length += n;
      } else {
        emit();
        kind = k;
        start = pos;
        host = h;
        length = n;
      }
      pos += n;
    }
    emit();
    await Promise.all(jobs);
  }

  /** Guest bytes [at, at+dst.length) as the backing chain shows them (zeros past its end). */
  private async readBacking(at: number, dst: Buffer): Promise<void> {
    const b = this.backing;
    const inBacking = b ? Math.max(0, Math.min(dst.length, Math.min(b.size, this.size) - at)) : 0;
    if (inBacking < dst.length) dst.fill(0, inBacking);
    if (inBacking === 0 || !b) return;
    const part = dst.subarray(0, inBacking);
    if (b.readInto) await b.readInto(at, part);
    else (await b.read(at, inBacking)).copy(part);
  }

  /** Bytes [within, within+len) of guest cluster g as entry e shows them, into dst at dstAt. */
  private async readOld(g: number, e: Entry, within: number, len: number, dst: Buffer, dstAt: number): Promise<void> {
    const part = dst.subarray(dstAt, dstAt + len);
    switch (e.kind) {
      case Kind.Unallocated:
        return this.readBacking(g * this.cs + within, part);
      case Kind.Normal:
        return this.image.file.read(e.host + within, part);
      case Kind.Compressed: {
        const data = await this.image.map.decompress(e);
        data.copy(part, 0, within, within + len);
        return;
      }
      default:
        part.fill(0);
    }
  }

  /** Whether guest bytes [at, at+len) of a cluster with entry e read as zeros, known without I/O. */
  private readsZero(e: Entry, at: number, len: number): boolean {
    if (len === 0 || e.kind === Kind.ZeroPlain || e.kind === Kind.ZeroAlloc) return true;
    if (e.kind !== Kind.Unallocated) return false;
    return at >= this.size || !this.backing || at >= this.backing.size;
  }

  // -----------------------------------------------------------------------------------------------
  // writes

  async write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    this.checkWritable('write');
    checkRange(this, offset, data.length, 'write');
    o?.signal?.throwIfAborted();
    if (data.length > 0) {
      const epoch = await this.begin();
      try {
        await this.writeRange(offset, data);
      } finally {
        this.image.gate.end(epoch);
      }
      this.image.maybeWriteback();
    }
    if (o?.fua) await this.image.flush();
  }

  private async writeRange(offset: number, data: Buffer): Promise<void> {
    const cs = this.cs;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + data.length - 1) / cs);
    const inPlace = await this.inPlace(first, last, offset, data.length);
    if (inPlace) {
      await this.writePieces(inPlace, offset, data);
      return;
    }
    const release = await this.image.ranges.lock(first, last + 1);
    try {
      await this.writeLocked(first, last, offset, data);
    } finally {
      release();
    }
  }

  /**
   * When every cluster of [first, last] is allocated and owned, the host pieces to write
   * ([guest offset, host offset, length], host-contiguous runs merged); else null.
   */
  private async inPlace(first: number, last: number, offset: number, length: number): Promise<Array<[number, number, number]> | null> {
    const { cs, l2e } = this;
    const map = this.image.map;
    const pieces: Array<[number, number, number]> = [];
    const end = offset + length;
    for (let g = first; g <= last; g++) {
      const l1i = Math.floor(g / l2e);
      let t = map.cachedTable(l1i);
      if (t === null) t = await map.table(l1i);
      if (!t) return null;
      const e = map.entry(t, g % l2e);
      if (e.kind !== Kind.Normal || !e.copied) return null;
      this.image.checkDataCluster(e.host, t.offset, g % l2e);
      const at = Math.max(offset, g * cs);
      const n = Math.min(end, (g + 1) * cs) - at;
      const host = e.host + (at - g * cs);
      const prev = pieces[pieces.length - 1];
      if (prev && prev[1] + prev[2] === host) prev[2] += n;
      else pieces.push([at, host, n]);
    }
    return pieces;
  }

  private async writePieces(pieces: Array<[number, number, number]>, offset: number, data: Buffer): Promise<void> {
    const file = this.image.file;
    if (pieces.length === 1) {
      const [at, host, n] = pieces[0]!;
      await file.write(host, data.subarray(at - offset, at - offset + n));
    } else {
      await Promise.all(pieces.map(([at, host, n]) => file.write(host, data.subarray(at - offset, at - offset + n))));
    }
    this.image.unsynced = true;
  }

  private async entryOf(g: number): Promise<Entry> {
    const map = this.image.map;
    const t = await map.table(Math.floor(g / this.l2e));
    return t ? map.entry(t, g % this.l2e) : { kind: Kind.Unallocated, host: 0, copied: false, csize: 0 };
  }

  /** The slow path, holding the range lock on clusters [first, last]. */
  private async writeLocked(first: number, last: number, offset: number, data: Buffer): Promise<void> {
    const l2e = this.l2e;
    for (let l1i = Math.floor(first / l2e); l1i <= Math.floor(last / l2e); l1i++) await this.image.ownedTable(l1i);
    const jobs: Array<Promise<void>> = [];
    const inPlace: Array<[number, number, number]> = [];
    const cs = this.cs;
    const end = offset + data.length;
    let g = first;
    while (g <= last) {
      const e = await this.entryOf(g);
      if (e.kind === Kind.Normal && e.copied) {
        this.image.checkDataCluster(e.host, 0, g % l2e);
        const at = Math.max(offset, g * cs);
        inPlace.push([at, e.host + (at - g * cs), Math.min(end, (g + 1) * cs) - at]);
        g++;
        continue;
      }
      if (e.kind === Kind.ZeroAlloc && e.copied) {
        this.image.checkDataCluster(e.host, 0, g % l2e);
        jobs.push(this.rewriteInPlace(g, e.host, offset, data));
        g++;
        continue;
      }
      const olds: Entry[] = [e];
      let h = g;
      while (h < last) {
        const next = await this.entryOf(h + 1);
        if ((next.kind === Kind.Normal || next.kind === Kind.ZeroAlloc) && next.copied) break;
        olds.push(next);
        h++;
      }
      jobs.push(this.allocateAndWrite(g, olds, offset, data));
      g = h + 1;
    }
    if (inPlace.length > 0) jobs.push(this.writePieces(inPlace, offset, data));
    await Promise.all(jobs);
  }

  /** Write guest clusters [g, g+olds.length) into a new host run, then point L2 at it. */
  private async allocateAndWrite(g: number, olds: Entry[], offset: number, data: Buffer): Promise<void> {
    const { cs } = this;
    const image = this.image;
    const n = olds.length;
    const alloc = await image.metaLock.run(() => image.rc.allocate(n));
    const host = alloc.cluster * cs;
    const runStart = g * cs;
    const runEnd = (g + n) * cs;
    const dStart = Math.max(offset, runStart);
    const dEnd = Math.min(offset + data.length, runEnd);
    const head = dStart - runStart;
    const tail = runEnd - dEnd;
    const slice = data.subarray(dStart - offset, dEnd - offset);
    try {
      if (head === 0 && tail === 0) {
        await image.file.write(host, slice);
      } else if (alloc.fresh && this.readsZero(olds[0]!, runStart, head) && this.readsZero(olds[n - 1]!, dEnd, tail)) {
        // a never-written run reads as zeros already
        await image.file.write(host + head, slice);
      } else {
        const buf = Buffer.allocUnsafe(n * cs);
        await Promise.all([
          head > 0 ? this.readOld(g, olds[0]!, 0, head, buf, 0) : undefined,
          tail > 0 ? this.readOld(g + n - 1, olds[n - 1]!, cs - tail, tail, buf, n * cs - tail) : undefined,
        ]);
        slice.copy(buf, head);
        await image.file.write(host, buf);
      }
    } catch (err) {
      // nothing points at the run: give it back (a leak if this fails too)
      await image.metaLock.run(() => image.rc.change(alloc.cluster, n, -1)).catch(() => {});
      throw err;
    }
    image.unsynced = true;
    await this.link(g, olds, (i) => host + i * cs);
  }

  /** A preallocated zero cluster (owned): write the data with zeros around it in place. */
  private async rewriteInPlace(g: number, host: number, offset: number, data: Buffer): Promise<void> {
    const cs = this.cs;
    const dStart = Math.max(offset, g * cs);
    const dEnd = Math.min(offset + data.length, (g + 1) * cs);
    const slice = data.subarray(dStart - offset, dEnd - offset);
    if (slice.length === cs) {
      await this.image.file.write(host, slice);
    } else {
      const buf = Buffer.alloc(cs);
      slice.copy(buf, dStart - g * cs);
      await this.image.file.write(host, buf);
    }
    this.image.unsynced = true;
    await this.link(g, [{ kind: Kind.Unallocated, host: 0, copied: false, csize: 0 }], () => host);
  }

  /** Point guest clusters g… at new hosts; queue the old host ranges to be freed. */
  private async link(g: number, olds: Entry[], hostOf: (i: number) => number): Promise<void> {
    const map = this.image.map;
    let i = 0;
    while (i < olds.length) {
      const l1i = Math.floor((g + i) / this.l2e);
      const t = (await map.table(l1i))!;
      // synchronous from here to the end of this table: nothing can evict it meanwhile
      for (; i < olds.length && Math.floor((g + i) / this.l2e) === l1i; i++) {
        map.setEntry(t, (g + i) % this.l2e, Kind.Normal, hostOf(i));
        const range = map.hostRange(olds[i]!);
        if (range) this.image.pendingFrees.push(range);
      }
    }
  }

  // -----------------------------------------------------------------------------------------------
  // zeroing and trim

  async writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    this.checkWritable('write-zeroes');
    checkRange(this, offset, length, 'write-zeroes');
    o?.signal?.throwIfAborted();
    if (length > 0) {
      const epoch = await this.begin();
      try {
        await this.zeroRange(offset, length, o ?? {});
      } finally {
        this.image.gate.end(epoch);
      }
      this.image.maybeWriteback();
    }
    if (o?.fua) await this.image.flush();
  }

  private async zeroRange(offset: number, length: number, o: ZeroOptions): Promise<void> {
    const cs = this.cs;
    const end = offset + length;
    // whole clusters change their L2 entry; so does the last, partial cluster when the range
    // reaches the end of the image
    const alignedStart = Math.ceil(offset / cs) * cs;
    const alignedEnd = end === this.size ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
    const whole = alignedStart < alignedEnd;
    // the partial clusters at the ends, one piece per cluster
    const partial: Array<[number, number]> = [];
    for (let at = offset; at < end; ) {
      if (whole && at === alignedStart) {
        at = alignedEnd;
        continue;
      }
      const next = Math.min(end, (Math.floor(at / cs) + 1) * cs, whole && at < alignedStart ? alignedStart : end);
      partial.push([at, next - at]);
      at = next;
    }
    const writes: Array<[number, number]> = [];
    for (const [at, n] of partial) {
      const e = await this.entryOf(Math.floor(at / cs));
      if (!this.readsZero(e, at, n)) writes.push([at, n]);
    }
    if (writes.length > 0 && o.fast) {
      throw new BlkrepError('ERR_NOT_FAST', `fast zeroing of ${length} bytes at offset ${offset}: the partial clusters at its ends would have to be written (cluster size ${cs})`, {
        errno: 'ENOTSUP',
        details: { offset, length, clusterSize: cs },
      });
    }
    const jobs: Array<Promise<void>> = writes.map(([at, n]) => this.writeRange(at, Buffer.alloc(n)));
    if (whole) jobs.push(this.changeClusters(alignedStart / cs, alignedEnd / cs - 1, o.noHole ? 'keep' : 'zero'));
    await Promise.all(jobs);
  }

  async trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    this.checkWritable('trim');
    checkRange(this, offset, length, 'trim');
    o?.signal?.throwIfAborted();
    const cs = this.cs;
    const first = Math.ceil(offset / cs);
    const end = offset + length === this.size ? Math.ceil((offset + length) / cs) : Math.floor((offset + length) / cs);
    if (end > first) {
      const epoch = await this.begin();
      try {
        await this.changeClusters(first, end - 1, 'discard');
      } finally {
        this.image.gate.end(epoch);
      }
      this.image.maybeWriteback();
    }
    if (o?.fua) await this.image.flush();
  }

  /**
   * Change whole clusters [first, last]: 'discard' (unallocated, or the ZERO flag when a backing
   * file would otherwise show through), 'zero' (ZERO flag, host cluster freed), 'keep' (ZERO flag,
   * an owned host cluster stays allocated: NO_HOLE).
   */
  private async changeClusters(first: number, last: number, mode: 'discard' | 'zero' | 'keep'): Promise<void> {
    const image = this.image;
    const map = image.map;
    const l2e = this.l2e;
    const backing = this.backing !== undefined;
    const release = await image.ranges.lock(first, last + 1);
    try {
      for (let l1i = Math.floor(first / l2e); l1i <= Math.floor(last / l2e); l1i++) {
        const { offset, copied } = map.l1Entry(l1i);
        if (offset === 0 && !backing) continue; // reads as zeros already
        if (offset === 0 || !copied) await image.ownedTable(l1i);
        const t = (await map.table(l1i))!;
        const a = Math.max(first, l1i * l2e);
        const b = Math.min(last, (l1i + 1) * l2e - 1);
        for (let g = a; g <= b; g++) {
          const index = g % l2e;
          const e = map.entry(t, index);
          let next: Kind;
          let keepHost = false;
          if (mode === 'discard') {
            next = backing ? Kind.ZeroPlain : Kind.Unallocated;
          } else if (mode === 'zero') {
            next = e.kind === Kind.Unallocated && !backing ? Kind.Unallocated : Kind.ZeroPlain;
          } else if ((e.kind === Kind.Normal || e.kind === Kind.ZeroAlloc) && e.copied) {
            next = Kind.ZeroAlloc;
            keepHost = true;
          } else if (e.kind === Kind.Unallocated) {
            next = backing ? Kind.ZeroPlain : Kind.Unallocated;
          } else {
            next = Kind.ZeroPlain;
          }
          if (next === e.kind && (keepHost || e.host === 0)) continue;
          map.setEntry(t, index, next, keepHost ? e.host : 0);
          if (!keepHost) {
            const range = map.hostRange(e);
            if (range) image.pendingFrees.push(range);
          }
        }
      }
    } finally {
      release();
    }
  }

  // -----------------------------------------------------------------------------------------------
  // flush, extents, lifecycle

  async flush(o?: IoOptions): Promise<void> {
    o?.signal?.throwIfAborted();
    if (this.closed) throw this.closedError();
    await this.image.flush();
  }

  /**
   * Allocation through the chain: depth 1 = this image, 2 = its backing, …, 0 = nowhere (reads
   * as zeros). Zero clusters are {hole, zero} at depth 1, as QEMU reports them (no data).
   */
  async extents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    checkRange(this, offset, length, 'extents');
    o?.signal?.throwIfAborted();
    if (length === 0) return [];
    const epoch = await this.begin();
    try {
      return coalesceExtents(await this.extentsRange(offset, offset + length));
    } finally {
      this.image.gate.end(epoch);
    }
  }

  private async extentsRange(offset: number, end: number): Promise<Extent[]> {
    const { cs, l2e } = this;
    const map = this.image.map;
    const out: Extent[] = [];
    let unallocatedFrom = -1;
    const flushUnallocated = async (to: number): Promise<void> => {
      if (unallocatedFrom < 0) return;
      out.push(...(await this.backingExtents(unallocatedFrom, to)));
      unallocatedFrom = -1;
    };
    let pos = offset;
    let scanned = 0;
    while (pos < end && scanned < EXTENT_SCAN_CLUSTERS) {
      const g = Math.floor(pos / cs);
      const l1i = Math.floor(g / l2e);
      let t = map.cachedTable(l1i);
      if (t === null) t = await map.table(l1i);
      if (t === undefined) {
        const next = Math.min(end, (l1i + 1) * l2e * cs);
        if (unallocatedFrom < 0) unallocatedFrom = pos;
        scanned += Math.ceil((next - pos) / cs);
        pos = next;
        continue;
      }
      const e = map.entry(t, g % l2e);
      const next = Math.min(end, (g + 1) * cs);
      scanned++;
      if (e.kind === Kind.Unallocated) {
        if (unallocatedFrom < 0) unallocatedFrom = pos;
      } else {
        await flushUnallocated(pos);
        const zero = e.kind === Kind.ZeroPlain || e.kind === Kind.ZeroAlloc;
        out.push({ length: next - pos, hole: zero, zero, depth: 1 });
      }
      pos = next;
    }
    await flushUnallocated(pos);
    return out;
  }

  /** [from, to) unallocated here: what the backing chain has there, one level deeper. */
  private async backingExtents(from: number, to: number): Promise<Extent[]> {
    const b = this.backing;
    const out: Extent[] = [];
    const inBacking = b ? Math.min(to, b.size) : from;
    let pos = from;
    while (b && pos < inBacking) {
      const runs = b.extents ? await b.extents(pos, inBacking - pos) : [{ length: inBacking - pos, hole: false, zero: false }];
      if (runs.length === 0) break;
      for (const r of runs) {
        const n = Math.min(r.length, inBacking - pos);
        if (n <= 0) break;
        const depth = r.depth === undefined ? 2 : r.depth === 0 ? 0 : r.depth + 1;
        out.push({ length: n, hole: r.hole, zero: r.zero, depth });
        pos += n;
      }
    }
    if (pos < to) out.push({ length: to - pos, hole: true, zero: true, depth: 0 });
    return out;
  }

  /** Every cluster unallocated, so reads fall through to the backing chain (B.8). */
  /**
   * No guest cluster is mapped (every L1 entry is zero): the image reads as its backing node, and
   * makeEmpty() would change nothing a reader sees (it would only reclaim leaked clusters).
   */
  get mapsNothing(): boolean {
    const map = this.image.map;
    for (let i = 0; i < map.l1Size; i++) if (map.l1Entry(i).offset !== 0) return false;
    return true;
  }

  async makeEmpty(o?: IoOptions): Promise<void> {
    this.checkWritable('make-empty');
    o?.signal?.throwIfAborted();
    if (this.closed) throw this.closedError();
    await this.image.makeEmpty();
  }

  /**
   * Put `node` in place of the backing node — the same image reopened, e.g. read-write for a
   * live commit into it — once every request in flight has finished (new ones wait meanwhile).
   * Returns the old backing node: the caller closes it.
   */
  async replaceBacking(node: BlockNode): Promise<BlockNode | undefined> {
    if (this.closed) throw this.closedError();
    return this.image.gate.exclusive(async () => {
      const old = this.backing;
      (this as { backing: BlockNode | undefined }).backing = node;
      return old;
    });
  }

  /** Grow the virtual size (a multiple of 512). */
  async resize(size: number): Promise<void> {
    this.checkWritable('resize');
    if (this.closed) throw this.closedError();
    await this.image.resize(size);
  }

  async info(): Promise<Record<string, unknown>> {
    return this.image.info();
  }

  /** Waits for requests in flight, writes everything back, closes the backing chain and file. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      try {
        await this.image.gate.exclusive(async () => {
          this.closed = true;
          if (!this.image.readOnly) await this.image.cycleLock.run(() => this.image.writebackAll());
        });
      } finally {
        this.closed = true;
        await this.backing?.close().catch(() => {});
        await this.image.file.close().catch(() => {});
      }
    })();
    return this.closing;
  }

  private async begin(): Promise<number> {
    if (this.closed) throw this.closedError();
    const epoch = await this.image.gate.begin();
    if (this.closed) {
      this.image.gate.end(epoch);
      throw this.closedError();
    }
    return epoch;
  }

  private closedError(): BlkrepError {
    return new BlkrepError('ERR_CLOSED', `${this.image.path} is closed`, { errno: 'ESHUTDOWN' });
  }

  private checkWritable(op: string): void {
    if (this.image.readOnly) {
      throw new BlkrepError('ERR_READ_ONLY', `${op} refused: ${this.image.path} is open read-only`, { errno: 'EPERM', details: { path: this.image.path } });
    }
    if (this.image.corruption) throw this.image.corruption;
  }
}

/** A backing image read-only, in the format its parent names (probed when none or unknown). */
function defaultOpener(spec: string, format: string | undefined): Promise<BlockNode> {
  const f = format === 'raw' || format === 'qcow2' ? format : undefined;
  return openImage(spec, { readOnly: true, chainDepth: 1, ...(f ? { format: f } : {}) });
}

// the driver registers itself in the table of image formats (open.ts has a lazy entry for it)
registerImageFormat({ name: 'qcow2', probe: isQcow2Header, open: (path, o) => Qcow2Node.open(path, o) });
