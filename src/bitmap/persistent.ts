/**
 * PersistentBitmap — a dirty bitmap kept in a bitmap file of its own (man/blkrep-bitmap.5), for
 * any image: raw files, block devices, qcow2, NBD.
 *
 * The write path (DESIGN.md §5, with DRBD's activity log making a crash survivable):
 *
 *   t = beforeWriteSync(off, len)     the common case: the extents are hot already; else
 *   t ??= await beforeWrite(off, len) extents of the range durable in the activity log
 *   … the write to the image …         (or, for huge ranges, the bits themselves durable)
 *   afterWrite(t)                     bits set in memory; extents unpinned
 *   await flush()                     changed bitmap pages written and fdatasync'd
 *
 * Invariant: at every moment, the stored bits OR the newest activity-log transaction cover every
 * region written (acknowledged or not) since the bits were last cleared. So a bitmap loaded after
 * a crash ("recovered") never misses a write.
 *
 * clear() never clears a granule under a write in flight: that write is about to dirty it, and
 * clearing it meanwhile could let a flush store "clean" for data that is changing.
 */
import { access, readdir, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import { ActivityLog, type ActivityLogStats } from './activity-log.js';
import { DEFAULT_GRANULARITY, DirtyBitmap, PAGE_BYTES } from './dirty-bitmap.js';
import { closeFd, datasync, openFd, statFd, writeAt } from './file-io.js';
import {
  AL_OFFSET, DEFAULT_AL_SLOTS, DEFAULT_EXTENT_SIZE, DEFAULT_HOT_EXTENTS, FLAG_ENABLED, FLAG_FROZEN, FLAG_IN_USE, HEADER_SLOT_BYTES,
  PageChecksum, computeLayout, encodeAlBlock, encodeHeader, type Header, type Layout,
} from './format.js';
import { GroupCommit } from './group-commit.js';
import { readImage, writeImage, type LoadState } from './image.js';
import { trustProblem } from './trust.js';

export type { LoadState, BitmapFault } from './image.js';

export interface CreateOptions {
  /** bytes the bitmap covers: the disk's size */
  size: number;
  /** bytes per bit; power of two 512 B … 64 MiB, default 64 KiB */
  granularity?: number;
  /** activity-log extent: power of two 4 KiB … 1 TiB, default 4 MiB */
  extentSize?: number;
  /** most extents kept hot (1 … 8192), default 1024 (4 GiB of 4 MiB extents) */
  hotExtents?: number;
  /** activity-log ring slots (2 … 64), default 4 */
  alSlots?: number;
  /** recording writes (default true) */
  enabled?: boolean;
  /** replace an existing file instead of failing ERR_BITMAP_EXISTS */
  overwrite?: boolean;
}

export interface OpenOptions {
  /** the disk's size: a file covering another size is refused (ERR_BITMAP_SIZE_MISMATCH); needed to load an unreadable file as all-dirty */
  size?: number;
  /** granularity of the all-dirty bitmap when the file's header is unusable (default 64 KiB) */
  granularity?: number;
  /** load only: no in-use marking, no writes */
  readOnly?: boolean;
  /** refuse a file that cannot prove its consistency (ERR_BITMAP_CORRUPT) instead of loading it all-dirty */
  strict?: boolean;
}

export interface OpenResult {
  bitmap: PersistentBitmap;
  loadState: LoadState;
  /** a checkpoint interrupted after its file was written was completed on load */
  checkpointCompleted?: number;
}

/** A write in flight, from beforeWrite() to afterWrite(). */
export interface WriteTicket {
  readonly offset: number;
  readonly length: number;
}

const NOT_RECORDED = 0;
const LOGGED = 1;
const PRE_MARKED = 2;

class Ticket implements WriteTicket {
  mode = NOT_RECORDED;
  first = 0;
  last = -1;
  /** links of the in-flight list (Inflight): no hashing, no allocation per write */
  prev: Ticket | undefined = undefined;
  next: Ticket | undefined = undefined;
  listed = false;
  constructor(
    readonly offset: number,
    readonly length: number,
  ) {}
}

/** The writes in flight: an intrusive doubly linked list of tickets. */
class Inflight {
  private head: Ticket | undefined;
  size = 0;

  add(t: Ticket): void {
    t.listed = true;
    t.prev = undefined;
    t.next = this.head;
    if (this.head) this.head.prev = t;
    this.head = t;
    this.size++;
  }

  /** false when `t` is not in the list (already removed) */
  delete(t: Ticket): boolean {
    if (!t.listed) return false;
    t.listed = false;
    if (t.prev) t.prev.next = t.next;
    else this.head = t.next;
    if (t.next) t.next.prev = t.prev;
    t.prev = t.next = undefined;
    this.size--;
    return true;
  }

  *[Symbol.iterator](): Generator<Ticket> {
    for (let t = this.head; t; t = t.next) yield t;
  }
}

export interface CheckpointInfo {
  /** checkpoint number (epoch) */
  number: number;
  /** set when the checkpoint file cannot be loaded; the other numbers are then 0 */
  error?: string;
  path: string;
  /** when it was frozen (ISO 8601) */
  createdAt: string;
  /** bytes covered */
  size: number;
  granularity: number;
  dirtyGranules: number;
  dirtyBytes: number;
  /** bytes the checkpoint file takes */
  fileBytes: number;
}

export interface PersistentBitmapInfo {
  path: string;
  size: number;
  granularity: number;
  extentSize: number;
  hotExtents: number;
  enabled: boolean;
  readOnly: boolean;
  frozen: boolean;
  /** checkpoint number being recorded (the next checkpoint() freezes this number) */
  epoch: number;
  generation: number;
  dirtyGranules: number;
  dirtyBytes: number;
  createdAt: string;
  activityLog: ActivityLogStats & { hot: number };
}

const checkpointPath = (path: string, n: number) => `${path}.ckpt-${n}`;

export class PersistentBitmap {
  readonly path: string;
  readonly bitmap: DirtyBitmap;
  readonly readOnly: boolean;
  readonly extentSize: number;
  readonly hotExtents: number;

  private fd: number;
  private header: Header;
  private readonly layout: Layout;
  private readonly pageCrcs: Uint32Array;
  private readonly checksum: PageChecksum;
  private readonly al: ActivityLog;
  private readonly syncer: GroupCommit;
  /** sync snapshots taken / made durable (see ActivityLog rule 3) */
  private snapEpoch = 0;
  private durable = 0;
  private alSequence = 0;
  /** the activity-log transaction the next page sync writes: [block, file offset] */
  private alBlock: [Buffer, number] | undefined;
  /** a request touching more extents than this pre-marks its bits instead of logging extents */
  private readonly directLimit: number;
  private readonly inflight = new Inflight();
  /** where the last RECENT_ENDS write requests ended: a request starting at one is sequential (the log's look-ahead) */
  private readonly recentEnds = new Float64Array(RECENT_ENDS).fill(-1);
  private recentAt = 0;
  private idle: (() => void) | undefined;
  /** set while a checkpoint's file is being written: bitmap syncs wait (they would store the cleared bits) */
  private barrier: Promise<void> | undefined;
  private headerChain: Promise<unknown> = Promise.resolve();
  private checkpointChain: Promise<unknown> = Promise.resolve();
  private closing: Promise<void> | undefined;

  private constructor(path: string, fd: number, header: Header, bitmap: DirtyBitmap, pageCrcs: Uint32Array, readOnly: boolean) {
    this.path = path;
    this.fd = fd;
    this.header = header;
    this.bitmap = bitmap;
    this.readOnly = readOnly;
    this.layout = computeLayout(header);
    this.pageCrcs = pageCrcs;
    this.checksum = new PageChecksum(header.size, header.granularity);
    this.extentSize = header.extentSize;
    this.hotExtents = header.hotExtents;
    this.directLimit = Math.max(1, Math.floor(header.hotExtents / 4));
    this.syncer = new GroupCommit(() => this.syncPages());
    this.al = new ActivityLog(
      header.hotExtents,
      {
        commit: (extents) => this.commitTransaction(extents),
        syncBits: () => this.syncer.request(),
        durableEpoch: () => this.durable,
      },
      { extents: Math.ceil(header.size / header.extentSize), ahead: aheadExtents(header.extentSize, header.hotExtents) },
    );
  }

  // ------------------------------------------------------------------------------ lifecycle

  /** Create a new, empty, clean bitmap file and open it for writing. */
  static async create(path: string, options: CreateOptions): Promise<PersistentBitmap> {
    const granularity = options.granularity ?? DEFAULT_GRANULARITY;
    const geometry = {
      size: options.size,
      granularity,
      extentSize: options.extentSize ?? DEFAULT_EXTENT_SIZE,
      hotExtents: options.hotExtents ?? DEFAULT_HOT_EXTENTS,
      alSlots: options.alSlots ?? DEFAULT_AL_SLOTS,
    };
    const layout = computeLayout(geometry);
    const bitmap = new DirtyBitmap(options.size, { granularity, enabled: options.enabled ?? true });
    if (!options.overwrite && (await exists(path))) {
      throw new BlkrepError('ERR_BITMAP_EXISTS', `bitmap file "${path}" already exists`, { errno: 'EINVAL', details: { path } });
    }
    const now = Date.now();
    const header: Header = {
      ...geometry,
      generation: 1,
      flags: bitmap.enabled ? FLAG_ENABLED : 0,
      alBlockSize: layout.alBlockSize,
      session: 0,
      epoch: 1,
      createdAt: now,
      modifiedAt: now,
      dirtyGranules: 0,
      crcTableOffset: layout.crcTableOffset,
      dataOffset: layout.dataOffset,
      dataLength: layout.dataLength,
    };
    try {
      await writeImage(path, header, bitmap);
    } catch (err) {
      throw toBlkrepError(err, `cannot create bitmap file "${path}"`);
    }
    const { bitmap: opened } = await PersistentBitmap.open(path, { size: options.size, strict: true });
    return opened;
  }

  /**
   * Open a bitmap file. Read-write (the default) marks it in use durably before returning, after
   * storing whatever a recovery added; the file is then ready for beforeWrite().
   */
  static async open(path: string, options: OpenOptions = {}): Promise<OpenResult> {
    const readOnly = options.readOnly ?? false;
    let fd: number;
    try {
      fd = await openFd(path, readOnly ? 'r' : 'r+');
    } catch (err) {
      throw toBlkrepError(err, `cannot open bitmap file "${path}"`);
    }
    let image;
    try {
      const st = await statFd(fd);
      if (!st.isFile()) throw new BlkrepError('ERR_BITMAP_OPEN', `bitmap file "${path}" is not a regular file`, { errno: 'EINVAL', details: { path } });
      // a file another user could have written loads all-dirty, whatever it holds (trust.ts)
      const distrust = trustProblem(st);
      image = await readImage(fd, st.size, path, distrust ? { ...options, distrust } : options);
    } catch (err) {
      await closeFd(fd).catch(() => {});
      throw toBlkrepError(err, `cannot load bitmap file "${path}"`);
    }
    const { loadState } = image;
    if (loadState.state === 'all-dirty' && options.strict) {
      await closeFd(fd).catch(() => {});
      throw new BlkrepError('ERR_BITMAP_CORRUPT', `bitmap file "${path}" cannot be trusted: ${loadState.reason}`, {
        errno: 'EINVAL',
        details: { path, fault: loadState.fault },
      });
    }
    if (loadState.state === 'all-dirty' && loadState.fault === 'unknown-version' && !readOnly) {
      // Probably written by a newer blkrep: loading it all-dirty is fine, overwriting it is not.
      await closeFd(fd).catch(() => {});
      throw new BlkrepError('ERR_BITMAP_VERSION', `bitmap file "${path}" cannot be opened for writing: ${loadState.reason}; remove it or use a newer blkrep`, {
        errno: 'EINVAL',
        details: { path, fault: loadState.fault },
      });
    }
    if (!readOnly) await removeStaleTemporaries(path);
    const header = image.header;
    if (header && (header.flags & FLAG_FROZEN) !== 0 && !readOnly) {
      await closeFd(fd).catch(() => {});
      throw new BlkrepError('ERR_BITMAP_READ_ONLY', `bitmap file "${path}" is checkpoint ${header.epoch}, which is read-only`, { errno: 'EPERM', details: { path } });
    }

    // A checkpoint whose file exists was complete: finish starting the next epoch.
    let epoch = header?.epoch ?? 1;
    let checkpointCompleted: number | undefined;
    if (header && (header.flags & FLAG_FROZEN) === 0 && (await exists(checkpointPath(path, epoch)))) {
      checkpointCompleted = epoch;
      epoch++;
    }

    if (loadState.state === 'all-dirty' && !readOnly) {
      // Nothing on disk is trustworthy: replace the whole file with the all-dirty bitmap.
      await closeFd(fd).catch(() => {});
      const geometry = header ?? {
        size: image.bitmap.size,
        granularity: image.bitmap.granularity,
        extentSize: DEFAULT_EXTENT_SIZE,
        hotExtents: DEFAULT_HOT_EXTENTS,
        alSlots: DEFAULT_AL_SLOTS,
        createdAt: Date.now(),
        flags: FLAG_ENABLED,
      };
      const layout = computeLayout(geometry);
      const fresh: Header = {
        size: geometry.size,
        granularity: geometry.granularity,
        extentSize: geometry.extentSize,
        hotExtents: geometry.hotExtents,
        alSlots: geometry.alSlots,
        generation: 1,
        flags: geometry.flags & FLAG_ENABLED,
        alBlockSize: layout.alBlockSize,
        session: 0,
        epoch,
        createdAt: geometry.createdAt,
        modifiedAt: Date.now(),
        dirtyGranules: image.bitmap.dirtyGranules,
        crcTableOffset: layout.crcTableOffset,
        dataOffset: layout.dataOffset,
        dataLength: layout.dataLength,
      };
      try {
        await writeImage(path, fresh, image.bitmap);
      } catch (err) {
        throw toBlkrepError(err, `cannot rewrite untrustworthy bitmap file "${path}"`);
      }
      const reopened = await PersistentBitmap.open(path, { size: geometry.size, strict: true });
      return { bitmap: reopened.bitmap, loadState, ...(checkpointCompleted !== undefined ? { checkpointCompleted } : {}) };
    }

    const h: Header = header ?? syntheticHeader(image.bitmap);
    const pageCrcs = image.pageCrcs ?? new Uint32Array(computeLayout(h).pages);
    const pb = new PersistentBitmap(path, fd, { ...h, epoch }, image.bitmap, pageCrcs, readOnly);
    if (!readOnly) {
      try {
        await pb.startSession(loadState.state !== 'clean');
      } catch (err) {
        await closeFd(fd).catch(() => {});
        throw toBlkrepError(err, `cannot open bitmap file "${path}" for writing`);
      }
    }
    return { bitmap: pb, loadState, ...(checkpointCompleted !== undefined ? { checkpointCompleted } : {}) };
  }

  /**
   * Store what a recovery added, empty the activity log, then mark the file in use with a new
   * session. In that order, a crash between any two steps loads what it loaded before.
   */
  private async startSession(rewriteAll: boolean): Promise<void> {
    this.bitmap.trackChanges();
    if (!rewriteAll) this.bitmap.takeChangedPages();
    await this.syncer.request();
    await writeAt(this.fd, Buffer.alloc(this.header.alSlots * this.layout.alBlockSize), AL_OFFSET);
    await datasync(this.fd);
    await this.writeHeader({ flags: this.header.flags | FLAG_IN_USE, session: this.header.session + 1 });
  }

  /**
   * Wait for writes in flight, store every bit, mark the file clean and close it. Later calls
   * return the same promise; other operations fail ERR_BITMAP_CLOSED.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      if (this.inflight.size > 0) await new Promise<void>((resolve) => (this.idle = resolve));
      try {
        if (!this.readOnly) {
          await this.checkpointChain.catch(() => {});
          await this.syncer.request();
          await this.writeHeader({ flags: this.header.flags & ~FLAG_IN_USE });
        }
      } catch (err) {
        await closeFd(this.fd).catch(() => {});
        throw toBlkrepError(err, `cannot close bitmap file "${this.path}" cleanly`);
      }
      try {
        await closeFd(this.fd);
      } catch (err) {
        throw toBlkrepError(err, `close of bitmap file "${this.path}"`);
      }
    })();
    return this.closing;
  }

  // ------------------------------------------------------------------------------ write path

  /**
   * Call before issuing a write, write-zeroes or trim of [offset, offset+length) to the image;
   * issue it only once this resolves. Free when the range's extents are already hot. The ticket
   * goes to afterWrite() when the write has completed, failed or been abandoned.
   */
  beforeWrite(offset: number, length: number): Promise<WriteTicket> {
    try {
      this.checkWritable('beforeWrite');
      this.checkRange(offset, length);
    } catch (err) {
      return Promise.reject(err);
    }
    const t = new Ticket(offset, length);
    this.inflight.add(t);
    if (!this.bitmap.enabled || length === 0) return Promise.resolve(t);
    const first = Math.floor(offset / this.extentSize);
    const last = Math.floor((offset + length - 1) / this.extentSize);
    if (last - first >= this.directLimit) {
      // Too many extents for the log (a trim of the whole disk): store the bits themselves first.
      t.mode = PRE_MARKED;
      this.bitmap.fill(offset, length);
      return this.syncer.request().then(
        () => t,
        (err) => this.abandon(t, err),
      );
    }
    t.mode = LOGGED;
    t.first = first;
    t.last = last;
    const sequential = this.recentEnds.includes(offset);
    this.noteEnd(offset + length);
    const wait = this.al.acquire(first, last, sequential);
    if (!wait) return Promise.resolve(t);
    return wait.then(
      () => t,
      (err) => this.abandon(t, err),
    );
  }

  /**
   * beforeWrite()'s fast case, synchronous: the ticket when the write may be issued at once
   * (its extents are already hot in the activity log, or the bitmap is not recording), else
   * undefined, having changed nothing — then call beforeWrite(). A write into a hot extent thus
   * costs no promise, no await and no I/O; only the first write into a cold extent waits for
   * the log.
   */
  beforeWriteSync(offset: number, length: number): WriteTicket | undefined {
    if (this.closing || this.readOnly) return undefined;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.bitmap.size) return undefined;
    const t = new Ticket(offset, length);
    if (this.bitmap.enabled && length > 0) {
      const first = Math.floor(offset / this.extentSize);
      const last = Math.floor((offset + length - 1) / this.extentSize);
      if (last - first >= this.directLimit || !this.al.tryAcquire(first, last)) return undefined;
      t.mode = LOGGED;
      t.first = first;
      t.last = last;
      this.noteEnd(offset + length);
    }
    this.inflight.add(t);
    return t;
  }

  private noteEnd(end: number): void {
    this.recentEnds[this.recentAt] = end;
    this.recentAt = (this.recentAt + 1) & (RECENT_ENDS - 1);
  }

  /** The write of `ticket` is over (successfully or not): record its range and unpin its extents. */
  afterWrite(ticket: WriteTicket): void {
    const t = ticket as Ticket;
    if (!this.inflight.delete(t)) return;
    // the range was checked by beforeWrite: set the bits directly
    if (t.mode !== NOT_RECORDED && t.length > 0) {
      const g = this.bitmap.granularity;
      this.bitmap.setBits(Math.floor(t.offset / g), Math.ceil((t.offset + t.length) / g));
    }
    // bits set now are stored by the next sync snapshot
    if (t.mode === LOGGED) this.al.release(t.first, t.last, this.snapEpoch + 1);
    this.maybeIdle();
  }

  /** beforeWrite failed: the write must not be issued; the log pinned nothing for it. */
  private abandon(t: Ticket, err: unknown): never {
    this.inflight.delete(t);
    this.maybeIdle();
    throw toBlkrepError(err, `activity log of bitmap file "${this.path}"`);
  }

  private maybeIdle(): void {
    if (this.inflight.size === 0 && this.idle) {
      const idle = this.idle;
      this.idle = undefined;
      idle();
    }
  }

  /** Make every bit set so far durable (before a FLUSH of the image is acknowledged). */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    if (this.closing) throw this.closedError('flush');
    try {
      await this.syncer.request();
    } catch (err) {
      throw toBlkrepError(err, `flush of bitmap file "${this.path}"`);
    }
  }

  // ------------------------------------------------------------------- management operations
  // In memory; durable at the next flush() or close().

  /** Dirty every granule touching the range, enabled or not (bitmap fill). */
  fill(offset: number, length: number): void {
    this.checkWritable('fill');
    this.bitmap.fill(offset, length);
  }

  setAll(): void {
    this.checkWritable('fill');
    this.bitmap.setAll();
  }

  /** Clean the granules wholly inside the range, except those under a write in flight. */
  clear(offset: number, length: number): void {
    this.checkWritable('clear');
    this.bitmap.clear(offset, length);
    this.reMarkInflight(offset, offset + length);
  }

  clearAll(): void {
    this.checkWritable('clear');
    this.bitmap.clearAll();
    this.reMarkInflight(0, this.bitmap.size);
  }

  /** OR another bitmap (same size and granularity) into this one. */
  merge(other: DirtyBitmap): void {
    this.checkWritable('merge');
    this.bitmap.merge(other);
  }

  /** Enable or disable recording; stored in the header before this resolves. */
  async setEnabled(enabled: boolean): Promise<void> {
    this.checkWritable(enabled ? 'enable' : 'disable');
    this.bitmap.enabled = enabled;
    await this.writeHeader({ flags: enabled ? this.header.flags | FLAG_ENABLED : this.header.flags & ~FLAG_ENABLED });
  }

  get enabled(): boolean {
    return this.bitmap.enabled;
  }

  /** the checkpoint number being recorded */
  get epoch(): number {
    return this.header.epoch;
  }

  private reMarkInflight(start: number, end: number): void {
    for (const t of this.inflight) {
      if (t.mode === NOT_RECORDED) continue;
      const a = Math.max(start, t.offset);
      const b = Math.min(end, t.offset + t.length);
      if (b > a) this.bitmap.fill(a, b - a);
    }
  }

  // ----------------------------------------------------------------------------- checkpoints

  /**
   * Freeze the bitmap as checkpoint N (= epoch) in the file `PATH.ckpt-N` and start recording
   * N+1 empty, as one step with respect to writes: a write that completed before the call is in
   * N; one in flight is in both N and N+1; later writes are in N+1. A crash at any point leaves
   * either no checkpoint and the old bitmap, or the checkpoint and a bitmap N+1 that may hold
   * some regions of N as well (never fewer than it should).
   */
  checkpoint(): Promise<CheckpointInfo> {
    const run = this.checkpointChain.catch(() => {}).then(() => this.checkpointNow());
    this.checkpointChain = run;
    return run;
  }

  private async checkpointNow(): Promise<CheckpointInfo> {
    this.checkWritable('checkpoint');
    const n = this.header.epoch;
    const path = checkpointPath(this.path, n);
    let open!: () => void;
    this.barrier = new Promise<void>((resolve) => (open = resolve));
    // Synchronously: freeze, then start N+1 with only the writes in flight.
    const frozen = this.bitmap.clone();
    for (const t of this.inflight) if (t.mode !== NOT_RECORDED && t.length > 0) frozen.fill(t.offset, t.length);
    this.bitmap.clearAll();
    this.reMarkInflight(0, this.bitmap.size);
    const now = Date.now();
    const frozenHeader: Header = {
      ...this.header,
      generation: 1,
      flags: FLAG_FROZEN,
      session: 0,
      epoch: n,
      createdAt: now,
      modifiedAt: now,
      dirtyGranules: frozen.dirtyGranules,
    };
    try {
      await writeImage(path, frozenHeader, frozen);
    } catch (err) {
      // Nothing of N+1 was stored: put N's bits back and carry on recording N.
      this.bitmap.merge(frozen);
      throw toBlkrepError(err, `cannot write checkpoint ${n} of bitmap "${this.path}"`);
    } finally {
      this.barrier = undefined;
      open();
    }
    // From now on this is epoch N+1, stored or not: another checkpoint must never rewrite N's
    // file (a load that finds PATH.ckpt-N with the header still at N completes the step).
    this.header = { ...this.header, epoch: n + 1 };
    await this.syncer.request();
    await this.writeHeader({});
    const st = await statFile(path);
    return {
      number: n,
      path,
      createdAt: new Date(now).toISOString(),
      size: frozen.size,
      granularity: frozen.granularity,
      dirtyGranules: frozen.dirtyGranules,
      dirtyBytes: frozen.dirtyBytes,
      fileBytes: st,
    };
  }

  /** The checkpoints of this bitmap, oldest first. */
  checkpoints(): Promise<CheckpointInfo[]> {
    return PersistentBitmap.listCheckpoints(this.path);
  }

  /** The checkpoints beside a bitmap file (`PATH.ckpt-N`), oldest first. */
  static async listCheckpoints(path: string): Promise<CheckpointInfo[]> {
    const dir = dirname(path);
    const prefix = `${basename(path)}.ckpt-`;
    const out: CheckpointInfo[] = [];
    for (const name of await readdir(dir)) {
      if (!name.startsWith(prefix) || !/^\d+$/.test(name.slice(prefix.length))) continue;
      const file = join(dir, name);
      let ck: PersistentBitmap;
      try {
        ({ bitmap: ck } = await PersistentBitmap.open(file, { readOnly: true, strict: true }));
      } catch (err) {
        const number = Number(name.slice(prefix.length));
        const fileBytes = await statFile(file).catch(() => 0);
        const error = err instanceof Error ? err.message : String(err);
        out.push({ number, error, path: file, createdAt: new Date(0).toISOString(), size: 0, granularity: 0, dirtyGranules: 0, dirtyBytes: 0, fileBytes });
        continue;
      }
      try {
        out.push({
          number: ck.header.epoch,
          path: file,
          createdAt: new Date(ck.header.createdAt).toISOString(),
          size: ck.bitmap.size,
          granularity: ck.bitmap.granularity,
          dirtyGranules: ck.bitmap.dirtyGranules,
          dirtyBytes: ck.bitmap.dirtyBytes,
          fileBytes: await statFile(file),
        });
      } finally {
        await ck.close();
      }
    }
    return out.sort((a, b) => a.number - b.number);
  }

  // ----------------------------------------------------------------------------------- info

  info(): PersistentBitmapInfo {
    const h = this.header;
    return {
      path: this.path,
      size: this.bitmap.size,
      granularity: this.bitmap.granularity,
      extentSize: this.extentSize,
      hotExtents: this.hotExtents,
      enabled: this.bitmap.enabled,
      readOnly: this.readOnly,
      frozen: (h.flags & FLAG_FROZEN) !== 0,
      epoch: h.epoch,
      generation: h.generation,
      dirtyGranules: this.bitmap.dirtyGranules,
      dirtyBytes: this.bitmap.dirtyBytes,
      createdAt: new Date(h.createdAt).toISOString(),
      activityLog: { ...this.al.stats, hot: this.al.size },
    };
  }

  /** SHA-256 of the bits and geometry. */
  hash(): string {
    return this.bitmap.hash();
  }

  // ------------------------------------------------------------------------------- file I/O

  /** One group-commit run: write the pages changed since the last run, then fdatasync. */
  private async syncPages(): Promise<void> {
    while (this.barrier) await this.barrier;
    const snap = ++this.snapEpoch;
    const pages = this.bitmap.takeChangedPages();
    const al = this.alBlock;
    this.alBlock = undefined;
    if (pages.length === 0 && !al) {
      this.durable = snap;
      return;
    }
    // Copy now, synchronously: later changes must not slip half into this write.
    const writes: Array<[Buffer, number]> = al ? [al] : [];
    const tablePages = new Set<number>();
    const MAX_RUN = 256;
    for (let i = 0; i < pages.length; ) {
      let j = i + 1;
      while (j < pages.length && pages[j] === pages[j - 1]! + 1 && j - i < MAX_RUN) j++;
      const firstPage = pages[i]!;
      const buf = Buffer.allocUnsafe((j - i) * PAGE_BYTES);
      this.bitmap.copyBytes(firstPage * PAGE_BYTES, buf, 0, buf.length);
      for (let k = 0; k < j - i; k++) {
        this.pageCrcs[firstPage + k] = this.checksum.of(buf.subarray(k * PAGE_BYTES, (k + 1) * PAGE_BYTES), firstPage + k);
        tablePages.add((firstPage + k) >>> 10);
      }
      writes.push([buf, this.layout.dataOffset + firstPage * PAGE_BYTES]);
      i = j;
    }
    for (const tp of tablePages) {
      const buf = Buffer.alloc(PAGE_BYTES);
      const end = Math.min(this.pageCrcs.length, (tp + 1) * 1024);
      for (let p = tp * 1024; p < end; p++) buf.writeUInt32BE(this.pageCrcs[p]!, 4 * (p - tp * 1024));
      writes.push([buf, this.layout.crcTableOffset + tp * PAGE_BYTES]);
    }
    try {
      await Promise.all(writes.map(([buf, at]) => writeAt(this.fd, buf, at)));
      await datasync(this.fd);
    } catch (err) {
      this.bitmap.markPagesChanged(pages);
      throw toBlkrepError(err, `write of bitmap file "${this.path}"`);
    }
    this.durable = snap;
  }

  /**
   * Write one activity-log transaction holding the whole hot set, durably. It rides on the next
   * page sync: one fdatasync stores the transaction and the changed pages, which makes the
   * extents written so far retirable by the next transaction without a sync of their own. (Safe:
   * this transaction retires only extents whose pages were durable before it.)
   */
  private async commitTransaction(extents: number[]): Promise<void> {
    const sequence = ++this.alSequence;
    const block = encodeAlBlock({ session: this.header.session, sequence, extents }, this.extentSize, this.layout.alBlockSize);
    this.alBlock = [block, AL_OFFSET + (sequence % this.header.alSlots) * this.layout.alBlockSize];
    try {
      await this.syncer.request();
    } catch (err) {
      throw toBlkrepError(err, `write of the activity log of bitmap file "${this.path}"`);
    }
  }

  /** Write the next header generation into the other slot, durably. Serialised. */
  private writeHeader(changes: Partial<Header>): Promise<void> {
    const run = this.headerChain.catch(() => {}).then(async () => {
      const next: Header = {
        ...this.header,
        ...changes,
        generation: this.header.generation + 1,
        modifiedAt: Date.now(),
        dirtyGranules: this.bitmap.dirtyGranules,
      };
      await writeAt(this.fd, encodeHeader(next), (next.generation % 2) * HEADER_SLOT_BYTES);
      await datasync(this.fd);
      this.header = next;
    });
    this.headerChain = run;
    return run;
  }

  private checkWritable(op: string): void {
    if (this.closing) throw this.closedError(op);
    if (this.readOnly) {
      throw new BlkrepError('ERR_BITMAP_READ_ONLY', `${op} refused: bitmap file "${this.path}" is open read-only`, { errno: 'EPERM', details: { path: this.path } });
    }
  }

  private closedError(op: string): BlkrepError {
    return new BlkrepError('ERR_BITMAP_CLOSED', `${op} refused: bitmap file "${this.path}" is closed`, { errno: 'ESHUTDOWN', details: { path: this.path } });
  }

  private checkRange(offset: number, length: number): void {
    const size = this.bitmap.size;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new BlkrepError('ERR_OUT_OF_RANGE', `write of ${length} bytes at offset ${offset} is beyond the bitmap's size ${size}`, {
        errno: 'EINVAL',
        details: { offset, length, size },
      });
    }
  }
}

