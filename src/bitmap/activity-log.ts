/**
 * The activity log (after DRBD's): the set of "hot" extents — large regions of the disk that
 * writes may be touching — kept durable in the bitmap file, so that after a crash the dirty set
 * is the stored bitmap OR every hot extent.
 *
 * Rules that make this safe (each is needed; see the crash test):
 * 1. A write may be issued only once every extent it touches is in a DURABLE transaction
 *    (acquire() resolves). Writes to extents already hot cost nothing: no I/O, no wait, not
 *    even a promise (tryAcquire() pins them synchronously).
 * 2. Transactions are written one at a time and each holds the WHOLE hot set, so the newest
 *    valid block is enough at recovery, and a torn newest block falls back to the previous one,
 *    which still covers every write that was issued (rule 1: nothing was issued on the torn one).
 * 3. An extent leaves the set (LRU) only when no write into it is in flight (refs = 0) and the
 *    bitmap bits of every write into it are durable (touched ≤ the durable sync epoch). It is
 *    removed from the in-memory set synchronously when the transaction dropping it is built, so
 *    a new write into it waits for a later transaction that adds it back.
 * 4. New extents are batched: requests arriving while a transaction is being written share the
 *    next one (group commit), so a burst into N cold extents costs one or two syncs, not N.
 * 5. A request waiting for the log pins nothing. Only writes that may proceed hold extents, and
 *    they finish without the log, so the hot set always drains and no wait can deadlock. Waiting
 *    requests are served in order, as many per transaction as fit (the first one that does not
 *    fit holds back the rest).
 *
 * Look-ahead for a sequential writer (`ahead`): a request the caller calls sequential (it starts
 * where a recent one ended: PersistentBitmap) has the `ahead` extents after its last added to the
 * same transaction, best effort: only into free room or in place of extents rule 3 lets go
 * without a bitmap sync, never holding back a request. So a sequential writer pays one
 * transaction per `ahead + 1` extents instead of one per extent. Nothing of the rules changes:
 * those extents are hot like any other (a crash counts them written: at most `ahead` extents
 * more to resync, inside the same `capacity` bound).
 */

export interface ActivityLogIo {
  /** write a transaction holding `extents` (ascending) and make it durable */
  commit(extents: number[]): Promise<void>;
  /** make every bitmap bit set so far durable (advances durableEpoch()) */
  syncBits(): Promise<void>;
  /** the newest sync epoch whose bits are durable */
  durableEpoch(): number;
}

interface Entry {
  extent: number;
  /** committing: in the transaction being written, not yet durable */
  status: 'committing' | 'hot';
  /** writes in flight into this extent */
  refs: number;
  /** sync epoch that will make the bits of the latest write into it durable */
  touched: number;
  /** when it was last pinned or added (the log's use clock): the LRU order */
  used: number;
}

interface Request {
  first: number;
  last: number;
  /** extents after `last` to add as well if there is room (look-ahead) */
  ahead: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export interface ActivityLogStats {
  /** transactions written */
  transactions: number;
  /** extents added to the hot set */
  added: number;
  /** extents retired from it */
  retired: number;
  /** bitmap syncs an eviction had to wait for */
  evictionSyncs: number;
  /** extents added ahead of a sequential writer (counted in `added` too) */
  ahead: number;
}

export interface ActivityLogOptions {
  /** extents of the disk: none at or beyond it is ever added ahead (default: no look-ahead) */
  extents?: number;
  /** extents added ahead of a sequential writer, best effort (default 0: none) */
  ahead?: number;
}

export class ActivityLog {
  /** the hot set by extent; LRU order is by `used` (a pin costs a counter bump, not a re-insert) */
  private readonly entries = new Map<number, Entry>();
  /** the use clock: bumped at every pin and every addition */
  private clock = 0;
  private readonly waiting: Request[] = [];
  private running = false;
  private again = false;
  readonly stats: ActivityLogStats = { transactions: 0, added: 0, retired: 0, evictionSyncs: 0, ahead: 0 };
  private readonly ahead: number;
  private readonly lastExtent: number;

