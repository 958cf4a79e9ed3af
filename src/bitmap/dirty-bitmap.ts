/**
 * DirtyBitmap — the in-memory dirty bitmap (DESIGN.md §5): one bit per granule of a disk.
 *
 * Bit n covers disk bytes [n·g, (n+1)·g) clipped to the disk's size, g = granularity. The bits
 * live in a Uint32Array; bit n is bit (n mod 32) of word ⌊n/32⌋, so on a little-endian host the
 * array's bytes are exactly QEMU's serialisation (least significant bit of byte 0 = granule 0).
 * Bits past the last granule are always 0.
 *
 * Rounding, the one rule everything depends on:
 * - set (a write happened) rounds OUTWARD: a write touching any byte of a granule dirties it;
 * - clear (a copy finished) rounds INWARD: only granules whose whole range (the last, partial
 *   granule ends at the disk's end) lies inside the cleared range become clean. A copy of part
 *   of a granule says nothing about the rest of it, so clearing it would lose a difference.
 *
 * A disabled bitmap ignores set() (writes are not recorded); explicit operations — fill, clear,
 * setAll, clearAll, merge — work whatever the state, as `qemu-img bitmap` does.
 *
 * Iteration is a word at a time: clean words are skipped with one comparison, the first set bit
 * of a word is found with Math.clz32 on its lowest set bit.
 */
import { createHash } from 'node:crypto';
import { endianness } from 'node:os';
import { BlkrepError } from '../api/errors.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const MIN_GRANULARITY = 512;
export const MAX_GRANULARITY = 64 * MiB;
export const DEFAULT_GRANULARITY = 64 * KiB;
/** At most 2^32 bits (512 MiB of bitmap), QEMU's limit too. */
export const MAX_BITS = 2 ** 32;
/** Change tracking unit for the persistent file: one 4 KiB page = 1024 words. */
export const PAGE_BYTES = 4096;
const WORDS_PER_PAGE_SHIFT = 10;

const LITTLE_ENDIAN = endianness() === 'LE';

/** A run of dirty (or clean) bytes. */
export interface Run {
  offset: number;
  length: number;
}

export interface DirtyCount {
  /** dirty granules */
  granules: number;
  /** dirty bytes (the last granule counts only up to the disk's end) */
  bytes: number;
}

export interface DirtyBitmapOptions {
  /** bytes per bit: a power of two, 512 B … 64 MiB; default 64 KiB */
  granularity?: number;
  /** default true */
  enabled?: boolean;
}

export function popcount32(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

/** index of the lowest set bit of a non-zero word */
function ctz32(x: number): number {
  return 31 - Math.clz32(x & -x);
}

/** mask of bits [lo, hi) of a word, 0 ≤ lo < hi ≤ 32 */
function bitMask(lo: number, hi: number): number {
  const upper = hi === 32 ? 0xffffffff : (1 << hi) - 1;
  return (upper & ~((1 << lo) - 1)) >>> 0;
}

/** Throws ERR_BITMAP_INVALID unless `granularity` is a power of two in [512, 64 MiB]. */
export function checkGranularity(granularity: number): void {
  if (!Number.isSafeInteger(granularity) || granularity < MIN_GRANULARITY || granularity > MAX_GRANULARITY || (granularity & (granularity - 1)) !== 0) {
    throw new BlkrepError('ERR_BITMAP_INVALID', `bitmap granularity ${granularity} is not a power of two from ${MIN_GRANULARITY} to ${MAX_GRANULARITY} bytes`, {
      errno: 'EINVAL',
      details: { granularity },
    });
  }
}

/** Number of bits a bitmap of this geometry has; throws when the size is invalid or too large. */
export function bitCount(size: number, granularity: number): number {
  checkGranularity(granularity);
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new BlkrepError('ERR_BITMAP_INVALID', `bitmap size ${size} is not a byte count below 2^53`, { errno: 'EINVAL', details: { size } });
  }
  const bits = Math.ceil(size / granularity);
  if (bits > MAX_BITS) {
    throw new BlkrepError(
      'ERR_BITMAP_INVALID',
      `a bitmap of ${size} bytes at granularity ${granularity} needs ${bits} bits, more than ${MAX_BITS}; use a granularity of at least ${Math.ceil(size / MAX_BITS)} bytes`,
      { errno: 'EINVAL', details: { size, granularity, bits } },
    );
  }
  return bits;
}

