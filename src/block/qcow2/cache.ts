/**
 * Cached metadata clusters (L2 tables, refcount blocks) with write-back.
 *
 * A table is dirty while its `gen` (bumped by every change) is ahead of `writtenGen` (the change
 * count its last completed write carried). Writes of one table are chained, so a later snapshot
 * of its contents never lands before an earlier one. Only clean, unpinned tables are evicted:
 * when the cache is full of dirty tables it grows past its budget until a writeback cycle cleans
 * them (the owner starts one when `overBudget`).
 *
 * A capture copies and writes only the pages (4 KiB, aligned) changed since the last capture,
 * adjacent changed pages as one run (one pwrite each; the container batches a turn's writes): one
 * allocation's L2 entry and refcount are 8 and 2 bytes of 64 KiB tables, and a writeback cycle used
 * to copy and pwrite both tables whole for them, then the span between the first and last changed
 * byte (most of a table when a cycle's allocations are scattered over it). The rest of the table on
 * disk is what the buffer holds (the earlier writes of this table completed before, in the chain).
 * A table new on disk (`add`), or whose last write or fsync may have failed (`markDirty`, a failed
 * write), is written whole at its next capture, and stays dirty until that whole write succeeds.
 * The copies are taken at the capture instant (never a view of the live buffer).
 */
import type { Qcow2Container } from './file.js';

/** the unit a partial capture copies and writes (a page) */
const PAGE = 4096;

export class Table {
  gen = 0;
  writtenGen = 0;
  /** requests holding a reference across an await; a pinned table is never evicted */
  pins = 0;
  private writes = 0;
  private chain: Promise<void> = Promise.resolve();
  /** per page (4 KiB; a table smaller than a page is one): 1 when changed since the last capture */
  private readonly changed: Uint8Array;
  /** how many of `changed` are set */
  private changedCount = 0;
  /** the next capture takes the whole table (new on disk, or a write of it may have failed) */
  private whole: boolean;

  constructor(
    readonly offset: number,
    readonly buf: Buffer,
    /** the file holds these bytes already (a table loaded from disk) */
    onDisk = false,
  ) {
    this.whole = !onDisk;
    this.changed = new Uint8Array(Math.max(1, Math.ceil(buf.length / PAGE)));
  }

  get dirty(): boolean {
    return this.gen !== this.writtenGen;
  }

  get evictable(): boolean {
    return !this.dirty && this.pins === 0 && this.writes === 0;
  }

  /** The bytes [from, to) changed (default: any of them). */
  touch(from = 0, to = this.buf.length): void {
    this.gen++;
    if (to <= from) return;
    const last = Math.min(this.changed.length, Math.ceil(to / PAGE));
    for (let p = Math.floor(from / PAGE); p < last; p++) {
      if (this.changed[p] === 0) {
        this.changed[p] = 1;
        this.changedCount++;
      }
    }
  }

  /** Force the table dirty (its last write may not be durable): written whole next time. */
  markDirty(): void {
    this.writtenGen = -1;
    this.whole = true;
  }

  /**
   * A copy of the pages changed since the last capture (all of the table when `whole`), as runs of
   * adjacent pages, to be written later with `write()`.
   */
  capture(): Captured {
    const runs: CapturedRun[] = [];
    const len = this.buf.length;
    const changed = this.changed;
    if (this.whole) {
      runs.push(this.copyRun(0, len));
    } else if (this.changedCount > 0) {
      for (let p = 0; p < changed.length; p++) {
        if (changed[p] === 0) continue;
        let q = p + 1;
        while (q < changed.length && changed[q] !== 0) q++;
        runs.push(this.copyRun(p * PAGE, Math.min(len, q * PAGE)));
        p = q;
      }
    }
    this.whole = false;
    if (this.changedCount > 0) {
      changed.fill(0);
      this.changedCount = 0;
    }
    return { table: this, runs, gen: this.gen };
  }

  private copyRun(at: number, end: number): CapturedRun {
    return { at, copy: Buffer.from(this.buf.subarray(at, end)) };
  }

