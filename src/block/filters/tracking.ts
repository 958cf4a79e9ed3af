/**
 * dirty-tracking — a filter that records every write, write-zeroes and trim passing through it
 * in one or more bitmaps (DESIGN.md §5). Reads, extents and cache pass straight through.
 *
 * Order, for each modifying request, and why:
 *   1. every tracker's beforeWrite(range) resolves (or its beforeWriteSync(range) returns a
 *      ticket at once) — for a persistent bitmap the range is then covered on disk (activity
 *      log or stored bits), so a crash from here on finds it dirty;
 *   2. the request goes to `next`;
 *   3. every tracker's afterWrite(ticket), whatever the outcome — a failed write may still have
 *      changed part of the range.
 * modify() is write/writeZeroes/trim with a tag, passed to every tracker's beforeWrite.
 * flush() flushes `next` and every tracker together and resolves when all are durable, so the
 * bitmap is on stable storage before the FLUSH is acknowledged.
 */
import type { BlockNode, CompleteBlockNode, FileRange, IoOptions, WriteOptions, ZeroOptions } from '../../api/block.js';
import { checkRange } from '../node.js';
import { Filter } from '../filter.js';
import type { DirtyBitmap, Run } from '../../bitmap/dirty-bitmap.js';

/** the requests that change data */
export type ModifyOp = 'write' | 'write-zeroes' | 'trim';

/**
 * What the caller of modify() says about a request, handed to every tracker's beforeWrite (the
 * mirror tags its write-blocking writes so its own tracker does not mark them dirty).
 */
export type WriteTag = symbol | undefined;

/** What the filter needs from a bitmap. PersistentBitmap is one; volatileTracker() makes one of a DirtyBitmap. */
export interface WriteTracker<T = unknown> {
  /** resolves when a write to [offset, offset+length) may be issued */
  beforeWrite(offset: number, length: number, tag?: WriteTag): Promise<T>;
  /**
   * Optional fast path: the ticket at once when a write to [offset, offset+length) may be issued
   * without waiting, else undefined having changed nothing (the filter then calls beforeWrite).
   * A ticket is never undefined.
   */
  beforeWriteSync?(offset: number, length: number, tag?: WriteTag): T | undefined;
  /** the write of `ticket` is over, successfully or not */
  afterWrite(ticket: T): void;
  /** resolves when everything recorded so far is durable */
  flush(): Promise<void>;
}

/** A DirtyBitmap as a tracker: nothing to make durable (an in-flight or volatile bitmap). */
export function volatileTracker(bitmap: DirtyBitmap): WriteTracker<Run> {
  return {
    beforeWrite: (offset, length) => Promise.resolve({ offset, length }),
    beforeWriteSync: (offset, length) => ({ offset, length }),
    afterWrite: (t) => {
      if (t.length > 0) bitmap.set(t.offset, t.length);
    },
    flush: () => Promise.resolve(),
  };
}

export class DirtyTrackingNode extends Filter {
  readonly driver = 'dirty-tracking';
  private trackers: WriteTracker[];

  constructor(next: BlockNode, trackers: WriteTracker[] = []) {
    super(next);
    this.trackers = [...trackers];
  }
  /** reads pass straight through: so does a range sent from the file */
  override fileRange(offset: number, length: number): FileRange | undefined {
    return this.passFileRange(offset, length);
  }


  /** Start recording into `tracker` (writes already in flight are not recorded by it). */
  addTracker(tracker: WriteTracker): void {
    if (!this.trackers.includes(tracker)) this.trackers = [...this.trackers, tracker];
  }

  /** Stop recording into `tracker`; writes in flight still complete their afterWrite on it. */
  removeTracker(tracker: WriteTracker): void {
    this.trackers = this.trackers.filter((t) => t !== tracker);
  }

