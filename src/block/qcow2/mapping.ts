/**
 * Address translation (B.3): the L1 table (in memory whole, ≤ 32 MiB) and L2 tables (through an
 * LRU TableCache), and the meaning of an L2 entry.
 *
 * Changes are write-back: an L2 table or L1 entry changed in memory reaches the disk only in a
 * writeback cycle, after the refcounts and data it points to are durable (see image.ts).
 */
import { createInflateRaw, inflateRaw, constants as zlibConstants } from 'node:zlib';
import { promisify } from 'node:util';
import { TableCache, type Table } from './cache.js';
import type { Qcow2Container } from './file.js';
import { corrupt } from './format.js';

const inflateRawAsync = promisify(inflateRaw);

export const enum Kind {
  /** entry 0: read from the backing file, or zeros */
  Unallocated = 0,
  /** ZERO flag, no host cluster */
  ZeroPlain = 1,
  /** ZERO flag with a (preallocated) host cluster */
  ZeroAlloc = 2,
  Normal = 3,
  Compressed = 4,
}

export interface Entry {
  kind: Kind;
  /** host byte offset: the cluster (normal, zero-alloc) or the compressed data */
  host: number;
  /** COPIED: refcount exactly 1, may be written in place */
  copied: boolean;
  /** compressed data length in bytes */
  csize: number;
}

const COPIED_HI = 0x80000000;
const COMPRESSED_HI = 0x40000000;
export const ZERO_LO = 1;

export const UNALLOCATED: Entry = { kind: Kind.Unallocated, host: 0, copied: false, csize: 0 };
export const ZERO_PLAIN: Entry = { kind: Kind.ZeroPlain, host: 0, copied: false, csize: 0 };

export class ClusterMap {
  readonly clusterSize: number;
  /** entries per L2 table */
  readonly l2Entries: number;
  readonly l2: TableCache;
  readonly dirtyL1 = new Set<number>();

  constructor(
    private readonly file: Qcow2Container,
    private readonly path: string,
    readonly clusterBits: number,
    public l1Offset: number,
    public l1: Buffer,
    cacheBytes: number,
  ) {
    this.clusterSize = 2 ** clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.l2 = new TableCache(file, this.clusterSize, Math.max(cacheBytes, 16 * this.clusterSize));
  }

  get l1Size(): number {
    return this.l1.length / 8;
  }

  /** Offset of the L2 table for L1 index i (0 when none) and its COPIED flag. */
  l1Entry(i: number): { offset: number; copied: boolean } {
    if (i >= this.l1Size) return { offset: 0, copied: false };
    const hi = this.l1.readUInt32BE(i * 8);
    const lo = this.l1.readUInt32BE(i * 8 + 4);
    const offset = (hi & 0x00ffffff) * 0x100000000 + ((lo & ~0x1ff) >>> 0);
    if (offset !== 0 && ((hi & 0x00ffffff) > 0x1fffff || offset % this.clusterSize !== 0)) {
      throw this.fail(`L2 table offset ${offset} (L1 index ${i}) is not cluster aligned or too large`, { l1Index: i, offset });
    }
    return { offset, copied: (hi & COPIED_HI) !== 0 };
  }

  /**
   * Turns a malformed entry into the error for the request (image.ts sets it to QEMU's
   * signal-corruption: the image is marked corrupt and written no more).
   */
  fail: (what: string, details: Record<string, unknown>) => Error = (what, details) => corrupt(this.path, what, details, 'EIO');
  private l2Set: { l1: Buffer; set: Set<number> } | undefined;

  /** Host cluster c holds an active L2 table (the set is rebuilt after the L1 changes). */
  isL2(c: number): boolean {
    if (!this.l2Set || this.l2Set.l1 !== this.l1) {
      const set = new Set<number>();
      for (let i = 0; i < this.l1Size; i++) {
        const hi = this.l1.readUInt32BE(i * 8) & 0x00ffffff;
        const offset = hi * 0x100000000 + ((this.l1.readUInt32BE(i * 8 + 4) & ~0x1ff) >>> 0);
        if (offset !== 0) set.add(Math.floor(offset / this.clusterSize));
      }
      this.l2Set = { l1: this.l1, set };
    }
    return this.l2Set.set.has(c);
  }

  invalidateL2Set(): void {
    this.l2Set = undefined;
  }

  setL1(i: number, offset: number, copied: boolean): void {
    this.l2Set = undefined;
    this.l1.writeUInt32BE(((copied ? COPIED_HI : 0) | Math.floor(offset / 0x100000000)) >>> 0, i * 8);
    this.l1.writeUInt32BE(offset >>> 0, i * 8 + 4);
    this.dirtyL1.add(i);
  }

  /** The L2 table if cached, without I/O; null if it exists but is not cached. */
  cachedTable(i: number): Table | undefined | null {
    const { offset } = this.l1Entry(i);
    if (offset === 0) return undefined;
    return this.l2.peek(offset) ?? null;
  }

  /** The L2 table for L1 index i (undefined when there is none), the cached one when it resolves. */
  async table(i: number): Promise<Table | undefined> {
    for (;;) {
      const { offset } = this.l1Entry(i);
      if (offset === 0) return undefined;
      const t = this.l2.peek(offset) ?? (await this.l2.get(offset));
      if (this.l1Entry(i).offset === offset && this.l2.peek(offset) === t) return t;
    }
  }

