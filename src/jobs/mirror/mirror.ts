/**
 * mirror — keep a target in step with a source that may be written meanwhile (DESIGN.md §5, §6;
 * model/README.md).
 *
 * Writes to the source must go through `job.node` (the front end): it forwards them to the
 * source wrapped in a DirtyTrackingNode whose tracker the job owns, so every completed source
 * write sets its granules in the dirty bitmap and clears them in the in-flight bitmap. After the
 * job, the front end forwards to the target (completed with a pivot) or to the source.
 *
 * The bitmaps (one bit per granule):
 *   dirty      the "persistent" dirty bitmap of §5: granules that may differ from the target
 *   inflight   §5's in-flight bitmap: set by a copy before it reads, cleared by every source write
 *   locked     a copy (or a write-blocking write) of the granule is in flight — model finding 2:
 *              the in-flight bit cannot be this lock, since writes clear it
 *   unstable   granules cleared from `dirty` since the target was last flushed — model finding 1:
 *              a cleared bit may reach stable storage only once the target holds the data
 *              stably, so whoever persists the bitmap stores persistedView() = dirty | unstable;
 *              a target flush forgets exactly the unstable bits recorded when it was issued (two
 *              bitmaps swap at the issue) and, if it fails, puts them back into dirty.
 *
 * A copy operation: pick a run of granules dirty and not locked (from a cursor that sweeps the
 * disk, at most `bufSize` bytes), set locked and inflight, THEN ask the source's extents (so a
 * write landing meanwhile clears inflight and keeps the granule dirty; they are asked 64 MiB
 * ahead and a window is used until a write overlaps it: copy/extents-ahead.ts), read the data parts,
 * write them to the target — granules wholly zero go as write-zeroes (holes may be punched),
 * never as data, and so does a data part that reads as zeros. Its completion runs in one
 * callback (no await): for each granule whose inflight bit is still set, clear dirty and set
 * unstable; clear inflight and locked. Up to `maxOps` operations are in flight. The loop, the
 * operation and the unstable bits are the copy engine's (src/jobs/copy/: scheduler, operations,
 * consistency); the job's own state is one phase (MirrorPhase).
 *
 * When nothing is dirty and no copy is in flight, the target is flushed; a flush issued at such
 * a moment is a consistency point once it completes: the stable target is the source as of the
 * issue, writes in flight then being either there or not. The first one makes the job ready.
 *
 * Copy modes: background (writes only mark dirty), write-blocking (a source write completes
 * only once the target has it: it takes the granule lock, writes the source, writes the same
 * bytes to the target, then clears the granules it wholly covers — the partial ones stay dirty
 * for the copy loop), auto (background; write-blocking once no consistency point came for
 * `maxLagMs`; background again at the next one). Each switch is a copy-mode event. Writes of one
 * mode drain before writes of the other start, so a write-blocking write never races a
 * background one. While the job is paused, writes are background writes.
 *
 * complete (ready only) and cancel of a ready job without force drain: new front-end writes wait,
 * the ones in flight finish, everything dirty is copied and the target flushed; then (pending)
 * the `onConsistent` hook runs — the target equals the source — and, for complete with pivot,
 * the `pivot` hook; then the front end forwards to the target (pivot) or to the source, and the
 * waiting writes go on. A pause or an error with policy stop during the drain lets writes
 * through to the source until resume. A hard cancel (before ready, or force) aborts the I/O in
 * flight: the target is not a usable copy.
 *
 * Errors: source extents/read are the source side, target write/write-zeroes/flush the target
 * side; the side's policy decides (job.ts). A failed copy leaves its granules dirty; ignore
 * retries them later (backing off from 10 ms to 1 s while errors repeat); a failed target flush
 * makes its unstable granules dirty again. A target error of a write-blocking write never fails
 * the write (the source has it; the granules stay dirty). After ready, an error that is ignored
 * or stops the job is a ready(synced false) event and the job is running again until the next
 * consistency point.
 */
import type { BlockNode, CompleteBlockNode, Extent, IoOptions, ZeroOptions } from '../../api/block.js';
import { BlkrepError, toBlkrepError } from '../../api/errors.js';
import { completeNode } from '../../block/node.js';
import { DirtyBitmap, DEFAULT_GRANULARITY, checkGranularity } from '../../bitmap/dirty-bitmap.js';
import { DirtyTrackingNode, type ModifyOp, type WriteTag, type WriteTracker } from '../../block/filters/tracking.js';
import { FrontEnd } from '../../block/filters/front-end.js';
import type { PersistentBitmap } from '../../bitmap/persistent.js';
import { Job, type JobOptions, type JobSide } from '../job.js';
import { nextRun, scanExtents, ZeroHints } from '../segments.js';
import { unrefTimer, withTimers, type TimerClock, type TimerHandle } from '../copy/clock.js';
import { Consistency, DEFAULT_WRITEBACK_BYTES } from '../copy/consistency.js';
import { ExtentsAhead } from '../copy/extents-ahead.js';
import { asCopyError, copyOperation, newCounters, type CopyIo } from '../copy/operations.js';
import { Phase } from '../copy/phase.js';
import { BufferPool, CopyScheduler } from '../copy/scheduler.js';

export const MIRROR_SYNC_MODES = ['full', 'top', 'none', 'bitmap'] as const;
export type MirrorSync = (typeof MIRROR_SYNC_MODES)[number];
export const COPY_MODES = ['background', 'write-blocking', 'auto'] as const;
export type CopyMode = (typeof COPY_MODES)[number];
export const BITMAP_MODES = ['on-success', 'always', 'never'] as const;
export type BitmapMode = (typeof BITMAP_MODES)[number];

