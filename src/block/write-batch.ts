/**
 * Small positional writes gathered per turn of the event loop and handed to libuv's thread pool as
 * one job (the native addon's pwriteBatch): one wake-up of a worker and one of the loop for all of
 * them, where `fs.write` costs a job each (a request object, a futex wake of a worker, an eventfd
 * wake of the loop, a callback). A write resolves once its pwrite returned, exactly as `fs.write`
 * would: what it promises about ordering and durability is the same (nothing until an fsync). A
 * job holds at most BATCH_ITEMS writes; more go to the next job, on another worker, so two writes
 * given in one turn may land in either order, as two `fs.write` calls may: callers never have two
 * overlapping writes in flight.
 */
import type { SparseOps } from './native.js';
import { envFlag } from '../util/env.js';

/** writes up to this size are batched; larger ones are the copy's cost, one job each is fine */
export const WRITE_BATCH_MAX = 64 * 1024;
const BATCH_ITEMS = 64;

/** BLKREP_NO_WRITE_BATCHING=1: one thread-pool job per write, as before pwriteBatch (bench/serve-nbd compares the two). */
export function writeBatchingDisabled(): boolean {
  return envFlag('BLKREP_NO_WRITE_BATCHING');
}

interface Batch {
  buffers: Buffer[];
  positions: number[];
  waiters: Array<{ resolve: (n: number) => void; reject: (err: unknown) => void }>;
}

export class WriteBatcher {
  private pending: Batch | undefined;
  /** jobs handed to the addon and not yet settled */
  private readonly jobs = new Set<Promise<unknown>>();

  constructor(
    private readonly fd: number,
    private readonly pwriteBatch: NonNullable<SparseOps['pwriteBatch']>,
  ) {}

  /** The batcher for `fd`, or null when the addon has no pwriteBatch or BLKREP_NO_WRITE_BATCHING is set (then one job per write). */
  static for(fd: number, native: SparseOps | null): WriteBatcher | null {
    const f = native?.pwriteBatch;
    return typeof f === 'function' && !writeBatchingDisabled() ? new WriteBatcher(fd, f.bind(native)) : null;
  }

  /** pwrite all of `data` (at most WRITE_BATCH_MAX bytes) at `position`: the bytes written (short only when the kernel wrote nothing more) */
  write(data: Buffer, position: number): Promise<number> {
    return new Promise((resolve, reject) => {
      let b = this.pending;
      if (!b) {
        b = this.pending = { buffers: [], positions: [], waiters: [] };
        // after the poll phase and the microtasks that issued this turn's writes
        setImmediate(this.submit);
      }
      b.buffers.push(data);
      b.positions.push(position);
      b.waiters.push({ resolve, reject });
      if (b.buffers.length >= BATCH_ITEMS) this.submit();
    });
  }

  /**
   * Submit the writes gathered so far and wait until every job has settled: before the fd is
   * closed (a write left for the next turn must not land on a reused descriptor).
   */
  async drain(): Promise<void> {
    this.submit();
    while (this.jobs.size > 0) await Promise.allSettled([...this.jobs]);
  }

  private readonly submit = (): void => {
    const b = this.pending;
    if (!b) return;
    this.pending = undefined;
    let job: Promise<Array<number | Error>>;
    try {
      job = this.pwriteBatch(this.fd, b.buffers, b.positions);
    } catch (err) {
      for (const w of b.waiters) w.reject(err);
      return;
    }
    const settled = job.then(
      (results) => {
        for (let i = 0; i < results.length; i++) {
          const r = results[i]!;
          if (typeof r === 'number') b.waiters[i]!.resolve(r);
          else b.waiters[i]!.reject(r);
        }
      },
      (err: unknown) => {
        for (const w of b.waiters) w.reject(err);
      },
    );
    this.jobs.add(settled);
    void settled.finally(() => this.jobs.delete(settled));
  };
}
