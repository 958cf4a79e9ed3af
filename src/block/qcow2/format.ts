/**
 * The qcow2 on-disk format (reference part B): the header in cluster 0, its extensions, and the
 * open-time checks QEMU performs (B.11). Everything here is pure: bytes in, typed values or a
 * BlkrepError out. Every size read from the file is checked against a limit before anything is
 * allocated from it.
 */
import { BlkrepError } from '../../api/errors.js';
import type { Qcow2Container } from './file.js';

export const QCOW2_MAGIC = 0x514649fb;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limits: active L1 table ≤ 32 MiB, refcount table ≤ 8 MiB */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
/** QEMU: QCOW_MAX_SNAPSHOTS_SIZE, the largest snapshot table it reads */
export const MAX_SNAPSHOT_TABLE_BYTES = 1024 * MAX_SNAPSHOTS;
export const MAX_BACKING_NAME = 1023;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;
/** Offsets are JavaScript numbers: anything from 2^53 on cannot be addressed exactly. */
export const MAX_OFFSET = Number.MAX_SAFE_INTEGER;

export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** what QEMU 7.2 writes (104 + compression type + padding) */
export const V3_HEADER_LENGTH = 112;

// header field offsets
export const H = {
  magic: 0,
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatible: 72,
  compatible: 80,
  autoclear: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Feature names QEMU 7.2 writes into the feature name table, in its order. */
export const QEMU_FEATURE_NAMES: ReadonlyArray<[kind: number, bit: number, name: string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

export interface FeatureName {
  kind: number;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  // from the extensions and the backing name
  backingFile: string | undefined;
  backingFormat: string | undefined;
  featureNames: FeatureName[];
  /** present and trusted only while autoclear bit 0 is set (C.1) */
  bitmaps: BitmapsExtension | undefined;
  /** a bitmaps extension exists, whether or not autoclear bit 0 trusts it */
  hasBitmapsExtension: boolean;
  dataFile: string | undefined;
  /** types of extensions we do not know (kept byte for byte: we never rewrite the extensions) */
  unknownExtensions: number[];
}

export function corrupt(path: string, what: string, details: Record<string, unknown> = {}, errno: 'EIO' | 'EINVAL' = 'EINVAL'): BlkrepError {
  return new BlkrepError('ERR_QCOW2_CORRUPT', `qcow2 image "${path}" is corrupt: ${what}`, { errno, details: { path, ...details } });
}

export function unsupported(path: string, feature: string, what: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_QCOW2_UNSUPPORTED', `qcow2 image "${path}": ${what}`, { errno: 'ENOTSUP', details: { path, feature, ...details } });
}

/** A u64 field as a number, or an error naming it when it does not fit below 2^53. */
function u64(buf: Buffer, at: number, path: string, field: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(MAX_OFFSET)) throw corrupt(path, `${field} ${v} is too large (above 2^53)`, { [field]: v.toString() });
  return Number(v);
}

export function clusterAligned(offset: number, clusterBits: number): boolean {
  return offset % 2 ** clusterBits === 0;
}

/** L1 entries needed to map `size` bytes. */
export function l1EntriesFor(size: number, clusterBits: number): number {
  const l2Bits = clusterBits - 3;
  return Math.ceil(size / 2 ** (clusterBits + l2Bits));
}

/**
 * Parse and check the header (the first cluster of the file, or as much of it as exists).
 * `fileLength` bounds tables that must lie inside the file.
 */
/**
 * Read and parse the header of an image: cluster_bits first, so that the read of the header
 * cluster is bounded (parseHeader then rejects a bad value).
 */
export async function readHeader(file: Qcow2Container): Promise<Qcow2Header> {
  const start = Buffer.alloc(Math.min(file.length, 512));
  await file.read(0, start);
  const bits = start.length >= 24 ? start.readUInt32BE(H.clusterBits) : 9;
  const cluster0 = Buffer.alloc(Math.min(file.length, 2 ** (bits >= 9 && bits <= 21 ? bits : 9)));
  await file.read(0, cluster0);
  return parseHeader(file.path, cluster0);
}

export function parseHeader(path: string, cluster0: Buffer): Qcow2Header {
  if (cluster0.length < V2_HEADER_LENGTH || cluster0.readUInt32BE(H.magic) !== QCOW2_MAGIC) {
    throw corrupt(path, 'no qcow2 magic (QFI\\xfb) at offset 0, or the file is shorter than a qcow2 header (72 bytes)', { length: cluster0.length });
  }
  const version = cluster0.readUInt32BE(H.version);
  if (version !== 2 && version !== 3) {
    throw unsupported(path, 'version', `qcow2 version ${version} is not supported (only 2 and 3)`, { version });
  }
  const clusterBits = cluster0.readUInt32BE(H.clusterBits);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw unsupported(path, 'cluster size', `cluster_bits ${clusterBits} is out of range: cluster sizes 512 B (9) … 2 MiB (21) are supported`, { clusterBits });
  }
  const clusterSize = 2 ** clusterBits;
  let headerLength = V2_HEADER_LENGTH;
  let incompatible = 0n;
  let compatible = 0n;
  let autoclear = 0n;
  let refcountOrder = 4;
  let compressionType = 0;
  if (version === 3) {
    if (cluster0.length < V3_MIN_HEADER_LENGTH) throw corrupt(path, `file of ${cluster0.length} bytes is shorter than a version 3 header (104 bytes)`);
    headerLength = cluster0.readUInt32BE(H.headerLength);
    if (headerLength < V3_MIN_HEADER_LENGTH) throw corrupt(path, `header_length ${headerLength} is below 104`, { headerLength });
    if (headerLength % 8 !== 0) throw corrupt(path, `header_length ${headerLength} is not a multiple of 8`, { headerLength });
    if (headerLength > clusterSize) throw corrupt(path, `header_length ${headerLength} exceeds the cluster size ${clusterSize}`, { headerLength, clusterSize });
    incompatible = cluster0.readBigUInt64BE(H.incompatible);
    compatible = cluster0.readBigUInt64BE(H.compatible);
    autoclear = cluster0.readBigUInt64BE(H.autoclear);
    refcountOrder = cluster0.readUInt32BE(H.refcountOrder);
    // fields past header_length are absent and read as 0
    compressionType = headerLength > H.compressionType && cluster0.length > H.compressionType ? cluster0[H.compressionType]! : 0;
  }
  if (refcountOrder > 6) throw unsupported(path, 'refcount width', `refcount_order ${refcountOrder} is out of range (0 … 6: refcounts of 1 … 64 bits)`, { refcountOrder });

  const size = u64(cluster0, H.size, path, 'size');
  const cryptMethod = cluster0.readUInt32BE(H.cryptMethod);
  const l1Size = cluster0.readUInt32BE(H.l1Size);
  const l1TableOffset = u64(cluster0, H.l1TableOffset, path, 'l1_table_offset');
  const refcountTableOffset = u64(cluster0, H.refcountTableOffset, path, 'refcount_table_offset');
  const refcountTableClusters = cluster0.readUInt32BE(H.refcountTableClusters);
  const nbSnapshots = cluster0.readUInt32BE(H.nbSnapshots);
  const snapshotsOffset = u64(cluster0, H.snapshotsOffset, path, 'snapshots_offset');
  const backingFileOffset = u64(cluster0, H.backingFileOffset, path, 'backing_file_offset');
  const backingFileSize = cluster0.readUInt32BE(H.backingFileSize);

  if (refcountTableClusters === 0) throw corrupt(path, 'refcount_table_clusters is 0: the image has no refcount table');
  if (refcountTableClusters > MAX_REFTABLE_BYTES / clusterSize) {
    throw corrupt(path, `refcount table of ${refcountTableClusters} clusters (${refcountTableClusters * clusterSize} bytes) is larger than the limit of ${MAX_REFTABLE_BYTES} bytes`, { refcountTableClusters });
  }
  checkTable(path, 'refcount table', refcountTableOffset, refcountTableClusters * clusterSize, clusterBits);
  if (refcountTableOffset === 0) throw corrupt(path, 'refcount_table_offset is 0');

  if (l1Size > MAX_L1_BYTES / 8) throw corrupt(path, `L1 table of ${l1Size} entries (${l1Size * 8} bytes) is larger than the limit of ${MAX_L1_BYTES} bytes`, { l1Size });
  const l1Needed = l1EntriesFor(size, clusterBits);
  if (l1Size < l1Needed) {
    throw corrupt(path, `L1 table of ${l1Size} entries is too small for the virtual size ${size} (needs ${l1Needed} with ${clusterSize}-byte clusters)`, { l1Size, size, l1Needed });
  }
  if (l1Size > 0) {
    if (l1TableOffset === 0) throw corrupt(path, `l1_table_offset is 0 with ${l1Size} L1 entries`, { l1Size });
    checkTable(path, 'L1 table', l1TableOffset, l1Size * 8, clusterBits);
  }

  if (nbSnapshots > MAX_SNAPSHOTS) throw corrupt(path, `nb_snapshots ${nbSnapshots} is above the limit of ${MAX_SNAPSHOTS}`, { nbSnapshots });
  if (nbSnapshots > 0) {
    if (snapshotsOffset === 0) throw corrupt(path, `snapshots_offset is 0 with ${nbSnapshots} snapshots`, { nbSnapshots });
    checkTable(path, 'snapshot table', snapshotsOffset, 0, clusterBits);
  }

  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileOffset > clusterSize) {
      throw corrupt(path, `backing_file_offset ${backingFileOffset} is outside the header cluster (${clusterSize} bytes)`, { backingFileOffset, clusterSize });
    }
    const limit = Math.min(MAX_BACKING_NAME, clusterSize - backingFileOffset);
    if (backingFileSize > limit) {
      throw corrupt(path, `backing file name of ${backingFileSize} bytes is too long (at most ${limit} at offset ${backingFileOffset})`, { backingFileSize, backingFileOffset });
    }
    if (backingFileOffset + backingFileSize > cluster0.length) {
      throw corrupt(path, `backing file name at ${backingFileOffset}+${backingFileSize} lies past the end of the file (${cluster0.length} bytes)`, { backingFileOffset, backingFileSize });
    }
    backingFile = cluster0.subarray(backingFileOffset, backingFileOffset + backingFileSize).toString('utf8');
    if (backingFile === '') backingFile = undefined;
  }

  const header: Qcow2Header = {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatible,
    compatible,
    autoclear,
    refcountOrder,
    headerLength,
    compressionType,
    backingFile,
    backingFormat: undefined,
    featureNames: [],
    bitmaps: undefined,
    hasBitmapsExtension: false,
    dataFile: undefined,
    unknownExtensions: [],
  };
  if (version === 3) parseExtensions(path, cluster0, header);
  return header;
}

