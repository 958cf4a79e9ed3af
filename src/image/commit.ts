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
 * The work is a CommitJob (src/jobs/commit.ts): data moves in chunks of at most 1 MiB with several
 * requests in flight; `rate` (or `speed`) limits the data bytes per second (writing zeros is not
 * counted: it moves no data); the error policies and pause/resume/cancel are the job's.
 */
import { truncate } from 'node:fs/promises';
import type { BlockNode, IoOptions } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { openImage } from '../block/open.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { CommitJob } from '../jobs/commit.js';
import type { ErrorPolicy } from '../jobs/job.js';
import { chainSizes, describeChain, filePath, isFileSpec, sameImage, type ChainLayer } from './chain.js';

export interface CommitOptions {
  /** the image to commit into (default: the overlay's backing file); must be in its chain */
  base?: string;
  /** data bytes per second (default: no limit); `speed` is the same (0 = no limit) */
  rate?: number;
  speed?: number;
  onSourceError?: ErrorPolicy;
  onTargetError?: ErrorPolicy;
  /** do not make the overlay empty afterwards (implied by `base`, as in qemu-img) */
  keep?: boolean;
  /** requests in flight (default 8) */
  parallel?: number;
  /** largest read/write (default 1 MiB) */
  chunkSize?: number;
  signal?: AbortSignal;
  /** bytes committed so far, of the total (data and zeros): once planned, and at the end */
  onProgress?(done: number, total: number): void;
  /** the job, created and about to start (query it for progress; pause, resume, cancel it) */
  onJob?(job: CommitJob): void;
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

export async function commitImage(image: string, o: CommitOptions = {}): Promise<CommitResult> {
  const started = Date.now();
  if (o.rate !== undefined && !(o.rate > 0)) throw new BlkrepError('ERR_USAGE', `--rate must be a positive number of bytes per second, not ${o.rate}`, { errno: 'EINVAL' });
  if (o.speed !== undefined && !(Number.isSafeInteger(o.speed) && o.speed >= 0)) throw new BlkrepError('ERR_USAGE', `--speed must be a number of bytes per second ≥ 0, not ${o.speed}`, { errno: 'EINVAL' });
  const layers = await findLayers(image, o.base);
  const keep = o.keep === true || o.base !== undefined;
  const k = layers.length - 1;
  const b = layers[k]!;
  const topSize = layers[0]!.size;

  // BASE grows to the overlay's size (a raw file before it is opened, qcow2 once planned).
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
  let job: CommitJob;
  const onAbort = (): void => void job?.cancel({ force: true }).catch(() => {});
  try {
    // The sizes before BASE grows: where the overlay reads zeros past a layer's end, BASE must
    // be given them too (unless it reads zeros there anyway).
    const sizes = [...layers.map((l) => l.size), ...chainSizes(base).slice(1)];
    let total = 0;
    job = new CommitJob({
      id: 'commit0',
      top,
      base,
      layers: k,
      sizes,
      speed: o.speed ?? o.rate ?? 0,
      ...(o.chunkSize === undefined ? {} : { bufSize: o.chunkSize }),
      ...(o.parallel === undefined ? {} : { maxOps: Math.max(1, o.parallel) }),
      ...(o.onSourceError === undefined ? {} : { onSourceError: o.onSourceError }),
      ...(o.onTargetError === undefined ? {} : { onTargetError: o.onTargetError }),
      makeEmpty: keep ? [] : [top],
      onPlanned: async (plan) => {
        if (b.size < topSize && base instanceof Qcow2Node) {
          await base.resize(Math.ceil(topSize / 512) * 512);
          baseGrownFrom = b.size;
        }
        total = plan.dataBytes + plan.zeroBytes;
        o.onProgress?.(0, total);
      },
    });
    o.onJob?.(job);
    o.signal?.throwIfAborted();
    o.signal?.addEventListener('abort', onAbort, { once: true });
    job.start();
    await job.whenConcluded();
    if (job.error) throw job.error;
    o.onProgress?.(total, total);
  } catch (err) {
    o.signal?.removeEventListener('abort', onAbort);
    await top.close().catch(() => {});
    throw err;
  }
  o.signal?.removeEventListener('abort', onAbort);
  await top.close();
  const plan = job.plan!;
  return {
    changed: plan.runs.length > 0 || job.emptied.length > 0 || baseGrownFrom !== null,
    image,
    base: b.filename,
    baseFormat: b.format,
    intermediates: layers.slice(1, k).map((l) => l.filename),
    dataBytes: plan.dataBytes,
    zeroBytes: plan.zeroBytes,
    baseGrownFrom,
    emptied: job.emptied.length > 0,
    seconds: (Date.now() - started) / 1000,
  };
}
