/**
 * nbd://host[:port]/export, nbd+unix:///export?socket=PATH — an NBD export as a block node.
 *
 * The protocol lives in src/nbd/client*.ts; this file turns block-node calls into commands the
 * server accepts:
 * - READ/WRITE are split at the server's maximum payload (at most 32 MiB) and sent in parallel.
 * - Everything is aligned to the server's minimum block size: reads and block status widen to
 *   whole blocks, writes and zeroing of partial blocks become read-modify-write (serialised per
 *   block, so two partial writes to one block cannot undo each other), trim shrinks to whole blocks
 *   (it is advisory).
 * - What the server does not offer is emulated, never sent: FUA by a flush after the write,
 *   write-zeroes by writing zeros (fast zeroing then fails with ENOTSUP), trim and cache by
 *   nothing, extents by "all data".
 * - Extents come from base:allocation; with `allocationDepth`, qemu:allocation-depth is asked for
 *   too and becomes Extent.depth.
 *
 * Events (reconnects, holds) are on `node.client`, an EventEmitter; see src/nbd/client.ts.
 */
import type { BlockLimits, BlockNode, Capabilities, Extent, IoOptions, WriteOptions, ZeroOptions } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { NbdClient, type NbdClientOptions } from '../nbd/client.js';
import { BASE_ALLOCATION, MAX_PAYLOAD, STATE_HOLE, STATE_ZERO, TF } from '../nbd/constants.js';
import type { NbdUri } from '../nbd/uri.js';
import { checkRange } from './node.js';

export const ALLOCATION_DEPTH = 'qemu:allocation-depth';

/** Payload-free commands (zero, trim, cache, block status) are sent in pieces of at most this. */
const PAYLOADLESS_MAX = 1 << 30;

export interface NbdNodeOptions extends Omit<NbdClientOptions, 'uri'> {
  /** refuse writes even if the export is writable */
  readOnly?: boolean;
  /** ask for qemu:allocation-depth and report it as Extent.depth */
  allocationDepth?: boolean;
  /** for the connect */
  signal?: AbortSignal;
}

/** Exclusive locks on byte ranges, for read-modify-write of partial blocks. */
class RangeLock {
  private held: Array<{ start: number; end: number; done: Promise<void> }> = [];

  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      const other = this.held.find((h) => h.start < end && start < h.end);
      if (!other) break;
      await other.done;
    }
    let release!: () => void;
    const entry = { start, end, done: new Promise<void>((resolve) => (release = resolve)) };
    this.held.push(entry);
    return () => {
      this.held = this.held.filter((h) => h !== entry);
      release();
    };
  }
}

