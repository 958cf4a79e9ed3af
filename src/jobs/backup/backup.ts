/**
 * backup — a point-in-time copy of a source that may be written meanwhile (DESIGN.md §1.3, §6):
 * QEMU's drive-backup with its copy-before-write filter and snapshot-access (fleecing) node.
 *
 * Writes to the source must go through `job.node` (the front end, the copy-before-write filter).
 * The point in time is the call of start(): from then on, a write, write-zeroes or trim first
 * copies into the target the old content of every granule it touches that the job still has to
 * copy, then goes to the source. The target thus ends up holding the source as it was at start,
 * however the source is written meanwhile.
 *
 * The bitmaps (one bit per granule):
 *   todo      granules whose start-time content the target must still receive. By sync mode:
 *             full — every granule; top — the granules the source's top layer holds (allocation
 *             depth 1; every granule when the source cannot tell); none — every granule, but
 *             the background copy copies nothing: only copy-before-write fills the target
 *             (QEMU's sync=none, the COLO hidden disk); incremental — the granules dirty in a
 *             bitmap at start.
 *   locked    a copy of the granule is in flight (background or copy-before-write)
 *   copied    the target holds the granule's start-time content (set when its copy completed)
 *   written   a write through the front end touched the granule since start
 *
 * A copy operation locks a run of todo granules, asks the source which parts are zeros, reads
 * the rest and writes it to the target — zeros go as write-zeroes, never as data (with
 * `targetIsZero` not at all) — and completes in one synchronous step: todo cleared, copied set,
 * lock released. A granule leaves todo only there, so it is copied at most once, and a write
 * reaches the source only once none of its granules is in todo (copy-before-write waits for the
 * copies in flight on them, copies the others itself, and looks again): so no granule is ever
 * copied after it was overwritten, and concurrent writers of one granule share one copy.
 *
 * Background copy: up to `maxOps` operations of at most `bufSize` bytes in flight (a run the
 * source reported as zeros at start goes in one operation of up to 1 GiB), at `speed` (data
 * bytes; copy-before-write is never throttled — it holds a guest write). The loop, the
 * operations and the end flush are the copy engine's (src/jobs/copy/); the job's own state is
 * one phase (BackupPhase) besides the front end's mode and the snapshot's state. When todo is empty and
 * nothing is in flight, the target is flushed and the job ends by itself: running → waiting →
 * pending → concluded, never ready. sync=none has no background copy: it runs until cancelled.
 *
 * Errors of the background copy follow the job's policies (source: extents, read; target:
 * write, write-zeroes, flush): report ends the job, ignore retries the granules later (backing
 * off 10 ms … 1 s), stop pauses it. A copy-before-write that fails follows `onCbwError`:
 * break-guest-write — the guest write fails with the error and nothing of it reaches the source
 * (the granules stay to do; the snapshot stays valid); break-snapshot — the guest write goes on,
 * the snapshot is broken: the job fails (ERR_SNAPSHOT_BROKEN) and the snapshot view fails every
 * read with EIO from then on. Both emit an error event (operation cbw-read, cbw-write …).
 *
 * The snapshot view (`job.snapshotNode`, read-only; an NBD export of it is image fleecing): a
 * granule copied reads from the target, any other from the source — while no write can reach
 * the source on it (a write waits for the view's source reads of its granules). With a temporary
 * target and sync=none this is the point-in-time image. A granule that is not to be copied
 * (top, incremental) and has been written since start cannot be served: EIO. After the job
 * ended, granules copied still read from the target (a finished full backup: the whole image),
 * the others fail with EIO; after a failure or a broken snapshot every read fails with EIO.
 *
 * bitmap (incremental, or full to start a chain), bitmapMode: on-success — when the job
 * succeeds, the granules the target holds are cleared from the bitmap, except those written
 * since start (the next incremental needs them); always — also when it fails; never.
 */
import type { BlockNode, CompleteBlockNode, Extent, IoOptions, ZeroOptions } from '../../api/block.js';
import { BlkrepError, toBlkrepError } from '../../api/errors.js';
import { completeNode, coalesceExtents } from '../../block/node.js';
import { DirtyBitmap, DEFAULT_GRANULARITY, checkGranularity, type Run } from '../../bitmap/dirty-bitmap.js';
import type { PersistentBitmap } from '../../bitmap/persistent.js';
import { FrontEnd } from '../../block/filters/front-end.js';
import type { ModifyOp } from '../../block/filters/tracking.js';
import { Job, type JobOptions, type JobSide } from '../job.js';
import { nextRun, scanExtents, ZeroHints } from '../segments.js';
import { withTimers } from '../copy/clock.js';
import { Consistency, DEFAULT_WRITEBACK_BYTES } from '../copy/consistency.js';
import { asCopyError, copyOperation, CopyError, type CopyIo } from '../copy/operations.js';
import { Phase } from '../copy/phase.js';
import { BufferPool, CopyScheduler } from '../copy/scheduler.js';