  /** Write a captured copy, after any earlier write of this table. */
  write(file: Qcow2Container, captured: Captured): Promise<void> {
    this.writes++;
    const done = this.chain.then(async () => {
      try {
        const { runs } = captured;
        if (runs.length === 1) {
          await file.write(this.offset + runs[0].at, runs[0].copy);
        } else if (runs.length > 1) {
          // every run settled before the table counts as written or not; the first failure is the error
          const results = await Promise.allSettled(runs.map((r) => file.write(this.offset + r.at, r.copy)));
          for (const r of results) if (r.status === 'rejected') throw r.reason;
        }
        // after a failed write, only a whole one makes the table clean
        if (captured.gen > this.writtenGen && !this.whole) this.writtenGen = captured.gen;
      } catch (err) {
        this.markDirty();
        throw err;
      } finally {
        this.writes--;
      }
    });
    this.chain = done.catch(() => {});
    return done;
  }
}

export interface CapturedRun {
  /** the table's bytes [at, at + copy.length) at the capture instant */
  copy: Buffer;
  at: number;
}

export interface Captured {
  table: Table;
  /** adjacent changed pages, in order; empty when nothing changed */
  runs: CapturedRun[];
  gen: number;
}

/** An LRU of tables keyed by host offset, bounded in bytes (clean tables only are evicted). */
export class TableCache {
  private readonly tables = new Map<number, Table>();
  private readonly loading = new Map<number, Promise<Table>>();

  constructor(
    private readonly file: Qcow2Container,
    private readonly tableBytes: number,
    private readonly budgetBytes: number,
  ) {}

  get size(): number {
    return this.tables.size;
  }

  get overBudget(): boolean {
    return this.tables.size * this.tableBytes > this.budgetBytes;
  }

  /** The table if cached (marked most recently used), without I/O. */
  peek(offset: number): Table | undefined {
    const t = this.tables.get(offset);
    if (t) {
      this.tables.delete(offset);
      this.tables.set(offset, t);
    }
    return t;
  }

  async get(offset: number): Promise<Table> {
    const t = this.peek(offset);
    if (t) return t;
    let pending = this.loading.get(offset);
    if (!pending) {
      pending = (async () => {
        const buf = Buffer.allocUnsafe(this.tableBytes);
        try {
          await this.file.read(offset, buf);
        } finally {
          this.loading.delete(offset);
        }
        // a concurrent add() (a new table at this offset) wins over what the disk had
        const table = this.tables.get(offset) ?? new Table(offset, buf, true);
        // Pinned until the callers waiting for it have run (they resume in microtasks, before
        // any macrotask): otherwise a concurrent load could evict it first, and two loaders
        // evicting each other's tables could keep reloading forever.
        table.pins++;
        setImmediate(() => table.pins--);
        if (!this.tables.has(offset)) this.insert(table);
        return table;
      })();
      this.loading.set(offset, pending);
    }
    return pending;
  }

  /** A new table (contents from the caller), dirty from the start. */
  add(offset: number, buf: Buffer): Table {
    const table = new Table(offset, buf);
    table.touch();
    this.insert(table);
    return table;
  }

  dirtyTables(): Table[] {
    const out: Table[] = [];
    for (const t of this.tables.values()) if (t.dirty) out.push(t);
    return out;
  }

  dirtyCount(): number {
    let n = 0;
    for (const t of this.tables.values()) if (t.dirty) n++;
    return n;
  }

  /** Drop everything (make-empty): the tables no longer exist on disk. */
  clear(): void {
    this.tables.clear();
  }

  delete(offset: number): void {
    this.tables.delete(offset);
  }

  /** Evict clean tables, least recently used first, while over budget (after a writeback). */
  trim(keep?: Table): void {
    if (!this.overBudget) return;
    for (const [offset, t] of this.tables) {
      if (!this.overBudget) break;
      if (t !== keep && t.evictable) this.tables.delete(offset);
    }
  }

  private insert(table: Table): void {
    this.tables.set(table.offset, table);
    this.trim(table);
  }
}