function checkTable(path: string, what: string, offset: number, bytes: number, clusterBits: number): void {
  if (!clusterAligned(offset, clusterBits)) {
    throw corrupt(path, `${what} offset ${offset} is not aligned to the cluster size ${2 ** clusterBits}`, { offset });
  }
  if (offset + bytes > MAX_OFFSET) throw corrupt(path, `${what} at ${offset} of ${bytes} bytes ends past 2^53`, { offset, bytes });
}

function parseExtensions(path: string, cluster0: Buffer, h: Qcow2Header): void {
  const clusterSize = 2 ** h.clusterBits;
  const end = Math.min(h.backingFileOffset !== 0 ? h.backingFileOffset : clusterSize, cluster0.length);
  const seen = new Set<number>();
  let at = h.headerLength;
  while (at + 8 <= end) {
    const type = cluster0.readUInt32BE(at);
    const length = cluster0.readUInt32BE(at + 4);
    if (type === EXT_END) return;
    const dataAt = at + 8;
    if (length > end - dataAt) {
      throw corrupt(path, `header extension 0x${type.toString(16)} at ${at} has length ${length}, past the end of the extension area (${end})`, { type, length, at });
    }
    const data = cluster0.subarray(dataAt, dataAt + length);
    const known = type === EXT_BACKING_FORMAT || type === EXT_FEATURE_TABLE || type === EXT_BITMAPS || type === EXT_CRYPTO || type === EXT_DATA_FILE;
    if (known && seen.has(type)) throw corrupt(path, `header extension 0x${type.toString(16)} appears twice`, { type });
    seen.add(type);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (length >= 16) throw corrupt(path, `backing format extension of ${length} bytes is too long (at most 15)`, { length });
        h.backingFormat = data.toString('utf8');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= length; i += 48) {
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          h.featureNames.push({ kind: data[i]!, bit: data[i + 1]!, name: raw.subarray(0, nul < 0 ? raw.length : nul).toString('utf8') });
        }
        break;
      case EXT_BITMAPS:
        h.hasBitmapsExtension = true;
        // Without autoclear bit 0 the extension is stale (a program without bitmap support wrote
        // the image); QEMU ignores it then, and so do we.
        if ((h.autoclear & AUTOCLEAR_BITMAPS) !== 0n) h.bitmaps = parseBitmapsExtension(path, data, h.clusterBits);
        break;
      case EXT_CRYPTO:
        if (h.cryptMethod !== 2) throw corrupt(path, `a LUKS encryption header extension without LUKS encryption (crypt_method ${h.cryptMethod})`, { cryptMethod: h.cryptMethod });
        break;
      case EXT_DATA_FILE:
        h.dataFile = data.toString('utf8');
        break;
      default:
        h.unknownExtensions.push(type);
    }
    at = dataAt + Math.ceil(length / 8) * 8;
  }
}

