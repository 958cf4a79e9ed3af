/**
 * qcow2's own persistent dirty bitmaps (reference part C): the bitmap directory, the bitmap
 * tables and their data clusters, read and written as QEMU does, for the bitmap store
 * (src/bitmap/store-qcow2.ts). Only offline: the image is opened for the time of one change, by
 * a program that writes no guest data.
 *
 * Reading checks what QEMU checks when it loads bitmaps (check_dir_entry, bitmap_table_load):
 * anything else is ERR_QCOW2_CORRUPT. A bitmap whose in_use flag is set (its writer did not close
 * the image) is inconsistent: its bits are never read, only its removal is allowed (C.4).
 *
 * Writing is copy-on-write, in QEMU's crash-safe order (bitmap_list_store / update_ext_header_and_dir):
 *   1. the data clusters of every changed bitmap (all-zero clusters stay unallocated: table entry 0)
 *      and its table, in newly allocated clusters;
 *   2. a new directory, in newly allocated clusters;
 *   3. sync, then a writeback cycle: the refcounts of the new clusters are durable;
 *   4. the header: the bitmaps extension pointing at the new directory and autoclear bit 0 set
 *      (when the last bitmap goes, the extension goes and the bit is cleared), one write, sync;
 *   5. the old directory, and the tables and data of the bitmaps changed or removed, are freed
 *      (decremented, written back).
 * A crash before 4 leaves the old directory in force and leaks the new clusters; after it, leaks
 * the old ones — never a directory pointing at unwritten clusters.
 */
import { lockPerms } from '../image-lock.js';
import { BlkrepError } from '../../api/errors.js';
import { DirtyBitmap, MAX_GRANULARITY, MIN_GRANULARITY } from '../../bitmap/dirty-bitmap.js';
import { HostFile, type Qcow2Container } from './file.js';
import {
  AUTOCLEAR_BITMAPS,
  BME_AUTO,
  BME_IN_USE,
  corrupt,
  EXT_BITMAPS,
  EXT_END,
  EXT_FEATURE_TABLE,
  H,
  MAX_BITMAP_DIRECTORY_BYTES,
  MAX_BITMAPS,
  MAX_OFFSET,
  type BitmapsExtension,
  type Qcow2Header,
} from './format.js';
import { Qcow2Image } from './image.js';

/** the only bitmap type: dirty tracking */
export const BITMAP_TYPE_DIRTY = 1;
/** QEMU's limits (qcow2-bitmap.c) */
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
export const MAX_NAME_BYTES = 1023;
export const MAX_TABLE_ENTRIES = 0x8000000;
/** BME_MAX_PHYS_SIZE: the largest bitmap (table entries × cluster size) */
export const MAX_PHYS_BYTES = 0x20000000;
const BME_RESERVED_FLAGS = 0xfffffffc;
const TABLE_RESERVED = 0xff000000000001fen;
const TABLE_OFFSET = 0x00fffffffffffe00n;
const TABLE_ALL_ONES = 1n;

/** One entry of the bitmap directory (C.2). */
export interface DirEntry {
  name: string;
  tableOffset: number;
  tableSize: number;
  /** raw flags: BME_IN_USE, BME_AUTO */
  flags: number;
  granularityBits: number;
  /** extra data, kept byte for byte (QEMU writes none) */
  extra: Buffer;
}

export function inUse(e: DirEntry): boolean {
  return (e.flags & BME_IN_USE) !== 0;
}
export function enabled(e: DirEntry): boolean {
  return (e.flags & BME_AUTO) !== 0;
}
export function granularityOf(e: DirEntry): number {
  return 2 ** e.granularityBits;
}

/** ⌈ ⌈size / g⌉ / 8 ⌉: the bytes of a bitmap's data. */
export function dataBytes(size: number, granularityBits: number): number {
  return Math.ceil(Math.ceil(size / 2 ** granularityBits) / 8);
}

