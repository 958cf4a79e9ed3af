/**
 * error — fault injection, as nbdkit's error filter: requests of the chosen kinds fail with the
 * chosen errno, without reaching `next` (a failed write changes nothing).
 *
 * Which requests fail, among those that match (their kind is in `ops` and, when `ranges` are
 * given, they overlap one; flush is not ranged and matches only when no range is given):
 *   every: N   the N-th, 2N-th, 3N-th … matching request;
 *   rate: P    each matching request with probability P, drawn from a generator seeded by `seed`
 *              (the same seed and the same requests in the same order fail the same way);
 *   neither    every matching request.
 * Requests that do not match pass straight through and are not counted.
 *
 * When block-status may fail, the filter does not announce cheap extents: the NBD server would
 * otherwise ask block status on every large read, and the reads would fail too.
 */
import type { BlockNode, Capabilities, Extent, IoOptions, WriteOptions, ZeroOptions } from '../../api/block.js';
import { BlkrepError, type Errno } from '../../api/errors.js';
import { Filter } from '../filter.js';

/** The kinds of request a fault-injection filter tells apart (NBD's names). */
export const FAULT_OPS = ['read', 'write', 'zero', 'trim', 'flush', 'block-status'] as const;
export type FaultOp = (typeof FAULT_OPS)[number];

export interface ErrorFilterOptions {
  /** the kinds of request that may fail (default all) */
  ops?: readonly FaultOp[];
  /** the errno of the failures (default EIO) */
  errno?: Errno;
  /** probability, 0 … 1, that a matching request fails */
  rate?: number;
  /** every N-th matching request fails */
  every?: number;
  /** seed of the generator `rate` draws from (default 1) */
  seed?: number;
  /** [start, end) byte ranges: only requests overlapping one match */
  ranges?: ReadonlyArray<readonly [number, number]>;
}

/** mulberry32: a small, fast, seeded generator of numbers in [0, 1) */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export class ErrorFilter extends Filter {
  readonly driver = 'error';
  readonly errno: Errno;
  /** matching requests seen */
  matched = 0;
  /** requests failed */
  failed = 0;
  private readonly ops: ReadonlySet<FaultOp>;
  private readonly ranges: ReadonlyArray<readonly [number, number]>;
  private readonly every: number;
  private readonly rate: number;
  private readonly random: () => number;
  private readonly filteredCaps: Capabilities;

  constructor(next: BlockNode, options: ErrorFilterOptions = {}) {
    super(next);
    this.ops = new Set(options.ops ?? FAULT_OPS);
    this.errno = options.errno ?? 'EIO';
    this.ranges = options.ranges ?? [];
    this.every = options.every ?? 0;
    this.rate = options.rate ?? 1;
    this.random = seededRandom(options.seed ?? 1);
    this.filteredCaps = this.ops.has('block-status') ? { ...this.next.caps, cheapExtents: false } : this.next.caps;
  }

  override get caps(): Capabilities {
    return this.filteredCaps;
  }

  /** the error to fail this request with, or undefined to let it through */
  private fault(op: FaultOp, offset: number, length: number): BlkrepError | undefined {
    if (!this.ops.has(op)) return undefined;
    if (this.ranges.length > 0) {
      if (op === 'flush') return undefined;
      const end = offset + Math.max(length, 1);
      if (!this.ranges.some(([s, e]) => offset < e && s < end)) return undefined;
    }
    const n = ++this.matched;
    const fail = this.every > 0 ? n % this.every === 0 : this.rate >= 1 || this.random() < this.rate;
    if (!fail) return undefined;
    this.failed++;
    const what = op === 'flush' ? 'flush' : `${op} of ${length} bytes at offset ${offset}`;
    return new BlkrepError('ERR_INJECTED', `injected ${this.errno}: ${what} of ${this.next.description} (error filter, matching request ${n})`, {
      errno: this.errno,
      details: { op, offset, length, request: n },
    });
  }

  override read(offset: number, length: number, o?: IoOptions): Promise<Buffer> {
    const e = this.fault('read', offset, length);
    return e ? Promise.reject(e) : this.next.read(offset, length, o);
  }
  override readInto(offset: number, target: Buffer, o?: IoOptions): Promise<void> {
    const e = this.fault('read', offset, target.length);
    return e ? Promise.reject(e) : this.next.readInto(offset, target, o);
  }
  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    const e = this.fault('write', offset, data.length);
    return e ? Promise.reject(e) : this.next.write(offset, data, o);
  }
  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    const e = this.fault('zero', offset, length);
    return e ? Promise.reject(e) : this.next.writeZeroes(offset, length, o);
  }
  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    const e = this.fault('trim', offset, length);
    return e ? Promise.reject(e) : this.next.trim(offset, length, o);
  }
  override flush(o?: IoOptions): Promise<void> {
    const e = this.fault('flush', 0, 0);
    return e ? Promise.reject(e) : this.next.flush(o);
  }
  override extents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    const e = this.fault('block-status', offset, length);
    return e ? Promise.reject(e) : this.next.extents(offset, length, o);
  }
}