function parseBitmapsExtension(path: string, data: Buffer, clusterBits: number): BitmapsExtension {
  if (data.length !== 24) throw corrupt(path, `bitmaps extension has length ${data.length}, not 24`, { length: data.length });
  const nbBitmaps = data.readUInt32BE(0);
  const reserved = data.readUInt32BE(4);
  const directorySize = data.readBigUInt64BE(8);
  const directoryOffset = data.readBigUInt64BE(16);
  if (reserved !== 0) throw corrupt(path, `bitmaps extension reserved field is ${reserved}, not 0`);
  if (nbBitmaps === 0 || nbBitmaps > MAX_BITMAPS) throw corrupt(path, `bitmaps extension counts ${nbBitmaps} bitmaps (1 … ${MAX_BITMAPS} allowed)`, { nbBitmaps });
  if (directorySize > BigInt(MAX_BITMAP_DIRECTORY_BYTES)) {
    throw corrupt(path, `bitmap directory of ${directorySize} bytes is larger than the limit of ${MAX_BITMAP_DIRECTORY_BYTES}`, { directorySize: directorySize.toString() });
  }
  if (directoryOffset > BigInt(MAX_OFFSET) || Number(directoryOffset) % 2 ** clusterBits !== 0) {
    throw corrupt(path, `bitmap directory offset ${directoryOffset} is not cluster aligned or too large`, { directoryOffset: directoryOffset.toString() });
  }
  return { nbBitmaps, directorySize: Number(directorySize), directoryOffset: Number(directoryOffset) };
}