export class DirtyBitmap {
  readonly size: number;
  readonly granularity: number;
  /** number of granules (bits) */
  readonly bits: number;
  /** recording writes (set()); explicit operations ignore this */
  enabled: boolean;

  private readonly words: Uint32Array;
  private dirty = 0;
  /** one byte per 4 KiB page of words: changed since takeChangedPages() (only when tracked) */
  private changed: Uint8Array | undefined;
  private anyChanged = false;

  constructor(size: number, options: DirtyBitmapOptions = {}) {
    const granularity = options.granularity ?? DEFAULT_GRANULARITY;
    this.bits = bitCount(size, granularity);
    this.size = size;
    this.granularity = granularity;
    this.enabled = options.enabled ?? true;
    this.words = new Uint32Array(Math.ceil(this.bits / 32));
  }

  // ----------------------------------------------------------------------------------- counting

  /** dirty granules */
  get dirtyGranules(): number {
    return this.dirty;
  }

  /** dirty bytes, the last granule clipped to the disk's size */
  get dirtyBytes(): number {
    if (this.dirty === 0) return 0;
    let bytes = this.dirty * this.granularity;
    if (this.testBit(this.bits - 1)) bytes -= this.bits * this.granularity - this.size;
    return bytes;
  }

  count(): DirtyCount {
    return { granules: this.dirty, bytes: this.dirtyBytes };
  }

  // ------------------------------------------------------------------------------- byte ranges

  /** Record a write of [offset, offset+length): every granule it touches becomes dirty. Ignored when disabled. */
  set(offset: number, length: number): void {
    if (!this.enabled) return;
    this.fill(offset, length);
  }

  /** Make every granule touching [offset, offset+length) dirty, enabled or not. */
  fill(offset: number, length: number): void {
    this.checkRange(offset, length, 'set');
    if (length === 0) return;
    this.setBits(Math.floor(offset / this.granularity), Math.ceil((offset + length) / this.granularity));
  }

  /**
   * Make clean the granules lying wholly inside [offset, offset+length); a granule only partly
   * inside keeps its state. The last granule is whole when the range reaches the disk's end.
   */
  clear(offset: number, length: number): void {
    this.checkRange(offset, length, 'clear');
    const end = offset + length;
    const first = Math.ceil(offset / this.granularity);
    const last = end === this.size ? this.bits : Math.floor(end / this.granularity);
    if (last > first) this.clearBits(first, last);
  }

  /** Whether any granule touching [offset, offset+length) is dirty (length 0: the granule at offset). */
  isDirty(offset: number, length = 1): boolean {
    this.checkRange(offset, length, 'test');
    if (offset === this.size) return false;
    return this.nextDirty(offset, offset + Math.max(length, 1)) >= 0;
  }

  /** The first byte ≥ offset (and < end, default the disk's end) in a dirty granule, or -1. */
  nextDirty(offset: number, end = this.size): number {
    if (offset >= end) return -1;
    const [from, to] = this.bitSpan(offset, end);
    const bit = this.nextDirtyBit(from, to);
    return bit < 0 ? -1 : Math.max(offset, bit * this.granularity);
  }

  /** The first byte ≥ offset (and < end, default the disk's end) in a clean granule, or -1. */
  nextClean(offset: number, end = this.size): number {
    if (offset >= end) return -1;
    const [from, to] = this.bitSpan(offset, end);
    const bit = this.nextCleanBit(from, to);
    return bit < 0 ? -1 : Math.max(offset, bit * this.granularity);
  }