/** Wait for all, then throw the first failure: no piece may still write into a caller's buffer. */
async function settleAll(pieces: Array<Promise<unknown>>): Promise<void> {
  const results = await Promise.allSettled(pieces);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

export class NbdNode implements BlockNode {
  readonly driver = 'nbd';
  readonly description: string;
  readonly size: number;
  readonly limits: BlockLimits;
  readonly caps: Capabilities;
  private readonly flags: number;
  private readonly readOnly: boolean;
  private readonly locks = new RangeLock();

  /** Connect to the export. */
  static async open(uri: string | NbdUri, options: NbdNodeOptions = {}): Promise<NbdNode> {
    const metaContexts = options.metaContexts ?? [BASE_ALLOCATION, ...(options.allocationDepth ? [ALLOCATION_DEPTH] : [])];
    const client = await NbdClient.connect({ ...options, uri, metaContexts });
    return new NbdNode(client, options);
  }

  constructor(
    /** the protocol client: status(), and events 'disconnected', 'retrying', 'reconnected', … */
    readonly client: NbdClient,
    options: { readOnly?: boolean } = {},
  ) {
    const info = client.info;
    this.description = client.uri.uri;
    this.size = info.size;
    this.flags = info.flags;
    const f = info.flags;
    this.readOnly = Boolean(options.readOnly) || (f & TF.READ_ONLY) !== 0;
    const bs = info.blockSize;
    const minimum = bs?.minimum ?? 1;
    const payload = Math.min(bs && bs.maximum !== 0xffffffff ? bs.maximum : MAX_PAYLOAD, MAX_PAYLOAD);
    const maximum = Math.max(minimum, Math.floor(payload / minimum) * minimum);
    this.limits = { minimum, preferred: Math.max(bs?.preferred ?? 4096, minimum, 512), maximum };
    const rw = !this.readOnly;
    const contexts = new Set(info.contexts.values());
    this.caps = {
      canWrite: rw,
      canFlush: (f & TF.SEND_FLUSH) !== 0,
      canFua: rw && (f & (TF.SEND_FUA | TF.SEND_FLUSH)) !== 0,
      canTrim: rw && (f & TF.SEND_TRIM) !== 0,
      canZero: rw,
      canFastZero: rw && (f & TF.SEND_WRITE_ZEROES) !== 0 && (f & TF.SEND_FAST_ZERO) !== 0,
      canMultiConn: (f & TF.CAN_MULTI_CONN) !== 0,
      canExtents: contexts.has(BASE_ALLOCATION),
      canCache: (f & TF.SEND_CACHE) !== 0,
      cheapExtents: false,
    };
  }

  private has(flag: number): boolean {
    return (this.flags & flag) !== 0;
  }

  private alignDown(n: number): number {
    return n - (n % this.limits.minimum);
  }

  /** Up to a block boundary, but never past the end (the last block of an odd-sized export). */
  private alignUp(n: number): number {
    const m = this.limits.minimum;
    return Math.min(n % m === 0 ? n : n - (n % m) + m, this.size);
  }

  private aligned(n: number): boolean {
    return n % this.limits.minimum === 0 || n === this.size;
  }

  private checkWritable(op: string): void {
    if (this.readOnly) {
      throw new BlkrepError('ERR_READ_ONLY', `${op} refused: ${this.description} is read-only`, { errno: 'EPERM', details: { uri: this.description } });
    }
  }

  // ---------------------------------------------------------------------------------------------
  // data

  async read(offset: number, length: number, options?: IoOptions): Promise<Buffer> {
    const out = Buffer.allocUnsafe(length);
    await this.readInto(offset, out, options);
    return out;
  }

  async readInto(offset: number, target: Buffer, options: IoOptions = {}): Promise<void> {
    const length = target.length;
    checkRange(this, offset, length, 'read');
    if (length === 0) return;
    const start = this.alignDown(offset);
    const end = this.alignUp(offset + length);
    if (start === offset && end === offset + length) return this.readAligned(offset, target, options.signal);
    const whole = Buffer.allocUnsafe(end - start);
    await this.readAligned(start, whole, options.signal);
    whole.copy(target, 0, offset - start, offset - start + length);
  }

  private async readAligned(offset: number, target: Buffer, signal?: AbortSignal): Promise<void> {
    const max = this.limits.maximum;
    if (target.length <= max) return this.client.read(offset, target, { signal });
    const pieces: Array<Promise<void>> = [];
    for (let at = 0; at < target.length; at += max) {
      pieces.push(this.client.read(offset + at, target.subarray(at, Math.min(at + max, target.length)), { signal }));
    }
    await settleAll(pieces);
  }

  write(offset: number, data: Buffer, options: WriteOptions = {}): Promise<void> {
    try {
      this.checkWritable('write');
      checkRange(this, offset, data.length, 'write');
    } catch (err) {
      return Promise.reject(err);
    }
    // the common case (a pair's forwarded write): whole blocks, one request, FUA as the server
    // offers it — straight to the client, no promise of its own
    const n = data.length;
    if (n > 0 && n <= this.limits.maximum && this.aligned(offset) && this.aligned(offset + n) && (!options.fua || this.has(TF.SEND_FUA))) {
      return this.client.write(offset, data, options);
    }
    return this.writeSplit(offset, data, options);
  }

  private async writeSplit(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    const { signal } = options;
    const fua = Boolean(options.fua) && this.has(TF.SEND_FUA);
    if (data.length) {
      const end = offset + data.length;
      const a = this.aligned(offset) ? offset : this.alignUp(offset);
      const b = this.aligned(end) ? end : this.alignDown(end);
      if (a >= b) {
        // only partial blocks, no whole block between them
        await this.patch(this.alignDown(offset), this.alignUp(end), (buf, base) => data.copy(buf, offset - base), fua, signal);
      } else {
        const pieces: Array<Promise<void>> = [];
        if (offset < a) pieces.push(this.patch(this.alignDown(offset), a, (buf, base) => data.copy(buf, offset - base, 0, a - offset), fua, signal));
        if (a < b) pieces.push(this.writeAligned(a, data.subarray(a - offset, b - offset), fua, signal));
        if (b < end) pieces.push(this.patch(b, this.alignUp(end), (buf) => data.copy(buf, 0, b - offset), fua, signal));
        await settleAll(pieces);
      }
    }
    if (options.fua && !fua) await this.flush({ signal });
  }

  private async writeAligned(offset: number, data: Buffer, fua: boolean, signal?: AbortSignal): Promise<void> {
    const max = this.limits.maximum;
    if (data.length <= max) return this.client.write(offset, data, { fua, signal });
    const pieces: Array<Promise<void>> = [];
    for (let at = 0; at < data.length; at += max) {
      pieces.push(this.client.write(offset + at, data.subarray(at, Math.min(at + max, data.length)), { fua, signal }));
    }
    await settleAll(pieces);
  }

  /** Read-modify-write of whole blocks [start, end): `change` edits them in place (buf starts at `start`). */
  private async patch(start: number, end: number, change: (buf: Buffer, base: number) => unknown, fua: boolean, signal?: AbortSignal): Promise<void> {
    const release = await this.locks.acquire(start, end);
    try {
      signal?.throwIfAborted();
      const buf = Buffer.allocUnsafe(end - start);
      await this.readAligned(start, buf, signal);
      change(buf, start);
      await this.writeAligned(start, buf, fua, signal);
    } finally {
      release();
    }
  }

  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    this.checkWritable('write-zeroes');
    checkRange(this, offset, length, 'write-zeroes');
    const { signal } = options;
    if (options.fast && !this.caps.canFastZero) {
      throw new BlkrepError('ERR_NOT_FAST', `fast zeroing of ${length} bytes at offset ${offset} is not offered by ${this.description}`, {
        errno: 'ENOTSUP',
        details: { offset, length },
      });
    }
    if (length === 0) {
      if (options.fua) await this.flush({ signal });
      return;
    }
    if (!this.has(TF.SEND_WRITE_ZEROES)) {
      const zeros = Buffer.alloc(Math.min(length, this.limits.maximum));
      const pieces: Array<Promise<void>> = [];
      for (let at = 0; at < length; at += zeros.length) {
        const n = Math.min(zeros.length, length - at);
        pieces.push(this.write(offset + at, n === zeros.length ? zeros : zeros.subarray(0, n), { signal }));
      }
      await settleAll(pieces);
      if (options.fua) await this.flush({ signal });
      return;
    }
    const fua = Boolean(options.fua) && this.has(TF.SEND_FUA);
    const end = offset + length;
    const a = this.aligned(offset) ? offset : this.alignUp(offset);
    const b = this.aligned(end) ? end : this.alignDown(end);
    const zero = (buf: Buffer, base: number) => buf.fill(0, Math.max(offset, base) - base, Math.min(end, base + buf.length) - base);
    const pieces: Array<Promise<void>> = [];
    if (a >= b) {
      pieces.push(this.patch(this.alignDown(offset), this.alignUp(end), zero, fua, signal));
    } else {
      if (offset < a) pieces.push(this.patch(this.alignDown(offset), a, zero, fua, signal));
      const step = this.alignDown(PAYLOADLESS_MAX);
      for (let at = a; at < b; at += step) {
        pieces.push(this.client.writeZeroes(at, Math.min(step, b - at), { fua, noHole: options.noHole, fast: options.fast, signal }));
      }
      if (b < end) pieces.push(this.patch(b, this.alignUp(end), zero, fua, signal));
    }
    await settleAll(pieces);
    if (options.fua && !fua) await this.flush({ signal });
  }

  async trim(offset: number, length: number, options: WriteOptions = {}): Promise<void> {
    this.checkWritable('trim');
    checkRange(this, offset, length, 'trim');
    const { signal } = options;
    const fua = Boolean(options.fua) && this.has(TF.SEND_FUA);
    if (this.has(TF.SEND_TRIM)) {
      // Trim is advisory: only the whole blocks inside the range.
      const a = this.aligned(offset) ? offset : this.alignUp(offset);
      const end = offset + length;
      const b = this.aligned(end) ? end : this.alignDown(end);
      const step = this.alignDown(PAYLOADLESS_MAX);
      const pieces: Array<Promise<void>> = [];
      for (let at = a; at < b; at += step) pieces.push(this.client.trim(at, Math.min(step, b - at), { fua, signal }));
      await settleAll(pieces);
      if (options.fua && !fua && pieces.length) await this.flush({ signal });
    } else if (options.fua) {
      await this.flush({ signal });
    }
  }

  async flush(options: IoOptions = {}): Promise<void> {
    // Without SEND_FLUSH the server offers nothing to wait for (it writes through, or not at all).
    if (this.has(TF.SEND_FLUSH)) await this.client.flush(options);
  }

  async cache(offset: number, length: number, options: IoOptions = {}): Promise<void> {
    checkRange(this, offset, length, 'cache');
    if (!this.has(TF.SEND_CACHE) || length === 0) return;
    const start = this.alignDown(offset);
    const end = this.alignUp(offset + length);
    const step = this.alignDown(PAYLOADLESS_MAX);
    const pieces: Array<Promise<void>> = [];
    for (let at = start; at < end; at += step) pieces.push(this.client.cache(at, Math.min(step, end - at), options));
    await settleAll(pieces);
  }

  // ---------------------------------------------------------------------------------------------
  // block status

  /**
   * Raw block status of one selected meta context (e.g. "qemu:dirty-bitmap:b0"), starting at
   * `offset` (widened to the block size by the server's rules, then cut back to `offset`).
   */
  async metaContextStatus(context: string, offset: number, length: number, options: IoOptions = {}): Promise<Array<{ length: number; flags: number }>> {
    checkRange(this, offset, length, 'block-status');
    if (length === 0) return [];
    const [start, map] = await this.blockStatus(offset, length, options.signal);
    const descriptors = map.get(context);
    if (!descriptors) {
      throw new BlkrepError('ERR_NBD_UNSUPPORTED', `meta context "${context}" was not selected on ${this.description}`, { errno: 'EINVAL', details: { context } });
    }
    return clip(descriptors.map(([len, flags]) => ({ length: len, flags })), offset - start, this.size - start);
  }

  async extents(offset: number, length: number, options: IoOptions = {}): Promise<Extent[]> {
    checkRange(this, offset, length, 'extents');
    if (length === 0) return [];
    if (!this.caps.canExtents) return [{ length, hole: false, zero: false }];
    let at = offset;
    for (let tries = 0; ; tries++) {
      const [start, map] = await this.blockStatus(at, offset + length - at, options.signal);
      const base = map.get(BASE_ALLOCATION) ?? [];
      const depth = map.get(ALLOCATION_DEPTH);
      let runs: Extent[] = base.map(([len, flags]) => ({ length: len, hole: (flags & STATE_HOLE) !== 0, zero: (flags & STATE_ZERO) !== 0 }));
      if (depth) runs = withDepth(runs, depth);
      const out = clip(runs, at - start, this.size - start);
      // A descriptor shorter than the block size (servers should not) may end before `at`.
      if (out.length) return out;
      const described = base.reduce((n, [len]) => n + len, 0);
      if (described === 0 || tries > 64) return [{ length: offset + length - at, hole: false, zero: false }];
      at = Math.min(start + described, offset + length - 1);
    }
  }

  /** BLOCK_STATUS widened to whole blocks; returns where the descriptors start. */
  private async blockStatus(offset: number, length: number, signal?: AbortSignal): Promise<[number, Map<string, Array<[number, number]>>]> {
    const start = this.alignDown(offset);
    const end = Math.min(this.alignUp(offset + length), start + this.alignDown(PAYLOADLESS_MAX));
    return [start, await this.client.blockStatus(start, end - start, { signal })];
  }

  /** Try a lost connection now, skipping the backoff: true when connected (NbdClient.retryNow). */
  retryNow(): Promise<boolean> {
    return this.client.retryNow();
  }

  async close(): Promise<void> {
    await this.client.close();
  }
}