  /** Decode entry `index` of an L2 table. */
  entry(t: Table, index: number): Entry {
    const hi = t.buf.readUInt32BE(index * 8);
    const lo = t.buf.readUInt32BE(index * 8 + 4);
    if (hi === 0 && lo === 0) return UNALLOCATED;
    if (hi & COMPRESSED_HI) return this.compressed(hi, lo, t.offset, index);
    const copied = (hi & COPIED_HI) !== 0;
    const hostHi = hi & 0x00ffffff;
    const host = hostHi * 0x100000000 + ((lo & ~0x1ff) >>> 0);
    const zero = (lo & ZERO_LO) !== 0;
    if (host === 0) return zero ? ZERO_PLAIN : UNALLOCATED;
    if (hostHi > 0x1fffff || host % this.clusterSize !== 0) {
      throw this.fail(`data cluster offset ${host} (L2 table at ${t.offset}, index ${index}) is not cluster aligned or too large`, { l2Offset: t.offset, index, host });
    }
    return { kind: zero ? Kind.ZeroAlloc : Kind.Normal, host, copied, csize: 0 };
  }

  private compressed(hi: number, lo: number, l2Offset: number, index: number): Entry {
    // x = 62 − (cluster_bits − 8) bits of byte offset, then (cluster_bits − 8) bits of extra sectors
    const x = 70 - this.clusterBits;
    const v = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
    const host = v & ((1n << BigInt(x)) - 1n);
    const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(this.clusterBits - 8)) - 1n)) + 1;
    if (host > BigInt(Number.MAX_SAFE_INTEGER - 4 * this.clusterSize)) {
      throw this.fail(`compressed cluster offset ${host} (L2 table at ${l2Offset}, index ${index}) is too large`, { l2Offset, index });
    }
    const h = Number(host);
    return { kind: Kind.Compressed, host: h, copied: false, csize: sectors * 512 - (h & 511) };
  }

  setEntry(t: Table, index: number, kind: Kind, host: number): void {
    let hi = 0;
    let lo = 0;
    switch (kind) {
      case Kind.Unallocated:
        break;
      case Kind.ZeroPlain:
        lo = ZERO_LO;
        break;
      case Kind.ZeroAlloc:
        hi = (COPIED_HI | Math.floor(host / 0x100000000)) >>> 0;
        lo = (host | ZERO_LO) >>> 0;
        break;
      case Kind.Normal:
        hi = (COPIED_HI | Math.floor(host / 0x100000000)) >>> 0;
        lo = host >>> 0;
        break;
      default:
        throw new Error('compressed clusters are never written');
    }
    t.buf.writeUInt32BE(hi, index * 8);
    t.buf.writeUInt32BE(lo, index * 8 + 4);
    t.touch(index * 8, index * 8 + 8);
  }

  /** The host byte ranges an entry holds (what freeing it releases). */
  hostRange(e: Entry): [number, number] | undefined {
    switch (e.kind) {
      case Kind.Normal:
      case Kind.ZeroAlloc:
        return [e.host, this.clusterSize];
      case Kind.Compressed: {
        // QEMU frees whole 512-byte sectors: [offset & ~511, + sectors × 512)
        const start = e.host - (e.host & 511);
        return [start, e.csize + (e.host & 511)];
      }
      default:
        return undefined;
    }
  }

  /** Inflate a compressed cluster (raw deflate) into exactly one cluster. */
  async decompress(e: Entry): Promise<Buffer> {
    const input = Buffer.allocUnsafe(e.csize);
    await this.file.read(e.host, input);
    let out: Buffer;
    try {
      try {
        out = await inflateRawAsync(input, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize });
      } catch (err) {
        // a stream longer than a cluster: QEMU uses its first cluster, so do we (bounded)
        if ((err as { code?: string }).code !== 'ERR_BUFFER_TOO_LARGE') throw err;
        out = await inflateFirst(input, this.clusterSize);
      }
    } catch (err) {
      throw corrupt(this.path, `compressed cluster at ${e.host} (${e.csize} bytes) does not inflate: ${(err as Error).message}`, { host: e.host, csize: e.csize }, 'EIO');
    }
    if (out.length < this.clusterSize) {
      throw corrupt(this.path, `compressed cluster at ${e.host} inflates to ${out.length} bytes, not ${this.clusterSize}`, { host: e.host, csize: e.csize }, 'EIO');
    }
    return out.length === this.clusterSize ? out : out.subarray(0, this.clusterSize);
  }

  /** Capture changed L1 entries for a writeback cycle. */
  captureL1(): Array<[number, Buffer]> {
    const out: Array<[number, Buffer]> = [];
    for (const i of this.dirtyL1) out.push([i, Buffer.from(this.l1.subarray(i * 8, i * 8 + 8))]);
    this.dirtyL1.clear();
    return out;
  }

  async writeL1(entries: Array<[number, Buffer]>): Promise<void> {
    await Promise.all(entries.map(([i, bytes]) => this.file.write(this.l1Offset + i * 8, bytes)));
  }
}

/** The first `limit` bytes a raw deflate stream inflates to, without inflating the rest. */
function inflateFirst(input: Buffer, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const inflate = createInflateRaw({ finishFlush: zlibConstants.Z_SYNC_FLUSH });
    const chunks: Buffer[] = [];
    let length = 0;
    let settled = false;
    const finish = (): void => {
      if (settled) return;
      settled = true;
      inflate.destroy();
      resolve(Buffer.concat(chunks).subarray(0, limit));
    };
    inflate.on('data', (chunk: Buffer) => {
      chunks.push(chunk);
      length += chunk.length;
      if (length >= limit) finish();
    });
    inflate.on('end', finish);
    inflate.on('error', (err) => {
      if (settled) return;
      settled = true;
      reject(err);
    });
    inflate.end(input);
  });
}