  /**
   * The dirty runs in [offset, offset+length) (default: the whole disk), merged and clipped to
   * the range, in order.
   */
  *dirtyRuns(offset = 0, length = this.size - offset): Generator<Run> {
    this.checkRange(offset, length, 'dirtyRuns');
    if (length === 0) return;
    const end = offset + length;
    const g = this.granularity;
    const to = Math.ceil(end / g);
    let bit = Math.floor(offset / g);
    for (;;) {
      const d = this.nextDirtyBit(bit, to);
      if (d < 0) return;
      let c = this.nextCleanBit(d + 1, to);
      if (c < 0) c = to;
      const start = Math.max(offset, d * g);
      yield { offset: start, length: Math.min(end, c * g) - start };
      bit = c;
    }
  }

  /** Runs alternating clean/dirty from offset, for block status: [length, dirty] pairs. */
  statusRuns(offset: number, length: number, maxRuns = Infinity): Array<[number, boolean]> {
    this.checkRange(offset, length, 'status');
    const out: Array<[number, boolean]> = [];
    const end = offset + length;
    const g = this.granularity;
    const to = Math.ceil(end / g);
    let pos = offset;
    let bit = Math.floor(offset / g);
    while (pos < end && out.length < maxRuns) {
      const dirty = this.testBit(bit);
      let next = dirty ? this.nextCleanBit(bit, to) : this.nextDirtyBit(bit, to);
      if (next < 0) next = to;
      const stop = Math.min(end, next * g);
      out.push([stop - pos, dirty]);
      pos = stop;
      bit = next;
    }
    return out;
  }

  // ------------------------------------------------------------------------------ whole bitmap

  setAll(): void {
    if (this.bits > 0) this.setBits(0, this.bits);
  }

  clearAll(): void {
    if (this.dirty === 0) return;
    this.clearBits(0, this.bits);
  }

  /** OR another bitmap of the same size and granularity into this one. */
  merge(other: DirtyBitmap): void {
    this.checkSameGeometry(other, 'merge');
    const a = this.words;
    const b = other.words;
    for (let i = 0; i < a.length; i++) {
      const w = b[i]!;
      if (w === 0) continue;
      const old = a[i]!;
      const now = (old | w) >>> 0;
      if (now !== old) {
        this.dirty += popcount32(now & ~old);
        a[i] = now;
        this.markChanged(i, i);
      }
    }
  }

  /** An independent copy (same state, enabled flag, no change tracking). */
  clone(): DirtyBitmap {
    const copy = new DirtyBitmap(this.size, { granularity: this.granularity, enabled: this.enabled });
    copy.words.set(this.words);
    copy.dirty = this.dirty;
    return copy;
  }

  equals(other: DirtyBitmap): boolean {
    if (other.size !== this.size || other.granularity !== this.granularity || other.dirty !== this.dirty) return false;
    const a = this.words;
    const b = other.words;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }

  // ------------------------------------------------------------------------------ serialisation

  /** Bytes needed to serialise: ⌈bits / 8⌉. */
  get byteLength(): number {
    return Math.ceil(this.bits / 8);
  }

  /**
   * The bits as QEMU lays them out (qcow2 bitmap data, least significant bit first): byte i bit j
   * is granule 8i+j. Length ⌈bits/8⌉.
   */
  serialize(): Buffer {
    const out = Buffer.alloc(this.byteLength);
    this.copyBytes(0, out, 0, out.length);
    return out;
  }

  /** Copy serialised bytes [from, from+length) into target at targetOffset (bytes past the end read 0). */
  copyBytes(from: number, target: Uint8Array, targetOffset: number, length: number): void {
    const view = new Uint8Array(this.words.buffer, this.words.byteOffset, this.words.byteLength);
    const n = Math.max(0, Math.min(length, view.length - from));
    if (LITTLE_ENDIAN) {
      target.set(view.subarray(from, from + n), targetOffset);
    } else {
      for (let i = 0; i < n; i++) {
        const byte = from + i;
        target[targetOffset + i] = (this.words[byte >>> 2]! >>> ((byte & 3) * 8)) & 0xff;
      }
    }
    target.fill(0, targetOffset + n, targetOffset + length);
  }