/** Split runs where the depth descriptors change, attaching the depth. */
function withDepth(runs: Extent[], depth: Array<[number, number]>): Extent[] {
  const out: Extent[] = [];
  let d = 0;
  let dLeft = depth[0]?.[0] ?? 0;
  for (const r of runs) {
    let left = r.length;
    while (left > 0) {
      if (d >= depth.length) {
        out.push({ ...r, length: left });
        break;
      }
      const n = Math.min(left, dLeft);
      out.push({ length: n, hole: r.hole, zero: r.zero, depth: depth[d]![1] });
      left -= n;
      dLeft -= n;
      if (dLeft === 0) {
        d++;
        dLeft = depth[d]?.[0] ?? 0;
      }
    }
  }
  // Past the end of the depth descriptors nothing is known about depth: stop there.
  const known = depth.reduce((n, [len]) => n + len, 0);
  let total = 0;
  const cut: Extent[] = [];
  for (const e of out) {
    if (total >= known) break;
    const n = Math.min(e.length, known - total);
    cut.push({ ...e, length: n });
    total += n;
  }
  return cut;
}

/** Drop the first `skip` bytes of runs and anything past `limit` (both relative to the runs' start). */
function clip<T extends { length: number }>(runs: T[], skip: number, limit: number): T[] {
  const out: T[] = [];
  let pos = 0;
  for (const r of runs) {
    const s = Math.max(pos, skip);
    const e = Math.min(pos + r.length, limit);
    if (e > s) out.push({ ...r, length: e - s });
    pos += r.length;
    if (pos >= limit) break;
  }
  return out;
}