  constructor(
    /** most extents in the hot set; every request spans at most this many */
    readonly capacity: number,
    private readonly io: ActivityLogIo,
    options: ActivityLogOptions = {},
  ) {
    const extents = options.extents ?? 0;
    this.lastExtent = extents - 1;
    this.ahead = extents > 0 ? Math.max(0, Math.min(options.ahead ?? 0, capacity - 1)) : 0;
  }

  /** the extents currently durable in the log, ascending */
  hotExtents(): number[] {
    const out: number[] = [];
    for (const x of this.entries.values()) if (x.status === 'hot') out.push(x.extent);
    return out.sort((a, b) => a - b);
  }

  /** number of extents in the hot set */
  get size(): number {
    return this.entries.size;
  }

  /** writes in flight, counted per extent they pin */
  pinned(): number {
    let n = 0;
    for (const x of this.entries.values()) n += x.refs;
    return n;
  }

  /**
   * Pin extents [first, last] for a write (at most `capacity` of them). Returns undefined when
   * they are all hot (pinned now: the write may go ahead), else a promise that resolves once they
   * are all durable in the log and pinned. On rejection nothing is pinned. `sequential`: the
   * write continues a recent one, so the extents after it are likely next (look-ahead).
   */
  acquire(first: number, last: number, sequential = false): Promise<void> | undefined {
    if (last - first + 1 > this.capacity) {
      throw new RangeError(`a request spans ${last - first + 1} extents, more than the activity log's ${this.capacity}`);
    }
    if (this.tryAcquire(first, last)) return undefined;
    const ahead = sequential ? Math.max(0, Math.min(this.ahead, this.lastExtent - last)) : 0;
    return new Promise<void>((resolve, reject) => {
      this.waiting.push({ first, last, ahead, resolve, reject });
      this.kick();
    });
  }

  /**
   * The write path's fast case, synchronous and allocation-free: when extents [first, last] are
   * all hot (durable in the log), pin them and return true; otherwise change nothing and return
   * false (the caller then goes through acquire()).
   */
  tryAcquire(first: number, last: number): boolean {
    const entries = this.entries;
    if (first === last) {
      const x = entries.get(first);
      if (x === undefined || x.status !== 'hot') return false;
      x.refs++;
      x.used = ++this.clock;
      return true;
    }
    if (last - first + 1 > this.capacity) return false;
    for (let e = first; e <= last; e++) if (entries.get(e)?.status !== 'hot') return false;
    this.pin(first, last);
    return true;
  }

  /** Unpin extents [first, last]; `touched` = the sync epoch that will make the write's bits durable. */
  release(first: number, last: number, touched: number): void {
    let kick = false;
    for (let e = first; e <= last; e++) {
      const x = this.entries.get(e);
      if (!x || x.refs === 0) continue;
      x.refs--;
      if (touched > x.touched) x.touched = touched;
      if (x.refs === 0 && this.waiting.length > 0) kick = true;
    }
    if (kick) this.kick();
  }

  private pin(first: number, last: number): void {
    for (let e = first; e <= last; e++) {
      const x = this.entries.get(e)!;
      x.refs++;
      x.used = ++this.clock;
    }
  }

  /** the entries that pass `keep`, least recently used first */
  private byAge(keep: (x: Entry) => boolean): Entry[] {
    const out: Entry[] = [];
    for (const x of this.entries.values()) if (keep(x)) out.push(x);
    return out.sort((a, b) => a.used - b.used);
  }

  private kick(): void {
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    void this.loop();
  }

  private async loop(): Promise<void> {
    do {
      this.again = false;
      try {
        while (await this.round());
      } catch {
        // delivered to the waiting requests; a later acquire() starts afresh
      }
    } while (this.again);
    this.running = false;
  }

  /** the extents of a request not in the hot set */
  private missing(r: Request, also?: Set<number>): number[] {
    const out: number[] = [];
    for (let e = r.first; e <= r.last; e++) if (!this.entries.has(e) && !also?.has(e)) out.push(e);
    return out;
  }

