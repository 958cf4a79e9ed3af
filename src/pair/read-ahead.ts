/**
 * Read-ahead hints for a resync (`cache`: posix_fadvise WILLNEED on a raw file), a few in flight
 * at a time. Each hint is a thread-pool job that may block while the device's queue is full: a
 * burst of hundreds would hold every pool thread and keep the copies' own reads and writes
 * waiting behind them, so at most HINTS_IN_FLIGHT run at once and the rest wait here, in order.
 * A hint's failure costs only speed.
 */
import type { CompleteBlockNode } from '../api/block.js';

/** hints running at once (of the thread pool's 16 threads, bin/run.js) */
export const HINTS_IN_FLIGHT = 4;

export class ReadAhead {
  private readonly queue: Array<[number, number]> = [];
  private head = 0;
  private running = 0;

  constructor(
    private readonly node: Pick<CompleteBlockNode, 'cache'>,
    private readonly inFlight = HINTS_IN_FLIGHT,
  ) {}

  /** Ask [offset, offset+length) to be read ahead, after the hints asked before it. */
  hint(offset: number, length: number): void {
    if (length <= 0) return;
    this.queue.push([offset, length]);
    this.pump();
  }

  /** hints asked and not yet started */
  get waiting(): number {
    return this.queue.length - this.head;
  }

  private pump(): void {
    while (this.running < this.inFlight && this.head < this.queue.length) {
      const [offset, length] = this.queue[this.head++]!;
      if (this.head === this.queue.length) {
        this.queue.length = 0;
        this.head = 0;
      }
      this.running++;
      let p: Promise<void>;
      try {
        p = this.node.cache(offset, length);
      } catch {
        p = Promise.resolve();
      }
      p.catch(() => {}).finally(() => {
        this.running--;
        this.pump();
      });
    }
  }
}
