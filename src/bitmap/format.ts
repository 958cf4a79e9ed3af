/**
 * The bitmap file format (man/blkrep-bitmap.5): pure encoders and decoders, no I/O.
 *
 *   0          header slot 0 (4 KiB)      two slots; the valid one with the higher generation
 *   4096       header slot 1 (4 KiB)      is current; a header is written to slot gen mod 2
 *   8192       activity log: al_slots blocks of al_block_size bytes (ring of transactions)
 *   crc_off    page checksum table: one u32 CRC-32C per data page, padded to 4 KiB
 *   data_off   bitmap data: QEMU's bit layout, in 4 KiB pages, the last one zero-padded
 *
 * Integers are big-endian. Every structure carries a CRC-32C, so a torn or rotten write is
 * detected rather than believed.
 */
import { BlkrepError } from '../api/errors.js';
import { crc32c } from './crc32c.js';
import { MAX_GRANULARITY, MIN_GRANULARITY, PAGE_BYTES, bitCount } from './dirty-bitmap.js';

export const MAGIC = Buffer.from('BLKRBMAP', 'latin1');
export const VERSION = 1;
export const HEADER_SLOT_BYTES = 4096;
export const HEADER_BYTES = 128;
export const AL_OFFSET = 2 * HEADER_SLOT_BYTES;
export const AL_MAGIC = 0x4252414c; // "BRAL"
export const AL_HEADER_BYTES = 32;

export const FLAG_ENABLED = 1 << 0;
export const FLAG_IN_USE = 1 << 1;
export const FLAG_FROZEN = 1 << 2;
export const KNOWN_FLAGS = FLAG_ENABLED | FLAG_IN_USE | FLAG_FROZEN;

export const DEFAULT_EXTENT_SIZE = 4 * 1024 * 1024;
export const MIN_EXTENT_SIZE = 4096;
export const MAX_EXTENT_SIZE = 2 ** 40;
export const DEFAULT_HOT_EXTENTS = 1024;
export const MAX_HOT_EXTENTS = 8192;
export const DEFAULT_AL_SLOTS = 4;
export const MAX_AL_SLOTS = 64;

/** Everything the header says. */
export interface Header {
  generation: number;
  size: number;
  granularity: number;
  extentSize: number;
  alSlots: number;
  flags: number;
  /** most extents the activity log keeps hot */
  hotExtents: number;
  alBlockSize: number;
  /** the activity-log session: AL blocks of other sessions are stale */
  session: number;
  /** checkpoint number being recorded (live file) or frozen (checkpoint file) */
  epoch: number;
  createdAt: number;
  modifiedAt: number;
  /** dirty granules when the header was written; exact when the file is clean */
  dirtyGranules: number;
  crcTableOffset: number;
  dataOffset: number;
  dataLength: number;
}

export interface Geometry {
  size: number;
  granularity: number;
  extentSize: number;
  hotExtents: number;
  alSlots: number;
}

export interface Layout {
  alBlockSize: number;
  pages: number;
  crcTableOffset: number;
  crcTableLength: number;
  dataOffset: number;
  dataLength: number;
  fileLength: number;
  extents: number;
}

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to;
const isPow2 = (n: number) => Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;