/**
 * 256 KiB × 64 operations in flight (16 MiB, as nbdcopy's defaults), not 1 MiB × 16: the same
 * bytes in flight, but each request's buffer stays in the CPU's cache between the copies it goes
 * through (page cache → buffer → socket here, socket → buffer → page cache at the target). With
 * 1 MiB requests the targets' buffered writes ran at a third of the speed (bench/mirror, nbdkit's
 * stats filter: a 1 MiB pwrite ~30 ms of plugin time under load against 0.1 ms for 256 KiB, the
 * time in copy_folio_from_iter), and a 1 GiB mirror took 2-4× as long. Measured again (session
 * 10, loaded machine, medians of 3, 512 MiB dense and 2 GiB 10 % sparse): 1 MiB × 16 or × 32
 * cost the client ~20 % less CPU but the target 2-6× more (dense onto qemu-nbd 6780 against 1140
 * ms/GiB, onto nbdkit 2920 against 1040) and were slower in every case but sparse onto nbdkit
 * (a tie); neither target advertises a preferred block size above 4 KiB to choose by.
 */
export const DEFAULT_BUF_SIZE = 256 * 1024;
export const DEFAULT_MAX_OPS = 64;
export const DEFAULT_MAX_LAG_MS = 10_000;
export const DEFAULT_FLUSH_INTERVAL_MS = 100;
export { DEFAULT_WRITEBACK_BYTES };
const MAX_BUF_SIZE = 64 << 20;

/** A target whose lost connection can be tried again at once (an NBD node: NbdNode.retryNow). */
export interface Reconnectable {
  /** resolves true when connected, false when still unreachable */
  retryNow(): Promise<boolean>;
}

export interface MirrorOptions extends Omit<JobOptions, 'id'> {
  id?: string;
  source: BlockNode;
  target: BlockNode;
  /** full (default), top (what the source's top layer holds), none (new writes only), bitmap */
  sync?: MirrorSync;
  /** sync=bitmap: the granules to copy (its granularity is the job's unless given) */
  bitmap?: DirtyBitmap | PersistentBitmap;
  /** sync=bitmap: clear the copied granules from `bitmap` on success (default), always, or never */
  bitmapMode?: BitmapMode;
  /** bytes per bit, power of two 512 B … 64 MiB; default the bitmap's or 64 KiB */
  granularity?: number;
  /** most bytes one copy operation moves (default DEFAULT_BUF_SIZE, 256 KiB) */
  bufSize?: number;
  /** copy operations in flight (default DEFAULT_MAX_OPS, 64) */
  maxOps?: number;
  /** the target reads as zeros: zero ranges of the source are not copied at the start */
  targetIsZero?: boolean;
  copyMode?: CopyMode;
  /** auto: write-blocking once no consistency point came for this long (default 10 s) */
  maxLagMs?: number;
  /** least time between two flushes of the target once ready and not draining (default 100 ms) */
  flushIntervalMs?: number;
  /** complete with pivot: make the target the disk (an export switches to it); may fail */
  pivot?: (ctx: { source: BlockNode; target: BlockNode }) => Promise<void>;
  /** complete and soft cancel: called while writes wait and the target equals the source */
  onConsistent?: (reason: 'complete' | 'cancel') => Promise<void>;
  /**
   * Called (synchronously) when a target flush completes, with the granules that flush made
   * stable and that are clean now (not dirty again, not copied again since the flush was issued,
   * not locked): a caller persisting the dirty set may clear exactly these (model finding 1).
   * The bitmap is the job's own: read it during the call only.
   */
  onStable?: (granules: DirtyBitmap) => void;
  /**
   * While granules are still dirty, flush the target at least this often (ms; default 0: only
   * at consistency points). Such a flush is not a consistency point; it makes the copies done so
   * far stable, so onStable can report them (a persisted dirty set then keeps the progress of a
   * long copy across a crash).
   */
  stableIntervalMs?: number;
  /**
   * While copying, flush the target once this many bytes of data were written since the last
   * flush was issued (default DEFAULT_WRITEBACK_BYTES, 128 MiB; 0: never): the target writes its
   * cache back during the copy instead of all at the last flush. Not a consistency point.
   */
  writebackBytes?: number;
  /**
   * With writebackBytes: no write-back flush once less than writebackBytes is left to copy (the
   * granules dirty and the operations in flight): the consistency flush
   * follows soon and writes the rest, and a write-back flush still running when the last copy
   * completes holds that flush back (one flush at a time). Default false (a plain mirror's last
   * flush should not write back up to twice writebackBytes); a pair's bitmap resync sets it.
   */
  writebackSkipTail?: boolean;
}

interface CopyOp {
  first: number;
  end: number;
  offset: number;
  length: number;
  /** speed tokens taken when it started */
  reserved: number;
}

type FrontKind = ModifyOp;

/** a moment of the job for the phase split (bench/mirror): performance.now() and the process's CPU so far (µs, user + system) */
export interface MirrorMark {
  at: number;
  cpuUs: number;
}

export function mirrorMark(): MirrorMark {
  const c = process.cpuUsage();
  return { at: performance.now(), cpuUs: c.user + c.system };
}

/**
 * The phase of a mirror: scanning (the dirty bitmap at the start, by sync mode; writes are
 * tracked already), copying (ready or not), draining (complete or soft cancel: writes wait,
 * everything dirty is copied, the target flushed), ending (an error or a hard cancel: what is in
 * flight finishes), finished (execute() settles), closed (clean() ran).
 */
export type MirrorPhase = 'created' | 'scanning' | 'copying' | 'draining' | 'ending' | 'finished' | 'closed';

const MIRROR_PHASES: Readonly<Record<MirrorPhase, readonly MirrorPhase[]>> = {
  created: ['scanning', 'closed'],
  scanning: ['copying', 'ending', 'closed'],
  copying: ['draining', 'ending', 'closed'],
  draining: ['finished', 'ending', 'closed'],
  ending: ['finished', 'closed'],
  finished: ['closed'],
  closed: [],
};

