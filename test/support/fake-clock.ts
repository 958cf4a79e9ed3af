/**
 * A fake clock for the copy engine (src/jobs/copy/clock.ts TimerClock): time moves only when a
 * test calls advance(), which fires the timers due in order.
 */
import type { TimerClock, TimerHandle } from '../../src/jobs/copy/clock.js';

export class FakeClock implements TimerClock {
  private t = 0;
  private seq = 0;
  private timers = new Map<number, { at: number; fn: () => void }>();

  now(): number {
    return this.t;
  }

  setTimeout(fn: () => void, ms: number): TimerHandle {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }

  clearTimeout(handle: TimerHandle): void {
    this.timers.delete(handle as number);
  }

  /** timers not fired yet */
  get pending(): number {
    return this.timers.size;
  }

  /** when the next timer fires (Infinity: none) */
  get nextAt(): number {
    let at = Infinity;
    for (const t of this.timers.values()) at = Math.min(at, t.at);
    return at;
  }

  /** Move time forward by `ms`, firing every timer due on the way, in order of their time. */
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      let next: [number, { at: number; fn: () => void }] | undefined;
      for (const e of this.timers) if (e[1].at <= end && (!next || e[1].at < next[1].at)) next = e;
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = Math.max(this.t, next[1].at);
      next[1].fn();
    }
    this.t = end;
  }
}
