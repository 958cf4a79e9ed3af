/**
 * Consistency of a copy (model/README.md, finding 1): which copied granules the target holds
 * stably, and flush points.
 *
 *   unstable   granules cleared from `dirty` since the target was last flushed: a cleared bit
 *              may reach stable storage only once the target holds the data stably, so whoever
 *              persists the dirty set stores persistedView() = dirty | unstable.
 *
 * A target flush forgets exactly the unstable bits recorded when it was issued (two bitmaps swap
 * at the issue); if it fails, it puts them — and those recorded since — back into `dirty`. When a
 * flush completes, `onStable` gets the granules it made stable that are clean now (not dirty
 * again, not copied again since the issue, not locked): a caller persisting the dirty set may
 * clear exactly these. One flush is in flight at a time.
 */
import { DirtyBitmap } from '../../bitmap/dirty-bitmap.js';

/**
 * While copying, the target is flushed once this much data was written to it since the last
 * flush was issued. A target with a write-back cache (nbdkit's file plugin, qemu-nbd
 * --cache=writeback: the page cache) otherwise holds the whole copy dirty until the job's last
 * flush, which then writes all of it to the disk while nothing else happens: ~1 s of a
 * 1 GiB mirror onto nbdkit on the bench machine (its fdatasync, traced). Flushed along the way,
 * the target writes its cache back while the copy goes on, and the last flush finds little left
 * (0.09-0.10 s, 8 flushes in all). Such a flush is not a consistency point; it costs the target nothing it would
 * not do at the end anyway.
 */
export const DEFAULT_WRITEBACK_BYTES = 128 << 20;

export interface ConsistencyOptions {
  /** granules that may differ from the target (failed flushes put theirs back) */
  dirty: DirtyBitmap;
  /** granules a copy or write is in flight on (never reported stable) */
  locked?: DirtyBitmap;
  /** called synchronously when a flush completes; the bitmap is only valid during the call */
  onStable?: (granules: DirtyBitmap) => void;
}

export class Consistency {
  private readonly dirty: DirtyBitmap;
  private readonly locked: DirtyBitmap | undefined;
  private readonly onStable: ConsistencyOptions['onStable'];
  private cur: DirtyBitmap;
  private covering: DirtyBitmap;
  private inFlight = false;

  constructor(o: ConsistencyOptions) {
    this.dirty = o.dirty;
    this.locked = o.locked;
    this.onStable = o.onStable;
    const geometry = { granularity: o.dirty.granularity };
    this.cur = new DirtyBitmap(o.dirty.size, geometry);
    this.covering = new DirtyBitmap(o.dirty.size, geometry);
  }

  /** a flush is in flight */
  get flushing(): boolean {
    return this.inFlight;
  }

  /** bytes copied but not yet stable on the target */
  get unstableBytes(): number {
    return this.cur.dirtyBytes + this.covering.dirtyBytes;
  }

  /** granules made unstable since the last flush was issued */
  get pendingGranules(): number {
    return this.cur.dirtyGranules;
  }

  /** Granules [first, end) now equal on the target, not yet stable. */
  copied(first: number, end: number): void {
    this.cur.setBits(first, end);
  }

  /** What a persisting caller must store: dirty | unstable. */
  persistedView(): DirtyBitmap {
    const view = this.dirty.clone();
    view.merge(this.cur);
    view.merge(this.covering);
    return view;
  }

  /**
   * Issue `flush` (one at a time). It covers the unstable granules recorded so far. On success
   * onStable is told what became stable, then `done()`; on failure the granules go back into
   * dirty, then `failed(err)`.
   */
  flush(flush: () => Promise<void>, done: () => void, failed: (err: unknown) => void): void {
    if (this.inFlight) throw new Error('Consistency.flush(): a flush is in flight already');
    this.inFlight = true;
    const covering = this.cur;
    this.cur = this.covering;
    this.covering = covering;
    flush().then(
      () => {
        if (this.onStable) this.reportStable();
        this.covering.clearAll();
        this.inFlight = false;
        done();
      },
      (err: unknown) => {
        // the bits it was to make stable may not be: dirty again, and so are those of writes
        // completed since the issue (a connection that dropped may have lost them too)
        this.dirty.merge(this.covering);
        this.covering.clearAll();
        this.dirty.merge(this.cur);
        this.cur.clearAll();
        this.inFlight = false;
        failed(err);
      },
    );
  }

  /** After the job: a flush outside the flush points succeeded; everything copied is stable. */
  settledOutside(): void {
    this.cur.clearAll();
    this.covering.clearAll();
  }

  /** onStable: the granules the completed flush made stable, less those dirty, unstable again or locked. */
  private reportStable(): void {
    const stable = this.covering;
    const bits = stable.bits;
    let b = 0;
    while (b < bits) {
      const s = stable.nextDirtyBit(b);
      if (s < 0) break;
      let e = stable.nextCleanBit(s);
      if (e < 0) e = bits;
      for (let i = s; i < e; i++) if (this.dirty.testBit(i) || this.cur.testBit(i) || this.locked?.testBit(i)) stable.clearBits(i, i + 1);
      b = e;
    }
    try {
      this.onStable!(stable);
    } catch {
      // the caller keeps the granules dirty: safe
    }
  }
}
