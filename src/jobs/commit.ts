/**
 * commit — an overlay's data into its backing, as a job (DESIGN.md §6): active → hidden →
 * secondary disk, then optionally make the overlay empty.
 *
 * Two kinds, both with type "commit":
 *
 * - CommitJob (intermediate commit: the layers above BASE are not written meanwhile — an offline
 *   chain, or layers below an export's active layer). Every run the layers from the top down to
 *   above BASE hold (allocation depth 1 … k of the top's extents; zero clusters as write-zeroes;
 *   zeros where a layer above BASE ends early) is written into BASE as the top reads it. Up to
 *   `maxOps` requests of at most `bufSize` bytes are in flight; the speed counts data bytes only
 *   (writing zeros moves no data). BASE is flushed, then (pending) the overlays given in
 *   `makeEmpty` are emptied, and the job concludes by itself (running → waiting → pending →
 *   concluded). It never becomes ready, so complete() is refused and cancel() is always hard:
 *   BASE then holds part of the data, which changes nothing anyone reads — every run written into
 *   BASE is still shadowed by the layer above it (a commit can simply be run again).
 *
 * - ActiveCommitJob (the overlay is the active layer: clients write through `job.node`
 *   meanwhile). A MirrorJob with sync top from the overlay into BASE, where BASE must be the very
 *   node the overlay reads through as its backing (opened read-write): a second node on the same
 *   file would keep caches that go stale. Ready once BASE has caught up; complete() drains
 *   (writes wait), flushes BASE, makes the overlay empty while the writes still wait, then lets
 *   them flow to the (now empty) overlay again — no pivot. cancel() before ready (or force):
 *   BASE holds part of the data, shadowed by the overlay; after ready: BASE is a consistent copy
 *   as of the cancel and the overlay is left as it is.
 *
 * Errors of both: reads and extents of the overlay are the source side, writes, write-zeroes and
 * flushes of BASE the target side; each side's policy decides (job.ts): report ends the job,
 * ignore retries the range later (backing off 10 ms … 1 s), stop pauses the job until resume().
 */
import type { BlockNode, Extent } from '../api/block.js';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import { completeNode } from '../block/node.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { chainSizes, nextSizeBoundary, unallocatedDepth } from '../image/chain.js';
import { Job, type JobOptions, type JobSide } from './job.js';
import { MirrorJob, type MirrorOptions } from './mirror.js';

export const DEFAULT_COMMIT_BUF_SIZE = 1 << 20;
export const DEFAULT_COMMIT_MAX_OPS = 8;
/** zero runs are written in pieces of at most this (progress and cancellation) */
const ZERO_PIECE = 256 * 1024 * 1024;
/** how much one extents() call is asked for */
const EXTENT_STEP = 1024 * 1024 * 1024;
const MAX_BUF_SIZE = 64 << 20;

/** A run to write into BASE. */
export interface CommitRun {
  offset: number;
  length: number;
  zero: boolean;
}

export interface CommitPlan {
  runs: CommitRun[];
  /** the top layer itself allocates something (it has something to make empty) */
  topAllocated: boolean;
  dataBytes: number;
  zeroBytes: number;
}

function badOption(message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_JOB_INVALID', message, { errno: 'EINVAL', details });
}

/**
 * The runs of the top's view that come from a layer above BASE (index k in the chain, top = 0):
 * data and zero clusters at depth 1 … k, and zeros where a layer above BASE ends early (unless
 * BASE reads zeros there anyway: past its end, with no backing covering it). `sizes` are the
 * chain's sizes, top first, as they were before BASE grew.
 */