/** the tag of a write-blocking write (its tracker ticket must not mark the granules dirty) */
const BLOCKING: WriteTag = Symbol('write-blocking');

function badOption(message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_JOB_INVALID', message, { errno: 'EINVAL', details });
}

export class MirrorJob extends Job {
  readonly type = 'mirror';
  readonly source: BlockNode;
  readonly target: CompleteBlockNode;
  /** the source with the job's tracker: writes through `node` reach it */
  readonly tracking: DirtyTrackingNode;
  /** the front end: write the source through it (see the file comment) */
  readonly node: FrontEnd;
  readonly sync: MirrorSync;
  readonly granularity: number;
  readonly bufSize: number;
  readonly maxOps: number;
  readonly targetIsZero: boolean;
  readonly maxLagMs: number;
  readonly flushIntervalMs: number;
  readonly copyModeSetting: CopyMode;

  private readonly size: number;
  private readonly bits: number;
  private readonly dirty: DirtyBitmap;
  private readonly inflight: DirtyBitmap;
  private readonly locked: DirtyBitmap;
  /** unstable bits, flush points, onStable */
  private readonly consistency: Consistency;
  private readonly tracker: WriteTracker<{ offset: number; length: number; blocking: boolean }>;
  private readonly syncBitmap: DirtyBitmap | PersistentBitmap | undefined;
  private readonly bitmapMode: BitmapMode;
  private syncBitmapStart: DirtyBitmap | undefined;
  private readonly pivotHook: MirrorOptions['pivot'];
  private readonly consistentHook: MirrorOptions['onConsistent'];
  private readonly stableIntervalMs: number;
  private readonly writebackBytes: number;
  private readonly writebackSkipTail: boolean;
  /** bytes of the copy operations in flight */
  private opBytes = 0;
  /** the data bytes written to the target (io.counters.dataBytes) when the last flush was issued */
  private dataBytesAtFlush = 0;
  private readonly phase: Phase<MirrorPhase>;
  private readonly timers: TimerClock;
  /** the copy loop: operations in flight, speed, backoff, wake-ups */
  private readonly sched: CopyScheduler<CopyOp>;
  private readonly io: CopyIo;

  private copyModeNow: CopyMode;
  /** writing through the front end: 'tracked' while the job runs, then 'source' or 'target' */
  private backend: 'tracked' | 'source' | 'target' = 'tracked';
  private activeTargetWrites = 0;
  private frontWrites = 0;
  private modeWrites = { background: 0, blocking: 0 };
  private modeWaiters: Array<() => void> = [];
  private lockWaiters: Array<{ first: number; end: number; grant: () => void }> = [];
  private lastFlushIssue = -Infinity;
  /** stableIntervalMs: when a copy first waited to be made stable */
  private stableFrom: number | undefined;
  private changed = true;
  private cursor = 0;
  private bytesDone = 0;
  private lastConsistentAt: number;
  /** a resume is trying the target's lost connection again first (Reconnectable): no copy starts meanwhile */
  private reconnecting = false;
  private readonly reconnectable: Reconnectable | undefined;
  private lagTimer: TimerHandle | undefined;
  /** why the job drains (set by complete or soft cancel; the phase says whether it is draining now) */
  private drainReason: 'complete' | 'cancel' | undefined;
  private pivotWanted = true;
  private gate: { promise: Promise<void>; open: () => void } | undefined;
  private endError: BlkrepError | undefined;
  /** set once the copy runs (its end resolves or rejects execute()) */
  private finishFns: { resolve: () => void; reject: (e: unknown) => void } | undefined;
  /** [start, end) pairs, sorted: regions the source reported as zeros when the job started */
  private readonly zeroHints = new ZeroHints();
  /**
   * Where the time went, for the phase split of bench/mirror (the CLI prints it with
   * BLKREP_BENCH_PHASES=1): the scan ended and copying began; the first consistency point's
   * flush was issued (everything copied once).
   */
  readonly marks: { copying?: MirrorMark; pointIssued?: MirrorMark } = {};

