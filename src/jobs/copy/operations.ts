/**
 * One copy operation, as every copying job does it: [offset, offset+length) of the source as
 * segments (from its extents: granule-aligned zero segments, the rest data), then the data read
 * in windows of at most max(bufSize, granularity) bytes and written; zero segments — and whole
 * granules of data that read as zeros — go to the target as write-zeroes, never as data (a zero
 * segment that is a hole throughout may be punched). Zero segments are written while the data
 * windows are read and written; the operation settles once every request it issued has.
 *
 * A failure is a CopyError naming the side (source: extents, read; target: write, write-zeroes)
 * and the operation, so the job's error policy can decide.
 */
import type { CompleteBlockNode } from '../../api/block.js';
import type { JobSide } from '../job.js';
import { copySegments, isZero, type Segment } from '../segments.js';
import type { ExtentsNode } from './extents-ahead.js';
import type { BufferPool } from './scheduler.js';

/** An error of one copy step, tagged with its side and operation. */
export class CopyError extends Error {
  constructor(
    readonly side: JobSide,
    readonly operation: string,
    readonly inner: unknown,
  ) {
    super(inner instanceof Error ? inner.message : String(inner));
  }
}

/** `err` as a CopyError (an untagged one counts as a source read). */
export function asCopyError(err: unknown): CopyError {
  return err instanceof CopyError ? err : new CopyError('source', 'read', err);
}

/** What the target was sent, for statistics. */
export interface CopyCounters {
  /** target requests (writes, write-zeroes, flushes) */
  targetRequests: number;
  dataBytes: number;
  zeroBytes: number;
}

export function newCounters(): CopyCounters {
  return { targetRequests: 0, dataBytes: 0, zeroBytes: 0 };
}

export interface CopyIo {
  /** what is read: the source as the job sees it (a mirror: through its tracking filter) */
  source: CompleteBlockNode;
  /** where the source's extents are asked (default `source`; a mirror: its ExtentsAhead) */
  extents?: ExtentsNode;
  target: CompleteBlockNode;
  /** bytes per granule (power of two) */
  granularity: number;
  /** the disk's size */
  size: number;
  /** most bytes one read moves (a window is max(bufSize, granularity)) */
  bufSize: number;
  /** buffers of max(bufSize, granularity) bytes */
  buffers: BufferPool;
  /** the target reads as zeros and is written by this job only: zeros are not sent at all */
  skipZeros?: boolean;
  counters: CopyCounters;
  signal: AbortSignal;
}

/**
 * Copy [offset, offset+length). `charge(dataBytes)` is called once the segments are known (the
 * speed counts data only). Throws a CopyError.
 */
export async function copyOperation(io: CopyIo, offset: number, length: number, charge?: (dataBytes: number) => void): Promise<void> {
  let segs: Segment[];
  try {
    segs = await copySegments(io.extents ?? io.source, offset, length, { granularity: io.granularity, size: io.size, signal: io.signal });
  } catch (err) {
    throw new CopyError('source', 'extents', err);
  }
  charge?.(segs.reduce((n, x) => n + (x.zero ? 0 : x.length), 0));
  return copyPlanned(io, segs);
}

/**
 * Copy segments whose kind is known (zero: write-zeroes; data: read and written). With
 * `detectZeros` (default), whole granules of data that read as zeros go as write-zeroes too.
 */
export async function copyPlanned(io: CopyIo, segs: readonly Segment[], detectZeros = true): Promise<void> {
  const data = segs.filter((x) => !x.zero);
  const zeroWrites = segs.filter((x) => x.zero).map((x) => writeZeroes(io, x.offset, x.length, x.hole));
  for (const z of zeroWrites) z.catch(() => {}); // settled below, maybe after a data window failed
  let buffer: Buffer | undefined;
  try {
    for (const w of windows(data, Math.max(io.bufSize, io.granularity))) {
      buffer ??= io.buffers.take();
      const buf = buffer;
      await settle(
        w.pieces.map((x) =>
          io.source.readInto(x.offset, buf.subarray(x.offset - w.offset, x.offset - w.offset + x.length), { signal: io.signal, bulk: true }).catch((e: unknown) => {
            throw new CopyError('source', 'read', e);
          }),
        ),
      );
      await settle(
        (detectZeros ? splitZeros(w.pieces, w.offset, buf, io.granularity, io.size) : w.pieces).map((x) => {
          if (x.zero) return writeZeroes(io, x.offset, x.length, false);
          io.counters.targetRequests++;
          io.counters.dataBytes += x.length;
          return io.target.write(x.offset, buf.subarray(x.offset - w.offset, x.offset - w.offset + x.length), { signal: io.signal }).catch((e: unknown) => {
            throw new CopyError('target', 'write', e);
          });
        }),
      );
    }
    await settle(zeroWrites);
  } catch (err) {
    // nothing of this operation may still be writing the target when it settles (model finding 2)
    await Promise.allSettled(zeroWrites);
    throw err;
  } finally {
    if (buffer) io.buffers.give(buffer);
  }
}

function writeZeroes(io: CopyIo, offset: number, length: number, hole: boolean): Promise<void> {
  io.counters.zeroBytes += length;
  if (io.skipZeros) return Promise.resolve();
  io.counters.targetRequests++;
  return io.target.writeZeroes(offset, length, { noHole: !hole, signal: io.signal }).catch((e: unknown) => {
    throw new CopyError('target', 'write-zeroes', e);
  });
}

/** Wait for all; throw the first failure in order (as a CopyError). */
async function settle(ps: Array<Promise<void>>): Promise<void> {
  const settled = await Promise.allSettled(ps);
  const bad = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (bad) throw asCopyError(bad.reason);
}

/** Data segments in windows of at most `limit` bytes of the disk, in order. */
export function windows(data: readonly Segment[], limit: number): Array<{ offset: number; length: number; pieces: Segment[] }> {
  const out: Array<{ offset: number; length: number; pieces: Segment[] }> = [];
  for (const seg of data) {
    for (let at = seg.offset; at < seg.offset + seg.length; ) {
      let w = out[out.length - 1];
      if (!w || at + 1 - w.offset > limit) {
        w = { offset: at, length: 0, pieces: [] };
        out.push(w);
      }
      const n = Math.min(seg.offset + seg.length - at, w.offset + limit - at);
      w.pieces.push({ offset: at, length: n, zero: false, hole: false });
      w.length = at + n - w.offset;
      at += n;
    }
  }
  return out;
}

/** Data segments (read into `buffer`, which starts at `base`) cut where whole granules read as zeros: those become zero segments. */
export function splitZeros(segs: readonly Segment[], base: number, buffer: Buffer, granularity: number, size: number): Segment[] {
  const g = granularity;
  const out: Segment[] = [];
  const push = (offset: number, length: number, zero: boolean): void => {
    const last = out[out.length - 1];
    if (last && last.zero === zero && !last.hole && last.offset + last.length === offset) last.length += length;
    else out.push({ offset, length, zero, hole: false });
  };
  for (const s of segs) {
    if (s.zero) {
      out.push({ ...s });
      continue;
    }
    for (let at = s.offset; at < s.offset + s.length; ) {
      const next = Math.min(s.offset + s.length, (Math.floor(at / g) + 1) * g);
      const piece = buffer.subarray(at - base, next - base);
      // only whole granules (or the disk's last, partial one) become zero segments
      const whole = at % g === 0 && (next % g === 0 || next === size);
      push(at, next - at, whole && isZero(piece));
      at = next;
    }
  }
  return out;
}