/** The name of a feature bit, from the image's feature name table when it has one. */
export function featureName(h: Qcow2Header, kind: number, bit: number): string | undefined {
  return h.featureNames.find((f) => f.kind === kind && f.bit === bit)?.name;
}

/**
 * Refuse what this driver cannot open (B.11), naming the feature. Read-only opens accept a dirty
 * or corrupt image and internal snapshots; read-write opens do not.
 */
export function checkFeatures(path: string, h: Qcow2Header, readOnly: boolean): void {
  if (h.cryptMethod !== 0) {
    const kind = h.cryptMethod === 1 ? 'AES' : h.cryptMethod === 2 ? 'LUKS' : `method ${h.cryptMethod}`;
    throw unsupported(path, 'encryption', `encrypted images (${kind} encryption) are not supported`, { cryptMethod: h.cryptMethod });
  }
  const unknown = h.incompatible & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    const bits: string[] = [];
    for (let b = 0; b < 64; b++) {
      if ((unknown >> BigInt(b)) & 1n) {
        const name = featureName(h, 0, b);
        bits.push(name ? `${b} ("${name}")` : String(b));
      }
    }
    throw unsupported(path, 'unknown incompatible features', `unsupported incompatible feature bit${bits.length > 1 ? 's' : ''} ${bits.join(', ')}`, {
      incompatible: `0x${h.incompatible.toString(16)}`,
    });
  }
  if (h.incompatible & INCOMPAT_DATA_FILE) {
    throw unsupported(path, 'external data file', `images with an external data file${h.dataFile ? ` ("${h.dataFile}")` : ''} are not supported (incompatible feature bit 2)`);
  }
  if (h.incompatible & INCOMPAT_EXTL2) {
    throw unsupported(path, 'extended L2 entries', 'images with extended L2 entries (subclusters, incompatible feature bit 4) are not supported');
  }
  if (h.incompatible & INCOMPAT_COMPRESSION) {
    if (h.compressionType === 0) throw corrupt(path, 'the compression type feature bit (3) is set but the compression type is deflate (0)');
    const name = h.compressionType === 1 ? 'zstd' : `type ${h.compressionType}`;
    throw unsupported(path, 'zstd compression', `images with ${name} compression are not supported (only deflate/zlib)`, { compressionType: h.compressionType });
  }
  if (h.compressionType !== 0) {
    throw corrupt(path, `compression type ${h.compressionType} without the compression type feature bit (3)`, { compressionType: h.compressionType });
  }
  if (readOnly) return;
  if (h.incompatible & INCOMPAT_CORRUPT) {
    throw new BlkrepError('ERR_QCOW2_CORRUPT', `qcow2 image "${path}" is marked corrupt (incompatible feature bit 1): it can only be opened read-only; repair it with "qemu-img check -r all ${path}"`, {
      errno: 'EPERM',
      details: { path, feature: 'corrupt' },
    });
  }
  if (h.incompatible & INCOMPAT_DIRTY) {
    throw unsupported(path, 'dirty', `the image is dirty (incompatible feature bit 0: its refcounts may be stale after a crash with lazy refcounts) and cannot be opened read-write; open it read-only, or repair it with "qemu-img check -r all ${path}"`);
  }
  if (h.nbSnapshots > 0) {
    throw unsupported(path, 'internal snapshots', `images with internal snapshots (${h.nbSnapshots}) can only be opened read-only`, { nbSnapshots: h.nbSnapshots });
  }
  if (h.version === 2) {
    throw unsupported(path, 'version 2', 'qcow2 version 2 (compat=0.10) images can only be opened read-only; upgrade with "qemu-img amend -o compat=1.1"');
  }
}

