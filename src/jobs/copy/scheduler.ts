/**
 * The copy loop every copying job shares (mirror, backup, commit; later the pair's resync): up
 * to `maxOps` operations in flight, the speed limit (the job's RateLimiter: an operation is
 * charged its data bytes when it starts), the backoff after an ignored error (10 ms, doubling to
 * 1 s while errors repeat, back to 0 after a success), buffers reused across operations, and
 * one wake-up timer on the injected clock.
 *
 * The policy (the job) says what to copy next through a CopyFeed and does the operation itself;
 * it calls `done()` when an operation leaves the in-flight count and `fill()` (its pump) when
 * something changed. The scheduler never decides that a job ends: it only starts work.
 */
import type { RateLimiter } from '../job.js';
import { WakeTimer, type TimerClock } from './clock.js';
import { freeBufferNow } from '../../util/free-buffer.js';

/** What to copy next, and how (the policy's side of the loop). */
export interface CopyFeed<Op> {
  /**
   * The next operation to start (taking it: locks, cursor), or the ms until one may be ready, or
   * undefined when there is nothing to start now. `throttled`: the speed limit says wait — only
   * an operation that moves no data (cost 0) may start; else answer undefined.
   */
  next(now: number, throttled: boolean): Op | number | undefined;
  /** bytes charged to the speed limit when `op` starts */
  cost(op: Op): number;
  /** Start `op` (asynchronously); call the scheduler's done() when it leaves the in-flight count. */
  run(op: Op): void;
}

export interface SchedulerOptions {
  /** operations in flight, at most */
  maxOps: number;
  limiter: RateLimiter;
  clock: TimerClock;
  /** called when a wait is over (a held error backoff, the speed limit, a hold the feed asked for): the policy's pump */
  wake: () => void;
}

/** first backoff after an ignored error, and the most it grows to (ms) */
export const BACKOFF_FIRST_MS = 10;
export const BACKOFF_MAX_MS = 1000;

export class CopyScheduler<Op> {
  readonly maxOps: number;
  private readonly limiter: RateLimiter;
  private readonly clock: TimerClock;
  private readonly timer: WakeTimer;
  private ops = 0;
  private holdUntil = 0;
  private backoffMs = 0;
  private started = 0;

  constructor(
    private readonly feed: CopyFeed<Op>,
    o: SchedulerOptions,
  ) {
    this.maxOps = o.maxOps;
    this.limiter = o.limiter;
    this.clock = o.clock;
    this.timer = new WakeTimer(o.clock, o.wake);
  }

  /** operations in flight */
  get inFlight(): number {
    return this.ops;
  }

  /** operations started since the job began */
  get startedOps(): number {
    return this.started;
  }

  /** the backoff in force (0: none) */
  get backoff(): number {
    return this.backoffMs;
  }

  /** a wake-up is pending */
  get waiting(): boolean {
    return this.timer.pending;
  }

  /** Start operations while fewer than maxOps are in flight, no backoff holds, the speed allows and the feed has some. */
  fill(): void {
    const now = this.clock.now();
    while (this.ops < this.maxOps) {
      if (now < this.holdUntil) {
        this.timer.arm(this.holdUntil - now);
        return;
      }
      const wait = this.limiter.delay();
      const next = this.feed.next(now, wait > 0);
      if (next === undefined) {
        if (wait > 0) this.timer.arm(wait);
        return;
      }
      if (typeof next === 'number') {
        this.timer.arm(next);
        return;
      }
      this.limiter.take(this.feed.cost(next));
      this.ops++;
      this.started++;
      this.feed.run(next);
    }
  }

  /** An operation left the in-flight count (whatever its outcome). */
  done(): void {
    if (this.ops <= 0) throw new Error('CopyScheduler.done() without an operation in flight');
    this.ops--;
  }

  /** Wake the policy in `ms` (unless a wake-up is pending already). */
  wakeIn(ms: number): void {
    this.timer.arm(ms);
  }

  /** An ignored error: the next backoff (10 ms, doubling, at most 1 s). */
  nextBackoff(): number {
    this.backoffMs = this.backoffMs === 0 ? BACKOFF_FIRST_MS : Math.min(BACKOFF_MAX_MS, this.backoffMs * 2);
    return this.backoffMs;
  }

  /** An ignored error: start nothing for the next backoff. */
  holdAfterError(): void {
    this.holdUntil = this.clock.now() + this.nextBackoff();
  }

  /** A success: the backoff starts over. */
  succeeded(): void {
    this.backoffMs = 0;
  }

  /** resume: no hold, no backoff */
  clearHold(): void {
    this.holdUntil = 0;
    this.backoffMs = 0;
  }

  /** The speed changed: forget a pending wake-up (the caller fills again). */
  rearm(): void {
    this.timer.cancel();
  }

  /** The job is over: no more wake-ups. */
  stop(): void {
    this.timer.cancel();
  }
}

/**
 * Copy buffers of one size, reused: at most `keep` are kept. take() hands out a buffer of
 * `size` bytes (callers use a subarray).
 */
export class BufferPool {
  private free: Buffer[] = [];
  private closed = false;

  constructor(
    readonly size: number,
    private readonly keep: number,
  ) {}

  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafe(this.size);
  }

  give(b: Buffer): void {
    if (!this.closed && b.length === this.size && this.free.length < this.keep) this.free.push(b);
    else freeBufferNow(b);
  }

  /**
   * The job is over: free the kept buffers now (up to `keep` × `size`: 16 MiB for a pair's full
   * copy, garbage until a major GC otherwise), and each one given back from now on. take() still
   * works (a fresh buffer).
   */
  close(): void {
    this.closed = true;
    for (const b of this.free.splice(0)) freeBufferNow(b);
  }

  /** buffers kept for reuse (tests) */
  get kept(): number {
    return this.free.length;
  }
}