export async function planCommit(
  top: Pick<BlockNode, 'size' | 'description'> & { extents(offset: number, length: number): Promise<Extent[]> },
  k: number,
  sizes: readonly number[],
  checkpoint: () => Promise<void> = async () => {},
): Promise<CommitPlan> {
  const baseSize = sizes[k]!;
  const runs: CommitRun[] = [];
  let topAllocated = false;
  const add = (offset: number, length: number, zero: boolean): void => {
    const last = runs[runs.length - 1];
    if (last && last.zero === zero && last.offset + last.length === offset) last.length += length;
    else runs.push({ offset, length, zero });
  };
  let pos = 0;
  while (pos < top.size) {
    await checkpoint();
    const got = await top.extents(pos, Math.min(EXTENT_STEP, top.size - pos));
    if (got.length === 0) throw new BlkrepError('ERR_INTERNAL', `${top.description}: extents at offset ${pos} returned nothing`, { errno: 'EIO' });
    for (const r of got) {
      const n = Math.min(r.length, top.size - pos);
      if (n <= 0) break;
      const depth = r.depth ?? k + 1;
      if (depth >= 1 && depth <= k) {
        if (depth === 1) topAllocated = true;
        add(pos, n, r.zero);
      } else if (depth === 0) {
        // Allocated nowhere: zeros because some layer ends before this offset. If that layer is
        // above BASE (or is BASE, which grows), the top's zeros must be written into BASE —
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
  let dataBytes = 0;
  let zeroBytes = 0;
  for (const r of runs) {
    if (r.zero) zeroBytes += r.length;
    else dataBytes += r.length;
  }
  return { runs, topAllocated, dataBytes, zeroBytes };
}

// ------------------------------------------------------------------------- intermediate commit

export interface CommitJobOptions extends Omit<JobOptions, 'id'> {
  id?: string;
  /** the top of what is committed, as it reads (its extents give the allocation depth) */
  top: BlockNode;
  /** BASE, writable: the node the layer above it reads through, or one on the same image while nothing else has it open */
  base: BlockNode;
  /** how many layers above BASE are committed, the top included (default 1: BASE is the top's backing) */
  layers?: number;
  /** the chain's sizes, top first, before BASE grows (default: chainSizes(top)) */
  sizes?: readonly number[];
  /** after the plan, before anything is written (the offline command grows BASE here) */
  onPlanned?: (plan: CommitPlan) => Promise<void>;
  /** make these empty once BASE holds everything and is flushed (the top is skipped when it allocates nothing) */
  makeEmpty?: readonly BlockNode[];
  /** largest read/write of data (default 1 MiB) */
  bufSize?: number;
  /** requests in flight (default 8) */
  maxOps?: number;
}

interface Piece extends CommitRun {
  /** an ignored error: not before this time */
  holdUntil: number;
}

/** A promise to wait on until something changes (a request ended, resume, cancel, speed) or a timeout. */
class Waker {
  private waiters: Array<() => void> = [];
  wait(ms?: number): Promise<void> {
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const done = (): void => {
        if (timer) clearTimeout(timer);
        resolve();
      };
      this.waiters.push(done);
      if (ms !== undefined) timer = setTimeout(() => {
        const i = this.waiters.indexOf(done);
        if (i >= 0) this.waiters.splice(i, 1);
        resolve();
      }, Math.max(1, Math.ceil(ms)));
    });
  }
  kick(): void {
    for (const w of this.waiters.splice(0)) w();
  }
}

export class CommitJob extends Job {
  readonly type = 'commit';
  readonly top: BlockNode;
  readonly base: BlockNode;
  readonly layers: number;
  readonly bufSize: number;
  readonly maxOps: number;
  /** known once the job has planned */
  plan: CommitPlan | undefined;
  /** the overlays made empty at the end */
  readonly emptied: BlockNode[] = [];

  private readonly sizes: readonly number[];
  private readonly onPlanned: CommitJobOptions['onPlanned'];
  private readonly toEmpty: readonly BlockNode[];
  private readonly waker = new Waker();
  private inflight = 0;
  /** the next piece not started yet: run index, offset within it, piece size for zero runs */
  private cursor = { run: 0, within: 0, zeroPiece: ZERO_PIECE };
  private retry: Piece[] = [];
  private fatal: BlkrepError | undefined;
  private backoffMs = 0;
  private bytesDone = 0;
  private total = 0;
  private freeBuffers: Buffer[] = [];

  constructor(options: CommitJobOptions) {
    super({ ...options, id: options.id ?? 'commit0' });
    this.top = options.top;
    this.base = options.base;
    if (!this.base.caps.canWrite) throw new BlkrepError('ERR_READ_ONLY', `the base ${this.base.description} is read-only: a commit writes into it`, { errno: 'EPERM', details: { base: this.base.description } });
    if (!this.top.extents || !this.top.caps.canExtents) throw badOption(`${this.top.description} reports no extents: a commit needs the allocation of the layers above the base`);
    this.layers = options.layers ?? 1;
    if (!Number.isSafeInteger(this.layers) || this.layers < 1) throw badOption(`${this.layers} layers above the base: expected 1 or more`);
    this.sizes = options.sizes ?? chainSizes(this.top);
    if (this.sizes.length <= this.layers) throw badOption(`the chain of ${this.top.description} has ${this.sizes.length} layers: the base cannot be ${this.layers} below the top`);
    this.bufSize = options.bufSize ?? DEFAULT_COMMIT_BUF_SIZE;
    if (!Number.isSafeInteger(this.bufSize) || this.bufSize < 512 || this.bufSize > MAX_BUF_SIZE) throw badOption(`buffer size ${this.bufSize} is not from 512 bytes to ${MAX_BUF_SIZE}`);
    this.maxOps = options.maxOps ?? DEFAULT_COMMIT_MAX_OPS;
    if (!Number.isSafeInteger(this.maxOps) || this.maxOps < 1 || this.maxOps > 1024) throw badOption(`${this.maxOps} requests in flight: expected 1 to 1024`);
    this.onPlanned = options.onPlanned;
    this.toEmpty = options.makeEmpty ?? [];
    for (const n of this.toEmpty) {
      if (!n.makeEmpty || !n.caps.canWrite) throw badOption(`${n.description} cannot be made empty (it is read-only or not a qcow2 image)`);
    }
    this.signal.addEventListener('abort', () => this.waker.kick());
  }

  protected override extraInfo(): Record<string, unknown> {
    return {
      active: false,
      top: this.top.description,
      base: this.base.description,
      layers: this.layers,
      bufSize: this.bufSize,
      maxOps: this.maxOps,
      opsInFlight: this.inflight,
      dataBytes: this.plan?.dataBytes ?? null,
      zeroBytes: this.plan?.zeroBytes ?? null,
      makeEmpty: this.toEmpty.map((n) => n.description),
    };
  }

  protected override onPauseRequested(): void {
    this.waker.kick();
  }

  protected override onResume(): void {
    this.backoffMs = 0;
    for (const p of this.retry) p.holdUntil = 0;
    this.waker.kick();
  }

  protected override onSpeedChanged(): void {
    this.waker.kick();
  }

  protected override onCancel(): void {
    this.waker.kick();
  }

  /** Paused: say so once idle, then wait for resume (or cancel). */
  private async pausePoint(): Promise<void> {
    while (this.pauseRequested && !this.signal.aborted) {
      if (this.inflight === 0) this.reachedPausePoint();
      await this.waker.wait();
    }
    this.signal.throwIfAborted();
  }

  /** One request under the side's error policy, retried as the policy says. */
  private async withPolicy<T>(side: JobSide, operation: string, offset: number, length: number, fn: () => Promise<T>): Promise<T> {
    for (;;) {
      await this.pausePoint();
      try {
        const out = await fn();
        this.backoffMs = 0;
        return out;
      } catch (err) {
        this.signal.throwIfAborted();
        const action = this.handleIoError({ side, operation, offset, length, error: err });
        if (action === 'report') throw this.error ?? toBlkrepError(err);
        if (action === 'ignore') {
          this.backoffMs = this.backoffMs === 0 ? 10 : Math.min(1000, this.backoffMs * 2);
          await this.waker.wait(this.backoffMs);
        }
      }
    }
  }

  protected override beforeQuery(): void {
    this.progress(this.bytesDone, this.total - this.bytesDone);
  }

  protected async execute(): Promise<void> {
    const top = this.top;
    const plan = await planCommit(
      { size: top.size, description: top.description, extents: (offset, length) => this.withPolicy('source', 'extents', offset, length, () => top.extents!(offset, length, { signal: this.signal })) },
      this.layers,
      this.sizes,
      () => this.pausePoint(),
    );
    this.plan = plan;
    this.total = plan.dataBytes + plan.zeroBytes;
    this.progress(0, this.total);
    if (this.onPlanned) await this.onPlanned(plan);
    const base = completeNode(this.base);
    this.cursor = { run: 0, within: 0, zeroPiece: this.base.writeZeroes && this.base.caps.canZero ? ZERO_PIECE : this.bufSize };
    await this.copyAll(base);
    await this.withPolicy('target', 'flush', 0, 0, () => base.flush({ signal: this.signal }));
  }

  /** The next piece to start: a retry whose hold is over, else a fresh one; or the ms to wait. */
  private nextPiece(now: number): Piece | number | undefined {
    let soonest = Infinity;
    for (let i = 0; i < this.retry.length; i++) {
      const p = this.retry[i]!;
      if (p.holdUntil <= now) return this.retry.splice(i, 1)[0]!;
      soonest = Math.min(soonest, p.holdUntil);
    }
    const p = this.nextFresh();
    if (p) return p;
    return soonest === Infinity ? undefined : soonest - now;
  }

  /** The plan's runs cut, as they are reached, into pieces of at most bufSize (zeros: 256 MiB). */
  private nextFresh(): Piece | undefined {
    const c = this.cursor;
    const r = this.plan?.runs[c.run];
    if (!r) return undefined;
    const length = Math.min(r.zero ? c.zeroPiece : this.bufSize, r.length - c.within);
    const piece = { offset: r.offset + c.within, length, zero: r.zero, holdUntil: 0 };
    c.within += length;
    if (c.within >= r.length) {
      c.run++;
      c.within = 0;
    }
    return piece;
  }

  private async copyAll(base: ReturnType<typeof completeNode>): Promise<void> {
    for (;;) {
      if (this.fatal || this.signal.aborted) break;
      if (this.pauseRequested) {
        if (this.inflight === 0) this.reachedPausePoint();
        await this.waker.wait();
        continue;
      }
      if (this.inflight >= this.maxOps) {
        await this.waker.wait();
        continue;
      }
      const next = this.nextPiece(this.clock.now());
      if (next === undefined) {
        if (this.inflight === 0) break;
        await this.waker.wait();
        continue;
      }
      if (typeof next === 'number') {
        await this.waker.wait(next);
        continue;
      }
      if (!next.zero) {
        const wait = this.limiter.delay();
        if (wait > 0) {
          this.retry.unshift(next);
          await this.waker.wait(wait);
          continue;
        }
        this.limiter.take(next.length);
      }
      this.inflight++;
      void this.copyPiece(base, next);
    }
    while (this.inflight > 0) await this.waker.wait();
    if (this.fatal) throw this.fatal;
    this.signal.throwIfAborted();
  }

  private async copyPiece(base: ReturnType<typeof completeNode>, p: Piece): Promise<void> {
    let side: JobSide = 'target';
    let operation = 'write-zeroes';
    let buffer: Buffer | undefined;
    try {
      if (p.zero) {
        await base.writeZeroes(p.offset, p.length, { signal: this.signal });
      } else {
        buffer = this.freeBuffers.pop() ?? Buffer.allocUnsafe(this.bufSize);
        const view = buffer.subarray(0, p.length);
        side = 'source';
        operation = 'read';
        if (this.top.readInto) await this.top.readInto(p.offset, view, { signal: this.signal });
        else (await this.top.read(p.offset, p.length, { signal: this.signal })).copy(view);
        side = 'target';
        operation = 'write';
        await base.write(p.offset, view, { signal: this.signal });
      }
      this.bytesDone += p.length;
      this.backoffMs = 0;
      this.progress(this.bytesDone, this.total - this.bytesDone);
    } catch (err) {
      if (!this.signal.aborted && !this.fatal) {
        const action = this.handleIoError({ side, operation, offset: p.offset, length: p.length, error: err });
        if (action === 'report') this.fatal = this.error ?? toBlkrepError(err);
        else if (action === 'ignore') {
          this.backoffMs = this.backoffMs === 0 ? 10 : Math.min(1000, this.backoffMs * 2);
          p.holdUntil = this.clock.now() + this.backoffMs;
          this.retry.push(p);
        } else {
          p.holdUntil = 0;
          this.retry.unshift(p);
        }
      }
    } finally {
      if (buffer) this.freeBuffers.push(buffer);
      this.inflight--;
      this.waker.kick();
    }
  }

  /** Pending: BASE holds everything stably; make the overlays empty. */
  protected override async prepare(): Promise<void> {
    for (const n of this.toEmpty) {
      if (n === this.top && !this.plan?.topAllocated) continue;
      await n.makeEmpty!();
      this.emptied.push(n);
    }
  }
}

// ------------------------------------------------------------------------------ active commit

export interface ActiveCommitOptions extends Omit<MirrorOptions, 'source' | 'target' | 'sync' | 'pivot' | 'onConsistent' | 'bitmap' | 'bitmapMode' | 'targetIsZero'> {
  /** the active layer (a qcow2 node) whose backing is BASE */
  overlay: BlockNode;
  /** BASE: must be the overlay's backing node, writable (default: that node) */
  base?: BlockNode;
  /**
   * What writes go through to reach the overlay, read as the overlay (default: the overlay). A
   * daemon gives its export's dirty-tracking filter, so the export's bitmaps keep recording.
   */
  via?: BlockNode;
}

/** The node an overlay reads through (a qcow2 image's backing), if any. */
function backingNode(node: BlockNode): BlockNode | undefined {
  return node instanceof Qcow2Node ? node.backing : undefined;
}

function checkActive(options: ActiveCommitOptions): { overlay: BlockNode; base: BlockNode; depth: number } {
  const overlay = options.overlay;
  const backing = backingNode(overlay);
  if (!backing) throw new BlkrepError('ERR_NO_BACKING', `${overlay.description} has no backing node: there is nothing to commit it into`, { errno: 'EINVAL', details: { image: overlay.description } });
  const base = options.base ?? backing;
  // how deep BASE is in the chain the overlay reads through (1: its backing)
  let depth = 1;
  for (let n: BlockNode | undefined = backing; n !== base; n = backingNode(n), depth++) {
    if (!n) {
      throw badOption(`the base ${base.description} is not a node ${overlay.description} reads through (${backing.description} …): an active commit writes into that very node, or its caches would go stale`, {
        overlay: overlay.description,
        base: base.description,
        backing: backing.description,
      });
    }
  }
  if (!base.caps.canWrite) {
    throw new BlkrepError('ERR_READ_ONLY', `the backing node ${base.description} of ${overlay.description} is read-only: open it read-write to commit into it`, { errno: 'EPERM', details: { base: base.description } });
  }
  if (!overlay.caps.canWrite || !overlay.makeEmpty) throw new BlkrepError('ERR_READ_ONLY', `${overlay.description} is read-only: an active commit makes it empty at the end`, { errno: 'EPERM', details: { image: overlay.description } });
  return { overlay, base, depth };
}

/**
 * Active commit: a mirror (sync top) from the overlay into its own backing node. See the file
 * comment. Clients write through `job.node`.
 */
export class ActiveCommitJob extends MirrorJob {
  readonly overlay: BlockNode;
  readonly base: BlockNode;
  /** the overlay was made empty (complete) */
  emptied = false;

  /** how deep the base is below the overlay (1: its backing); the layers between must be empty */
  readonly baseDepth: number;

  constructor(options: ActiveCommitOptions) {
    const { overlay, base, depth } = checkActive(options);
    let self: ActiveCommitJob | undefined;
    const granularity = options.granularity ?? (overlay instanceof Qcow2Node ? Math.min(64 << 20, Math.max(512, overlay.image.clusterSize)) : undefined);
    super({
      ...options,
      id: options.id ?? 'commit0',
      source: options.via ?? overlay,
      target: base,
      sync: 'top',
      ...(granularity === undefined ? {} : { granularity }),
      onConsistent: async (reason) => {
        // writes wait and BASE (flushed) holds everything the overlay shows: drop the overlay
        if (reason === 'complete') {
          await overlay.makeEmpty!();
          if (self) self.emptied = true;
        }
      },
    });
    self = this;
    // the job type: a mirror underneath, a commit to everyone who looks
    Object.defineProperty(this, 'type', { value: 'commit', enumerable: true });
    this.overlay = overlay;
    this.base = base;
    this.baseDepth = depth;
  }

  /**
   * A base further down: the layers between must hold nothing (commit them first, e.g. with an
   * intermediate CommitJob that empties them), since the mirror copies only what the overlay
   * itself holds. Nothing writes them meanwhile: writes go to the overlay.
   */
  protected override async execute(): Promise<void> {
    if (this.baseDepth > 1) {
      const size = this.overlay.size;
      for (let pos = 0; pos < size; ) {
        const runs = await this.overlay.extents!(pos, size - pos, { signal: this.signal });
        if (runs.length === 0) break;
        for (const r of runs) {
          const n = Math.min(r.length, size - pos);
          if (n <= 0) break;
          if (r.depth !== undefined && r.depth >= 2 && r.depth <= this.baseDepth) {
            throw new BlkrepError('ERR_NOT_EMPTY', `a layer between ${this.overlay.description} and the base ${this.base.description} holds data (at offset ${pos}, ${n} bytes, depth ${r.depth}): commit it into the base first, then commit the overlay`, {
              errno: 'EINVAL',
              details: { offset: pos, length: n, depth: r.depth },
            });
          }
          pos += n;
        }
      }
    }
    return super.execute();
  }

  protected override extraInfo(): Record<string, unknown> {
    return { ...super.extraInfo(), active: true, top: this.overlay.description, base: this.base.description, layers: this.baseDepth };
  }

  /** complete never pivots: the writes go on to the (now empty) overlay. */
  protected override onComplete(options: Record<string, unknown>): void {
    super.onComplete({ ...options, pivot: false });
  }
}

/** The node a commit reads through for an open overlay (its backing), for callers choosing the job kind. */
export function commitBaseOf(overlay: BlockNode): BlockNode | undefined {
  return backingNode(overlay);
}

export type AnyCommitJob = CommitJob | ActiveCommitJob;