export const BACKUP_SYNC_MODES = ['full', 'top', 'none', 'incremental'] as const;
export type BackupSync = (typeof BACKUP_SYNC_MODES)[number];
export const CBW_ERROR_POLICIES = ['break-guest-write', 'break-snapshot'] as const;
export type CbwErrorPolicy = (typeof CBW_ERROR_POLICIES)[number];
export const BACKUP_BITMAP_MODES = ['on-success', 'always', 'never'] as const;
export type BackupBitmapMode = (typeof BACKUP_BITMAP_MODES)[number];

/**
 * The mirror's request size and depth (DEFAULT_BUF_SIZE, DEFAULT_MAX_OPS in mirror/mirror.ts:
 * 256 KiB × 64, measured there): the background copy goes through the same CopyScheduler, and
 * 1 MiB requests made the target's buffered writes slower for the same bytes in flight.
 */
export const DEFAULT_BACKUP_BUF_SIZE = 256 * 1024;
export const DEFAULT_BACKUP_MAX_OPS = 64;
const MAX_BUF_SIZE = 64 << 20;

export interface BackupOptions extends Omit<JobOptions, 'id'> {
  id?: string;
  source: BlockNode;
  target: BlockNode;
  /** full (default), top, none, incremental */
  sync?: BackupSync;
  /** incremental: the granules to copy; full: a bitmap to clear (start of a chain) */
  bitmap?: DirtyBitmap | PersistentBitmap;
  bitmapMode?: BackupBitmapMode;
  /** bytes per bit, power of two 512 B … 64 MiB; default the bitmap's or 64 KiB */
  granularity?: number;
  /** most bytes one background copy operation moves (default 256 KiB) */
  bufSize?: number;
  /** background copy operations in flight (default 64) */
  maxOps?: number;
  /** the target reads as zeros: zero ranges of the source are not written */
  targetIsZero?: boolean;
  /**
   * While copying, flush the target once this many bytes of data were written since the last
   * flush was issued (default DEFAULT_WRITEBACK_BYTES, 128 MiB; 0: never): the target writes its
   * cache back during the copy instead of all at the last flush.
   */
  writebackBytes?: number;
  /** what a failed copy-before-write does (default break-guest-write) */
  onCbwError?: CbwErrorPolicy;
  /**
   * Where bitmap-mode clears go instead of `bitmap.clear()` (a daemon export's bitmap, changed
   * asynchronously): `clear` the runs, then `fill` again the runs written meanwhile.
   */
  bitmapSink?: BackupBitmapSink;
}

export interface BackupBitmapSink {
  clear(runs: Run[]): Promise<void>;
  fill(runs: Run[]): Promise<void>;
}

type OpKind = 'background' | 'cbw';

interface CopyOp {
  first: number;
  end: number;
  offset: number;
  length: number;
  kind: OpKind;
  promise: Promise<void>;
  /** speed tokens taken when a background copy started */
  reserved: number;
}

type FrontKind = ModifyOp;
type Mode = 'before' | 'starting' | 'cbw' | 'passthrough';
export type SnapshotState = 'pending' | 'live' | 'ended' | 'broken';

/**
 * The phase of the background copy: starting (waits for front-end writes in flight, builds todo),
 * copying (background copies; sync none stays here until cancelled), flushed (the target flush
 * after todo emptied succeeded), succeeded; ending (an error or a cancel: what is in flight
 * finishes), finished; closed once clean() ran (front-end writes are no longer recorded).
 */
export type BackupPhase = 'created' | 'starting' | 'copying' | 'flushed' | 'succeeded' | 'ending' | 'finished' | 'closed';

const BACKUP_PHASES: Readonly<Record<BackupPhase, readonly BackupPhase[]>> = {
  created: ['starting', 'closed'],
  starting: ['copying', 'ending', 'closed'],
  copying: ['flushed', 'ending', 'closed'],
  flushed: ['succeeded', 'ending', 'closed'],
  succeeded: ['closed'],
  ending: ['finished', 'closed'],
  finished: ['closed'],
  closed: [],
};

function badOption(message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_JOB_INVALID', message, { errno: 'EINVAL', details });
}

export class BackupJob extends Job {
  readonly type = 'backup';
  readonly source: CompleteBlockNode;
  readonly target: CompleteBlockNode;
  /** the front end, the copy-before-write filter: write the source through it */
  readonly node: BlockNode;
  /** the point-in-time view (read-only): what an image-fleecing export serves */
  readonly snapshotNode: BlockNode;
  readonly sync: BackupSync;
  readonly granularity: number;
  readonly bufSize: number;
  readonly maxOps: number;
  readonly targetIsZero: boolean;
  readonly onCbwError: CbwErrorPolicy;
  readonly bitmapMode: BackupBitmapMode;

  private readonly size: number;
  private readonly bits: number;
  private readonly todo: DirtyBitmap;
  private readonly locked: DirtyBitmap;
  private readonly copied: DirtyBitmap;
  private readonly written: DirtyBitmap;
  private readonly syncBitmap: DirtyBitmap | PersistentBitmap | undefined;
  private readonly bitmapSink: BackupBitmapSink | undefined;
  /** set by whoever serves the snapshot view (shown by query()) */
  fleecing: Record<string, unknown> | undefined;