/** Where everything lives for a geometry; throws ERR_BITMAP_INVALID for impossible geometry. */
export function computeLayout(g: Geometry): Layout {
  const bits = bitCount(g.size, g.granularity);
  if (!isPow2(g.extentSize) || g.extentSize < MIN_EXTENT_SIZE || g.extentSize > MAX_EXTENT_SIZE) {
    throw invalid(`activity-log extent size ${g.extentSize} is not a power of two from ${MIN_EXTENT_SIZE} to ${MAX_EXTENT_SIZE} bytes`, { extentSize: g.extentSize });
  }
  if (!Number.isSafeInteger(g.hotExtents) || g.hotExtents < 1 || g.hotExtents > MAX_HOT_EXTENTS) {
    throw invalid(`hot extents ${g.hotExtents} is not from 1 to ${MAX_HOT_EXTENTS}`, { hotExtents: g.hotExtents });
  }
  if (!Number.isSafeInteger(g.alSlots) || g.alSlots < 2 || g.alSlots > MAX_AL_SLOTS) {
    throw invalid(`activity-log slots ${g.alSlots} is not from 2 to ${MAX_AL_SLOTS}`, { alSlots: g.alSlots });
  }
  const alBlockSize = roundUp(AL_HEADER_BYTES + 8 * g.hotExtents, 4096);
  const pages = Math.ceil(Math.ceil(bits / 8) / PAGE_BYTES);
  const crcTableOffset = AL_OFFSET + g.alSlots * alBlockSize;
  const crcTableLength = roundUp(pages * 4, 4096);
  const dataOffset = crcTableOffset + crcTableLength;
  const dataLength = pages * PAGE_BYTES;
  return {
    alBlockSize,
    pages,
    crcTableOffset,
    crcTableLength,
    dataOffset,
    dataLength,
    fileLength: dataOffset + dataLength,
    extents: Math.ceil(g.size / g.extentSize),
  };
}

function invalid(message: string, details: Record<string, unknown>): BlkrepError {
  return new BlkrepError('ERR_BITMAP_INVALID', message, { errno: 'EINVAL', details });
}

// ------------------------------------------------------------------------------------- header

/** A 4 KiB header slot. */
export function encodeHeader(h: Header): Buffer {
  const b = Buffer.alloc(HEADER_SLOT_BYTES);
  MAGIC.copy(b, 0);
  b.writeUInt32BE(VERSION, 8);
  b.writeUInt32BE(HEADER_BYTES, 12);
  b.writeBigUInt64BE(BigInt(h.generation), 16);
  b.writeBigUInt64BE(BigInt(h.size), 24);
  b.writeUInt8(Math.log2(h.granularity), 32);
  b.writeUInt8(Math.log2(h.extentSize), 33);
  b.writeUInt16BE(h.alSlots, 34);
  b.writeUInt32BE(h.flags >>> 0, 36);
  b.writeUInt32BE(h.hotExtents, 40);
  b.writeUInt32BE(h.alBlockSize, 44);
  b.writeBigUInt64BE(BigInt(h.session), 48);
  b.writeBigUInt64BE(BigInt(h.epoch), 56);
  b.writeBigUInt64BE(BigInt(h.createdAt), 64);
  b.writeBigUInt64BE(BigInt(h.modifiedAt), 72);
  b.writeBigUInt64BE(BigInt(h.dirtyGranules), 80);
  b.writeBigUInt64BE(BigInt(h.crcTableOffset), 88);
  b.writeBigUInt64BE(BigInt(h.dataOffset), 96);
  b.writeBigUInt64BE(BigInt(h.dataLength), 104);
  b.writeUInt32BE(crc32c(b.subarray(0, HEADER_BYTES - 4)), HEADER_BYTES - 4);
  return b;
}

export type HeaderResult = { ok: true; header: Header } | { ok: false; code: HeaderFault; reason: string };
export type HeaderFault = 'magic' | 'version' | 'checksum' | 'field' | 'short';

function u64(b: Buffer, at: number): number {
  const v = b.readBigUInt64BE(at);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.NaN : Number(v);
}

