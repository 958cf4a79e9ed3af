/**
 * The copy engine's scheduler (src/jobs/copy/scheduler.ts) on a fake clock: ops in flight bound,
 * speed limit, backoff, finish — no real time passes.
 */
import { describe, expect, it } from 'vitest';
import { CopyScheduler, BufferPool, type CopyFeed } from '../../../src/jobs/copy/scheduler.js';
import { WakeTimer, Waker, withTimers, systemTimerClock } from '../../../src/jobs/copy/clock.js';
import { Phase } from '../../../src/jobs/copy/phase.js';
import { RateLimiter } from '../../../src/jobs/job.js';
import { FakeClock } from '../../support/fake-clock.js';

interface Op {
  n: number;
  bytes: number;
}

/** A feed of `count` ops of `bytes` each; ops end when the test says (or at once with auto). */
class Feed implements CopyFeed<Op> {
  next_ = 0;
  running: Op[] = [];
  started: Array<[number, number]> = [];
  sched!: CopyScheduler<Op>;
  constructor(
    private readonly clock: FakeClock,
    private readonly count: number,
    private readonly bytes: number,
    private readonly auto = false,
    private readonly zeroEvery = 0,
  ) {}
  next(_now: number, throttled: boolean): Op | undefined {
    if (this.next_ >= this.count) return undefined;
    const n = this.next_;
    const bytes = this.zeroEvery > 0 && n % this.zeroEvery === 0 ? 0 : this.bytes;
    if (throttled && bytes > 0) return undefined;
    this.next_++;
    return { n, bytes };
  }
  cost(op: Op): number {
    return op.bytes;
  }
  run(op: Op): void {
    this.started.push([op.n, this.clock.now()]);
    if (this.auto) {
      this.sched.done();
      return;
    }
    this.running.push(op);
  }
  /** end the oldest op in flight and pump */
  finishOne(): void {
    const op = this.running.shift();
    if (!op) throw new Error('nothing in flight');
    this.sched.done();
    this.sched.fill();
  }
}

function setup(o: { count: number; bytes: number; maxOps: number; speed?: number; auto?: boolean; zeroEvery?: number }) {
  const clock = new FakeClock();
  const feed = new Feed(clock, o.count, o.bytes, o.auto ?? false, o.zeroEvery ?? 0);
  const limiter = new RateLimiter(o.speed ?? 0, clock);
  const sched: CopyScheduler<Op> = new CopyScheduler(feed, { maxOps: o.maxOps, limiter, clock, wake: () => sched.fill() });
  feed.sched = sched;
  return { clock, feed, limiter, sched };
}