/** Entries of the bitmap table of a bitmap of this geometry. */
export function tableEntries(size: number, granularityBits: number, clusterBits: number): number {
  return Math.ceil(dataBytes(size, granularityBits) / 2 ** clusterBits);
}

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** Why a name cannot be the name of a qcow2 bitmap (QEMU's rules), or undefined. */
export function nameProblem(name: string): string | undefined {
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes === 0) return 'a bitmap name cannot be empty';
  if (bytes > MAX_NAME_BYTES) return `bitmap name of ${bytes} bytes is too long: qcow2 allows at most ${MAX_NAME_BYTES}`;
  if (name.includes('\0')) return 'a bitmap name cannot contain a NUL byte';
  return undefined;
}

/** Parse the directory strictly, as QEMU loads it (bitmap_list_load, check_dir_entry). */
export function parseDirectory(path: string, h: Qcow2Header, ext: BitmapsExtension, dir: Buffer): DirEntry[] {
  const cs = 2 ** h.clusterBits;
  const out: DirEntry[] = [];
  const names = new Set<string>();
  let at = 0;
  for (let i = 0; i < ext.nbBitmaps; i++) {
    const bad = (what: string, details: Record<string, unknown> = {}): BlkrepError =>
      corrupt(path, `bitmap directory entry ${i} (at ${ext.directoryOffset + at}) ${what}`, { bitmap: i, ...details });
    if (at + 24 > dir.length) throw bad(`lies past the end of the directory (${ext.directorySize} bytes, ${ext.nbBitmaps} bitmaps)`);
    const tableOffset = dir.readBigUInt64BE(at);
    const tableSize = dir.readUInt32BE(at + 8);
    const flags = dir.readUInt32BE(at + 12);
    const type = dir[at + 16]!;
    const granularityBits = dir[at + 17]!;
    const nameSize = dir.readUInt16BE(at + 18);
    const extraSize = dir.readUInt32BE(at + 20);
    const length = 24 + extraSize + nameSize;
    if (at + length > dir.length) throw bad(`(name ${nameSize}, extra data ${extraSize} bytes) lies past the end of the directory`, { nameSize, extraSize });
    const name = dir.subarray(at + 24 + extraSize, at + length).toString('utf8');
    if (type !== BITMAP_TYPE_DIRTY) throw bad(`has type ${type}, not 1 (dirty tracking)`, { type });
    if (nameSize === 0 || nameSize > MAX_NAME_BYTES) throw bad(`has a name of ${nameSize} bytes (1 … ${MAX_NAME_BYTES} allowed)`, { nameSize });
    if (flags & BME_RESERVED_FLAGS) throw bad(`of "${name}" has reserved flags set (0x${flags.toString(16)})`, { flags });
    if (granularityBits < MIN_GRANULARITY_BITS || granularityBits > MAX_GRANULARITY_BITS) {
      throw bad(`of "${name}" has granularity_bits ${granularityBits} (${MIN_GRANULARITY_BITS} … ${MAX_GRANULARITY_BITS} allowed)`, { granularityBits });
    }
    if (tableOffset === 0n || tableOffset > BigInt(MAX_OFFSET) || Number(tableOffset) % cs !== 0) {
      throw bad(`of "${name}" has bitmap table offset ${tableOffset}: zero, not cluster aligned or too large`, { tableOffset: tableOffset.toString() });
    }
    if (tableSize === 0 || tableSize > MAX_TABLE_ENTRIES || tableSize * cs > MAX_PHYS_BYTES) {
      throw bad(`of "${name}" has a bitmap table of ${tableSize} entries (1 … ${Math.min(MAX_TABLE_ENTRIES, MAX_PHYS_BYTES / cs)} allowed)`, { tableSize });
    }
    if (!(flags & BME_IN_USE) && tableSize !== tableEntries(h.size, granularityBits, h.clusterBits)) {
      throw bad(`of "${name}" has a bitmap table of ${tableSize} entries; a bitmap of ${h.size} bytes at granularity ${2 ** granularityBits} needs ${tableEntries(h.size, granularityBits, h.clusterBits)}`, {
        tableSize,
      });
    }
    if (names.has(name)) throw bad(`repeats the name "${name}"`, { name });
    names.add(name);
    out.push({ name, tableOffset: Number(tableOffset), tableSize, flags, granularityBits, extra: Buffer.from(dir.subarray(at + 24, at + 24 + extraSize)) });
    at += pad8(length);
  }
  if (at !== ext.directorySize) {
    throw corrupt(path, `the bitmap directory holds ${at} bytes of ${ext.nbBitmaps} entries, but the bitmaps extension says ${ext.directorySize}`, {
      directorySize: ext.directorySize,
      entriesBytes: at,
    });
  }
  return out;
}