  constructor(options: MirrorOptions) {
    super({ ...options, id: options.id ?? 'mirror0' });
    const source = options.source;
    const target = options.target;
    if (source.size !== target.size) {
      throw new BlkrepError('ERR_SIZE_MISMATCH', `the source ${source.description} is ${source.size} bytes and the target ${target.description} is ${target.size}: a mirror needs the same size`, {
        errno: 'EINVAL',
        details: { sourceSize: source.size, targetSize: target.size },
      });
    }
    if (!target.caps.canWrite) throw new BlkrepError('ERR_READ_ONLY', `the target ${target.description} is read-only`, { errno: 'EPERM' });
    this.sync = options.sync ?? 'full';
    if (!(MIRROR_SYNC_MODES as readonly string[]).includes(this.sync)) throw badOption(`sync "${this.sync}" is not one of ${MIRROR_SYNC_MODES.join(', ')}`);
    this.syncBitmap = options.bitmap;
    const bitmapBits = options.bitmap ? ('path' in options.bitmap ? options.bitmap.bitmap : options.bitmap) : undefined;
    if (this.sync === 'bitmap' && !bitmapBits) throw badOption('sync bitmap needs a bitmap');
    if (this.sync !== 'bitmap' && bitmapBits) throw badOption(`a bitmap is only used with sync bitmap, not ${this.sync}`);
    this.bitmapMode = options.bitmapMode ?? 'on-success';
    if (!(BITMAP_MODES as readonly string[]).includes(this.bitmapMode)) throw badOption(`bitmap mode "${this.bitmapMode}" is not one of ${BITMAP_MODES.join(', ')}`);
    this.granularity = options.granularity ?? bitmapBits?.granularity ?? DEFAULT_GRANULARITY;
    checkGranularity(this.granularity);
    if (bitmapBits && (bitmapBits.granularity !== this.granularity || bitmapBits.size !== source.size)) {
      throw badOption(`the bitmap covers ${bitmapBits.size} bytes at granularity ${bitmapBits.granularity}; the mirror needs ${source.size} bytes at ${this.granularity}`);
    }
    this.bufSize = options.bufSize ?? DEFAULT_BUF_SIZE;
    if (!Number.isSafeInteger(this.bufSize) || this.bufSize < 512 || this.bufSize > MAX_BUF_SIZE) throw badOption(`buffer size ${this.bufSize} is not from 512 bytes to ${MAX_BUF_SIZE}`);
    this.maxOps = options.maxOps ?? DEFAULT_MAX_OPS;
    if (!Number.isSafeInteger(this.maxOps) || this.maxOps < 1 || this.maxOps > 1024) throw badOption(`${this.maxOps} copy operations in flight: expected 1 to 1024`);
    this.targetIsZero = options.targetIsZero ?? false;
    this.copyModeSetting = options.copyMode ?? 'background';
    if (!(COPY_MODES as readonly string[]).includes(this.copyModeSetting)) throw badOption(`copy mode "${this.copyModeSetting}" is not one of ${COPY_MODES.join(', ')}`);
    this.copyModeNow = this.copyModeSetting === 'write-blocking' ? 'write-blocking' : 'background';
    this.maxLagMs = options.maxLagMs ?? DEFAULT_MAX_LAG_MS;
    if (!(this.maxLagMs > 0)) throw badOption(`max lag ${this.maxLagMs} ms is not positive`);
    this.flushIntervalMs = options.flushIntervalMs ?? DEFAULT_FLUSH_INTERVAL_MS;
    this.pivotHook = options.pivot;
    this.consistentHook = options.onConsistent;
    this.stableIntervalMs = options.stableIntervalMs ?? 0;
    this.writebackBytes = options.writebackBytes ?? DEFAULT_WRITEBACK_BYTES;
    if (!Number.isSafeInteger(this.writebackBytes) || this.writebackBytes < 0) throw badOption(`write-back flush every ${this.writebackBytes} bytes: expected a whole number of bytes, 0 for never`);
    this.writebackSkipTail = options.writebackSkipTail ?? false;

    this.source = source;
    this.target = completeNode(target);
    this.reconnectable = typeof (target as Partial<Reconnectable>).retryNow === 'function' ? (target as BlockNode & Reconnectable) : undefined;
    this.size = source.size;
    const geometry = { granularity: this.granularity };
    this.dirty = new DirtyBitmap(this.size, geometry);
    this.inflight = new DirtyBitmap(this.size, geometry);
    this.locked = new DirtyBitmap(this.size, geometry);
    this.consistency = new Consistency({ dirty: this.dirty, locked: this.locked, ...(options.onStable ? { onStable: options.onStable } : {}) });
    this.bits = this.dirty.bits;
    if (bitmapBits) this.syncBitmapStart = bitmapBits.clone();
    const g = this.granularity;
    this.tracking = source instanceof DirtyTrackingNode ? source : new DirtyTrackingNode(source);
    // the source's extents asked ahead of the copy operations; every write through the tracker
    // forgets what it overlaps, when issued and when completed (copy/extents-ahead.ts)
    const extents = new ExtentsAhead(this.tracking, this.size);
    this.tracker = {
      beforeWrite: (offset, length, tag) => {
        extents.invalidate(offset, length);
        return Promise.resolve({ offset, length, blocking: tag === BLOCKING });
      },
      beforeWriteSync: (offset, length, tag) => {
        extents.invalidate(offset, length);
        return { offset, length, blocking: tag === BLOCKING };
      },
      afterWrite: ({ offset, length, blocking }) => {
        extents.invalidate(offset, length);
        if (length === 0 || this.backend !== 'tracked') return;
        const first = Math.floor(offset / g);
        const end = Math.ceil((offset + length) / g);
        // a write-blocking write makes the same change on the target itself (it holds the lock)
        if (!blocking) this.dirty.setBits(first, end);
        this.inflight.clearBits(first, end);
        this.changed = true;
        this.pump();
      },
      flush: () => Promise.resolve(),
    };
    this.tracking.addTracker(this.tracker);
    this.node = new FrontEnd('mirror', this.tracking, this);
    this.lastConsistentAt = this.clock.now();
    this.phase = new Phase(`job ${this.id}`, MIRROR_PHASES, 'created');
    this.timers = withTimers(this.clock);
    this.sched = new CopyScheduler<CopyOp>(
      {
        next: (_now, throttled) => (throttled ? undefined : this.pick()),
        cost: (op) => op.reserved,
        run: (op) => void this.copy(op),
      },
      { maxOps: this.maxOps, limiter: this.limiter, clock: this.timers, wake: () => this.pump() },
    );
    this.io = {
      source: this.tracking,
      extents,
      target: this.target,
      granularity: this.granularity,
      size: this.size,
      bufSize: this.bufSize,
      buffers: new BufferPool(Math.max(this.bufSize, this.granularity), this.maxOps),
      counters: newCounters(),
      signal: this.signal,
    };
  }

  /** target requests (writes, write-zeroes, flushes), for tests and stats */
  get targetWrites(): number {
    return this.io.counters.targetRequests;
  }

  /** scanning, copying, draining … (see MirrorPhase) */
  get mirrorPhase(): MirrorPhase {
    return this.phase.now;
  }