  private mode: Mode = 'before';
  private snapshot: SnapshotState = 'pending';
  private startGate: { promise: Promise<void>; open: () => void } | undefined;
  private frontWrites = 0;
  private drainWaiters: Array<() => void> = [];
  private readonly ops = new Set<CopyOp>();
  private viewReads: Array<{ first: number; end: number }> = [];
  private viewWaiters: Array<{ first: number; end: number; wake: () => void }> = [];
  private readonly phase: Phase<BackupPhase>;
  private endError: BlkrepError | undefined;
  /** set once the background copy runs (its end resolves or rejects execute()) */
  private finishFns: { resolve: () => void; reject: (e: unknown) => void } | undefined;
  /** the target flush at the end (no unstable bits: nothing is persisted against it) */
  private readonly consistency: Consistency;
  private readonly writebackBytes: number;
  /** the data bytes written to the target (stats.dataBytes) when the last write-back flush was issued */
  private dataBytesAtFlush = 0;
  /** the background copy: operations in flight, speed, backoff, wake-ups */
  private readonly sched: CopyScheduler<[number, number]>;
  private readonly io: CopyIo;
  private cursor = 0;
  private readonly zeroHints = new ZeroHints();
  private totalTodoBytes = 0;
  private bytesDone = 0;
  private brokenBy: BlkrepError | undefined;
  /** statistics, for tests and the command's result */
  readonly stats = { backgroundCopies: 0, cbwCopies: 0, cbwWaits: 0, targetRequests: 0, dataBytes: 0, zeroBytes: 0 };

  constructor(options: BackupOptions) {
    super({ ...options, id: options.id ?? 'backup0' });
    const { source, target } = options;
    if (source.size !== target.size) {
      throw new BlkrepError('ERR_SIZE_MISMATCH', `the source ${source.description} is ${source.size} bytes and the target ${target.description} is ${target.size}: a backup needs the same size`, {
        errno: 'EINVAL',
        details: { sourceSize: source.size, targetSize: target.size },
      });
    }
    if (!target.caps.canWrite) throw new BlkrepError('ERR_READ_ONLY', `the target ${target.description} is read-only`, { errno: 'EPERM' });
    this.sync = options.sync ?? 'full';
    if (!(BACKUP_SYNC_MODES as readonly string[]).includes(this.sync)) throw badOption(`sync "${this.sync}" is not one of ${BACKUP_SYNC_MODES.join(', ')}`);
    this.syncBitmap = options.bitmap;
    this.bitmapSink = options.bitmapSink;
    const bitmapBits = options.bitmap ? ('path' in options.bitmap ? options.bitmap.bitmap : options.bitmap) : undefined;
    if (this.sync === 'incremental' && !bitmapBits) throw badOption('sync incremental needs a bitmap');
    if (bitmapBits && this.sync !== 'incremental' && this.sync !== 'full') throw badOption(`a bitmap is used with sync incremental or full, not ${this.sync}`);
    this.bitmapMode = options.bitmapMode ?? 'on-success';
    if (!(BACKUP_BITMAP_MODES as readonly string[]).includes(this.bitmapMode)) throw badOption(`bitmap mode "${this.bitmapMode}" is not one of ${BACKUP_BITMAP_MODES.join(', ')}`);
    this.onCbwError = options.onCbwError ?? 'break-guest-write';
    if (!(CBW_ERROR_POLICIES as readonly string[]).includes(this.onCbwError)) throw badOption(`copy-before-write error policy "${this.onCbwError}" is not one of ${CBW_ERROR_POLICIES.join(', ')}`);
    this.granularity = options.granularity ?? bitmapBits?.granularity ?? DEFAULT_GRANULARITY;
    checkGranularity(this.granularity);
    if (bitmapBits && (bitmapBits.granularity !== this.granularity || bitmapBits.size !== source.size)) {
      throw badOption(`the bitmap covers ${bitmapBits.size} bytes at granularity ${bitmapBits.granularity}; the backup needs ${source.size} bytes at ${this.granularity}`);
    }
    this.bufSize = options.bufSize ?? DEFAULT_BACKUP_BUF_SIZE;
    if (!Number.isSafeInteger(this.bufSize) || this.bufSize < 512 || this.bufSize > MAX_BUF_SIZE) throw badOption(`buffer size ${this.bufSize} is not from 512 bytes to ${MAX_BUF_SIZE}`);
    this.maxOps = options.maxOps ?? DEFAULT_BACKUP_MAX_OPS;
    if (!Number.isSafeInteger(this.maxOps) || this.maxOps < 1 || this.maxOps > 1024) throw badOption(`${this.maxOps} copy operations in flight: expected 1 to 1024`);
    this.targetIsZero = options.targetIsZero ?? false;
    this.writebackBytes = options.writebackBytes ?? DEFAULT_WRITEBACK_BYTES;
    if (!Number.isSafeInteger(this.writebackBytes) || this.writebackBytes < 0) throw badOption(`write-back flush every ${this.writebackBytes} bytes: expected a whole number of bytes, 0 for never`);

    this.source = completeNode(source);
    this.target = completeNode(target);
    this.size = source.size;
    const geometry = { granularity: this.granularity };
    this.todo = new DirtyBitmap(this.size, geometry);
    this.locked = new DirtyBitmap(this.size, geometry);
    this.copied = new DirtyBitmap(this.size, geometry);
    this.written = new DirtyBitmap(this.size, geometry);
    this.bits = this.todo.bits;
    this.node = new FrontEnd('copy-before-write', this.source, this);
    this.snapshotNode = new SnapshotAccessNode(this);
    this.phase = new Phase(`job ${this.id}`, BACKUP_PHASES, 'created');
    this.consistency = new Consistency({ dirty: this.todo, locked: this.locked });
    this.sched = new CopyScheduler<[number, number]>(
      {
        next: (_now, throttled) => (throttled ? undefined : this.pick()),
        cost: ([first, end]) => Math.min(Math.min(end * this.granularity, this.size) - first * this.granularity, this.bufSize),
        run: (range) => this.startBackground(range),
      },
      { maxOps: this.maxOps, limiter: this.limiter, clock: withTimers(this.clock), wake: () => this.pump() },
    );
    const window = Math.max(this.bufSize, this.granularity);
    this.io = {
      source: this.source,
      target: this.target,
      granularity: this.granularity,
      size: this.size,
      bufSize: this.bufSize,
      buffers: new BufferPool(window, this.maxOps),
      skipZeros: this.targetIsZero,
      counters: this.stats,
      signal: this.signal,
    };
  }

