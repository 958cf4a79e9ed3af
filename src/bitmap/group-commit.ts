/**
 * Group commit: many callers ask for "a run of `work` that started after I asked" and share runs.
 * Runs never overlap; every request that arrives while a run is going on is served by the next
 * one, so N concurrent flushes cost two syncs at most, not N.
 */
interface Waiter {
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class GroupCommit {
  private running = false;
  private waiters: Waiter[] = [];

  constructor(private readonly work: () => Promise<void>) {}

  /** Resolves after a complete run of `work` that began after this call; rejects with its error. */
  request(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.waiters.push({ resolve, reject });
      if (!this.running) void this.run();
    });
  }

  /** whether a run is going on or waiting */
  get busy(): boolean {
    return this.running;
  }

  private async run(): Promise<void> {
    this.running = true;
    while (this.waiters.length > 0) {
      const batch = this.waiters;
      this.waiters = [];
      try {
        await this.work();
        for (const w of batch) w.resolve();
      } catch (err) {
        for (const w of batch) w.reject(err);
      }
    }
    this.running = false;
  }
}