  /** the copy runs and has not finished */
  private get copyRunning(): boolean {
    return this.finishFns !== undefined && this.phase.is('copying', 'draining', 'ending');
  }

  // --------------------------------------------------------------------------- what it shows

  /** What a persisting caller must store as the bitmap: dirty | unstable (model finding 1). */
  persistedView(): DirtyBitmap {
    return this.consistency.persistedView();
  }

  /** granules that may differ from the target right now */
  get dirtyBytes(): number {
    return this.dirty.dirtyBytes;
  }

  /** the copy mode in force now (auto shows as background or write-blocking) */
  get copyMode(): 'background' | 'write-blocking' {
    return this.copyModeNow === 'write-blocking' ? 'write-blocking' : 'background';
  }

  protected override extraInfo(): Record<string, unknown> {
    return {
      sync: this.sync,
      copyModeSetting: this.copyModeSetting,
      copyMode: this.copyMode,
      granularity: this.granularity,
      bufSize: this.bufSize,
      maxOps: this.maxOps,
      opsInFlight: this.sched.inFlight,
      dirtyBytes: this.dirty.dirtyBytes,
      unstableBytes: this.consistency.unstableBytes,
      targetIsZero: this.targetIsZero,
    };
  }

  protected override beforeQuery(): void {
    this.updateProgress();
  }

  private updateProgress(): void {
    this.progress(this.bytesDone, this.dirty.dirtyBytes);
  }

  /** Change the copy mode (QEMU's block-job-change). */
  setCopyMode(mode: CopyMode): void {
    this.checkVerb('change');
    if (!(COPY_MODES as readonly string[]).includes(mode)) throw badOption(`copy mode "${mode}" is not one of ${COPY_MODES.join(', ')}`);
    (this as { copyModeSetting: CopyMode }).copyModeSetting = mode;
    if (mode !== 'auto') this.switchMode(mode, 'user');
  }

  // ---------------------------------------------------------------------------- the driver

  protected async execute(): Promise<void> {
    this.phase.to('scanning');
    await this.initDirty();
    if (this.phase.is('scanning')) this.phase.to('copying');
    this.marks.copying = mirrorMark();
    this.updateProgress();
    const done = new Promise<void>((resolve, reject) => (this.finishFns = { resolve, reject }));
    this.armLag();
    this.pump();
    return done;
  }

  /** auto copy mode: look at the lag every maxLagMs/4 (10 ms … 1 s); the check does not keep the process alive. */
  private armLag(): void {
    this.lagTimer = this.timers.setTimeout(
      () => {
        if (this.lagTimer === undefined) return;
        this.checkLag();
        if (this.lagTimer !== undefined) this.armLag();
      },
      Math.max(10, Math.min(1000, this.maxLagMs / 4)),
    );
    unrefTimer(this.lagTimer);
  }

  /** The dirty bitmap at the start, by sync mode. The tracker is already recording writes. */
  private async initDirty(): Promise<void> {
    switch (this.sync) {
      case 'none':
        return;
      case 'bitmap':
        this.dirty.merge(this.syncBitmapStart!);
        return;
      case 'full':
        if (!this.source.caps.canExtents) {
          this.dirty.setAll();
          return;
        }
        if (!this.targetIsZero) {
          // everything is dirty; the zero regions become hints for large write-zeroes operations
          this.dirty.setAll();
          // only hints: when it fails (a flaky source), copy without the rest of them; the copy
          // operations ask the extents again, and their errors go through the source's policy
          await this.scanExtents(() => false, true).catch((err: unknown) => {
            if (this.signal.aborted) throw err;
          });
          return;
        }
        await this.scanExtents((e) => !e.zero);
        return;
      case 'top':
        if (!this.source.caps.allocationDepth || !this.source.caps.canExtents) {
          if (this.targetIsZero && this.source.caps.canExtents) await this.scanExtents((e) => !e.zero);
          else this.dirty.setAll();
          return;
        }
        await this.scanExtents((e) => e.depth === 1 && !(this.targetIsZero && e.zero));
        return;
    }
  }

  private scanExtents(wanted: (e: Extent) => boolean, hints = false): Promise<void> {
    return scanExtents(this.tracking, this.size, this.signal, (offset, length, e) => {
      if (wanted(e)) this.dirty.fill(offset, length);
      if (hints && e.zero) this.zeroHints.add(offset, offset + length);
    });
  }

  /** Start as many copy operations as allowed; then see whether a flush or an end is due. */
  private pump(): void {
    if (!this.copyRunning) return;
    if (!this.phase.is('ending') && !this.pauseRequested && !this.reconnecting) {
      this.sched.fill();
      if (this.stableIntervalMs > 0) this.maybeStableFlush();
      if (this.writebackBytes > 0) this.maybeWritebackFlush();
    }
    this.checkIdle();
  }

  private pick(): CopyOp | undefined {
    // a region the source reported as zeros at the start: one operation for up to 1 GiB of it
    // (only a hint: the operation asks the extents again once its in-flight bits are set)
    const run = nextRun({ todo: this.dirty, locked: this.locked, cursor: this.cursor, granularity: this.granularity, size: this.size, bufSize: this.bufSize, hints: this.zeroHints });
    if (!run) return undefined;
    const { first, end } = run;
    this.cursor = run.cursor;
    this.locked.setBits(first, end);
    this.inflight.setBits(first, end);
    const offset = first * this.granularity;
    const length = Math.min(end * this.granularity, this.size) - offset;
    this.opBytes += length;
    return { first, end, offset, length, reserved: Math.min(length, this.bufSize) };
  }