  /** starting, copying, flushed … (see BackupPhase) */
  get backupPhase(): BackupPhase {
    return this.phase.now;
  }

  // --------------------------------------------------------------------------- what it shows

  /** pending (not started), live, ended (copied granules still readable), broken */
  get snapshotState(): SnapshotState {
    return this.snapshot;
  }

  /** bytes still to copy */
  get todoBytes(): number {
    return this.todo.dirtyBytes;
  }

  /** bytes of the disk the target holds as of the start */
  get copiedBytes(): number {
    return this.copied.dirtyBytes;
  }

  /** a copy of the granules the target holds (as of the start) */
  copiedBitmap(): DirtyBitmap {
    return this.copied.clone();
  }

  protected override extraInfo(): Record<string, unknown> {
    return {
      sync: this.sync,
      granularity: this.granularity,
      bufSize: this.bufSize,
      maxOps: this.maxOps,
      opsInFlight: this.ops.size,
      todoBytes: this.todo.dirtyBytes,
      todoBytesAtStart: this.totalTodoBytes,
      copiedBytes: this.copied.dirtyBytes,
      cbwCopies: this.stats.cbwCopies,
      onCbwError: this.onCbwError,
      snapshot: this.snapshot,
      cancelled: this.isHardCancelled,
      targetIsZero: this.targetIsZero,
      ...(this.fleecing ? { fleecing: this.fleecing } : {}),
    };
  }

  protected override beforeQuery(): void {
    this.updateProgress();
  }

  private updateProgress(): void {
    this.progress(this.bytesDone, this.sync === 'none' ? 0 : this.todo.dirtyBytes);
  }

  // ---------------------------------------------------------------------------- the driver