  /** One transaction. True when it made progress or should be tried again at once. */
  private async round(): Promise<boolean> {
    if (this.waiting.length === 0) return false;
    // Serve the longest prefix of the waiting requests whose new extents fit in the free room
    // plus what can be retired: hot extents nobody writes to and no served request wants.
    const candidates = new Set<number>();
    for (const x of this.entries.values()) if (x.status === 'hot' && x.refs === 0) candidates.add(x.extent);
    const add = new Set<number>();
    const wanted = new Set<number>();
    let retirable = candidates.size;
    let served = 0;
    for (const r of this.waiting) {
      const need = this.missing(r, add);
      const newlyWanted: number[] = [];
      for (let e = r.first; e <= r.last; e++) {
        if (wanted.has(e)) continue;
        wanted.add(e);
        newlyWanted.push(e);
        if (candidates.has(e)) retirable--;
      }
      if (this.entries.size + add.size + need.length - this.capacity > retirable) {
        for (const e of newlyWanted) {
          wanted.delete(e);
          if (candidates.has(e)) retirable++;
        }
        break;
      }
      for (const e of need) add.add(e);
      served++;
    }
    if (served === 0) return false; // a release() will kick us again
    const over = this.entries.size + add.size - this.capacity;
    if (over > 0) {
      // Retire the least recently used, preferring those whose bits are stored already: the log
      // may forget an extent only then.
      const durable = this.io.durableEpoch();
      const victims: Entry[] = [];
      const lru = this.byAge((x) => candidates.has(x.extent) && !wanted.has(x.extent));
      for (const pass of [true, false]) {
        for (const x of lru) {
          if (victims.length >= over) break;
          if ((x.touched <= durable) === pass) victims.push(x);
        }
      }
      if (victims.some((v) => v.touched > durable)) {
        this.stats.evictionSyncs++;
        try {
          await this.io.syncBits();
        } catch (err) {
          this.failAll(err);
          throw err;
        }
        return true; // anything may have changed meanwhile: decide afresh
      }
      for (const v of victims) {
        this.entries.delete(v.extent);
        this.stats.retired++;
      }
    }
    if (add.size > 0) this.addAhead(served, add, wanted);
    if (add.size === 0) {
      // everything they need became hot while they waited
      for (const r of this.waiting.splice(0, served)) {
        this.pin(r.first, r.last);
        r.resolve();
      }
      return true;
    }
    // From deciding the set to the commit nothing awaits: the new hot set is one atomic step.
    for (const e of add) this.entries.set(e, { extent: e, status: 'committing', refs: 0, touched: 0, used: ++this.clock });
    const set = [...this.entries.keys()].sort((a, b) => a - b);
    const batch = this.waiting.splice(0, served);
    try {
      await this.io.commit(set);
    } catch (err) {
      for (const e of add) this.entries.delete(e);
      for (const r of batch) r.reject(err);
      this.failAll(err);
      throw err;
    }
    this.stats.transactions++;
    this.stats.added += add.size;
    for (const e of add) this.entries.get(e)!.status = 'hot';
    for (const r of batch) {
      this.pin(r.first, r.last);
      r.resolve();
    }
    return true;
  }

  /**
   * Look-ahead: the extents after the served sequential requests join `add`, as many as fit in
   * the free room plus what may be retired without a bitmap sync (rule 3: unpinned, bits durable,
   * not wanted by a served request), least recently used first. Never more: look-ahead neither
   * waits nor holds anything back.
   */
  private addAhead(served: number, add: Set<number>, wanted: Set<number>): void {
    let extra: number[] | undefined;
    for (let i = 0; i < served; i++) {
      const r = this.waiting[i]!;
      for (let e = r.last + 1; e <= r.last + r.ahead; e++) {
        if (this.entries.has(e) || add.has(e) || wanted.has(e) || extra?.includes(e)) continue;
        (extra ??= []).push(e);
      }
    }
    if (extra === undefined) return;
    let room = this.capacity - this.entries.size - add.size;
    if (room < extra.length) {
      const durable = this.io.durableEpoch();
      for (const x of this.byAge((x) => x.status === 'hot' && x.refs === 0 && x.touched <= durable && !wanted.has(x.extent))) {
        if (room >= extra.length) break;
        this.entries.delete(x.extent);
        this.stats.retired++;
        room++;
      }
    }
    for (let i = 0; i < extra.length && i < room; i++) {
      add.add(extra[i]!);
      this.stats.ahead++;
    }
  }

  private failAll(err: unknown): void {
    for (const r of this.waiting.splice(0)) r.reject(err);
  }
}