/** Decode and check one header slot. Only a header that passes every check is usable. */
export function decodeHeader(b: Buffer, slot: number): HeaderResult {
  const where = `header slot ${slot}`;
  if (b.length < HEADER_BYTES) return { ok: false, code: 'short', reason: `${where} is truncated (${b.length} of ${HEADER_BYTES} bytes)` };
  if (!b.subarray(0, 8).equals(MAGIC)) {
    return { ok: false, code: 'magic', reason: `${where} does not start with the magic "BLKRBMAP" (not a blkrep bitmap file, or overwritten)` };
  }
  const stored = b.readUInt32BE(HEADER_BYTES - 4);
  const actual = crc32c(b.subarray(0, HEADER_BYTES - 4));
  const version = b.readUInt32BE(8);
  if (stored !== actual) {
    // An unknown version with a bad checksum may simply be a layout we do not know.
    if (version !== VERSION) return { ok: false, code: 'version', reason: `${where} has unknown version ${version} (this blkrep reads version ${VERSION})` };
    return { ok: false, code: 'checksum', reason: `${where} checksum mismatch (stored 0x${hex(stored)}, computed 0x${hex(actual)}): torn or corrupted header` };
  }
  if (version !== VERSION) return { ok: false, code: 'version', reason: `${where} has unknown version ${version} (this blkrep reads version ${VERSION})` };
  const bad = (what: string): HeaderResult => ({ ok: false, code: 'field', reason: `${where}: ${what}` });
  if (b.readUInt32BE(12) !== HEADER_BYTES) return bad(`header length ${b.readUInt32BE(12)} is not ${HEADER_BYTES}`);
  if (!b.subarray(112, HEADER_BYTES - 4).every((x) => x === 0)) return bad('reserved bytes 112–123 are not zero');
  const gbits = b.readUInt8(32);
  const ebits = b.readUInt8(33);
  const h: Header = {
    generation: u64(b, 16),
    size: u64(b, 24),
    granularity: 2 ** gbits,
    extentSize: 2 ** ebits,
    alSlots: b.readUInt16BE(34),
    flags: b.readUInt32BE(36),
    hotExtents: b.readUInt32BE(40),
    alBlockSize: b.readUInt32BE(44),
    session: u64(b, 48),
    epoch: u64(b, 56),
    createdAt: u64(b, 64),
    modifiedAt: u64(b, 72),
    dirtyGranules: u64(b, 80),
    crcTableOffset: u64(b, 88),
    dataOffset: u64(b, 96),
    dataLength: u64(b, 104),
  };
  for (const [k, v] of Object.entries(h)) if (!Number.isSafeInteger(v)) return bad(`${k} does not fit in 2^53`);
  if (h.granularity < MIN_GRANULARITY || h.granularity > MAX_GRANULARITY) return bad(`granularity 2^${gbits} is outside ${MIN_GRANULARITY}…${MAX_GRANULARITY} bytes`);
  if ((h.flags & ~KNOWN_FLAGS) !== 0) return bad(`unknown flags 0x${hex(h.flags & ~KNOWN_FLAGS)}`);
  let layout: Layout;
  try {
    layout = computeLayout(h);
  } catch (err) {
    return bad(err instanceof Error ? err.message : String(err));
  }
  if (h.alBlockSize !== layout.alBlockSize) return bad(`activity-log block size ${h.alBlockSize} is not ${layout.alBlockSize}`);
  if (h.crcTableOffset !== layout.crcTableOffset) return bad(`checksum table offset ${h.crcTableOffset} is not ${layout.crcTableOffset}`);
  if (h.dataOffset !== layout.dataOffset) return bad(`data offset ${h.dataOffset} is not ${layout.dataOffset}`);
  if (h.dataLength !== layout.dataLength) return bad(`data length ${h.dataLength} is not ${layout.dataLength}`);
  const bits = Math.ceil(h.size / h.granularity);
  if (h.dirtyGranules > bits) return bad(`dirty granules ${h.dirtyGranules} is more than the ${bits} granules`);
  if (h.generation === 0) return bad('generation is 0');
  return { ok: true, header: h };
}

function hex(n: number): string {
  return (n >>> 0).toString(16).padStart(8, '0');
}

// ------------------------------------------------------------------------------- activity log

export interface AlTransaction {
  session: number;
  sequence: number;
  /** the whole hot set after this transaction, ascending */
  extents: number[];
}