export function buildDirectory(entries: readonly DirEntry[]): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const name = Buffer.from(e.name, 'utf8');
    const buf = Buffer.alloc(pad8(24 + e.extra.length + name.length));
    buf.writeBigUInt64BE(BigInt(e.tableOffset), 0);
    buf.writeUInt32BE(e.tableSize, 8);
    buf.writeUInt32BE(e.flags, 12);
    buf[16] = BITMAP_TYPE_DIRTY;
    buf[17] = e.granularityBits;
    buf.writeUInt16BE(name.length, 18);
    buf.writeUInt32BE(e.extra.length, 20);
    e.extra.copy(buf, 24);
    name.copy(buf, 24 + e.extra.length);
    parts.push(buf);
  }
  return Buffer.concat(parts);
}

/**
 * Cluster 0 with the bitmaps extension replaced (added, changed, or dropped when `ext` is
 * undefined) and autoclear bit 0 set accordingly. The other extensions keep their bytes and
 * order (a new bitmaps extension goes before the feature name table, where QEMU puts it); the
 * backing file name moves behind the end of the extensions when their length changes.
 */
export function rebuildHeader(path: string, cluster0: Buffer, h: Qcow2Header, ext: BitmapsExtension | undefined): Buffer {
  const cs = 2 ** h.clusterBits;
  const out = Buffer.from(cluster0);
  const limit = h.backingFileOffset !== 0 ? h.backingFileOffset : cs;
  const list: Array<[number, Buffer]> = [];
  let at = h.headerLength;
  while (at + 8 <= limit) {
    const type = cluster0.readUInt32BE(at);
    const length = cluster0.readUInt32BE(at + 4);
    if (type === EXT_END) break;
    list.push([type, Buffer.from(cluster0.subarray(at + 8, at + 8 + length))]);
    at += 8 + pad8(length);
  }
  let oldEnd = at + 8;
  const backing = h.backingFileOffset !== 0 ? Buffer.from(cluster0.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize)) : undefined;
  if (backing) oldEnd = Math.max(oldEnd, h.backingFileOffset + h.backingFileSize);

  const kept = list.filter(([type]) => type !== EXT_BITMAPS);
  if (ext) {
    const data = Buffer.alloc(24);
    data.writeUInt32BE(ext.nbBitmaps, 0);
    data.writeBigUInt64BE(BigInt(ext.directorySize), 8);
    data.writeBigUInt64BE(BigInt(ext.directoryOffset), 16);
    const old = list.findIndex(([type]) => type === EXT_BITMAPS);
    const table = kept.findIndex(([type]) => type === EXT_FEATURE_TABLE);
    const where = old >= 0 ? list.slice(0, old).filter(([type]) => type !== EXT_BITMAPS).length : table >= 0 ? table : kept.length;
    kept.splice(where, 0, [EXT_BITMAPS, data]);
  }
  let w = h.headerLength;
  const room = (n: number): void => {
    if (w + n > cs) {
      throw new BlkrepError('ERR_QCOW2_UNSUPPORTED', `qcow2 image "${path}": the header extensions${backing ? ' and the backing file name' : ''} would not fit in the ${cs}-byte header cluster`, {
        errno: 'ENOSPC',
        details: { path },
      });
    }
  };
  for (const [type, data] of kept) {
    room(8 + pad8(data.length));
    out.writeUInt32BE(type, w);
    out.writeUInt32BE(data.length, w + 4);
    out.fill(0, w + 8, w + 8 + pad8(data.length));
    data.copy(out, w + 8);
    w += 8 + pad8(data.length);
  }
  room(8);
  out.fill(0, w, w + 8);
  w += 8;
  if (backing) {
    room(backing.length);
    backing.copy(out, w);
    out.writeBigUInt64BE(BigInt(w), H.backingFileOffset);
    w += backing.length;
  }
  if (oldEnd > w) out.fill(0, w, Math.min(oldEnd, cs));
  const autoclear = ext ? h.autoclear | AUTOCLEAR_BITMAPS : h.autoclear & ~AUTOCLEAR_BITMAPS;
  out.writeBigUInt64BE(autoclear, H.autoclear);
  return out;
}