  /** One copy operation of the engine; completion and failure as the file comment says. */
  private async copy(op: CopyOp): Promise<void> {
    let failed: unknown;
    try {
      // the speed counts data only: settle what the scheduler reserved against the data found
      await copyOperation(this.io, op.offset, op.length, (data) => this.limiter.take(data - op.reserved));
      // completion: one synchronous step (model: d_step)
      this.completeCopy(op);
    } catch (err) {
      failed = err;
      // copyOperation settled every request it issued: nothing of this op still writes the target (finding 2)
      this.inflight.clearBits(op.first, op.end);
      this.locked.clearBits(op.first, op.end);
    } finally {
      this.opBytes -= op.length;
      this.sched.done();
    }
    if (failed !== undefined) {
      const e = asCopyError(failed);
      this.ioError(e.side, e.operation, op.offset, op.length, e.inner);
    } else this.sched.succeeded();
    this.grantLocks();
    this.pump();
  }

  private completeCopy(op: CopyOp): void {
    let b = op.first;
    while (b < op.end) {
      const s = this.inflight.nextDirtyBit(b, op.end);
      if (s < 0) break;
      let e = this.inflight.nextCleanBit(s, op.end);
      if (e < 0) e = op.end;
      this.dirty.clearBits(s, e);
      this.consistency.copied(s, e);
      b = e;
    }
    this.inflight.clearBits(op.first, op.end);
    this.locked.clearBits(op.first, op.end);
    this.bytesDone += op.length;
    this.changed = true;
  }

  /** Nothing in flight: pause, end, flush or finish the drain, as due. */
  private checkIdle(): void {
    if (!this.copyRunning) return;
    const flushing = this.consistency.flushing;
    const idle = this.sched.inFlight === 0 && this.activeTargetWrites === 0 && !flushing;
    if (this.phase.is('ending')) {
      if (idle) this.finish();
      return;
    }
    if (this.pauseRequested) {
      if (idle) this.reachedPausePoint();
      return;
    }
    if (this.reconnecting) return;
    if (this.sched.inFlight > 0 || flushing || this.dirty.dirtyGranules > 0) return;
    const final = this.phase.is('draining') && this.gate !== undefined && this.frontWrites === 0;
    if (!this.changed) {
      if (final && this.activeTargetWrites === 0) this.finish();
      return;
    }
    const now = this.clock.now();
    if (this.isReady && !this.phase.is('draining') && now - this.lastFlushIssue < this.flushIntervalMs) {
      this.sched.wakeIn(this.lastFlushIssue + this.flushIntervalMs - now);
      return;
    }
    this.startFlush(final && this.activeTargetWrites === 0);
  }

  /** stableIntervalMs: a flush that is not a consistency point, while granules are still dirty. */
  private maybeStableFlush(): void {
    if (this.consistency.flushing || !this.phase.is('copying') || this.consistency.pendingGranules === 0 || this.dirty.dirtyGranules === 0) return;
    // the first one an interval after the first copy completed, not at once: a copy shorter than
    // the interval pays no extra flush (a pair's resync of a short outage: bench/pair outage)
    this.stableFrom ??= this.clock.now();
    const wait = Math.max(this.lastFlushIssue, this.stableFrom) + this.stableIntervalMs - this.clock.now();
    if (wait > 0) this.sched.wakeIn(wait);
    else this.startFlush(false, false);
  }

  /** writebackBytes: a flush that is not a consistency point, once that much data was written since the last one was issued. */
  private maybeWritebackFlush(): void {
    if (this.consistency.flushing || !this.phase.is('copying') || this.consistency.pendingGranules === 0 || this.dirty.dirtyGranules === 0) return;
    if (this.io.counters.dataBytes - this.dataBytesAtFlush < this.writebackBytes) return;
    // the tail: the consistency flush writes the rest back soon, and would wait for this one
    if (this.writebackSkipTail && this.dirty.dirtyBytes + this.opBytes < this.writebackBytes) return;
    this.startFlush(false, false);
  }

  /**
   * `point`: issued with nothing dirty and no copy in flight (a consistency point once it
   * completes); `final`: the drain's last flush (the job finishes at that point).
   */
  private startFlush(final: boolean, point = true): void {
    // a flush issued while granules are dirty proves nothing about `changed`
    if (point) this.changed = false;
    if (point && !this.marks.pointIssued) this.marks.pointIssued = mirrorMark();
    this.lastFlushIssue = this.clock.now();
    this.dataBytesAtFlush = this.io.counters.dataBytes;
    const issuedAt = this.lastFlushIssue;
    this.io.counters.targetRequests++;
    this.consistency.flush(
      () => this.target.flush({ signal: this.signal }),
      () => {
        if (point) this.consistencyPoint(issuedAt, final);
        this.pump();
      },
      (err: unknown) => {
        this.changed = true;
        // the NBD client reconnected after a drop that may have lost unflushed writes: not an
        // error of the target; what it may have lost is dirty again and is copied once more
        if ((err as { code?: unknown } | null)?.code !== 'ERR_NBD_WRITES_LOST' || this.signal.aborted) this.ioError('target', 'flush', 0, 0, err);
        else if (this.isReady && !this.phase.is('ending')) this.setReady(false);
        this.pump();
      },
    );
  }

  private consistencyPoint(issuedAt: number, final: boolean): void {
    if (this.phase.is('ending')) return;
    this.lastConsistentAt = issuedAt;
    this.updateProgress();
    if (this.copyModeSetting === 'auto' && this.copyModeNow === 'write-blocking') this.switchMode('background', 'converged');
    if (!this.isReady) this.setReady(true);
    if (final && !this.changed && this.frontWrites === 0) this.finish();
  }

  private finish(): void {
    if (!this.finishFns || !this.phase.is('draining', 'ending')) return;
    const idle = this.sched.inFlight === 0 && this.activeTargetWrites === 0 && !this.consistency.flushing;
    if (!idle) return;
    this.phase.to('finished');
    this.stopTimers();
    this.updateProgress();
    if (this.endError) this.finishFns.reject(this.endError);
    else this.finishFns.resolve();
  }