/** One activity-log block of `blockSize` bytes: the complete hot set, not a delta. */
export function encodeAlBlock(t: AlTransaction, extentSize: number, blockSize: number): Buffer {
  const b = Buffer.alloc(blockSize);
  b.writeUInt32BE(AL_MAGIC, 0);
  b.writeBigUInt64BE(BigInt(t.session), 8);
  b.writeBigUInt64BE(BigInt(t.sequence), 16);
  b.writeUInt32BE(t.extents.length, 24);
  b.writeUInt8(Math.log2(extentSize), 28);
  let at = AL_HEADER_BYTES;
  for (const e of t.extents) {
    b.writeBigUInt64BE(BigInt(e), at);
    at += 8;
  }
  b.writeUInt32BE(crc32c(b), 4);
  return b;
}

export type AlBlockResult = { ok: true; transaction: AlTransaction } | { ok: false; invalid?: string };

/**
 * Decode an AL block. `{ok:false}` without `invalid`: not a complete transaction (never written,
 * torn, zeros) — expected after a crash. With `invalid`: the checksum holds but the contents
 * contradict the header, which no torn write explains, so the caller must not fall back to
 * older blocks.
 */
export function decodeAlBlock(b: Buffer, h: Pick<Header, 'session' | 'extentSize' | 'hotExtents'>, extentCount: number): AlBlockResult {
  if (b.length < AL_HEADER_BYTES || b.readUInt32BE(0) !== AL_MAGIC) return { ok: false };
  const stored = b.readUInt32BE(4);
  const copy = Buffer.from(b);
  copy.writeUInt32BE(0, 4);
  if (crc32c(copy) !== stored) return { ok: false };
  // Each session starts by zeroing the log, so a block of another session means that the header
  // is not the one the log was written under (the newest header was lost, or a field is wrong).
  const session = u64(b, 8);
  if (session !== h.session) return { ok: false, invalid: `belongs to session ${session}, the header's is ${h.session}` };
  const n = b.readUInt32BE(24);
  if (n > h.hotExtents || AL_HEADER_BYTES + 8 * n > b.length) return { ok: false, invalid: `holds ${n} extents, more than the ${h.hotExtents} allowed` };
  if (2 ** b.readUInt8(28) !== h.extentSize) return { ok: false, invalid: `has extent size 2^${b.readUInt8(28)}, the header ${h.extentSize}` };
  if (b.readUIntBE(29, 3) !== 0) return { ok: false, invalid: 'reserved field is not zero' };
  const sequence = u64(b, 16);
  if (!Number.isSafeInteger(sequence)) return { ok: false, invalid: 'sequence does not fit in 2^53' };
  const extents: number[] = [];
  for (let i = 0; i < n; i++) {
    const e = u64(b, AL_HEADER_BYTES + 8 * i);
    if (!Number.isSafeInteger(e) || e >= extentCount) return { ok: false, invalid: `extent ${e} is beyond the ${extentCount} extents of the disk` };
    if (i > 0 && e <= extents[i - 1]!) return { ok: false, invalid: 'extents are not in ascending order' };
    extents.push(e);
  }
  return { ok: true, transaction: { session, sequence, extents } };
}

// ------------------------------------------------------------------------------- data pages

/**
 * Checksums of data pages are seeded with the geometry and the page's index, so a page read
 * under another size or granularity, or found at another place, does not pass.
 */
export class PageChecksum {
  private readonly seed: number;
  private readonly index = Buffer.alloc(8);

  constructor(size: number, granularity: number) {
    const g = Buffer.alloc(12);
    g.writeBigUInt64BE(BigInt(size), 0);
    g.writeUInt32BE(granularity, 8);
    this.seed = crc32c(g);
  }

  of(page: Uint8Array, index: number): number {
    this.index.writeBigUInt64BE(BigInt(index), 0);
    return crc32c(page, crc32c(this.index, this.seed));
  }
}