/** What a new directory holds: an entry, and new bits for it (else its table stays as it is). */
export interface NextEntry {
  entry: Omit<DirEntry, 'tableOffset' | 'tableSize'> & Partial<Pick<DirEntry, 'tableOffset' | 'tableSize'>>;
  bits?: DirtyBitmap;
}

/** The bitmaps of one open qcow2 image. */
export class Qcow2BitmapDirectory {
  private constructor(
    readonly image: Qcow2Image,
    public entries: DirEntry[],
  ) {}

  /**
   * Open an image to read or change its bitmaps. Read-write, the image is left as it is apart
   * from the bitmaps (autoclear bit 0 is not cleared: keepBitmaps).
   */
  static async open(path: string, options: { readOnly: boolean; forceShare?: boolean }): Promise<Qcow2BitmapDirectory> {
    const lock = lockPerms({ format: 'qcow2', readOnly: options.readOnly, forceShare: options.forceShare === true && options.readOnly });
    return Qcow2BitmapDirectory.openContainer(await HostFile.open(path, { readOnly: options.readOnly, lock }), options);
  }

  /** The same in any container (tests use one that simulates crashes); closes it on failure. */
  static async openContainer(file: Qcow2Container, options: { readOnly: boolean }): Promise<Qcow2BitmapDirectory> {
    try {
      const image = await Qcow2Image.open(file, { readOnly: options.readOnly, keepBitmaps: true, l2CacheBytes: 1024 * 1024, refcountCacheBytes: 1024 * 1024 });
      return new Qcow2BitmapDirectory(image, await readDirectory(image));
    } catch (err) {
      await file.close().catch(() => {});
      throw err;
    }
  }

  /**
   * The bitmaps of an image already open (a served Qcow2Node: src/bitmap/qcow2-live.ts). Its
   * close() must not be called: the node closes the image.
   */
  static async forImage(image: Qcow2Image): Promise<Qcow2BitmapDirectory> {
    return new Qcow2BitmapDirectory(image, await readDirectory(image));
  }

  get path(): string {
    return this.image.path;
  }
  get size(): number {
    return this.image.size;
  }
  get clusterSize(): number {
    return this.image.clusterSize;
  }
  /** QEMU's default granularity of a new bitmap: the cluster size, within 4 KiB … 64 KiB */
  get defaultGranularity(): number {
    return Math.min(64 * 1024, Math.max(4096, this.image.clusterSize));
  }
  /** the bitmaps extension exists but autoclear bit 0 is clear: some program without bitmap support wrote the image */
  get staleExtension(): boolean {
    return this.image.header.hasBitmapsExtension && this.image.header.bitmaps === undefined;
  }

  find(name: string): DirEntry | undefined {
    return this.entries.find((e) => e.name === name);
  }