  /**
   * A bitmap from serialised bytes. The buffer holds at least ⌈bits/8⌉ bytes; bits past the last
   * granule must be 0 (they say nothing of the disk, so anything else means corruption).
   */
  static deserialize(data: Uint8Array, size: number, options: DirtyBitmapOptions = {}): DirtyBitmap {
    const bitmap = new DirtyBitmap(size, options);
    bitmap.loadBytes(data);
    return bitmap;
  }

  /** Replace the bits from serialised bytes (see deserialize). */
  loadBytes(data: Uint8Array): void {
    const need = this.byteLength;
    if (data.length < need) {
      throw new BlkrepError('ERR_BITMAP_CORRUPT', `bitmap data has ${data.length} bytes, ${need} are needed for ${this.bits} granules`, {
        errno: 'EINVAL',
        details: { have: data.length, need },
      });
    }
    for (let i = need; i < data.length; i++) {
      if (data[i] !== 0) throw tailError(this.bits);
    }
    const tailBits = this.bits % 8;
    if (tailBits !== 0 && (data[need - 1]! >>> tailBits) !== 0) throw tailError(this.bits);
    const words = this.words;
    words.fill(0);
    const view = new Uint8Array(words.buffer, words.byteOffset, words.byteLength);
    if (LITTLE_ENDIAN) {
      view.set(data.subarray(0, need));
    } else {
      for (let i = 0; i < need; i++) words[i >>> 2] = (words[i >>> 2]! | (data[i]! << ((i & 3) * 8))) >>> 0;
    }
    let dirty = 0;
    for (let i = 0; i < words.length; i++) if (words[i] !== 0) dirty += popcount32(words[i]!);
    this.dirty = dirty;
    this.markChanged(0, words.length - 1);
  }

  /** SHA-256 of the geometry and the bits, hex: equal hashes mean equal bitmaps. */
  hash(): string {
    const h = createHash('sha256');
    h.update(`blkrep-bitmap ${this.size} ${this.granularity}\n`);
    h.update(this.serialize());
    return h.digest('hex');
  }

  // -------------------------------------------------------------------- change tracking (files)

  /** Start recording which 4 KiB pages of the serialised bits change (all pages start changed). */
  trackChanges(): void {
    this.changed = new Uint8Array(this.pageCount).fill(1);
    this.anyChanged = this.pageCount > 0;
  }

  /** number of 4 KiB pages the serialised bits occupy (the last one padded with zeros) */
  get pageCount(): number {
    return Math.ceil(this.byteLength / PAGE_BYTES);
  }

  /** The pages changed since the last call, in order; they count as unchanged from now on. */
  takeChangedPages(): number[] {
    const c = this.changed;
    if (!c || !this.anyChanged) return [];
    const out: number[] = [];
    for (let i = 0; i < c.length; i++) {
      if (c[i]) {
        out.push(i);
        c[i] = 0;
      }
    }
    this.anyChanged = false;
    return out;
  }

  /** Mark every page changed (e.g. after a failed write of them). */
  markPagesChanged(pages: number[]): void {
    const c = this.changed;
    if (!c) return;
    for (const p of pages) c[p] = 1;
    if (pages.length > 0) this.anyChanged = true;
  }

  // ----------------------------------------------------------------------------- bit internals

  testBit(bit: number): boolean {
    if (bit < 0 || bit >= this.bits) return false;
    return ((this.words[Math.floor(bit / 32)]! >>> (bit & 31)) & 1) === 1;
  }

  /** set bits [first, last) */
  setBits(first: number, last: number): void {
    const words = this.words;
    const w0 = Math.floor(first / 32);
    const w1 = Math.floor((last - 1) / 32);
    const changed = this.changed;
    let added = 0;
    for (let i = w0; i <= w1; i++) {
      const lo = i === w0 ? first & 31 : 0;
      const hi = i === w1 ? ((last - 1) & 31) + 1 : 32;
      const mask = lo === 0 && hi === 32 ? 0xffffffff : bitMask(lo, hi);
      const old = words[i]!;
      if ((old & mask) >>> 0 === mask) continue;
      added += popcount32(mask & ~old);
      words[i] = (old | mask) >>> 0;
      if (changed) changed[i >>> WORDS_PER_PAGE_SHIFT] = 1;
    }
    if (added > 0) {
      this.dirty += added;
      if (changed) this.anyChanged = true;
    }
  }