// -------------------------------------------------------------------------------------------------
// snapshot table and bitmap directory: read to validate, list and preserve, never written

export interface SnapshotInfo {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  vmStateSize: number;
  dateSeconds: number;
  diskSize: number | undefined;
  /** bytes of its entry in the snapshot table, padded to 8 */
  entryBytes: number;
}

/** Parse the snapshot table from its bytes (the caller reads at most MAX_SNAPSHOT_TABLE_BYTES). */
export function parseSnapshots(path: string, h: Qcow2Header, table: Buffer): SnapshotInfo[] {
  const out: SnapshotInfo[] = [];
  let at = 0;
  for (let i = 0; i < h.nbSnapshots; i++) {
    if (at + 40 > table.length) throw corrupt(path, `snapshot ${i} at offset ${h.snapshotsOffset + at} lies past the end of the snapshot table or file`, { snapshot: i });
    const l1TableOffset = Number(table.readBigUInt64BE(at));
    const l1Size = table.readUInt32BE(at + 8);
    const idLength = table.readUInt16BE(at + 12);
    const nameLength = table.readUInt16BE(at + 14);
    const dateSeconds = table.readUInt32BE(at + 16);
    const vmStateSize = table.readUInt32BE(at + 32);
    const extraSize = table.readUInt32BE(at + 36);
    const entryLength = 40 + extraSize + idLength + nameLength;
    if (at + entryLength > table.length) {
      throw corrupt(path, `snapshot ${i} (extra data ${extraSize}, id ${idLength}, name ${nameLength} bytes) lies past the end of the snapshot table`, { snapshot: i, extraSize });
    }
    if (l1Size > MAX_L1_BYTES / 8) throw corrupt(path, `snapshot ${i} has an L1 table of ${l1Size} entries, above the limit`, { snapshot: i, l1Size });
    if (l1TableOffset % 2 ** h.clusterBits !== 0 || l1TableOffset > MAX_OFFSET) {
      throw corrupt(path, `snapshot ${i} L1 table offset ${l1TableOffset} is not cluster aligned`, { snapshot: i, l1TableOffset });
    }
    if (h.version === 3 && extraSize < 16) throw corrupt(path, `snapshot ${i} has ${extraSize} bytes of extra data; version 3 needs at least 16`, { snapshot: i, extraSize });
    const extra = table.subarray(at + 40, at + 40 + extraSize);
    const diskSize = extraSize >= 16 ? Number(extra.readBigUInt64BE(8)) : undefined;
    const idAt = at + 40 + extraSize;
    out.push({
      id: table.subarray(idAt, idAt + idLength).toString('utf8'),
      name: table.subarray(idAt + idLength, idAt + idLength + nameLength).toString('utf8'),
      l1TableOffset,
      l1Size,
      vmStateSize,
      dateSeconds,
      diskSize,
      entryBytes: Math.ceil(entryLength / 8) * 8,
    });
    at += Math.ceil(entryLength / 8) * 8;
  }
  return out;
}

export interface BitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
  inUse: boolean;
  enabled: boolean;
  tableOffset: number;
  tableSize: number;
}

export const BME_IN_USE = 1;
export const BME_AUTO = 2;

