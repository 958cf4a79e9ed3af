/**
 * The secondary's copy-before-write filter (replication.md §2, "S write path"): the replica
 * export's writes go through it to the disk. For each cluster a write touches whose bit is clear
 * this epoch, the disk's old content is read and written to the hidden disk (FUA: durable before
 * the disk is written, so a kill -9 or a host crash never leaves a disk cluster changed whose old
 * content is not kept), then the bit is set; a write's adjacent clusters to copy go as one run
 * (one read, one hidden write), and writers to a cluster being copied wait for that copy. If the
 * copy fails, the disk is not written and the request fails (QEMU's
 * ON_CBW_ERROR_BREAK_GUEST_WRITE). Reads go to the disk.
 *
 * The bits are reset at each checkpoint (step 6), when the hidden disk is emptied; at start they
 * are the clusters the hidden disk holds, so a restart never overwrites a kept old cluster.
 *
 * While the secondary has no checkpoint to roll back to (`bypass`: the initial full sync before
 * the first committed epoch, or a resync after a host crash lost a volatile hidden disk) there
 * is nothing to keep: writes go straight to the disk, in the same order, without a copy.
 *
 * Order: the disk writes are issued in the order the requests arrived (the NBD server calls
 * write() in the order of its connection; the primary uses one connection). Copies into the
 * hidden disk start at once and run concurrently (their fsyncs are shared by the qcow2 writeback
 * cycle), but a request's disk write is issued only after the one before it was issued, and
 * only after every earlier disk write it overlaps has completed (two writes of one block in
 * flight could otherwise land in either order). Once a request fails before its disk write, the
 * requests queued behind it fail too (ERR_PAIR_ORDER) until none is left. So once the requests
 * received have completed — the primary gone, the secondary alive — the disk holds a prefix of
 * what the primary sent, and an async primary may send its barrier groups without waiting for
 * the replies of the one before (replication-filter.ts, `ordered`). A crash of the secondary
 * itself may leave non-overlapping writes of the moment applied in any order (the page cache
 * never promised more): that disk is resynced by the primary's peer bitmap, and the hidden disk
 * still holds the checkpoint.
 * The order chain is the writer's (`writer()`: one per writer token, so per pair link): a retired
 * link's failing request fails only the requests queued behind it on that link, and the new
 * link's writes are issued only after every request of the links before it finished.
 * A sync primary (`ordered` false, from its hello) needs none of that: it has no write in flight
 * that depends on another in flight, so a request's disk write waits only for the earlier
 * requests it overlaps (their disk writes completed, or they failed), not for every earlier
 * request's copy — a first touch's copy (one to two qcow2 writeback cycles) no longer holds up the
 * writes behind it — and a failure fails only its own request.
 */
import type { BlockNode, CompleteBlockNode, WriteOptions, ZeroOptions } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { heldFaultPoint } from './crash-hook.js';
import { Filter } from '../block/filter.js';
import { freeBufferNow } from '../util/free-buffer.js';
import { REPLICA_MAX_INFLIGHT } from './data-token.js';
import { gated, WriteGate } from './write-gate.js';
import { writeFileSync } from 'node:fs';
import { cycleStats } from '../block/qcow2/image.js';
import { syncStats } from '../block/qcow2/file.js';

/**
 * BLKREP_CBW_STATS=<dir>: the filter writes its write-path figures to <dir>/cbw-<pid>.json each
 * second (bench/pair-style investigations of issue 10's first-touch cost; off by default, no cost then).
 */
