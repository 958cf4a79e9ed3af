/**
 * Commit an overlay into its backing file, or into BASE further down its chain (B.9), as
 * `qemu-img commit [-b BASE] [-d]` does:
 *
 * - Every range the overlay (or a layer between it and BASE) allocates is written into BASE as the
 *   overlay reads it; zero clusters are written as zeros (write-zeroes), so the old base data does
 *   not come back. Only allocated ranges move: the allocation is walked with extents (depth).
 *   Ranges that read as zeros because a layer above BASE ends early count as allocated there, as in
 *   QEMU. BASE grows to the overlay's size when it is smaller.
 * - BASE is flushed, then the overlay is made empty (make-empty) unless `keep`. Giving a base keeps
 *   the overlay, as `qemu-img commit -b` implies -d: the layers between the overlay and BASE are
 *   not changed, so after the commit they no longer read as before (they are listed as
 *   `intermediates`), while the overlay, kept, still reads the same.
 * - A crash at any point is harmless: until the overlay is emptied it shadows every range written
 *   into BASE, and the commit can be run again.
 *
 * Data moves in chunks of at most 1 MiB with several requests in flight; `rate` limits the data
 * bytes per second (writing zeros is not counted: it moves no data).
 */
import { truncate } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BlockNode, IoOptions } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { openImage } from '../block/open.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { chainSizes, describeChain, filePath, isFileSpec, nextSizeBoundary, sameImage, unallocatedDepth, type ChainLayer } from './chain.js';

export interface CommitOptions {
  /** the image to commit into (default: the overlay's backing file); must be in its chain */
  base?: string;
  /** data bytes per second (default: no limit) */
  rate?: number;
  /** do not make the overlay empty afterwards (implied by `base`, as in qemu-img) */
  keep?: boolean;
  /** requests in flight (default 8) */
  parallel?: number;
  /** largest read/write (default 1 MiB) */
  chunkSize?: number;
  signal?: AbortSignal;
  /** bytes committed so far, of the total (data and zeros) */
  onProgress?(done: number, total: number): void;
}

export interface CommitResult {
  /** false when the overlay held nothing to commit and nothing was changed */
  changed: boolean;
  image: string;
  base: string;
  baseFormat: string;
  /** layers between the overlay and BASE: they no longer read as before the commit */
  intermediates: string[];
  /** bytes of data copied into BASE */
  dataBytes: number;
  /** bytes written as zeros into BASE */
  zeroBytes: number;
  /** BASE's size before, when it had to grow to the overlay's size */
  baseGrownFrom: number | null;
  /** the overlay was made empty */
  emptied: boolean;
  seconds: number;
}

const DEFAULT_PARALLEL = 8;
const DEFAULT_CHUNK = 1024 * 1024;
/** zero runs are written in pieces of at most this (progress and cancellation) */
const ZERO_PIECE = 256 * 1024 * 1024;
/** how much one extents() call is asked for */
const EXTENT_STEP = 1024 * 1024 * 1024;

function failure(code: string, message: string, details: Record<string, unknown> = {}, errno: 'EINVAL' | 'EIO' = 'EINVAL'): BlkrepError {
  return new BlkrepError(code, message, { errno, details });
}

/** Which layers take part: the overlay first, BASE last. */
async function findLayers(image: string, base: string | undefined): Promise<ChainLayer[]> {
  if (base !== undefined && (await sameImage(base, image))) {
    throw new BlkrepError('ERR_USAGE', `the base "${base}" is the overlay itself: it must be an image below it in its backing chain`, { errno: 'EINVAL' });
  }
  let found = false;
  const layers = await describeChain(image, {
    stop: async (layer, index) => {
      if (index === 0) return layer.backingFilename === undefined;
      if (base === undefined || (await sameImage(layer.filename, base))) return (found = true);
      return false;
    },
  });
  const top = layers[0]!;
  if (top.format !== 'qcow2') {
    throw failure('ERR_NO_BACKING', `${image} is a ${top.format} image: it has no backing file to commit into (only qcow2 overlays have one)`, { image });
  }
  if (top.backingFilename === undefined) {
    throw failure('ERR_NO_BACKING', `${image} has no backing file: there is nothing to commit it into`, { image });
  }
  if (!found) {
    throw failure('ERR_NOT_IN_CHAIN', `"${base}" is not in the backing chain of ${image} (${layers.map((l) => l.filename).join(' → ')})`, { image, base, chain: layers.map((l) => l.filename) });
  }
  return layers;
}

/**
 * Open the chain for the commit: BASE read-write (with its own backing chain read-only), the
 * layers between read-only over it, the overlay over those (read-write unless it is kept).
 */