  protected async execute(): Promise<void> {
    // the point in time: writes from now on wait until copy-before-write is in place
    let open!: () => void;
    const promise = new Promise<void>((resolve) => (open = resolve));
    this.startGate = { promise, open };
    this.mode = 'starting';
    this.phase.to('starting');
    try {
      while (this.frontWrites > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
      this.written.clearAll();
      await this.initTodo();
    } catch (err) {
      this.mode = 'passthrough';
      this.snapshot = 'broken';
      this.openStartGate();
      throw err;
    }
    if (this.signal.aborted || this.phase.is('ending')) {
      this.mode = 'passthrough';
      this.openStartGate();
      return;
    }
    this.mode = 'cbw';
    this.snapshot = 'live';
    this.totalTodoBytes = this.todo.dirtyBytes;
    this.openStartGate();
    this.phase.to('copying');
    this.updateProgress();
    const done = new Promise<void>((resolve, reject) => (this.finishFns = { resolve, reject }));
    this.pump();
    return done;
  }

  private openStartGate(): void {
    const g = this.startGate;
    this.startGate = undefined;
    g?.open();
  }

  private async initTodo(): Promise<void> {
    switch (this.sync) {
      case 'none':
        this.todo.setAll();
        return;
      case 'incremental': {
        const bits = 'path' in this.syncBitmap! ? this.syncBitmap.bitmap : this.syncBitmap!;
        this.todo.merge(bits);
        return;
      }
      case 'full':
        this.todo.setAll();
        if (this.source.caps.canExtents) await this.scanExtents(() => false, true);
        return;
      case 'top':
        if (!this.source.caps.allocationDepth || !this.source.caps.canExtents) {
          this.todo.setAll();
          return;
        }
        await this.scanExtents((e) => e.depth === 1, false);
        return;
    }
  }

  private scanExtents(wanted: (e: Extent) => boolean, hints: boolean): Promise<void> {
    return scanExtents(this.source, this.size, this.signal, (offset, length, e) => {
      if (wanted(e)) this.todo.fill(offset, length);
      if (hints && e.zero) this.zeroHints.add(offset, offset + length);
    });
  }

  /** whether the background copy runs and has not finished */
  private get copyRunning(): boolean {
    return this.finishFns !== undefined && this.phase.is('copying', 'flushed', 'ending');
  }

  /** Start background copies as allowed; then see whether the job is idle. */
  private pump(): void {
    if (!this.copyRunning) return;
    if (!this.phase.is('ending') && !this.pauseRequested && this.sync !== 'none') {
      this.sched.fill();
      if (this.writebackBytes > 0) this.maybeWritebackFlush();
    }
    this.checkIdle();
  }

  /** The scheduler starts a background copy of granules [first, end). */
  private startBackground([first, end]: [number, number]): void {
    const op = this.startOp(first, end, 'background', Math.min(Math.min(end * this.granularity, this.size) - first * this.granularity, this.bufSize));
    this.stats.backgroundCopies++;
    op.promise.then(
      () => {
        this.sched.done();
        this.sched.succeeded();
        this.pump();
      },
      (err: unknown) => {
        this.sched.done();
        const e = asCopyError(err);
        this.ioError(e.side, e.operation, op.offset, op.length, e.inner);
        this.pump();
      },
    );
  }

  private pick(): [number, number] | undefined {
    const run = nextRun({ todo: this.todo, locked: this.locked, cursor: this.cursor, granularity: this.granularity, size: this.size, bufSize: this.bufSize, hints: this.zeroHints });
    if (!run) return undefined;
    this.cursor = run.cursor;
    return [run.first, run.end];
  }

  /** Lock [first, end) (all todo, all unlocked) and copy it; the promise settles after the completion step. */
  private startOp(first: number, end: number, kind: OpKind, reserved = 0): CopyOp {
    const g = this.granularity;
    const offset = first * g;
    const op: CopyOp = { first, end, offset, length: Math.min(end * g, this.size) - offset, kind, promise: Promise.resolve(), reserved };
    this.locked.setBits(first, end);
    this.ops.add(op);
    op.promise = this.copy(op).then(
      () => {
        // completion: one synchronous step. After the job ended, writes no longer wait for
        // copies, so what this copy read may be newer than the start: do not count it.
        if (this.mode === 'cbw') {
          this.todo.clearBits(first, end);
          this.copied.setBits(first, end);
          this.bytesDone += op.length;
        }
        this.locked.clearBits(first, end);
        this.ops.delete(op);
        if (kind === 'cbw') this.pump();
      },
      (err: unknown) => {
        this.locked.clearBits(first, end);
        this.ops.delete(op);
        if (kind === 'cbw') queueMicrotask(() => this.pump());
        throw err;
      },
    );
    return op;
  }

  /** One copy operation of the engine: zeros as write-zeroes (none with targetIsZero), the rest read and written. */
  private copy(op: CopyOp): Promise<void> {
    // the speed counts data only: a background copy settles what the scheduler reserved against the data found
    return copyOperation(this.io, op.offset, op.length, op.kind === 'background' ? (data) => this.limiter.take(data - op.reserved) : undefined);
  }

  /** writebackBytes: a target flush while copying, once that much data was written since the last one was issued (the end's flush is checkIdle's). */
  private maybeWritebackFlush(): void {
    if (this.consistency.flushing || !this.phase.is('copying') || this.todo.dirtyGranules === 0) return;
    if (this.stats.dataBytes - this.dataBytesAtFlush < this.writebackBytes) return;
    this.dataBytesAtFlush = this.stats.dataBytes;
    this.stats.targetRequests++;
    this.consistency.flush(
      () => this.target.flush({ signal: this.signal }),
      () => this.pump(),
      (err: unknown) => {
        this.ioError('target', 'flush', 0, 0, err);
        this.pump();
      },
    );
  }

  /** Nothing in flight: pause, end, or flush the target and finish, as due. */
  private checkIdle(): void {
    if (!this.copyRunning) return;
    const flushing = this.consistency.flushing;
    if (this.phase.is('ending')) {
      if (this.ops.size === 0 && !flushing) this.finish();
      return;
    }
    if (this.pauseRequested) {
      if (this.sched.inFlight === 0 && !flushing) this.reachedPausePoint();
      return;
    }
    if (this.sync === 'none') return; // copy-before-write only: runs until cancelled
    if (this.todo.dirtyGranules > 0 || this.ops.size > 0 || flushing) return;
    if (this.phase.is('flushed')) {
      this.finish();
      return;
    }
    this.stats.targetRequests++;
    this.consistency.flush(
      () => this.target.flush({ signal: this.signal }),
      () => {
        if (this.phase.is('copying')) this.phase.to('flushed');
        this.pump();
      },
      (err: unknown) => {
        this.ioError('target', 'flush', 0, 0, err);
        this.pump();
      },
    );
  }

  /** The background copy is over: succeeded after the target flush, else finished (an error or a cancel). */
  private finish(): void {
    if (!this.finishFns || !this.phase.is('flushed', 'ending')) return;
    this.phase.to(this.phase.is('flushed') ? 'succeeded' : 'finished');
    this.sched.stop();
    this.io.buffers.close();
    this.updateProgress();
    if (this.endError) this.finishFns.reject(this.endError);
    else this.finishFns.resolve();
  }

  private endWith(err?: BlkrepError): void {
    if (this.phase.is('starting', 'copying', 'flushed')) {
      this.phase.to('ending');
      this.endError = err;
    }
    this.checkIdle();
  }

  private ioError(side: JobSide, operation: string, offset: number, length: number, err: unknown): void {
    if (this.signal.aborted || this.phase.is('ending')) return;
    const action = this.handleIoError({ side, operation, offset, length, error: err });
    if (action === 'report') {
      this.stopSnapshot('broken');
      this.endWith(this.error ?? toBlkrepError(err));
      return;
    }
    if (action === 'ignore') this.sched.holdAfterError();
  }

  /** Copy-before-write ends: writes pass straight to the source from now on. */
  private stopSnapshot(state: 'ended' | 'broken'): void {
    if (this.mode !== 'passthrough') this.mode = 'passthrough';
    if (this.snapshot !== 'broken') this.snapshot = state;
    this.openStartGate();
    for (const w of this.viewWaiters.splice(0)) w.wake();
  }

  // ------------------------------------------------------------------------- verbs' hooks

  protected override onPauseRequested(): void {
    this.checkIdle();
  }

  protected override onResume(): void {
    this.sched.clearHold();
    this.pump();
  }

  protected override onSpeedChanged(): void {
    this.sched.rearm();
    this.pump();
  }

  protected override onCancel(): void {
    this.stopSnapshot('ended');
    this.endWith();
  }

  protected override async commit(): Promise<void> {
    this.stopSnapshot('ended');
    await this.applyBitmapMode(true);
  }

  protected override async abort(): Promise<void> {
    this.stopSnapshot(this.isHardCancelled && !this.brokenBy ? 'ended' : 'broken');
    await this.applyBitmapMode(false);
  }

  protected override async clean(): Promise<void> {
    const succeeded = this.phase.is('succeeded');
    this.phase.to('closed');
    this.sched.stop();
    this.io.buffers.close();
    this.stopSnapshot(succeeded || this.isHardCancelled ? 'ended' : 'broken');
  }

  /**
   * Clear from the bitmap the granules the target holds, except those written since start (front
   * end writes are recorded in `written` until the job has concluded, after the clear).
   */
  private async applyBitmapMode(success: boolean): Promise<void> {
    const bitmap = this.syncBitmap;
    if ((!bitmap && !this.bitmapSink) || this.bitmapMode === 'never' || (!success && this.bitmapMode !== 'always')) return;
    const before = this.written.clone();
    const runs = this.runsOf(this.copied, before);
    if (runs.length === 0) return;
    if (!this.bitmapSink) {
      for (const r of runs) bitmap!.clear(r.offset, r.length);
      return;
    }
    await this.bitmapSink.clear(runs);
    // a write that landed while the clear was on its way may have had its bit cleared: fill it again
    const meanwhile = this.written.clone();
    const again: Run[] = [];
    const g = this.granularity;
    for (const r of runs) {
      const first = r.offset / g;
      const end = Math.ceil((r.offset + r.length) / g);
      for (let b = first; b < end; ) {
        const d = meanwhile.nextDirtyBit(b, end);
        if (d < 0) break;
        let e = meanwhile.nextCleanBit(d, end);
        if (e < 0) e = end;
        if (before.nextCleanBit(d, e) >= 0) again.push({ offset: d * g, length: Math.min(e * g, this.size) - d * g });
        b = e;
      }
    }
    if (again.length > 0) await this.bitmapSink.fill(again);
  }

  /** Runs of granules set in `a` and clear in `minus`. */
  private runsOf(a: DirtyBitmap, minus: DirtyBitmap): Run[] {
    const out: Run[] = [];
    const g = this.granularity;
    let b = 0;
    while (b < this.bits) {
      const s = a.nextDirtyBit(b);
      if (s < 0) break;
      let e = a.nextCleanBit(s);
      if (e < 0) e = this.bits;
      for (let i = s; i < e; ) {
        if (minus.testBit(i)) {
          const c = minus.nextCleanBit(i, e);
          i = c < 0 ? e : c;
          continue;
        }
        let j = minus.nextDirtyBit(i, e);
        if (j < 0) j = e;
        const offset = i * g;
        const last = out[out.length - 1];
        const length = Math.min(j * g, this.size) - offset;
        if (last && last.offset + last.length === offset) last.length += length;
        else out.push({ offset, length });
        i = j;
      }
      b = e;
    }
    return out;
  }

  // ------------------------------------------------------------------------ the front end

  async frontWrite(kind: FrontKind, offset: number, length: number, o: ZeroOptions | undefined, data?: Buffer): Promise<void> {
    const toSource = (): Promise<void> =>
      kind === 'write' ? this.source.write(offset, data!, o) : kind === 'write-zeroes' ? this.source.writeZeroes(offset, length, o) : this.source.trim(offset, length, o);
    while (this.mode === 'starting' && this.startGate) await this.startGate.promise;
    // every write is recorded until the job has concluded (bitmap mode needs them after the end too)
    if (length > 0 && offset >= 0 && offset + length <= this.size && !this.phase.is('closed')) {
      this.written.setBits(Math.floor(offset / this.granularity), Math.ceil((offset + length) / this.granularity));
    }
    if (this.mode !== 'cbw') {
      if (this.mode === 'passthrough') return toSource();
      // before start: counted, so the start waits for it
      this.frontWrites++;
      try {
        return await toSource();
      } finally {
        this.frontWrites--;
        if (this.frontWrites === 0) for (const w of this.drainWaiters.splice(0)) w();
      }
    }
    if (length === 0 || offset < 0 || offset + length > this.size) return toSource(); // the source reports a bad range
    const g = this.granularity;
    const first = Math.floor(offset / g);
    const end = Math.ceil((offset + length) / g);
    await this.copyBeforeWrite(first, end, offset, length, kind);
    await this.waitViewReads(first, end);
    return toSource();
  }

  /**
   * Until no granule of [first, end) is to do: copy the free ones, wait for the copies in flight
   * on the others, look again. Throws (break-guest-write) when a copy of its own failed.
   */
  private async copyBeforeWrite(first: number, end: number, offset: number, length: number, kind: FrontKind): Promise<void> {
    for (;;) {
      if (this.mode !== 'cbw') return;
      const mine: CopyOp[] = [];
      const theirs = new Set<Promise<void>>();
      let b = first;
      while (b < end) {
        const d = this.todo.nextDirtyBit(b, end);
        if (d < 0) break;
        let e = this.todo.nextCleanBit(d, end);
        if (e < 0) e = end;
        for (let x = d; x < e; ) {
          if (this.locked.testBit(x)) {
            const c = this.locked.nextCleanBit(x, e);
            const y = c < 0 ? e : c;
            for (const op of this.ops) if (op.first < y && x < op.end) theirs.add(op.promise.catch(() => {}));
            x = y;
          } else {
            const c = this.locked.nextDirtyBit(x, e);
            const y = c < 0 ? e : c;
            mine.push(this.startOp(x, y, 'cbw'));
            x = y;
          }
        }
        b = e;
      }
      if (mine.length === 0 && theirs.size === 0) return;
      this.stats.cbwCopies += mine.length;
      if (theirs.size > 0) this.stats.cbwWaits++;
      const settled = await Promise.allSettled([...mine.map((op) => op.promise), ...theirs]);
      const bad = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
      if (bad) {
        if (this.mode !== 'cbw' || this.signal.aborted) return;
        const e = bad.reason instanceof CopyError ? bad.reason : new CopyError('source', 'read', bad.reason);
        const err = toBlkrepError(e.inner);
        const breakGuest = this.onCbwError === 'break-guest-write';
        this.emitEvent({
          event: 'error',
          side: e.side,
          operation: `cbw-${e.operation}`,
          errno: err.errno,
          action: breakGuest ? 'ignore' : 'report',
          offset,
          length,
          message: `copy-before-write of a ${kind} of ${length} bytes at offset ${offset}: ${err.message}`,
        });
        if (breakGuest) throw err;
        this.breakSnapshot(err);
        return;
      }
      this.pump();
    }
  }

  private breakSnapshot(cause: BlkrepError): void {
    const err = new BlkrepError('ERR_SNAPSHOT_BROKEN', `job ${this.id}: a copy-before-write failed, the snapshot is broken: ${cause.message}`, { errno: cause.errno, cause });
    this.brokenBy = err;
    this.fail(err);
    this.stopSnapshot('broken');
    this.endWith(err);
  }

  /** Wait until no read of the snapshot view is reading the source on [first, end). */
  private async waitViewReads(first: number, end: number): Promise<void> {
    while (this.mode === 'cbw' && this.viewReads.some((r) => r.first < end && first < r.end)) {
      await new Promise<void>((wake) => this.viewWaiters.push({ first, end, wake }));
    }
  }

  frontFlush(o?: IoOptions): Promise<void> {
    return this.source.flush(o);
  }

  // ------------------------------------------------------------------- the snapshot view

  private snapshotError(code: string, why: string, offset: number, length: number): BlkrepError {
    return new BlkrepError(code, `snapshot of job ${this.id}: read of ${length} bytes at offset ${offset}: ${why}`, { errno: 'EIO', details: { offset, length } });
  }

  /**
   * Which side each granule run of [offset, offset+length) of the view is read from, decided
   * synchronously after the checks; `live`: reads of the source must hold writes off.
   */
  private async planView(offset: number, length: number, op: string): Promise<{ pieces: Array<{ from: 'target' | 'source'; start: number; stop: number }>; live: boolean; first: number; end: number }> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new BlkrepError('ERR_OUT_OF_RANGE', `${op} of ${length} bytes at offset ${offset} is beyond the end of the snapshot (size ${this.size})`, { errno: 'EINVAL', details: { offset, length, size: this.size } });
    }
    // started, copy-before-write not in place yet (a sync top scan): wait for it
    while (this.mode === 'starting' && this.startGate) await this.startGate.promise;
    if (this.snapshot === 'broken') throw this.snapshotError('ERR_SNAPSHOT_BROKEN', `the snapshot is broken${this.brokenBy ? ` (${this.brokenBy.message})` : ''}`, offset, length);
    if (this.snapshot === 'pending') throw this.snapshotError('ERR_SNAPSHOT_PENDING', 'the job has not started', offset, length);
    const g = this.granularity;
    const first = Math.floor(offset / g);
    const end = Math.ceil((offset + length) / g);
    const pieces: Array<{ from: 'target' | 'source'; start: number; stop: number }> = [];
    const live = this.mode === 'cbw';
    for (let b = first; b < end; ) {
      const isCopied = this.copied.testBit(b);
      const c = isCopied ? this.copied.nextCleanBit(b, end) : this.copied.nextDirtyBit(b, end);
      const e = c < 0 ? end : c;
      if (!isCopied) {
        if (!live) throw this.snapshotError('ERR_SNAPSHOT_ENDED', `the job has ended and granules ${b}…${e - 1} were not copied`, offset, length);
        // a granule not to be copied that has been written since start no longer holds the start's data
        for (let x = b; x < e; x++) {
          if (this.written.testBit(x) && !this.todo.testBit(x)) {
            throw this.snapshotError('ERR_SNAPSHOT_STALE', `granule ${x} is not part of this ${this.sync} backup and has been written since the job started`, offset, length);
          }
        }
      }
      pieces.push({ from: isCopied ? 'target' : 'source', start: Math.max(offset, b * g), stop: Math.min(offset + length, e * g) });
      b = e;
    }
    return { pieces, live, first, end };
  }

  /** Run `fn` while writes to [first, end) of the source wait (when live). */
  private async holdingWrites<T>(live: boolean, first: number, end: number, fn: () => Promise<T>): Promise<T> {
    const reader = live ? { first, end } : undefined;
    if (reader) this.viewReads.push(reader);
    try {
      return await fn();
    } finally {
      if (reader) {
        this.viewReads.splice(this.viewReads.indexOf(reader), 1);
        const waiters = this.viewWaiters.splice(0);
        for (const w of waiters) w.wake();
      }
    }
  }

  /** Read the point-in-time view into `out`. */
  async snapshotRead(offset: number, out: Buffer, o?: IoOptions): Promise<void> {
    const length = out.length;
    if (length === 0 && offset >= 0 && offset <= this.size) return;
    const { pieces, live, first, end } = await this.planView(offset, length, 'read');
    await this.holdingWrites(live, first, end, () =>
      Promise.all(pieces.map((p) => (p.from === 'target' ? this.target : this.source).readInto(p.start, out.subarray(p.start - offset, p.stop - offset), o))),
    );
    // broken while reading: what was read may not be the start's data
    if ((this.snapshot as SnapshotState) === 'broken') throw this.snapshotError('ERR_SNAPSHOT_BROKEN', 'the snapshot broke during the read', offset, length);
  }

  /** The view's extents: copied granules as the target reports them, the others as the source does (no depth). */
  async snapshotExtents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    const { pieces, live, first, end } = await this.planView(offset, Math.max(1, Math.min(length, this.size - offset)), 'extents');
    const out: Extent[] = [];
    await this.holdingWrites(live, first, end, async () => {
      for (const p of pieces.slice(0, 64)) {
        const node = p.from === 'target' ? this.target : this.source;
        for (let at = p.start; at < p.stop; ) {
          const runs = await node.extents(at, p.stop - at, o);
          if (runs.length === 0) throw this.snapshotError('ERR_INTERNAL', `${node.description} described no extents at ${at}`, offset, length);
          for (const r of runs) {
            if (at >= p.stop) break;
            const n = Math.min(r.length, p.stop - at);
            out.push({ length: n, hole: r.hole, zero: r.zero });
            at += n;
          }
        }
      }
    });
    if ((this.snapshot as SnapshotState) === 'broken') throw this.snapshotError('ERR_SNAPSHOT_BROKEN', 'the snapshot broke during the extents', offset, length);
    return coalesceExtents(out);
  }
}