/** write requests remembered for the look-ahead's test "starts where a recent one ended" (a power of two) */
const RECENT_ENDS = 16;

/**
 * The activity log's look-ahead for a sequential writer (ActivityLog `ahead`): the extents of
 * `AL_AHEAD_BYTES` after the one it enters, at most an eighth of the log. A write request is
 * sequential when it starts where one of the last RECENT_ENDS ended (fio's QD8 stream: the one
 * before it). With the defaults (4 MiB × 1024) 7 extents: one transaction per 32 MiB written in
 * order instead of one per 4 MiB, and a crash resyncs at most 28 MiB more than was written.
 */
export const AL_AHEAD_BYTES = 32 * 1024 * 1024;

export function aheadExtents(extentSize: number, hotExtents: number): number {
  return Math.max(0, Math.min(Math.floor(AL_AHEAD_BYTES / extentSize) - 1, Math.floor(hotExtents / 8)));
}

/** A header for a bitmap opened read-only without a usable one (all-dirty, never written). */
function syntheticHeader(bitmap: DirtyBitmap): Header {
  const geometry = { size: bitmap.size, granularity: bitmap.granularity, extentSize: DEFAULT_EXTENT_SIZE, hotExtents: DEFAULT_HOT_EXTENTS, alSlots: DEFAULT_AL_SLOTS };
  const layout = computeLayout(geometry);
  return {
    ...geometry,
    generation: 1,
    flags: FLAG_ENABLED,
    alBlockSize: layout.alBlockSize,
    session: 0,
    epoch: 1,
    createdAt: 0,
    modifiedAt: 0,
    dirtyGranules: bitmap.dirtyGranules,
    crcTableOffset: layout.crcTableOffset,
    dataOffset: layout.dataOffset,
    dataLength: layout.dataLength,
  };
}

/** Remove `.NAME.tmp-PID-HEX` files left beside `path` by processes that no longer run. */
async function removeStaleTemporaries(path: string): Promise<void> {
  const dir = dirname(path);
  const prefix = `.${basename(path)}.tmp-`;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(name.slice(prefix.length).split('-')[0]);
    if (!Number.isSafeInteger(pid) || pid === process.pid || alive(pid)) continue;
    await unlink(join(dir, name)).catch(() => {});
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

async function statFile(path: string): Promise<number> {
  return (await stat(path)).size;
}