  get trackerCount(): number {
    return this.trackers.length;
  }

  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return this.tracked('write', offset, data.length, data, o, undefined);
  }

  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return this.tracked('write-zeroes', offset, length, undefined, o, undefined);
  }

  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return this.tracked('trim', offset, length, undefined, o, undefined);
  }

  /** write (with `data`), write-zeroes or trim, with `tag` handed to every tracker's beforeWrite */
  modify(op: ModifyOp, offset: number, length: number, data: Buffer | undefined, o: WriteOptions | ZeroOptions | undefined, tag: WriteTag): Promise<void> {
    return this.tracked(op, offset, op === 'write' ? data!.length : length, data, o, tag);
  }

  override async flush(o?: IoOptions): Promise<void> {
    const trackers = this.trackers;
    if (trackers.length === 0) return this.next.flush(o);
    await Promise.all([this.next.flush(o), ...trackers.map((t) => t.flush())]);
  }

  /** the request itself, to `next` as it was when the request arrived */
  private issue(next: CompleteBlockNode, kind: ModifyOp, offset: number, length: number, data: Buffer | undefined, o: WriteOptions | ZeroOptions | undefined): Promise<void> {
    if (kind === 'write') return next.write(offset, data!, o);
    if (kind === 'write-zeroes') return next.writeZeroes(offset, length, o);
    return next.trim(offset, length, o);
  }

  /**
   * Called for every modifying request. Not async itself: the common cases — no tracker, or one
   * tracker whose extent is already hot — issue the request synchronously, with one promise (the
   * request's own) and one await at most. `next` is read once, on arrival: a request waiting for
   * its trackers when the export stack relinks this filter still goes where it would have gone.
   */
  private tracked(kind: ModifyOp, offset: number, length: number, data: Buffer | undefined, o: WriteOptions | ZeroOptions | undefined, tag: WriteTag): Promise<void> {
    try {
      checkRange(this, offset, length, kind);
    } catch (err) {
      return Promise.reject(err);
    }
    const next = this.next;
    const trackers = this.trackers;
    if (trackers.length === 0) {
      try {
        return this.issue(next, kind, offset, length, data, o);
      } catch (err) {
        return Promise.reject(err);
      }
    }
    if (trackers.length === 1) {
      const tracker = trackers[0]!;
      const ticket = tracker.beforeWriteSync?.(offset, length, tag);
      if (ticket !== undefined) return this.issueThenRelease(next, tracker, ticket, kind, offset, length, data, o);
      let waiting: Promise<unknown>;
      try {
        waiting = tracker.beforeWrite(offset, length, tag);
      } catch (err) {
        return Promise.reject(err);
      }
      return waiting.then((t) => this.issueThenRelease(next, tracker, t, kind, offset, length, data, o));
    }
    return this.trackedByMany(next, trackers, kind, offset, length, data, o, tag);
  }

  /** issue, then afterWrite whatever the outcome (two closures and one promise: cheaper than an async function) */
  private issueThenRelease(
    next: CompleteBlockNode, tracker: WriteTracker, ticket: unknown, kind: ModifyOp, offset: number, length: number, data: Buffer | undefined, o: WriteOptions | ZeroOptions | undefined,
  ): Promise<void> {
    let issued: Promise<void>;
    try {
      issued = this.issue(next, kind, offset, length, data, o);
    } catch (err) {
      tracker.afterWrite(ticket);
      return Promise.reject(err);
    }
    return issued.then(
      () => tracker.afterWrite(ticket),
      (err: unknown) => {
        tracker.afterWrite(ticket);
        throw err;
      },
    );
  }

  private async trackedByMany(
    next: CompleteBlockNode, trackers: WriteTracker[], kind: ModifyOp, offset: number, length: number, data: Buffer | undefined, o: WriteOptions | ZeroOptions | undefined, tag: WriteTag,
  ): Promise<void> {
    // Every tracker is asked before the first await.
    const tickets: unknown[] = trackers.map((t) => {
      try {
        const ticket = t.beforeWriteSync?.(offset, length, tag);
        return ticket !== undefined ? ticket : t.beforeWrite(offset, length, tag);
      } catch (err) {
        return Promise.reject(err);
      }
    });
    const settled = await Promise.allSettled(tickets);
    const failure = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failure) {
      settled.forEach((s, i) => {
        if (s.status === 'fulfilled') trackers[i]!.afterWrite(s.value);
      });
      throw failure.reason;
    }
    try {
      await this.issue(next, kind, offset, length, data, o);
    } finally {
      settled.forEach((s, i) => trackers[i]!.afterWrite((s as PromiseFulfilledResult<unknown>).value));
    }
  }
}