const STATS_DIR = process.env['BLKREP_CBW_STATS'];
const hist = (): number[] => new Array<number>(16).fill(0);
/** log2 buckets of ms: <0.125, <0.25, … */
const bucket = (ms: number): number => Math.max(0, Math.min(15, Math.floor(Math.log2(Math.max(ms, 1e-3) * 8)) + 1));
class CbwStats {
  requests = 0;
  firstTouch = 0;
  copies = 0;
  copyMs = 0;
  copyReadMs = 0;
  copyWriteMs = 0;
  /** from apply() to the disk write's issue, first touches / the rest */
  issueFT = hist();
  issueRest = hist();
  issueFTms = 0;
  issueRestMs = 0;
  /** the rest that waited ≥ 0.5 ms for their issue (behind an earlier request) */
  restBlocked = 0;
  copyHist = hist();
  diskMs = 0;
  constructor() {
    // one timer per process (the file is per process): it writes the newest filter's figures
    latestStats = this;
    if (statsTimer) return;
    statsTimer = setInterval(() => {
      try {
        writeFileSync(`${STATS_DIR}/cbw-${process.pid}.json`, JSON.stringify({ ...latestStats, cycles: cycleStats, syncs: syncStats }));
      } catch {
        /* best effort */
      }
    }, 1000);
    statsTimer.unref();
  }
}
let latestStats: CbwStats | undefined;
let statsTimer: NodeJS.Timeout | undefined;

/**
 * Cluster buffers kept for copies: as many as the writer's requests in flight (128 × 64 KiB =
 * 8 MiB), each of which may copy a cluster of its own at once. At 64, every burst of first
 * touches past 64 allocated fresh buffers that, having waited on hidden's writeback, were old
 * enough to need a major GC: 2480 of them (155 MiB) in bench/pair's 10 s async run, up to 46 MiB
 * of the secondary's ArrayBuffers at its peak RSS.
 */
const SPARE_BUFFERS = REPLICA_MAX_INFLIGHT;
/** the longest run of adjacent clusters one copy reads and writes at once (a 1 MiB write's 16 clusters of 64 KiB) */
const RUN_BYTES = 1024 * 1024;
/** run buffers (RUN_BYTES each) kept for copies: one per request in flight of a sequential writer at QD8 */
const SPARE_RUN_BUFFERS = 8;
/** the most clusters one precopy claims (1 GiB at 64 KiB: a Map entry and a promise each); the resync's writes copy the rest */
export const PRECOPY_LIMIT = 16384;

/** An order chain: the requests of one writer (a pair link's data connection), in arrival order. */
interface Chain {
  /** the last request's disk write: true once issued, false when the request failed before it */
  tail: Promise<boolean>;
  /** its requests taken and not finished */
  queued: number;
  /** arrival order kept (an async primary); undefined: the filter's `ordered` */
  ordered: boolean | undefined;
  /** the requests of the chains before this one (a retired writer's) finished; null once they have */
  after: Promise<void> | null;
  /** told when `queued` drops to 0 */
  idle: Array<() => void>;
}

/** A writer's view of the filter (CbwFilter.writer): its writes go in its own order chain; reads and the rest as the filter's. */
class CbwWriter extends Filter {
  readonly driver = 'copy-before-write-writer';
  constructor(
    cbw: CbwFilter,
    private readonly apply: (offset: number, length: number, op: () => Promise<void>) => Promise<void>,
  ) {
    super(cbw);
  }
  private get disk(): CompleteBlockNode {
    return (this.next as CbwFilter).next;
  }
  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return this.apply(offset, data.length, () => this.disk.write(offset, data, o));
  }
  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return this.apply(offset, length, () => this.disk.writeZeroes(offset, length, o));
  }
  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return this.apply(offset, length, () => this.disk.trim(offset, length, o));
  }
  /** the disk belongs to the daemon */
  override close(): Promise<void> {
    return Promise.resolve();
  }
}