  private endWith(err?: BlkrepError): void {
    if (this.phase.is('scanning', 'copying', 'draining')) {
      this.phase.to('ending');
      this.endError = err;
    }
    this.openGate();
    this.wakeModeWaiters();
    this.checkIdle();
  }

  private ioError(side: JobSide, operation: string, offset: number, length: number, err: unknown): void {
    if (this.signal.aborted || this.phase.is('ending')) return;
    const action = this.handleIoError({ side, operation, offset, length, error: err });
    if (action === 'report') {
      this.endWith(this.error ?? toBlkrepError(err));
      return;
    }
    if (action === 'ignore') this.sched.holdAfterError();
    if (this.isReady) this.setReady(false);
  }

  private checkLag(): void {
    if (!this.phase.is('copying', 'draining') || this.copyModeSetting !== 'auto' || this.copyModeNow !== 'background') return;
    if (this.clock.now() - this.lastConsistentAt > this.maxLagMs && (this.dirty.dirtyGranules > 0 || this.changed)) this.switchMode('write-blocking', 'lag');
  }

  private switchMode(to: 'background' | 'write-blocking', reason: string): void {
    const from = this.copyModeNow;
    if (from === to) return;
    this.copyModeNow = to;
    this.emitEvent({ event: 'copy-mode', from, to, reason });
    this.wakeModeWaiters();
  }

  private stopTimers(): void {
    this.sched.stop();
    this.io.buffers.close();
    if (this.lagTimer !== undefined) this.timers.clearTimeout(this.lagTimer);
    this.lagTimer = undefined;
  }

  // ------------------------------------------------------------------------- verbs' hooks

  protected override onPauseRequested(): void {
    this.openGate();
    this.wakeModeWaiters();
    this.checkIdle();
  }

  protected override onResume(): void {
    this.sched.clearHold();
    if (this.phase.is('draining')) this.closeGate();
    this.wakeModeWaiters();
    // A target that lost its connection (an NBD server that went away) retries it first, now:
    // otherwise the first copy after the resume fails at once while the client waits out its
    // backoff (up to 10 s), and with on-target-error stop the job pauses again although the
    // server is back (issue 14, defect 7). Whether it connects or not, copying resumes after.
    const target = this.reconnectable;
    if (target && !this.reconnecting) {
      this.reconnecting = true;
      void target
        .retryNow()
        .catch(() => false)
        .then(() => {
          this.reconnecting = false;
          this.pump();
        });
      return;
    }
    this.pump();
  }

  protected override onSpeedChanged(): void {
    this.sched.rearm();
    this.pump();
  }

  protected override supportsSoftCancel(): boolean {
    return true;
  }

  protected override onComplete(options: Record<string, unknown>): void {
    this.pivotWanted = options.pivot !== false;
    this.startDrain('complete');
  }

  protected override onCancel(hard: boolean): void {
    if (hard) this.endWith();
    else this.startDrain('cancel');
  }

  private startDrain(reason: 'complete' | 'cancel'): void {
    this.drainReason = reason;
    if (this.phase.is('copying')) this.phase.to('draining');
    if (!this.pauseRequested && this.phase.is('draining')) this.closeGate();
    // no extra flush when nothing changed since the last one was issued: that flush was issued
    // with nothing dirty and no copy in flight, and every write since would have set `changed`
    this.pump();
  }

  protected override async prepare(): Promise<void> {
    if (!this.drainReason) return;
    if (this.consistentHook) await this.consistentHook(this.drainReason);
    if (this.drainReason === 'complete' && this.pivotWanted && this.pivotHook) await this.pivotHook({ source: this.source, target: this.target });
  }

  protected override async commit(): Promise<void> {
    this.setBackend(this.drainReason === 'complete' && this.pivotWanted ? 'target' : 'source');
    this.applyBitmapMode(true);
  }

  protected override async abort(): Promise<void> {
    this.setBackend('source');
    if (this.syncBitmap && this.bitmapMode === 'always' && !this.consistency.flushing) {
      // what was copied counts once the target holds it stably: try one flush
      try {
        await this.target.flush();
        this.consistency.settledOutside();
      } catch {
        // the copied granules stay in the bitmap
      }
    }
    this.applyBitmapMode(false);
  }

  protected override async clean(): Promise<void> {
    this.phase.to('closed');
    this.stopTimers();
    if (this.backend === 'tracked') this.setBackend('source');
    this.tracking.removeTracker(this.tracker);
    this.openGate();
    this.wakeModeWaiters();
    for (const w of this.lockWaiters.splice(0)) w.grant();
  }

  /** sync=bitmap: clear from the bitmap the granules the target now holds stably. */
  private applyBitmapMode(success: boolean): void {
    const start = this.syncBitmapStart;
    const bitmap = this.syncBitmap;
    if (!start || !bitmap || this.bitmapMode === 'never' || (!success && this.bitmapMode !== 'always')) return;
    const still = this.persistedView();
    const g = this.granularity;
    let b = 0;
    while (b < this.bits) {
      const s = start.nextDirtyBit(b);
      if (s < 0) break;
      let e = start.nextCleanBit(s);
      if (e < 0) e = this.bits;
      for (let i = s; i < e; i++) {
        if (!still.testBit(i)) {
          let j = i + 1;
          while (j < e && !still.testBit(j)) j++;
          const offset = i * g;
          bitmap.clear(offset, Math.min(j * g, this.size) - offset);
          i = j;
        }
      }
      b = e;
    }
  }

  // ------------------------------------------------------------------------ the front end

  private closeGate(): void {
    if (this.gate) return;
    let open!: () => void;
    const promise = new Promise<void>((resolve) => (open = resolve));
    this.gate = { promise, open };
  }

