/**
 * The memory every connection of one server may hold at once: request payloads being received
 * or written, read data, replies not yet taken by the kernel. Per-connection limits alone let
 * 100 connections hold 100 times as much.
 *
 * A request's bytes are reserved before its payload is read (a write) or its data is read
 * (a read); a connection whose next request does not fit stops reading its socket and waits in
 * line. Waiters are served first come, first served, so a large request is not starved by a
 * stream of small ones; a connection that hits the budget again goes to the back of the line.
 *
 * Every connection may hold `allowance` bytes whatever the budget says: small requests (a probe,
 * a 4 KiB read) are never stuck behind large ones, and no set of waiters can deadlock. The
 * process holds at most `limit` + connections × `allowance` (plus one socket read per connection).
 */

/** What the budget hands reservations to; implemented by ServerSession. */
export interface BudgetWaiter {
  /** the reservation the waiter asked for was made: `bytes` are now charged to it */
  granted(bytes: number): void;
}

interface Waiting {
  waiter: BudgetWaiter;
  bytes: number;
}

export interface BufferBudgetStatus {
  /** bytes the server may hold for all connections (--max-buffer) */
  limit: number;
  /** bytes held now: reserved for requests and replies not yet sent */
  used: number;
  /** bytes each connection may hold beyond the limit */
  allowance: number;
  /** connections waiting for room, their sockets not read */
  waiting: number;
}

export class BufferBudget {
  /** bytes charged now; may exceed the limit by the allowances */
  used = 0;
  private readonly line: Waiting[] = [];
  private waking = false;

  constructor(
    readonly limit: number,
    readonly allowance: number,
  ) {}

  /**
   * Reserve `bytes` for a waiter that holds `own` bytes already. False when it must wait: it is
   * put in line and `granted` is called once the bytes are reserved for it.
   */
  reserve(waiter: BudgetWaiter, own: number, bytes: number): boolean {
    if (own + bytes <= this.allowance || (this.line.length === 0 && this.used + bytes <= this.limit)) {
      this.used += bytes;
      return true;
    }
    this.line.push({ waiter, bytes });
    return false;
  }

  /** Give back bytes reserved earlier; the head of the line is served when they make room. */
  release(bytes: number): void {
    this.used -= bytes;
    if (this.line.length !== 0) this.wake();
  }

  /** Charge (positive) or give back (negative) bytes that were not reserved: replies queued. */
  adjust(delta: number): void {
    this.used += delta;
    if (delta < 0 && this.line.length !== 0) this.wake();
  }

  /** A waiter that goes away (its connection closed) leaves the line. */
  forget(waiter: BudgetWaiter): void {
    const i = this.line.findIndex((w) => w.waiter === waiter);
    if (i >= 0) this.line.splice(i, 1);
    if (i === 0) this.wake();
  }

  get waiting(): number {
    return this.line.length;
  }

  status(): BufferBudgetStatus {
    return { limit: this.limit, used: this.used, allowance: this.allowance, waiting: this.line.length };
  }

  private wake(): void {
    // granted() resumes a connection, which may release or reserve (and join the line) at once.
    if (this.waking) return;
    this.waking = true;
    try {
      for (;;) {
        const head = this.line[0];
        if (!head || this.used + head.bytes > this.limit) return;
        this.line.shift();
        this.used += head.bytes;
        head.waiter.granted(head.bytes);
      }
    } finally {
      this.waking = false;
    }
  }
}