/** job.snapshotNode: the point-in-time view, read-only (QEMU's snapshot-access). close() closes nothing. */
class SnapshotAccessNode implements BlockNode {
  readonly driver = 'snapshot-access';
  constructor(private readonly job: BackupJob) {}
  get description(): string {
    return `snapshot of ${this.job.source.description} (job ${this.job.id})`;
  }
  get size(): number {
    return this.job.source.size;
  }
  get limits() {
    return this.job.source.limits;
  }
  get caps() {
    return {
      canWrite: false,
      canFlush: true,
      canFua: false,
      canTrim: false,
      canZero: false,
      canFastZero: false,
      canMultiConn: true,
      canExtents: true,
      canCache: false,
    };
  }
  async read(offset: number, length: number, o?: IoOptions): Promise<Buffer> {
    const out = Buffer.allocUnsafe(length);
    await this.job.snapshotRead(offset, out, o);
    return out;
  }
  readInto(offset: number, target: Buffer, o?: IoOptions): Promise<void> {
    return this.job.snapshotRead(offset, target, o);
  }
  async write(offset: number, data: Buffer): Promise<void> {
    throw new BlkrepError('ERR_READ_ONLY', `the snapshot of job ${this.job.id} is read-only (write of ${data.length} bytes at offset ${offset})`, { errno: 'EPERM' });
  }
  extents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    return this.job.snapshotExtents(offset, length, o);
  }
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}
