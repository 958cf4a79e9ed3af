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
 *   BASE is still shadowed by the layer above it (a commit can simply be run again). The copy
 *   runs on the copy engine (src/jobs/copy/: scheduler, operations); its phase is CommitPhase.
 *
 * - ActiveCommitJob (active.ts) (the overlay is the active layer: clients write through `job.node`
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
import type { BlockNode, Extent } from '../../api/block.js';
import { BlkrepError, toBlkrepError } from '../../api/errors.js';
import { completeNode } from '../../block/node.js';
import { chainSizes, nextSizeBoundary, unallocatedDepth } from '../../image/chain.js';
import { Job, type JobOptions, type JobSide } from '../job.js';
import { Waker, withTimers, type TimerClock } from '../copy/clock.js';
import { copyPlanned, asCopyError, newCounters, type CopyIo } from '../copy/operations.js';
import { Phase } from '../copy/phase.js';
import { BufferPool, CopyScheduler, type CopyFeed } from '../copy/scheduler.js';

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

export function badOption(message: string, details: Record<string, unknown> = {}): BlkrepError {
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

/**
 * The phase of a CommitJob: planning (the extents of the top), copying (the plan's runs into
 * BASE), flushing (BASE), done; failed when execute() throws; emptying in prepare().
 */
export type CommitPhase = 'created' | 'planning' | 'copying' | 'flushing' | 'done' | 'emptying' | 'emptied' | 'failed';

const COMMIT_PHASES: Readonly<Record<CommitPhase, readonly CommitPhase[]>> = {
  created: ['planning', 'failed'],
  planning: ['copying', 'failed'],
  copying: ['flushing', 'failed'],
  flushing: ['done', 'failed'],
  done: ['emptying'],
  emptying: ['emptied', 'failed'],
  emptied: [],
  failed: [],
};

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
  private readonly timers: TimerClock;
  private readonly waker: Waker;
  private readonly sched: CopyScheduler<Piece>;
  private readonly phase: Phase<CommitPhase>;
  private io: CopyIo | undefined;
  /** the next piece not started yet: run index, offset within it, piece size for zero runs */
  private cursor = { run: 0, within: 0, zeroPiece: ZERO_PIECE };
  private retry: Piece[] = [];
  private fatal: BlkrepError | undefined;
  private copied: { resolve: () => void; reject: (e: unknown) => void } | undefined;
  private bytesDone = 0;
  private total = 0;

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
    this.timers = withTimers(this.clock);
    this.waker = new Waker(this.timers);
    const feed: CopyFeed<Piece> = {
      next: (now, throttled) => this.nextPiece(now, throttled),
      cost: (p) => (p.zero ? 0 : p.length),
      run: (p) => void this.copyPiece(p),
    };
    this.sched = new CopyScheduler(feed, { maxOps: this.maxOps, limiter: this.limiter, clock: this.timers, wake: () => this.pump() });
    this.phase = new Phase(`job ${this.id}`, COMMIT_PHASES, 'created');
    this.signal.addEventListener('abort', () => this.kick());
  }

  /** planning, copying, flushing, done … (see CommitPhase) */
  get commitPhase(): CommitPhase {
    return this.phase.now;
  }

  protected override extraInfo(): Record<string, unknown> {
    return {
      active: false,
      top: this.top.description,
      base: this.base.description,
      layers: this.layers,
      bufSize: this.bufSize,
      maxOps: this.maxOps,
      opsInFlight: this.sched.inFlight,
      dataBytes: this.plan?.dataBytes ?? null,
      zeroBytes: this.plan?.zeroBytes ?? null,
      makeEmpty: this.toEmpty.map((n) => n.description),
    };
  }

  /** Something changed (a request ended, resume, cancel, speed): the sequential steps look again, the copy pumps. */
  private kick(): void {
    this.waker.kick();
    this.pump();
  }

  protected override onPauseRequested(): void {
    this.kick();
  }

  protected override onResume(): void {
    this.sched.clearHold();
    for (const p of this.retry) p.holdUntil = 0;
    this.kick();
  }

  protected override onSpeedChanged(): void {
    this.sched.rearm();
    this.kick();
  }

  protected override onCancel(): void {
    this.kick();
  }

  /** Paused: say so once idle, then wait for resume (or cancel). */
  private async pausePoint(): Promise<void> {
    while (this.pauseRequested && !this.signal.aborted) {
      if (this.sched.inFlight === 0) this.reachedPausePoint();
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
        this.sched.succeeded();
        return out;
      } catch (err) {
        this.signal.throwIfAborted();
        const action = this.handleIoError({ side, operation, offset, length, error: err });
        if (action === 'report') throw this.error ?? toBlkrepError(err);
        if (action === 'ignore') await this.waker.wait(this.sched.nextBackoff());
      }
    }
  }

  protected override beforeQuery(): void {
    this.progress(this.bytesDone, this.total - this.bytesDone);
  }

  protected async execute(): Promise<void> {
    try {
      await this.work();
    } catch (err) {
      this.phase.to('failed');
      throw err;
    } finally {
      this.sched.stop();
      this.io?.buffers.close();
    }
  }

  private async work(): Promise<void> {
    const top = this.top;
    this.phase.to('planning');
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
    this.io = {
      source: completeNode(top),
      target: base,
      granularity: 512,
      size: top.size,
      bufSize: this.bufSize,
      buffers: new BufferPool(this.bufSize, this.maxOps),
      counters: newCounters(),
      signal: this.signal,
    };
    this.phase.to('copying');
    await new Promise<void>((resolve, reject) => {
      this.copied = { resolve, reject };
      this.pump();
    });
    this.phase.to('flushing');
    await this.withPolicy('target', 'flush', 0, 0, () => base.flush({ signal: this.signal }));
    this.phase.to('done');
  }

  // ------------------------------------------------------------- the copy, over the engine

  /** The feed's next: a retry whose hold is over, else a fresh piece; or the ms to wait. Data waits while throttled. */
  private nextPiece(now: number, throttled: boolean): Piece | number | undefined {
    let soonest = Infinity;
    for (let i = 0; i < this.retry.length; i++) {
      const p = this.retry[i]!;
      if (p.holdUntil <= now) {
        if (throttled && !p.zero) return undefined;
        return this.retry.splice(i, 1)[0]!;
      }
      soonest = Math.min(soonest, p.holdUntil);
    }
    const p = this.nextFresh(throttled);
    if (p) return p;
    if (throttled) return undefined;
    return soonest === Infinity ? undefined : soonest - now;
  }

  /** The plan's runs cut, as they are reached, into pieces of at most bufSize (zeros: 256 MiB); a data piece stays while throttled. */
  private nextFresh(throttled = false): Piece | undefined {
    const c = this.cursor;
    const r = this.plan?.runs[c.run];
    if (!r) return undefined;
    if (throttled && !r.zero) return undefined;
    const length = Math.min(r.zero ? c.zeroPiece : this.bufSize, r.length - c.within);
    const piece = { offset: r.offset + c.within, length, zero: r.zero, holdUntil: 0 };
    c.within += length;
    if (c.within >= r.length) {
      c.run++;
      c.within = 0;
    }
    return piece;
  }

  /** every piece of the plan has been started and none waits for a retry */
  private get allStarted(): boolean {
    return this.retry.length === 0 && (this.plan?.runs[this.cursor.run] === undefined);
  }

  /** Start what may start; then see whether the copy is over or paused. */
  private pump(): void {
    if (!this.phase.is('copying') || !this.copied) return;
    if (!this.fatal && !this.signal.aborted && !this.pauseRequested) this.sched.fill();
    if (this.sched.inFlight > 0) return;
    const copied = this.copied;
    if (this.fatal || this.signal.aborted) {
      this.copied = undefined;
      copied.reject(this.fatal ?? this.signal.reason);
      return;
    }
    if (this.pauseRequested) {
      this.reachedPausePoint();
      return;
    }
    if (this.allStarted) {
      this.copied = undefined;
      copied.resolve();
    }
  }

  private async copyPiece(p: Piece): Promise<void> {
    try {
      await copyPlanned(this.io!, [{ offset: p.offset, length: p.length, zero: p.zero, hole: p.zero }], false);
      this.bytesDone += p.length;
      this.sched.succeeded();
      this.progress(this.bytesDone, this.total - this.bytesDone);
    } catch (err) {
      if (!this.signal.aborted && !this.fatal) {
        const e = asCopyError(err);
        const action = this.handleIoError({ side: e.side, operation: e.operation, offset: p.offset, length: p.length, error: e.inner });
        if (action === 'report') this.fatal = this.error ?? toBlkrepError(e.inner);
        else if (action === 'ignore') {
          p.holdUntil = this.timers.now() + this.sched.nextBackoff();
          this.retry.push(p);
        } else {
          p.holdUntil = 0;
          this.retry.unshift(p);
        }
      }
    } finally {
      this.sched.done();
      this.kick();
    }
  }

  /** Pending: BASE holds everything stably; make the overlays empty. */
  protected override async prepare(): Promise<void> {
    this.phase.to('emptying');
    for (const n of this.toEmpty) {
      if (n === this.top && !this.plan?.topAllocated) continue;
      await n.makeEmpty!();
      this.emptied.push(n);
    }
    this.phase.to('emptied');
  }
}
