/**
 * The copy engine's time: `now()` and timers through one injected clock, so tests (and the
 * heartbeat) can drive a job with a fake clock instead of waiting.
 */
import type { Clock } from '../job.js';

/** An opaque timer handle, as the clock's setTimeout returns it. */
export type TimerHandle = unknown;

export interface TimerClock extends Clock {
  setTimeout(fn: () => void, ms: number): TimerHandle;
  clearTimeout(handle: TimerHandle): void;
}

/**
 * performance.now() and Node's timers. A pending wake-up keeps the process alive (an offline
 * job waiting out its speed limit or a backoff must not exit); see unrefTimer().
 */
export const systemTimerClock: TimerClock = {
  now: () => performance.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle as NodeJS.Timeout),
};

/** Let a system timer not keep the process alive (a periodic check); a fake clock's handle is left alone. */
export function unrefTimer(handle: TimerHandle): void {
  (handle as { unref?: () => void } | null)?.unref?.();
}

/** `clock` itself when it has timers, else its now() with the system's timers. */
export function withTimers(clock: Clock): TimerClock {
  const c = clock as Partial<TimerClock>;
  if (typeof c.setTimeout === 'function' && typeof c.clearTimeout === 'function') return clock as TimerClock;
  return { now: () => clock.now(), setTimeout: systemTimerClock.setTimeout, clearTimeout: systemTimerClock.clearTimeout };
}

/** One pending wake-up at a time: arming it again while it is pending changes nothing. */
export class WakeTimer {
  private handle: TimerHandle | undefined;
  private armed = false;

  constructor(
    private readonly clock: TimerClock,
    private readonly fire: () => void,
  ) {}

  get pending(): boolean {
    return this.armed;
  }

  /** Call fire() in `ms` (at least 1 ms, rounded up), unless a wake-up is already pending. */
  arm(ms: number): void {
    if (this.armed) return;
    this.armed = true;
    this.handle = this.clock.setTimeout(() => {
      this.armed = false;
      this.handle = undefined;
      this.fire();
    }, Math.max(1, Math.ceil(ms)));
  }

  cancel(): void {
    if (this.armed) this.clock.clearTimeout(this.handle);
    this.armed = false;
    this.handle = undefined;
  }
}

/** A promise to wait on until something changes (kick) or a timeout on the clock. */
export class Waker {
  private waiters: Array<() => void> = [];

  constructor(private readonly clock: TimerClock) {}

  wait(ms?: number): Promise<void> {
    return new Promise((resolve) => {
      let handle: TimerHandle | undefined;
      const done = (): void => {
        if (handle !== undefined) this.clock.clearTimeout(handle);
        resolve();
      };
      this.waiters.push(done);
      if (ms !== undefined) {
        handle = this.clock.setTimeout(() => {
          handle = undefined;
          const i = this.waiters.indexOf(done);
          if (i >= 0) this.waiters.splice(i, 1);
          resolve();
        }, Math.max(1, Math.ceil(ms)));
      }
    });
  }

  kick(): void {
    for (const w of this.waiters.splice(0)) w();
  }
}