/** Parse the bitmap directory (C.2) for listing and for the read-write open decision. */
export function parseBitmapDirectory(path: string, ext: BitmapsExtension, dir: Buffer): BitmapInfo[] {
  const out: BitmapInfo[] = [];
  let at = 0;
  for (let i = 0; i < ext.nbBitmaps; i++) {
    if (at + 24 > dir.length) throw corrupt(path, `bitmap directory entry ${i} lies past the end of the directory (${ext.directorySize} bytes)`, { bitmap: i });
    const tableOffset = Number(dir.readBigUInt64BE(at));
    const tableSize = dir.readUInt32BE(at + 8);
    const flags = dir.readUInt32BE(at + 12);
    const granularityBits = dir[at + 17]!;
    const nameSize = dir.readUInt16BE(at + 18);
    const extraSize = dir.readUInt32BE(at + 20);
    const entryLength = 24 + extraSize + nameSize;
    if (at + entryLength > dir.length) throw corrupt(path, `bitmap directory entry ${i} (name ${nameSize}, extra ${extraSize} bytes) lies past the end of the directory`, { bitmap: i });
    const name = dir.subarray(at + 24 + extraSize, at + 24 + extraSize + nameSize).toString('utf8');
    const names: string[] = [];
    if (flags & BME_IN_USE) names.push('in-use');
    if (flags & BME_AUTO) names.push('auto');
    out.push({
      name,
      granularity: 2 ** granularityBits,
      flags: names,
      inUse: (flags & BME_IN_USE) !== 0,
      enabled: (flags & BME_AUTO) !== 0,
      tableOffset,
      tableSize,
    });
    at += Math.ceil(entryLength / 8) * 8;
  }
  return out;
}

// -------------------------------------------------------------------------------------------------
// writing a new header (create)

export interface NewHeader {
  clusterBits: number;
  refcountOrder: number;
  backingFile?: string;
  backingFormat?: string;
}

/**
 * Cluster 0 of a new, empty image as QEMU 7.2 writes it: size 0, no L1 table, the refcount table
 * in cluster 1 and its first block in cluster 2; extensions: backing format, the feature name
 * table (clusters above 4 KiB); then the backing file name.
 */
export function buildHeaderCluster(n: NewHeader): Buffer {
  const clusterSize = 2 ** n.clusterBits;
  const buf = Buffer.alloc(clusterSize);
  buf.writeUInt32BE(QCOW2_MAGIC, H.magic);
  buf.writeUInt32BE(3, H.version);
  buf.writeUInt32BE(n.clusterBits, H.clusterBits);
  buf.writeBigUInt64BE(BigInt(clusterSize), H.refcountTableOffset);
  buf.writeUInt32BE(1, H.refcountTableClusters);
  buf.writeUInt32BE(n.refcountOrder, H.refcountOrder);
  buf.writeUInt32BE(V3_HEADER_LENGTH, H.headerLength);
  let at = V3_HEADER_LENGTH;
  const ext = (type: number, data: Buffer): void => {
    const padded = Math.ceil(data.length / 8) * 8;
    if (at + 8 + padded > clusterSize) throw new BlkrepError('ERR_USAGE', `the header extensions do not fit in one ${clusterSize}-byte cluster`, { errno: 'EINVAL' });
    buf.writeUInt32BE(type, at);
    buf.writeUInt32BE(data.length, at + 4);
    data.copy(buf, at + 8);
    at += 8 + padded;
  };
  if (n.backingFile !== undefined && n.backingFormat !== undefined) ext(EXT_BACKING_FORMAT, Buffer.from(n.backingFormat, 'utf8'));
  // QEMU leaves the table out for clusters of 4 KiB and less, to keep room for the backing name
  if (clusterSize > 4096) {
    const table = Buffer.alloc(48 * QEMU_FEATURE_NAMES.length);
    QEMU_FEATURE_NAMES.forEach(([kind, bit, name], i) => {
      table[i * 48] = kind;
      table[i * 48 + 1] = bit;
      table.write(name, i * 48 + 2, 'utf8');
    });
    ext(EXT_FEATURE_TABLE, table);
  }
  at += 8; // end of extensions (zeros)
  if (n.backingFile !== undefined) {
    const name = Buffer.from(n.backingFile, 'utf8');
    if (name.length > MAX_BACKING_NAME || at + name.length > clusterSize) {
      throw new BlkrepError('ERR_USAGE', `backing file name of ${name.length} bytes is too long (at most ${Math.min(MAX_BACKING_NAME, clusterSize - at)})`, { errno: 'EINVAL' });
    }
    buf.writeBigUInt64BE(BigInt(at), H.backingFileOffset);
    buf.writeUInt32BE(name.length, H.backingFileSize);
    name.copy(buf, at);
  }
  return buf;
}