export class CbwFilter extends Filter {
  readonly driver = 'copy-before-write';
  /** one byte per cluster: copied to hidden this epoch */
  private readonly copied: Uint8Array;
  private readonly copying = new Map<number, Promise<void>>();
  readonly gate = new WriteGate();
  /** no restore point: no copy-before-write (set by the secondary while the gate is held or no writer is connected) */
  bypass = false;
  /** the chain of writes made on the filter itself (tests, a plain primary's export); a pair writer has its own (`writer()`) */
  private readonly own: Chain = { tail: Promise.resolve(true), queued: 0, ordered: undefined, after: null, idle: [] };
  /** the chains with requests in flight: a new writer's writes go after theirs (`writer()`) */
  private readonly busy = new Set<Chain>();
  /** requests taken and not yet finished (their disk write completed, or they failed before it), in arrival order */
  private readonly arrived = new Set<{ offset: number; end: number; done: Promise<void> }>();
  /**
   * Issue the disk writes in arrival order (the order chain): what an async primary's pipelined
   * forwards need (replication-filter.ts `ordered`). A pair writer's chain (`writer()`) takes its
   * own, from its primary's hello's `protocol`: false for sync, which never has a write in flight
   * that depends on another in flight (a write that started after another completed was sent
   * after that one's reply), so a request's disk write waits only for the earlier requests it
   * overlaps, not for every earlier one's copy-before-write. This one is for the writes made on
   * the filter itself (a plain primary's export, tests); taken per request on arrival; true by default.
   */
  ordered = true;
  /** requests taken and not finished, every chain */
  private queued = 0;
  /**
   * Cluster buffers for the copies, used again: a resync copies every cluster it writes, and
   * fresh 64 KiB buffers each time are garbage the GC lets pile up (the secondary's peak RSS).
   */
  private readonly spare: Buffer[] = [];
  /** buffers of maxRun clusters for runs of more than one cluster */
  private readonly spareRuns: Buffer[] = [];
  /** buffers the copies allocated (the rest were spares used again), for tests */
  readonly copyBuffers = { allocated: 0 };
  /** the most clusters one copy takes (RUN_BYTES worth, at least one) */
  private readonly maxRun: number;
  /** the precopies running: told that a writer waits for cluster `c`, being copied (copyOnce) */
  private readonly claimWaits = new Set<(c: number) => void>();
  private readonly stats = STATS_DIR ? new CbwStats() : undefined;

  constructor(
    next: BlockNode,
    private readonly hidden: CompleteBlockNode,
    readonly clusterSize: number,
    /** a copy into the hidden disk failed (failure case 3: an event for the HA side) */
    private readonly onCopyError: (err: BlkrepError) => void = () => {},
    /** the disk write itself failed (failure case 4: the secondary's disk is Failed) */
    private readonly onDiskError: (err: Error) => void = () => {},
  ) {
    super(next);
    this.copied = new Uint8Array(Math.ceil(this.next.size / clusterSize));
    this.maxRun = Math.max(1, Math.floor(RUN_BYTES / clusterSize));
  }

  /** the writer's writes taken and not yet finished: waiting in the order chain, copying, or on the disk */
  get writesInFlight(): number {
    return this.queued;
  }

  /** clusters copied this epoch */
  get copiedClusters(): number {
    let n = 0;
    for (const b of this.copied) n += b;
    return n;
  }