  /** clear bits [first, last) */
  clearBits(first: number, last: number): void {
    const words = this.words;
    const w0 = Math.floor(first / 32);
    const w1 = Math.floor((last - 1) / 32);
    const changed = this.changed;
    let removed = 0;
    for (let i = w0; i <= w1; i++) {
      const old = words[i]!;
      if (old === 0) continue;
      const lo = i === w0 ? first & 31 : 0;
      const hi = i === w1 ? ((last - 1) & 31) + 1 : 32;
      const mask = lo === 0 && hi === 32 ? 0xffffffff : bitMask(lo, hi);
      const hit = old & mask;
      if (hit === 0) continue;
      removed += popcount32(hit);
      words[i] = (old & ~mask) >>> 0;
      if (changed) changed[i >>> WORDS_PER_PAGE_SHIFT] = 1;
    }
    if (removed > 0) {
      this.dirty -= removed;
      if (changed) this.anyChanged = true;
    }
  }

  /** first set bit in [from, to), or -1 */
  nextDirtyBit(from: number, to = this.bits): number {
    if (to > this.bits) to = this.bits;
    if (from >= to || this.dirty === 0) return -1;
    const words = this.words;
    let i = Math.floor(from / 32);
    let w = (words[i]! & ~((1 << (from & 31)) - 1)) >>> 0;
    const last = Math.floor((to - 1) / 32);
    for (;;) {
      if (w !== 0) {
        const bit = i * 32 + ctz32(w);
        return bit < to ? bit : -1;
      }
      if (++i > last) return -1;
      w = words[i]!;
    }
  }

  /** first clear bit in [from, to), or -1 */
  nextCleanBit(from: number, to = this.bits): number {
    if (to > this.bits) to = this.bits;
    if (from >= to) return -1;
    const words = this.words;
    let i = Math.floor(from / 32);
    let w = (~words[i]! & ~((1 << (from & 31)) - 1)) >>> 0;
    const last = Math.floor((to - 1) / 32);
    for (;;) {
      if (w !== 0) {
        const bit = i * 32 + ctz32(w);
        return bit < to ? bit : -1;
      }
      if (++i > last) return -1;
      w = ~words[i]! >>> 0;
    }
  }

  private bitSpan(offset: number, end: number): [number, number] {
    this.checkRange(offset, Math.max(0, end - offset), 'search');
    return [Math.floor(offset / this.granularity), Math.ceil(end / this.granularity)];
  }

  private markChanged(w0: number, w1: number): void {
    const c = this.changed;
    if (!c || w1 < w0) return;
    for (let p = w0 >>> WORDS_PER_PAGE_SHIFT, last = w1 >>> WORDS_PER_PAGE_SHIFT; p <= last; p++) c[p] = 1;
    this.anyChanged = true;
  }

  private checkRange(offset: number, length: number, op: string): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new BlkrepError('ERR_OUT_OF_RANGE', `bitmap ${op} of ${length} bytes at offset ${offset} is beyond the bitmap's size ${this.size}`, {
        errno: 'EINVAL',
        details: { offset, length, size: this.size },
      });
    }
  }

  checkSameGeometry(other: DirtyBitmap, op: string): void {
    if (other.size !== this.size || other.granularity !== this.granularity) {
      throw new BlkrepError(
        'ERR_BITMAP_MISMATCH',
        `cannot ${op} a bitmap of ${other.size} bytes at granularity ${other.granularity} with one of ${this.size} bytes at granularity ${this.granularity}`,
        { errno: 'EINVAL', details: { size: this.size, granularity: this.granularity, otherSize: other.size, otherGranularity: other.granularity } },
      );
    }
  }
}

function tailError(bits: number): BlkrepError {
  return new BlkrepError('ERR_BITMAP_CORRUPT', `bitmap data has bits set past its last granule (${bits} granules)`, { errno: 'EINVAL', details: { bits } });
}