  private openGate(): void {
    const g = this.gate;
    this.gate = undefined;
    g?.open();
  }

  private wakeModeWaiters(): void {
    for (const w of this.modeWaiters.splice(0)) w();
  }

  private blockingNow(): boolean {
    return this.copyModeNow === 'write-blocking' && !this.pauseRequested && this.finishFns !== undefined && this.phase.is('copying', 'draining') && (this.status === 'running' || this.status === 'ready');
  }

  /** The node front-end reads and extents go to. */
  backendNode(): CompleteBlockNode {
    return this.backend === 'target' ? this.target : this.tracking;
  }

  private setBackend(backend: 'source' | 'target'): void {
    this.backend = backend;
    this.node.route(this.backendNode());
  }

  async frontWrite(kind: FrontKind, offset: number, length: number, o: ZeroOptions | undefined, data?: Buffer): Promise<void> {
    while (this.gate) await this.gate.promise;
    const toNode = (node: CompleteBlockNode): Promise<void> =>
      kind === 'write' ? node.write(offset, data!, o) : kind === 'write-zeroes' ? node.writeZeroes(offset, length, o) : node.trim(offset, length, o);
    const tracking = this.tracking;
    if (this.backend !== 'tracked') return toNode(this.backendNode());
    this.frontWrites++;
    let blocking = false;
    let counted = false;
    try {
      for (;;) {
        blocking = this.blockingNow() && kind !== 'trim';
        const other = blocking ? this.modeWrites.background : this.modeWrites.blocking;
        if (other === 0 || this.backend !== 'tracked') break;
        await new Promise<void>((resolve) => this.modeWaiters.push(resolve));
      }
      if (this.backend !== 'tracked') return await toNode(this.backendNode());
      if (blocking) this.modeWrites.blocking++;
      else this.modeWrites.background++;
      counted = true;
      if (!blocking) return await toNode(tracking);
      await this.blockingWrite(kind, offset, length, o, data, () => tracking.modify(kind, offset, length, data, o, BLOCKING));
    } finally {
      if (counted) {
        if (blocking) this.modeWrites.blocking--;
        else this.modeWrites.background--;
        if ((blocking ? this.modeWrites.blocking : this.modeWrites.background) === 0) this.wakeModeWaiters();
      }
      this.frontWrites--;
      this.checkIdle();
    }
  }

  /** write-blocking: lock, source, target with the same bytes, clear what it wholly covered. */
  private async blockingWrite(kind: FrontKind, offset: number, length: number, o: ZeroOptions | undefined, data: Buffer | undefined, toSource: () => Promise<void>): Promise<void> {
    const g = this.granularity;
    if (length === 0) return toSource();
    const first = Math.floor(offset / g);
    const end = Math.ceil((offset + length) / g);
    await this.lock(first, end);
    try {
      // The tracker does not set dirty bits for this write (toSource tags it BLOCKING, and the
      // tracker's ticket says so): the same bytes go to the target below, so granules clean
      // before stay clean.
      try {
        await toSource();
      } catch (err) {
        if (this.backend === 'tracked') this.dirty.setBits(first, end);
        throw err;
      }
      if (this.backend !== 'tracked') return;
      if (this.phase.is('ending')) {
        this.dirty.setBits(first, end);
        return;
      }
      const c0 = Math.ceil(offset / g);
      const c1 = offset + length === this.size ? this.bits : Math.floor((offset + length) / g);
      this.activeTargetWrites++;
      this.io.counters.targetRequests++;
      try {
        if (kind === 'write') await this.target.write(offset, data!, { signal: this.signal });
        else await this.target.writeZeroes(offset, length, { noHole: o?.noHole ?? false, signal: this.signal });
        if (this.backend === 'tracked') {
          // the lock keeps copies and other writes off these granules: the change is on both
          // sides; the wholly covered ones are equal now; all of them wait for a target flush
          if (c1 > c0) this.dirty.clearBits(c0, c1);
          this.consistency.copied(first, end);
          this.changed = true;
        }
        this.bytesDone += length;
      } catch (err) {
        if (this.backend === 'tracked') {
          this.dirty.setBits(first, end);
          this.changed = true;
        }
        this.ioError('target', kind, offset, length, err);
      } finally {
        this.activeTargetWrites--;
      }
    } finally {
      this.unlock(first, end);
      this.pump();
    }
  }

  private lockFree(first: number, end: number): boolean {
    return this.locked.nextDirtyBit(first, end) < 0;
  }

  private lock(first: number, end: number): Promise<void> {
    const overlapsWaiter = this.lockWaiters.some((w) => w.first < end && first < w.end);
    if (!overlapsWaiter && this.lockFree(first, end)) {
      this.locked.setBits(first, end);
      return Promise.resolve();
    }
    return new Promise((grant) => this.lockWaiters.push({ first, end, grant }));
  }

  private unlock(first: number, end: number): void {
    this.locked.clearBits(first, end);
    this.grantLocks();
  }

  /** Grant waiting locks in order; a waiter never overtakes an earlier one it overlaps. */
  private grantLocks(): void {
    if (this.lockWaiters.length === 0) return;
    const blocked: Array<[number, number]> = [];
    for (const w of [...this.lockWaiters]) {
      if (blocked.some(([a, b]) => a < w.end && w.first < b) || !this.lockFree(w.first, w.end)) {
        blocked.push([w.first, w.end]);
        continue;
      }
      this.locked.setBits(w.first, w.end);
      this.lockWaiters.splice(this.lockWaiters.indexOf(w), 1);
      w.grant();
    }
  }

  frontFlush(o?: IoOptions): Promise<void> {
    return this.backendNode().flush(o);
  }
}