  /** Mark clusters the hidden disk holds already (at start, from its allocation map). */
  markCopied(offset: number, length: number): void {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last && c < this.copied.length; c++) this.copied[c] = 1;
  }

  /**
   * Before a bitmap resync writes `runs` (secondary.ts, before its welcome): claim the clusters of
   * them not copied yet (at most `limit`, the lowest), as a run's clusters are claimed ("being
   * copied": a writer to one waits for its copy), then copy the old content of each into the hidden
   * disk in ascending order, `depth` at a time, with plain writes. The copies done go in rounds:
   * one hidden flush for every copy completed before it (the qcow2 cycle; the copies go on
   * meanwhile), then their bits are set and their writers released. So the resync's writes, also
   * ascending, start as soon as their clusters are done and skip their own FUA copy, whose sync
   * cycles (one per few dozen scattered clusters) were most of a short resync's time. The rule
   * holds per cluster: its old content is durable (its round's flush) before a disk write of it is
   * issued. The claims are taken when the returned promise resolves (the welcome may go then);
   * `done` settles when every claim is released. A failed copy or flush, or `stop()`, ends the
   * precopy: the claims left are released with their bits clear, and their writers copy them as
   * usual (with FUA, failing as case 3 if that fails too); `done` then rejects with the failure.
   * `waited`: the claimed clusters a writer waited for (the resync's writes caught up with the
   * copies or their rounds), each counted once.
   * A crash before a round's flush leaves hidden clusters no L2 entry maps yet (the qcow2
   * writeback order), or mapped with the disk's content, which no write changed meanwhile.
   * Through the gate, as one write until `done` (a checkpoint's reset waits for it).
   */
  async precopy(
    runs: ReadonlyArray<{ offset: number; length: number }>,
    o: { depth?: number; limit?: number; stop?: () => boolean } = {},
  ): Promise<{ claimed: number; done: Promise<{ clusters: number; bytes: number; rounds: number; waited: number }> }> {
    await this.gate.enter();
    const todo: number[] = [];
    const release: Array<(() => void) | undefined> = [];
    const limit = o.limit ?? PRECOPY_LIMIT;
    for (const c of this.uncopiedClusters(runs)) {
      if (todo.length >= limit) break;
      let r!: () => void;
      this.copying.set(c, new Promise<void>((x) => (r = x)));
      todo.push(c);
      release.push(r);
    }
    const done = this.copyClaimed(todo, release, Math.max(1, o.depth ?? 32), o.stop).finally(() => this.gate.leave());
    return { claimed: todo.length, done };
  }

  /** precopy's copies and rounds; every claim of `todo` is released when it settles. */
  private async copyClaimed(todo: number[], release: Array<(() => void) | undefined>, depth: number, stop?: () => boolean): Promise<{ clusters: number; bytes: number; rounds: number; waited: number }> {
    const free = (i: number, copied: boolean): void => {
      const r = release[i];
      if (!r) return;
      release[i] = undefined;
      if (copied) this.copied[todo[i]!] = 1;
      this.copying.delete(todo[i]!);
      r();
    };
    let next = 0;
    /** indexes of todo copied, not yet flushed */
    let written: number[] = [];
    let clusters = 0;
    let bytes = 0;
    let rounds = 0;
    let failure: { err: unknown } | undefined;
    let workersDone = false;
    let wake: (() => void) | undefined;
    /** claimed clusters a writer waited for (todo is ascending) */
    const waitedFor = new Set<number>();
    const onWait = (c: number): void => {
      let lo = 0;
      let hi = todo.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (todo[mid]! < c) lo = mid + 1;
        else hi = mid;
      }
      if (todo[lo] === c && release[lo]) waitedFor.add(c);
    };
    this.claimWaits.add(onWait);
    const worker = async (): Promise<void> => {
      const buf = Buffer.allocUnsafe(this.clusterSize);
      while (!failure && next < todo.length) {
        if (stop?.()) {
          failure ??= { err: new BlkrepError('ERR_PAIR_LINK_DOWN', 'the precopy stopped: the resync it was for is gone', { errno: 'EIO' }) };
          break;
        }
        const i = next++;
        const at = todo[i]! * this.clusterSize;
        const old = buf.subarray(0, Math.min(this.clusterSize, this.next.size - at));
        try {
          await this.next.readInto(at, old);
          await this.hidden.write(at, old);
        } catch (err) {
          failure ??= { err };
          free(i, false);
          break;
        }
        written.push(i);
        bytes += old.length;
        wake?.();
      }
    };
    const flusher = async (): Promise<void> => {
      for (;;) {
        if (written.length === 0) {
          if (workersDone) return;
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
          continue;
        }
        const round = written;
        written = [];
        try {
          await this.hidden.flush();
        } catch (err) {
          failure ??= { err };
          for (const i of round) free(i, false);
          continue;
        }
        rounds++;
        clusters += round.length;
        for (const i of round) free(i, true);
      }
    };
    const flushing = flusher();
    try {
      await Promise.all(Array.from({ length: Math.min(depth, Math.max(1, todo.length)) }, worker));
      workersDone = true;
      wake?.();
      await flushing;
    } finally {
      this.claimWaits.delete(onWait);
    }
    // claims never copied (a failure or stop): their writers copy them
    for (let i = 0; i < todo.length; i++) free(i, false);
    if (failure) throw failure.err;
    return { clusters, bytes, rounds, waited: waitedFor.size };
  }

  /** The clusters `runs` touch (in any order, overlapping) not copied this epoch and not being copied, ascending, each once. */
  private *uncopiedClusters(runs: ReadonlyArray<{ offset: number; length: number }>): Generator<number> {
    let c = 0;
    for (const r of [...runs].sort((a, b) => a.offset - b.offset)) {
      if (r.length <= 0) continue;
      const last = Math.min(Math.floor((r.offset + r.length - 1) / this.clusterSize), this.copied.length - 1);
      for (c = Math.max(c, Math.floor(r.offset / this.clusterSize)); c <= last; c++) if (!this.copied[c] && !this.copying.has(c)) yield c;
    }
  }

  /** A new epoch: nothing copied. Only while the gate is held (checkpoint step 6). */
  reset(): void {
    this.copied.fill(0);
  }

  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return this.apply(this.own, offset, data.length, () => this.next.write(offset, data, o));
  }

  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return this.apply(this.own, offset, length, () => this.next.writeZeroes(offset, length, o));
  }

  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return this.apply(this.own, offset, length, () => this.next.trim(offset, length, o));
  }

  /**
   * A pair writer's node (data-token.ts: one per writer token, so per pair link): its writes go
   * through this filter in an order chain of their own, `ordered` as its primary's protocol says.
   * The chain belongs to the writer: a request of a retired writer that fails (its copy failed)
   * fails the ones queued behind it on that writer's connection only, never the new writer's
   * (before, one chain spanned links: an old sync link's request failing while still queued could
   * fail the new async link's first write with ERR_PAIR_ORDER, a spurious degrade and resync).
   * And a retired writer's writes never land after the new writer's: each write of the new chain
   * waits, before its disk write is issued, until every request taken on the chains before it
   * has finished (its disk write completed, or it failed) — ordered or not, overlapping or not.
   */
  writer(ordered: boolean): CompleteBlockNode {
    const earlier = [...this.busy].map((c) => new Promise<void>((r) => c.idle.push(r)));
    const chain: Chain = { tail: Promise.resolve(true), queued: 0, ordered, after: earlier.length ? Promise.all(earlier).then(() => undefined) : null, idle: [] };
    if (chain.after) void chain.after.then(() => (chain.after = null));
    return new CbwWriter(this, (offset, length, op) => this.apply(chain, offset, length, op));
  }

  /**
   * Copy the old clusters, then write the disk once every earlier request it overlaps has
   * finished and (ordered) the request before this one in its chain was issued.
   */
  private apply(chain: Chain, offset: number, length: number, op: () => Promise<void>): Promise<void> {
    // the place in the chain is taken now, in the caller's order (before any await)
    const before = chain.tail;
    const ordered = chain.ordered ?? this.ordered;
    let issued!: (ok: boolean) => void;
    chain.tail = new Promise<boolean>((r) => (issued = r));
    chain.queued++;
    this.busy.add(chain);
    this.queued++;
    const end = offset + length;
    // the earlier requests this one overlaps, as they arrived: its disk write goes after theirs
    const overlap = this.overlapping(offset, end);
    let finished!: () => void;
    const mine = { offset, end, done: new Promise<void>((r) => (finished = r)) };
    this.arrived.add(mine);
    const st = this.stats;
    const t0 = st ? performance.now() : 0;
    return gated(this.gate, async () => {
      const ft = !this.bypass && !this.allCopied(offset, length);
      if (ft) await this.copyOld(offset, length);
      // a new writer's requests go after every request of the writers before it
      if (chain.after) await chain.after;
      if (ordered && !(await before)) {
        throw new BlkrepError('ERR_PAIR_ORDER', `a replica write before this one (${length} bytes at offset ${offset}) failed: later writes are not applied, so the disk stays a state the primary's was in`, {
          errno: 'EIO',
          details: { offset, length },
        });
      }
      if (overlap) await Promise.all(overlap);
      if (st) {
        const ms = performance.now() - t0;
        st.requests++;
        if (ft) {
          st.firstTouch++;
          st.issueFT[bucket(ms)]!++;
          st.issueFTms += ms;
        } else {
          st.issueRest[bucket(ms)]!++;
          st.issueRestMs += ms;
          if (ms >= 0.5) st.restBlocked++;
        }
      }
      const done = this.toDisk(op);
      issued(true);
      await done;
    }).finally(() => {
      this.arrived.delete(mine);
      finished();
      this.queued--;
      // the chain is empty: the next request starts a new one (a failure poisons only its followers)
      if (--chain.queued === 0) {
        chain.tail = Promise.resolve(true);
        this.busy.delete(chain);
        for (const r of chain.idle.splice(0)) r();
      }
      issued(false); // no effect once issued
    });
  }

  /** The completions of the requests taken and not finished that overlap [offset, end), or null when none does (no allocation on the common path). */
  private overlapping(offset: number, end: number): Array<Promise<void>> | null {
    let found: Array<Promise<void>> | null = null;
    for (const w of this.arrived) {
      if (w.offset < end && offset < w.end) (found ??= []).push(w.done);
    }
    return found;
  }

  /**
   * For the view's reads (secondary.ts ViewNode): a read through active → hidden → disk looks up
   * hidden's L2 and then, for a cluster not copied, reads the disk, in two steps; a copy of that
   * cluster and the disk write behind it may land in between, and the disk read would return
   * the new data. The copied bits of the read's clusters before it; null when all are copied
   * (hidden holds them until the next epoch: nothing to check after the read).
   */
  copiedBefore(offset: number, length: number): Uint8Array | null {
    if (this.allCopied(offset, length)) return null;
    const first = Math.floor(offset / this.clusterSize);
    return this.copied.slice(first, Math.floor((offset + length - 1) / this.clusterSize) + 1);
  }

  /**
   * The parts of [offset, offset+length) in clusters whose copy completed since `before`
   * (copiedBefore): a read of them may have seen the disk after the write that followed the copy,
   * so the view reads them again (hidden holds their old content now, durable before any disk
   * write of them was issued).
   */
  copiedSince(before: Uint8Array, offset: number, length: number): { offset: number; length: number }[] {
    const out: { offset: number; length: number }[] = [];
    const first = Math.floor(offset / this.clusterSize);
    const end = offset + length;
    for (let i = 0; i < before.length; i++) {
      if (before[i] || !this.copied[first + i]) continue;
      const from = Math.max(offset, (first + i) * this.clusterSize);
      const to = Math.min(end, (first + i + 1) * this.clusterSize);
      const prev = out[out.length - 1];
      if (prev && prev.offset + prev.length === from) prev.length += to - from;
      else out.push({ offset: from, length: to - from });
    }
    return out;
  }

  /** Every cluster of [offset, offset+length) copied this epoch: the common case, checked without a promise or an array. */
  private allCopied(offset: number, length: number): boolean {
    if (length <= 0) return true;
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = Math.floor(offset / this.clusterSize); c <= last; c++) if (!this.copied[c]) return false;
    return true;
  }

  private async toDisk(op: () => Promise<void>): Promise<void> {
    try {
      await op();
    } catch (err) {
      this.onDiskError(err as Error);
      throw err;
    }
  }

  /** The daemon owns the disk; the secondary owns the hidden disk. */
  override close(): Promise<void> {
    return Promise.resolve();
  }

  /**
   * Copy the clusters of [offset, offset+length) not copied this epoch. Adjacent clusters that no
   * other request is copying go as one run (up to RUN_BYTES): one disk read, one hidden write
   * (one allocation of a contiguous host run, one pwrite, one FUA flush) instead of one of each
   * per cluster; a 1 MiB write on a fresh epoch touches 16 clusters.
   */
  private async copyOld(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    // a precopy that stopped releases its claims with their bits clear: copy those here
    do await this.copyOnce(offset, length);
    while (!this.allCopied(offset, length));
  }

  /** One pass of copyOld: copy the clusters no one copies, wait for those another request (or the precopy) copies. */
  private async copyOnce(offset: number, length: number): Promise<void> {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    const waits: Promise<void>[] = [];
    let c = first;
    while (c <= last) {
      if (this.copied[c]) {
        c++;
        continue;
      }
      const busy = this.copying.get(c);
      if (busy) {
        for (const f of this.claimWaits) f(c);
        waits.push(busy);
        c++;
        continue;
      }
      let n = 1;
      while (n < this.maxRun && c + n <= last && !this.copied[c + n] && !this.copying.has(c + n)) n++;
      const start = c;
      const p = this.copyRun(start, n).finally(() => {
        for (let i = start; i < start + n; i++) this.copying.delete(i);
      });
      for (let i = start; i < start + n; i++) this.copying.set(i, p);
      waits.push(p);
      c += n;
    }
    if (waits.length === 1) await waits[0];
    else if (waits.length) await Promise.all(waits);
  }

  /** Copy clusters [c, c+n) into hidden (FUA), then set their bits. */
  private async copyRun(c: number, n: number): Promise<void> {
    const at = c * this.clusterSize;
    const length = Math.min(n * this.clusterSize, this.next.size - at);
    const pool = n === 1 ? this.spare : this.spareRuns;
    let buf = pool.pop();
    if (!buf) {
      buf = Buffer.allocUnsafe((n === 1 ? 1 : this.maxRun) * this.clusterSize);
      this.copyBuffers.allocated++;
    }
    try {
      const old = buf.subarray(0, length);
      const st = this.stats;
      const t0 = st ? performance.now() : 0;
      // bulk: a run's read (up to 1 MiB) is tried on the loop with RWF_NOWAIT, as a single
      // cluster's 64 KiB is, not sent through the thread pool (raw.ts BULK_NOWAIT_MAX)
      await this.next.readInto(at, old, n === 1 ? undefined : { bulk: true });
      const t1 = st ? performance.now() : 0;
      if (st) {
        // the same as FUA (qcow2 node.ts: write, then the image's flush), timed apart
        await this.hidden.write(at, old);
        st.copyWriteMs += performance.now() - t1;
        await this.hidden.flush();
      } else await this.hidden.write(at, old, { fua: true });
      // test hook (crash-hook.ts): BLKREP_TEST_FAIL_AT=cbw-copy fails the first copy with EIO after
      // its I/O (BLKREP_TEST_FAIL_COUNT: the K-th; BLKREP_TEST_HOLD_UNTIL: held in flight until a file exists)
      const fault = heldFaultPoint('cbw-copy');
      if (fault) await fault;
      if (st) {
        const t2 = performance.now();
        st.copies++;
        st.copyReadMs += t1 - t0;
        st.copyMs += t2 - t0;
        st.copyHist[bucket(t2 - t0)]!++;
      }
      // only after a success: a failed write may still hold the buffer
      if (pool.length < (n === 1 ? SPARE_BUFFERS : SPARE_RUN_BUFFERS)) pool.push(buf);
      else freeBufferNow(buf);
    } catch (err) {
      const which = n === 1 ? `cluster ${c}` : `clusters ${c}–${c + n - 1}`;
      const e = new BlkrepError('ERR_PAIR_CBW', `copy-before-write of ${which} (bytes ${at}–${at + length}) into the hidden disk failed: ${(err as Error).message}; the disk was not written`, {
        errno: (err as { errno?: string }).errno === 'ENOSPC' ? 'ENOSPC' : 'EIO',
        cause: err,
        details: n === 1 ? { cluster: c, offset: at, length } : { cluster: c, clusters: n, offset: at, length },
      });
      this.onCopyError(e);
      throw e;
    }
    this.copied.fill(1, c, c + n);
  }
}