  /** The raw entries of a bitmap's table, checked (C.3). */
  async readTable(e: DirEntry): Promise<bigint[]> {
    const cs = this.image.clusterSize;
    const file = this.image.file;
    if (e.tableOffset + e.tableSize * 8 > file.length) {
      throw corrupt(this.path, `the bitmap table of "${e.name}" at ${e.tableOffset} (${e.tableSize} entries) lies past the end of the file (${file.length} bytes)`, {
        bitmap: e.name,
        tableOffset: e.tableOffset,
      });
    }
    const buf = Buffer.alloc(e.tableSize * 8);
    await file.read(e.tableOffset, buf);
    const out: bigint[] = [];
    for (let i = 0; i < e.tableSize; i++) {
      const v = buf.readBigUInt64BE(i * 8);
      const offset = v & TABLE_OFFSET;
      const bad = (what: string): BlkrepError =>
        corrupt(this.path, `entry ${i} of the bitmap table of "${e.name}" (0x${v.toString(16)}) ${what}`, { bitmap: e.name, index: i, entry: `0x${v.toString(16)}` });
      if (v & TABLE_RESERVED) throw bad('has reserved bits set');
      if (offset !== 0n) {
        if (v & TABLE_ALL_ONES) throw bad('has both a data cluster and the all-ones flag');
        if (Number(offset) % cs !== 0) throw bad(`points at ${offset}, which is not cluster aligned`);
        if (Number(offset) >= file.length) throw bad(`points at ${offset}, past the end of the file (${file.length} bytes)`);
      }
      out.push(v);
    }
    return out;
  }

  /** The serialised bits of a bitmap (⌈bits/8⌉ bytes, least significant bit first), unused tail bits cleared. */
  async readBytes(e: DirEntry): Promise<Buffer> {
    if (inUse(e)) throw inconsistent(this.path, e.name);
    const cs = this.image.clusterSize;
    const table = await this.readTable(e);
    const bytes = dataBytes(this.size, e.granularityBits);
    const buf = Buffer.alloc(e.tableSize * cs);
    const reads: Array<Promise<void>> = [];
    table.forEach((v, i) => {
      const offset = Number(v & TABLE_OFFSET);
      if (offset !== 0) reads.push(this.image.file.read(offset, buf.subarray(i * cs, (i + 1) * cs)));
      else if (v & TABLE_ALL_ONES) buf.fill(0xff, i * cs, (i + 1) * cs);
    });
    for (let i = 0; i < reads.length; i += 64) await Promise.all(reads.slice(i, i + 64));
    const out = buf.subarray(0, bytes);
    const bits = Math.ceil(this.size / 2 ** e.granularityBits);
    if (bits % 8 !== 0) out[bytes - 1] = out[bytes - 1]! & ((1 << bits % 8) - 1);
    return out;
  }

  /** A bitmap's bits. Granularities above 64 MiB (qcow2 allows up to 2 GiB) are not supported. */
  async readBits(e: DirEntry): Promise<DirtyBitmap> {
    if (inUse(e)) throw inconsistent(this.path, e.name);
    checkSupported(this.path, e);
    return DirtyBitmap.deserialize(await this.readBytes(e), this.size, { granularity: granularityOf(e), enabled: enabled(e) });
  }

  /** Dirty granules and bytes of a bitmap, for any granularity. */
  async count(e: DirEntry): Promise<{ granules: number; bytes: number }> {
    const data = await this.readBytes(e);
    const g = granularityOf(e);
    let granules = 0;
    for (let i = 0; i < data.length; i++) granules += POPCOUNT[data[i]!]!;
    // only the last granule may be short
    const bits = Math.ceil(this.size / g);
    const lastSet = bits > 0 && (data[(bits - 1) >>> 3]! >>> ((bits - 1) & 7)) & 1;
    return { granules, bytes: granules * g - (lastSet ? bits * g - this.size : 0) };
  }

