/**
 * The three kinds of waiting the qcow2 driver needs:
 *
 * - Mutex: metadata updates that await (refcount block loads, table growth) run one at a time.
 * - RangeLock: requests that change the mapping of guest clusters (allocating writes, zeroing,
 *   trim) exclude each other per cluster range, so two writes to the same unallocated cluster
 *   never allocate it twice. Data I/O to different clusters still runs concurrently.
 * - RequestGate: counts requests in flight by epoch. A freed host cluster may be reused only
 *   after every request that could still be doing I/O to it (it started before the pointer was
 *   removed) has finished; exclusive operations (make-empty, resize, close) wait for all of them.
 */

export class Mutex {
  private tail: Promise<void> = Promise.resolve();
  private held = false;

  get locked(): boolean {
    return this.held;
  }

  async run<T>(fn: () => Promise<T> | T): Promise<T> {
    const previous = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((resolve) => (release = resolve));
    await previous;
    this.held = true;
    try {
      return await fn();
    } finally {
      this.held = false;
      release();
    }
  }
}

interface HeldRange {
  start: number;
  end: number;
  released: Promise<void>;
}

/** Exclusive locks on half-open ranges [start, end) of integers (guest cluster indices). */
export class RangeLock {
  private readonly held: HeldRange[] = [];

  async lock(start: number, end: number): Promise<() => void> {
    for (;;) {
      const conflict = this.held.find((h) => h.start < end && start < h.end);
      if (!conflict) break;
      await conflict.released;
    }
    let release!: () => void;
    const entry: HeldRange = { start, end, released: new Promise<void>((resolve) => (release = resolve)) };
    this.held.push(entry);
    return () => {
      const i = this.held.indexOf(entry);
      if (i >= 0) this.held.splice(i, 1);
      release();
    };
  }
}

/**
 * Requests in flight, by epoch. `begin()` before a request looks at any table, `end()` when its
 * I/O is done; `advance()` starts a new epoch and returns the old one; `drain(e)` resolves once
 * no request of epoch ≤ e is in flight.
 */
export class RequestGate {
  private epoch = 0;
  private readonly counts = new Map<number, number>();
  private waiters: Array<{ epoch: number; resolve: () => void }> = [];
  private blocked: Promise<void> | undefined;

  /** Returns the request's epoch, waiting while an exclusive operation runs. */
  async begin(): Promise<number> {
    while (this.blocked) await this.blocked;
    const e = this.epoch;
    this.counts.set(e, (this.counts.get(e) ?? 0) + 1);
    return e;
  }

  end(epoch: number): void {
    const n = (this.counts.get(epoch) ?? 1) - 1;
    if (n > 0) {
      this.counts.set(epoch, n);
      return;
    }
    this.counts.delete(epoch);
    if (this.waiters.length === 0) return;
    const oldest = this.oldest();
    const ready = this.waiters.filter((w) => oldest === undefined || oldest > w.epoch);
    if (ready.length === 0) return;
    this.waiters = this.waiters.filter((w) => !ready.includes(w));
    for (const w of ready) w.resolve();
  }

  advance(): number {
    return this.epoch++;
  }

  drain(epoch: number): Promise<void> {
    const oldest = this.oldest();
    if (oldest === undefined || oldest > epoch) return Promise.resolve();
    return new Promise<void>((resolve) => this.waiters.push({ epoch, resolve }));
  }

  /** Run `fn` with no request in flight and none starting until it is done. */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    while (this.blocked) await this.blocked;
    let unblock!: () => void;
    this.blocked = new Promise<void>((resolve) => (unblock = resolve));
    try {
      await this.drain(this.advance());
      return await fn();
    } finally {
      this.blocked = undefined;
      unblock();
    }
  }

  private oldest(): number | undefined {
    let min: number | undefined;
    for (const e of this.counts.keys()) if (min === undefined || e < min) min = e;
    return min;
  }
}
