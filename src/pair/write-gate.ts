/**
 * Holding writes for a checkpoint (replication.md §2 step 4: "stop taking replica writes and
 * hold its own active writes"): `hold()` resolves once the writes in flight have finished, and
 * writes that arrive meanwhile wait in `enter()` until `release()`. Reads never pass here.
 */
export class WriteGate {
  private inflight = 0;
  private held: { promise: Promise<void>; resolve: () => void } | undefined;
  private drained: Array<() => void> = [];

  get isHeld(): boolean {
    return this.held !== undefined;
  }

  async enter(): Promise<void> {
    while (this.held) await this.held.promise;
    this.inflight++;
  }

  leave(): void {
    this.inflight--;
    if (this.inflight === 0) for (const fn of this.drained.splice(0)) fn();
  }

  /** New writes wait; resolves when none is in flight. Holding twice is an error of the caller. */
  async hold(): Promise<void> {
    if (!this.held) {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      this.held = { promise, resolve };
    }
    if (this.inflight > 0) await new Promise<void>((r) => this.drained.push(r));
  }

  release(): void {
    const h = this.held;
    this.held = undefined;
    h?.resolve();
  }
}

/** Run `fn` as one write through `gate`. */
export async function gated<T>(gate: WriteGate, fn: () => Promise<T>): Promise<T> {
  await gate.enter();
  try {
    return await fn();
  } finally {
    gate.leave();
  }
}