  /**
   * Replace the directory by `next` (in that order), in the crash-safe order of the file comment:
   * entries with `bits` get new tables and data; the others keep theirs.
   */
  async commit(next: readonly NextEntry[]): Promise<void> {
    const image = this.image;
    const rc = image.rc;
    const cs = image.clusterSize;
    const file = image.file;
    if (next.length > MAX_BITMAPS) throw new BlkrepError('ERR_NO_SPACE', `qcow2 image "${this.path}" cannot hold more than ${MAX_BITMAPS} bitmaps`, { errno: 'ENOSPC' });
    const allocate = (n: number): Promise<number> => image.metaLock.run(async () => (await rc.allocate(n)).cluster * cs);
    // the header must have room for the extension before anything is allocated (else leaks)
    const h = image.header;
    const cluster0 = Buffer.alloc(cs);
    await file.read(0, cluster0);
    if (next.length > 0) rebuildHeader(this.path, cluster0, h, { nbBitmaps: next.length, directorySize: 0, directoryOffset: 0 });

    // 1. data and tables
    const entries: DirEntry[] = [];
    for (const n of next) {
      if (!n.bits) {
        if (n.entry.tableOffset === undefined || n.entry.tableSize === undefined) throw new BlkrepError('ERR_INTERNAL', `qcow2 bitmap "${n.entry.name}" has neither a table nor bits`);
        entries.push({ ...n.entry, tableOffset: n.entry.tableOffset, tableSize: n.entry.tableSize });
        continue;
      }
      const data = n.bits.serialize();
      const tableSize = tableEntries(this.size, n.entry.granularityBits, image.clusterBits);
      const table = Buffer.alloc(Math.ceil((tableSize * 8) / cs) * cs);
      let writes: Array<Promise<void>> = [];
      for (let i = 0; i < tableSize; i++) {
        const chunk = data.subarray(i * cs, (i + 1) * cs);
        if (isZero(chunk)) continue;
        const at = await allocate(1);
        const cluster = Buffer.alloc(cs);
        chunk.copy(cluster);
        writes.push(file.write(at, cluster));
        if (writes.length >= 32) {
          await Promise.all(writes);
          writes = [];
        }
        table.writeBigUInt64BE(BigInt(at), i * 8);
      }
      await Promise.all(writes);
      const tableAt = await allocate(table.length / cs);
      await file.write(tableAt, table);
      entries.push({ ...n.entry, tableOffset: tableAt, tableSize });
    }

    // 2. the directory
    let ext: BitmapsExtension | undefined;
    if (entries.length > 0) {
      const dir = buildDirectory(entries);
      if (dir.length > MAX_BITMAP_DIRECTORY_BYTES) {
        throw new BlkrepError('ERR_NO_SPACE', `the bitmap directory of "${this.path}" would need ${dir.length} bytes, more than QEMU's limit of ${MAX_BITMAP_DIRECTORY_BYTES}`, { errno: 'ENOSPC' });
      }
      const padded = Buffer.alloc(Math.ceil(dir.length / cs) * cs);
      dir.copy(padded);
      const at = await allocate(padded.length / cs);
      await file.write(at, padded);
      ext = { nbBitmaps: entries.length, directorySize: dir.length, directoryOffset: at };
    }

    // 3. everything new is durable and counted
    await file.sync();
    await image.cycleLock.run(() => image.writebackAll());

    // 4. the header switches to the new directory
    const oldExt = h.bitmaps;
    const header = rebuildHeader(this.path, cluster0, h, ext);
    let first = 0;
    while (first < cs && header[first] === cluster0[first]) first++;
    if (first < cs) {
      let last = cs - 1;
      while (header[last] === cluster0[last]) last--;
      await file.write(first, header.subarray(first, last + 1));
      await file.sync();
    }
    h.bitmaps = ext;
    h.hasBitmapsExtension = ext !== undefined;
    h.autoclear = header.readBigUInt64BE(H.autoclear);
    h.backingFileOffset = Number(header.readBigUInt64BE(H.backingFileOffset));
    const old = this.entries;
    this.entries = entries;
    image.bitmaps = entries.map((e) => ({
      name: e.name,
      granularity: granularityOf(e),
      flags: [...(inUse(e) ? ['in-use'] : []), ...(enabled(e) ? ['auto'] : [])],
      inUse: inUse(e),
      enabled: enabled(e),
      tableOffset: e.tableOffset,
      tableSize: e.tableSize,
    }));

    // 5. free what the old directory alone used
    const stillUsed = new Set(entries.map((e) => e.tableOffset));
    const frees: Array<[number, number]> = [];
    if (oldExt) frees.push([oldExt.directoryOffset, Math.ceil(oldExt.directorySize / cs)]);
    for (const e of old) {
      if (stillUsed.has(e.tableOffset)) continue;
      frees.push([e.tableOffset, Math.ceil((e.tableSize * 8) / cs)]);
      let table: bigint[];
      try {
        table = await this.readTable(e);
      } catch {
        continue; // a broken table: its data clusters leak rather than free something else
      }
      for (const v of table) {
        const offset = Number(v & TABLE_OFFSET);
        if (offset !== 0) frees.push([offset, 1]);
      }
    }
    if (frees.length > 0) {
      await image.metaLock.run(async () => {
        for (const [offset, clusters] of frees) {
          const freed = await rc.change(offset / cs, clusters, -1);
          for (const c of freed) await file.punch(c * cs, cs);
        }
      });
      await image.cycleLock.run(() => image.writebackAll());
    }
  }