async function openChain(layers: ChainLayer[], keep: boolean): Promise<{ top: Qcow2Node; base: BlockNode }> {
  const b = layers[layers.length - 1]!;
  const base = await openImage(b.filename, { readOnly: false, ...(b.format === 'raw' || b.format === 'qcow2' ? { format: b.format } : {}) });
  let below: BlockNode = opaqueBelow(base);
  try {
    for (let i = layers.length - 2; i >= 0; i--) {
      below = await Qcow2Node.open(layers[i]!.filename, { readOnly: i > 0 || keep, backing: below });
    }
  } catch (err) {
    await below.close().catch(() => {});
    throw err;
  }
  return { top: below as Qcow2Node, base };
}

/**
 * BASE as the layers above it see it, except that its extents are one run "present, below": the
 * commit never looks into BASE's allocation (ranges that reach BASE stay as they are), so asking
 * BASE and its own chain (SEEK_DATA on a raw file, its L2 tables) for every gap is wasted work.
 */
function opaqueBelow(base: BlockNode): BlockNode {
  return {
    driver: base.driver,
    description: base.description,
    get size() {
      return base.size;
    },
    limits: base.limits,
    caps: { ...base.caps, canExtents: true, cheapExtents: true, allocationDepth: false },
    read: (offset, length, o) => base.read(offset, length, o),
    ...(base.readInto ? { readInto: (offset: number, target: Buffer, o?: IoOptions) => base.readInto!(offset, target, o) } : {}),
    write: (offset, data, o) => base.write(offset, data, o),
    ...(base.flush ? { flush: (o?: IoOptions) => base.flush!(o) } : {}),
    extents: async (_offset, length) => [{ length, hole: false, zero: false }],
    close: () => base.close(),
  };
}

/** A run to write into BASE. */
interface Job {
  offset: number;
  length: number;
  zero: boolean;
}

/**
 * The runs of the overlay's view that come from a layer above BASE (index k in the chain): data
 * and zero clusters at depth 1 … k, and zeros where a layer above BASE ends early.
 */
async function planCommit(top: BlockNode, k: number, sizes: readonly number[], signal: AbortSignal | undefined): Promise<{ jobs: Job[]; topAllocated: boolean }> {
  const baseSize = sizes[k]!;
  const jobs: Job[] = [];
  let topAllocated = false;
  const add = (offset: number, length: number, zero: boolean): void => {
    const last = jobs[jobs.length - 1];
    if (last && last.zero === zero && last.offset + last.length === offset) last.length += length;
    else jobs.push({ offset, length, zero });
  };
  let pos = 0;
  while (pos < top.size) {
    signal?.throwIfAborted();
    const runs = await top.extents!(pos, Math.min(EXTENT_STEP, top.size - pos));
    if (runs.length === 0) throw failure('ERR_INTERNAL', `${top.description}: extents at offset ${pos} returned nothing`, {}, 'EIO');
    for (const r of runs) {
      const n = Math.min(r.length, top.size - pos);
      if (n <= 0) break;
      const depth = r.depth ?? k + 1;
      if (depth >= 1 && depth <= k) {
        if (depth === 1) topAllocated = true;
        add(pos, n, r.zero);
      } else if (depth === 0) {
        // Allocated nowhere: zeros because some layer ends before this offset. If that layer is
        // above BASE (or is BASE, which grows), the overlay's zeros must be written into BASE —
        // unless BASE reads zeros there anyway (past its end, with no backing covering it).
        for (let at = pos; at < pos + n; ) {
          const to = nextSizeBoundary(sizes, at, pos + n);
          const reached = unallocatedDepth(sizes, at);
          if (reached < k) {
            const baseReadsZero = at >= baseSize && !(k + 1 < sizes.length && at < sizes[k + 1]!);
            if (!baseReadsZero) add(at, to - at, true);
          }
          at = to;
        }
      }
      pos += n;
      if (pos >= top.size) break;
    }
  }
  return { jobs, topAllocated };
}