describe('CopyScheduler', () => {
  it('keeps at most maxOps operations in flight and starts the next as one ends', () => {
    const { feed, sched } = setup({ count: 10, bytes: 65536, maxOps: 3 });
    sched.fill();
    expect(sched.inFlight).toBe(3);
    expect(feed.started.map(([n]) => n)).toEqual([0, 1, 2]);
    sched.fill(); // nothing more while full
    expect(feed.started).toHaveLength(3);
    let most = 0;
    while (feed.running.length > 0) {
      feed.finishOne();
      most = Math.max(most, sched.inFlight);
    }
    expect(most).toBe(3);
    expect(feed.started.map(([n]) => n)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(sched.inFlight).toBe(0);
    expect(sched.startedOps).toBe(10);
  });

  it('finishes: nothing to start, nothing in flight, no timer left', () => {
    const { clock, feed, sched } = setup({ count: 4, bytes: 4096, maxOps: 2 });
    sched.fill();
    while (feed.running.length > 0) feed.finishOne();
    expect(sched.inFlight).toBe(0);
    expect(sched.waiting).toBe(false);
    expect(clock.pending).toBe(0);
    expect(() => sched.done()).toThrow(/without an operation in flight/);
  });

  it('holds to the speed limit through wake-ups on the clock', () => {
    // 1 MiB/s, ops of 64 KiB that end at once: 10 s of fake time moves ~10 MiB
    const { clock, feed, sched } = setup({ count: 1000, bytes: 65536, maxOps: 4, speed: 1 << 20, auto: true });
    sched.fill();
    expect(feed.started).toHaveLength(1); // the bucket starts empty: one op, then in debt
    expect(sched.waiting).toBe(true);
    expect(clock.nextAt).toBe(63); // 64 KiB of debt at 1 MiB/s: 62.5 ms, rounded up
    clock.advance(10_000);
    const bytes = feed.started.length * 65536;
    expect(bytes / (1 << 20)).toBeGreaterThanOrEqual(9.9);
    expect(bytes / (1 << 20)).toBeLessThanOrEqual(10.1);
    // never two starts closer than the debt of one op allows
    for (let i = 2; i < feed.started.length; i++) expect(feed.started[i]![1] - feed.started[i - 1]![1]).toBeGreaterThanOrEqual(62);
  });

  it('lets an operation that moves no data through while throttled', () => {
    const { feed, sched } = setup({ count: 6, bytes: 65536, maxOps: 8, speed: 1000, auto: true, zeroEvery: 2 });
    sched.fill();
    // op 0 is zeros (free), op 1 data (puts the bucket in debt), op 2 zeros goes through while
    // throttled, op 3 (data) waits for the speed
    expect(feed.started.map(([n]) => n)).toEqual([0, 1, 2]);
    expect(sched.waiting).toBe(true);
  });

  it('sets the speed to 0: a pending wake-up is dropped, everything starts', () => {
    const { feed, limiter, sched } = setup({ count: 20, bytes: 65536, maxOps: 64, speed: 65536, auto: true });
    sched.fill();
    expect(feed.started).toHaveLength(1);
    limiter.setRate(0);
    sched.rearm();
    expect(sched.waiting).toBe(false);
    sched.fill();
    expect(feed.started).toHaveLength(20);
  });

  it('backs off after ignored errors: 10 ms doubling to 1 s, reset by a success or resume', () => {
    const { clock, feed, sched } = setup({ count: 100, bytes: 4096, maxOps: 1 });
    const seen: number[] = [];
    for (let i = 0; i < 9; i++) seen.push(sched.nextBackoff());
    expect(seen).toEqual([10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
    sched.succeeded();
    expect(sched.backoff).toBe(0);

    sched.holdAfterError(); // 10 ms
    sched.fill();
    expect(feed.started).toHaveLength(0);
    expect(clock.nextAt).toBe(10);
    clock.advance(9);
    expect(feed.started).toHaveLength(0);
    clock.advance(1);
    expect(feed.started.map(([, at]) => at)).toEqual([10]);
    feed.running.shift();
    sched.done();
    sched.holdAfterError(); // 20 ms from 10
    sched.fill();
    clock.advance(19);
    expect(feed.started).toHaveLength(1);
    clock.advance(1);
    expect(feed.started.map(([, at]) => at)).toEqual([10, 30]);
    feed.running.shift();
    sched.done();
    sched.holdAfterError(); // 40 ms; resume clears it
    sched.clearHold();
    sched.fill();
    expect(feed.started.map(([, at]) => at)).toEqual([10, 30, 30]);
    expect(sched.backoff).toBe(0);
  });

  it('stop() drops the pending wake-up', () => {
    const { clock, feed, sched } = setup({ count: 10, bytes: 65536, maxOps: 1, speed: 1000, auto: true });
    sched.fill();
    expect(clock.pending).toBe(1);
    sched.stop();
    expect(clock.pending).toBe(0);
    clock.advance(100_000);
    expect(feed.started).toHaveLength(1);
  });
});

describe('clock helpers', () => {
  it('WakeTimer arms once while pending, fires at ceil(ms) ≥ 1', () => {
    const clock = new FakeClock();
    let fired = 0;
    const t = new WakeTimer(clock, () => fired++);
    t.arm(0.2);
    t.arm(500);
    expect(clock.pending).toBe(1);
    expect(clock.nextAt).toBe(1);
    clock.advance(1);
    expect(fired).toBe(1);
    expect(t.pending).toBe(false);
    t.arm(5);
    t.cancel();
    clock.advance(10);
    expect(fired).toBe(1);
  });

  it('Waker resolves on kick or on its timeout, and clears its timer', async () => {
    const clock = new FakeClock();
    const w = new Waker(clock);
    let a = false;
    let b = false;
    void w.wait().then(() => (a = true));
    void w.wait(50).then(() => (b = true));
    clock.advance(49);
    await Promise.resolve();
    expect([a, b]).toEqual([false, false]);
    clock.advance(1);
    await Promise.resolve();
    expect([a, b]).toEqual([false, true]);
    w.kick();
    await Promise.resolve();
    expect(a).toBe(true);
    void w.wait(1000);
    w.kick();
    expect(clock.pending).toBe(0);
  });

  it('withTimers keeps a clock that has timers and adds the system timers to one that has not', () => {
    const clock = new FakeClock();
    expect(withTimers(clock)).toBe(clock);
    const plain = withTimers({ now: () => 42 });
    expect(plain.now()).toBe(42);
    expect(plain.setTimeout).toBe(systemTimerClock.setTimeout);
  });

  it('BufferPool hands out buffers of its size and keeps at most `keep`', () => {
    const pool = new BufferPool(4096, 1);
    const a = pool.take();
    const b = pool.take();
    expect(a.length).toBe(4096);
    pool.give(a);
    pool.give(b);
    pool.give(Buffer.alloc(10));
    expect(pool.take()).toBe(a);
    // b found the pool full: freed at once (freeBufferNow), not kept
    expect(b.length).toBe(0);
    expect(pool.take() === b).toBe(false);
  });

  it('BufferPool.close frees the kept buffers now and each one given back afterwards; take still works', () => {
    // a pair's full copy kept 64 × 256 KiB, garbage until a major GC once the mirror ended
    const pool = new BufferPool(256 << 10, 4);
    const bufs = Array.from({ length: 5 }, () => pool.take());
    for (const x of bufs.slice(0, 4)) pool.give(x);
    expect(pool.kept).toBe(4);
    pool.close();
    expect(pool.kept).toBe(0);
    // freed (freeBufferNow): their memory handed on, the buffers empty
    expect(bufs.slice(0, 4).every((x) => x.length === 0)).toBe(true);
    expect(bufs[4]!.length).toBe(256 << 10);
    pool.give(bufs[4]!);
    expect(bufs[4]!.length).toBe(0);
    expect(pool.kept).toBe(0);
    expect(pool.take().length).toBe(256 << 10);
  });
});

describe('Phase', () => {
  it('goes where its table allows and names a transition it does not', () => {
    const p = new Phase<'a' | 'b' | 'c'>('job x', { a: ['b'], b: ['c'], c: [] }, 'a');
    p.to('a');
    p.to('b');
    expect(p.is('a', 'b')).toBe(true);
    expect(() => p.to('a')).toThrow(expect.objectContaining({ code: 'ERR_JOB_INTERNAL', details: { from: 'b', to: 'a', allowed: ['c'] } }));
    p.to('c');
    expect(p.now).toBe('c');
  });
});