  async close(): Promise<void> {
    try {
      if (!this.image.readOnly) await this.image.cycleLock.run(() => this.image.writebackAll());
    } finally {
      await this.image.file.close();
    }
  }
}

async function readDirectory(image: Qcow2Image): Promise<DirEntry[]> {
  const ext = image.header.bitmaps;
  if (!ext) return [];
  if (ext.directoryOffset + ext.directorySize > image.file.length) {
    throw corrupt(image.path, `the bitmap directory at ${ext.directoryOffset} of ${ext.directorySize} bytes lies past the end of the file (${image.file.length} bytes)`, {
      directoryOffset: ext.directoryOffset,
    });
  }
  const dir = Buffer.alloc(ext.directorySize);
  await image.file.read(ext.directoryOffset, dir);
  return parseDirectory(image.path, image.header, ext, dir);
}

const ZEROS = Buffer.alloc(64 * 1024);
const POPCOUNT = Uint8Array.from({ length: 256 }, (_, b) => {
  let n = 0;
  for (let x = b; x !== 0; x &= x - 1) n++;
  return n;
});

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += ZEROS.length) {
    const part = b.subarray(i, Math.min(b.length, i + ZEROS.length));
    if (!part.equals(ZEROS.subarray(0, part.length))) return false;
  }
  return true;
}

export function inconsistent(path: string, name: string): BlkrepError {
  return new BlkrepError(
    'ERR_BITMAP_IN_USE',
    `bitmap "${name}" of qcow2 image ${path} is inconsistent (flag in-use: the program that had the image open for writing did not close it, so writes may be missing from it — or it still runs: then change the bitmap through it, e.g. blkrep bitmap … --control for serve-nbd); as with QEMU, it can only be removed: blkrep bitmap remove ${path} --name ${name}`,
    { errno: 'EPERM', details: { path, name } },
  );
}

/** Granularities blkrep's bitmaps handle (512 B … 64 MiB) — qcow2 allows up to 2 GiB. */
export function checkSupported(path: string, e: DirEntry): void {
  const g = granularityOf(e);
  if (g < MIN_GRANULARITY || g > MAX_GRANULARITY) {
    throw new BlkrepError('ERR_NOT_SUPPORTED', `bitmap "${e.name}" of qcow2 image ${path} has a granularity of ${g} bytes; blkrep handles ${MIN_GRANULARITY} B … ${MAX_GRANULARITY / 1024 / 1024} MiB (use qemu-img bitmap for it)`, {
      errno: 'ENOTSUP',
      details: { path, name: e.name, granularity: g },
    });
  }
}