/** Writes every job into BASE with `parallel` requests in flight, data read through the overlay. */
async function copyJobs(top: BlockNode, base: BlockNode, jobs: Job[], o: CommitOptions, total: number): Promise<void> {
  const chunk = o.chunkSize ?? DEFAULT_CHUNK;
  const parallel = Math.max(1, o.parallel ?? DEFAULT_PARALLEL);
  const rate = o.rate;
  const started = Date.now();
  let nextSlot = started;
  const throttle = async (bytes: number): Promise<void> => {
    if (!rate) return;
    const now = Date.now();
    const at = Math.max(nextSlot, now);
    nextSlot = at + (bytes / rate) * 1000;
    if (at > now) await sleep(at - now, undefined, o.signal ? { signal: o.signal } : undefined);
  };
  let done = 0;
  let j = 0;
  let within = 0;
  /** the next piece of work: at most `chunk` bytes of data, or ZERO_PIECE of zeros */
  const next = (): Job | undefined => {
    const job = jobs[j];
    if (!job) return undefined;
    const limit = job.zero ? ZERO_PIECE : chunk;
    const length = Math.min(limit, job.length - within);
    const piece = { offset: job.offset + within, length, zero: job.zero };
    within += length;
    if (within >= job.length) {
      j++;
      within = 0;
    }
    return piece;
  };
  const zeroes = base.writeZeroes && base.caps.canZero ? base.writeZeroes.bind(base) : undefined;
  let failed = false;
  const worker = async (): Promise<void> => {
    const buf = Buffer.allocUnsafe(chunk);
    for (let piece = next(); piece && !failed; piece = next()) {
      o.signal?.throwIfAborted();
      if (piece.zero) {
        if (zeroes) {
          await zeroes(piece.offset, piece.length);
        } else {
          const z = Buffer.alloc(Math.min(chunk, piece.length));
          for (let at = 0; at < piece.length; at += z.length) await base.write(piece.offset + at, z.subarray(0, Math.min(z.length, piece.length - at)));
        }
      } else {
        await throttle(piece.length);
        const view = buf.subarray(0, piece.length);
        if (top.readInto) await top.readInto(piece.offset, view);
        else (await top.read(piece.offset, piece.length)).copy(view);
        await base.write(piece.offset, view);
      }
      done += piece.length;
      o.onProgress?.(done, total);
    }
  };
  const workers = Array.from({ length: parallel }, () =>
    worker().catch((err: unknown) => {
      failed = true;
      throw err;
    }),
  );
  const results = await Promise.allSettled(workers);
  const rejected = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (rejected) throw rejected.reason;
}

export async function commitImage(image: string, o: CommitOptions = {}): Promise<CommitResult> {
  const started = Date.now();
  if (o.rate !== undefined && !(o.rate > 0)) throw new BlkrepError('ERR_USAGE', `--rate must be a positive number of bytes per second, not ${o.rate}`, { errno: 'EINVAL' });
  const layers = await findLayers(image, o.base);
  const keep = o.keep === true || o.base !== undefined;
  const k = layers.length - 1;
  const b = layers[k]!;
  const topSize = layers[0]!.size;

  // BASE grows to the overlay's size (a raw file before it is opened, qcow2 once open).
  let baseGrownFrom: number | null = null;
  if (b.size < topSize) {
    if (b.format === 'raw' && isFileSpec(b.filename)) {
      await truncate(filePath(b.filename), topSize);
      baseGrownFrom = b.size;
    } else if (b.format !== 'qcow2') {
      throw failure('ERR_BASE_TOO_SMALL', `the base ${b.filename} (${b.size} bytes) is smaller than ${image} (${topSize} bytes) and cannot be grown`, { base: b.filename, size: b.size, needed: topSize });
    }
  }

  const { top, base } = await openChain(layers, keep);
  let result: CommitResult;
  try {
    // The sizes before BASE grows: where the overlay reads zeros past a layer's end, BASE must
    // be given them too (unless it reads zeros there anyway).
    const sizes = [...layers.map((l) => l.size), ...chainSizes(base).slice(1)];
    const { jobs, topAllocated } = await planCommit(top, k, sizes, o.signal);
    if (b.size < topSize && base instanceof Qcow2Node) {
      await base.resize(Math.ceil(topSize / 512) * 512);
      baseGrownFrom = b.size;
    }
    let dataBytes = 0;
    let zeroBytes = 0;
    for (const job of jobs) {
      if (job.zero) zeroBytes += job.length;
      else dataBytes += job.length;
    }
    o.onProgress?.(0, dataBytes + zeroBytes);
    await copyJobs(top, base, jobs, o, dataBytes + zeroBytes);
    await base.flush?.();
    let emptied = false;
    if (!keep && topAllocated) {
      await top.makeEmpty();
      emptied = true;
    }
    result = {
      changed: jobs.length > 0 || emptied || baseGrownFrom !== null,
      image,
      base: b.filename,
      baseFormat: b.format,
      intermediates: layers.slice(1, k).map((l) => l.filename),
      dataBytes,
      zeroBytes,
      baseGrownFrom,
      emptied,
      seconds: 0,
    };
  } catch (err) {
    await top.close().catch(() => {});
    throw err;
  }
  await top.close();
  result.seconds = (Date.now() - started) / 1000;
  return result;
}
