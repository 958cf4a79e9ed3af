/**
 * The replication filter: the primary's side of the pair's data path (replication.md §2–3).
 * It sits above the export's image and below its dirty-tracking filter; reads, extents and cache
 * go to the local disk (`next`) only. Every write, write-zeroes and trim goes to the local disk
 * and, while the filter forwards, to the secondary (`target`, an NBD client's node):
 *
 *   sync    the request completes when both replied; a FLUSH is a local flush plus a forwarded
 *           FLUSH; FUA is forwarded as FUA. A trim is forwarded as write-zeroes (a target may
 *           ignore a trim, and both disks must read the same), and written so on the local disk
 *           too (a qcow2 disk keeps the data of a trim's partial clusters).
 *   async   the request completes after the local write; a copy goes into a bounded queue
 *           (`queueBytes`), forwarded in order with write-order fidelity: barrier groups as DRBD's
 *           epochs — a group closes when any of its writes completes to the client, on a FLUSH,
 *           or at 2048 writes, and group g+1 is sent only once every write of g was replied. So
 *           the secondary's disk is always a state the primary's disk was in, only older.
 *           `ordered` (a blkrep secondary says so in its welcome: it applies one connection's
 *           writes in arrival order, cbw-filter.ts): writes are sent as their local writes
 *           complete, without waiting for the group before — a write that may depend on another
 *           (started after it completed) completes after it, so it is sent after it, and the
 *           secondary applies it after it. Only a FLUSH still waits for every reply before it.
 *
 * The peer bitmap (a PersistentBitmap beside the disk, crash-safe through its activity log)
 * covers every region the secondary may miss: each request takes a ticket (beforeWrite: the
 * region is durable in the log before the local write is issued) and gives it back
 * (afterWrite: the bits are set) once the forward was replied or dropped. A forwarded FLUSH that
 * succeeds clears the granules replied before it was sent and not written since (the mirror's
 * "unstable" rule: a cleared bit is stored only once the secondary holds the data stably).
 *
 * A full async queue (DRBD's congestion) is met by the `onCongestion` policy: `block` (the
 * default, DRBD's): the write that does not fit waits, with every write after it, for room that
 * the secondary's replies make, so the secondary stays UpToDate; a wait with no reply for
 * `congestionTimeoutMs` degrades (a secondary that stops answering never holds a client's write
 * longer than that). `pull-ahead`: the filter degrades at once (queue-full) and resyncs later.
 *
 * A forwarding failure (a forward rejected, the queue full under pull-ahead) never fails the client's request:
 * the filter degrades — forwarding stops, what was queued is dropped (its bits are set), later
 * writes only set bits — and calls `onDegraded(reason)`. The primary (primary.ts) reconnects and
 * resyncs by the peer bitmap with a mirror job: quiesce() first (the writes in flight set their
 * bits before the mirror copies the bitmap), then, while it runs, writes go through the job's front
 * end (resync()), and in the job's consistent instant attach() makes the filter forward again.
 *
 * Modes: detached (no peer: a pass-through with no cost), forwarding, degraded, resyncing.
 */
import type { BlockNode, CompleteBlockNode, IoOptions, WriteOptions, ZeroOptions } from '../api/block.js';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import type { PersistentBitmap, WriteTicket } from '../bitmap/persistent.js';
import { Filter } from '../block/filter.js';
import { completeNode } from '../block/node.js';
import { freeBufferNow } from '../util/free-buffer.js';

export type ReplicationProtocol = 'sync' | 'async';
export type ReplicationMode = 'detached' | 'forwarding' | 'degraded' | 'resyncing';
/** what an async primary does when a write does not fit in the queue (DRBD's on-congestion) */
export type CongestionPolicy = 'block' | 'pull-ahead';
export const CONGESTION_POLICIES: readonly CongestionPolicy[] = ['block', 'pull-ahead'];
/**
 * DRBD's default: a write waits for room in the buffer and the peer stays UpToDate (pull-ahead
 * gives up the secondary's currency, and a resync, for the writer's latency)
 */
export const DEFAULT_ON_CONGESTION: CongestionPolicy = 'block';
/**
 * block: a write that waits for room while the secondary replies to nothing for this long
 * degrades the filter (reason congestion-timeout): the bound on a client's wait when the
 * secondary stops answering without closing its connection (DRBD: timeout × ko-count, 6 s × 7)
 */
export const DEFAULT_CONGESTION_TIMEOUT_MS = 10_000;

/** block: how long writes waited for room in the queue */
export interface CongestionStats {
  /** writes that waited */
  waits: number;
  /** their waits added up, ms */
  waitedMs: number;
  /** the longest wait, ms */
  maxWaitMs: number;
  /** writes waiting now */
  waiting: number;
  /** congestion episodes (started: a first write waited; ended: no write waits and the queue is at most half full) */
  episodes: number;
  /** writes let in over the limit because the queue cannot drain without them (a checkpoint's cut, a barrier group's head) */
  overLimit: number;
}

/**
 * The async queue's default bound: DRBD's own buffer (max-buffers 2048 pages), 8 MiB. A primary's
 * RSS is about its base (~100 MiB after the first connection's full copy; ~75–80 MiB for a daemon
 * that does not replicate) plus 1.1 × the queue (payloads in slabs, QUEUE_ENTRY_BYTES of
 * bookkeeping per write counted in it, allocator slack) plus what a degrade's resync holds (its
 * mirror's buffers): 64 MiB made the issue's 150 MiB impossible (bench/pair, loaded: 158–181 MiB
 * peak). A full queue under block (a strict secondary that applies fewer writes than the primary
 * takes), loaded machine, VmHWM of the async primary: 16 MiB 125–150 MiB (median 140), 8 MiB
 * 126–133 (median 129); the secondary stayed connected in every run (src/pair/README.md "RSS rule").
 */
export const DEFAULT_QUEUE_BYTES = 8 * 1024 * 1024;
/** DRBD's max-epoch-size: a barrier group closes at this many writes */
export const MAX_GROUP_WRITES = 2048;
/**
 * An ordered target: at most this many forwards in flight. The rest wait in the queue as plain
 * items instead of all being handed to the NBD client at once (each there costs its request
 * state and promise chain, kept in the client's own waiting list: to a blkrep secondary it puts at
 * most REPLICA_MAX_INFLIGHT (data-token.ts) on the wire, to a plain NBD target 64).
 */
export const MAX_SENDING = 256;

type Op = 'write' | 'write-zeroes' | 'trim' | 'flush';

interface Item {
  op: Op;
  /** the barrier group (async) */
  group?: number;
  offset: number;
  length: number;
  data?: Buffer | undefined;
  fua?: boolean;
  noHole?: boolean;
  ticket?: WriteTicket | undefined;
  sent: boolean;
  done: boolean;
  /** bytes this item counts in the queue (0 once sent and replied, or dropped with the queue) */
  queuedBytes?: number;
  /** counted in the queue's entries (QUEUE_ENTRY_BYTES each) until replied or dropped */
  entry?: boolean;
  /** the async queue's slab its payload copy is cut from (released once replied or dropped) */
  slab?: Slab | undefined;
  /** where in the slab: `data` is made a view of it only when sent (a view is 95 bytes of heap) */
  at?: number;
  /** the barrier group it was added to (async): its `undone` counts this item until settled */
  owner?: Group | undefined;
}

interface Group {
  id: number;
  /** writes of the group still in their local write */
  pendingLocal: number;
  /** writes of the group (for the 2048 limit) */
  members: number;
  /** NO_ITEMS until the first (most groups hold one write: a literal [item] of one slot) */
  items: Item[];
  /** items added and not yet settled (replied or dropped): the group is replied at 0 */
  undone: number;
  /** items[0…sentUpTo) were all sent (the head loop sends from here, not from 0 at every reply) */
  sentUpTo: number;
  closed: boolean;
  /** dropped with the queue (forwarding stopped) */
  dropped: boolean;
}

/** a group's items before its first: shared, never pushed to (addItem replaces it) */
const NO_ITEMS = Object.freeze([]) as unknown as Item[];

/**
 * The async queue's payload copies are cut from slabs of this size (a payload over a quarter of
 * it gets an exact-size slab of its own): one allocation per 64 queued 4 KiB writes instead of
 * one ArrayBuffer (215 bytes of heap and a malloc'd backing store) each.
 */
export const SLAB_BYTES = 256 * 1024;
/**
 * What one queued write counts against the queue's limit beside its payload: its bookkeeping (a
 * barrier group, an item, the peer bitmap's ticket: 244–271 bytes of heap measured, a test bounds
 * it at 384) and the heap's slack around it. So `--queue` bounds the memory of a queue of 512-byte
 * writes too (half of it bookkeeping), not only its payloads.
 */
export const QUEUE_ENTRY_BYTES = 512;

/** A slab of payload copies: bump-allocated, reset for reuse once every copy in it was released. */
interface Slab {
  buf: Buffer;
  used: number;
  /** copies cut from it not yet released */
  live: number;
}

export interface ReplicationFilterOptions {
  protocol: ReplicationProtocol;
  /** the async queue's bound in bytes: payloads and QUEUE_ENTRY_BYTES per write (default 8 MiB) */
  queueBytes?: number;
  /** async: a write that does not fit in the queue waits (block, the default) or degrades (pull-ahead) */
  onCongestion?: CongestionPolicy;
  /** block: a wait with no reply from the secondary for this long degrades (default 10 s) */
  congestionTimeoutMs?: number;
  /** block: a first write waited (started), or none waits and the queue is at most half full again (ended) */
  onCongestionChange?: (state: 'started' | 'ended', info: { queueBytes: number; limit: number; waits: number; waitedMs: number; ms: number }) => void;
  /** the peer bitmap; the filter takes a ticket for every modifying request */
  peerBitmap?: PersistentBitmap;
  /** forwarding stopped: why (queue-full, forward-failed: …, detached) */
  /** `from`: the mode degraded from (forwarding: the secondary held every completed write until now) */
  onDegraded?: (reason: string, error: BlkrepError | undefined, from: ReplicationMode) => void;
  /**
   * A write, write-zeroes or trim failed on the local disk (failure case 1, replication.md §4): the
   * client gets the disk's error; the secondary may hold the write, so its region stays in the peer
   * bitmap (a forwarded FLUSH does not clear it) until a resync copies it.
   */
  onLocalError?: (op: Op, offset: number, length: number, error: BlkrepError) => void;
}

export class ReplicationFilter extends Filter {
  readonly driver = 'replication';
  protocol: ReplicationProtocol;
  queueLimit: number;
  onCongestion: CongestionPolicy;
  congestionTimeoutMs: number;
  private onCongestionChange: ReplicationFilterOptions['onCongestionChange'];
  /** block: writes waiting for room, oldest first */
  private waiters: Waiter[] = [];
  /** block: the congestion episode under way (since when, and its counters at its start) */
  private episode: { since: number; waits: number; waitedMs: number } | undefined;
  /** block: the last reply of a forward (the congestion timeout counts from it) */
  private lastReplyAt = 0;
  private congestionTimer: NodeJS.Timeout | undefined;
  private readonly cong: CongestionStats = { waits: 0, waitedMs: 0, maxWaitMs: 0, waiting: 0, episodes: 0, overLimit: 0 };
  private peer: PersistentBitmap | undefined;
  private target: CompleteBlockNode | undefined;
  private resyncFront: CompleteBlockNode | undefined;
  private current: ReplicationMode = 'detached';
  private onDegraded: ReplicationFilterOptions['onDegraded'];
  private onLocalError: ReplicationFilterOptions['onLocalError'];
  /** granules whose local write failed since the last resync: never cleared by a forwarded FLUSH */
  private localFailed: DirtyBitmap | undefined;
  /** writes in modify() (local write and forward), for the order of overlapping ones */
  private readonly modifying = new Set<Modifying>();
  /** bumped at every mode change: a request compares it to learn it raced one */
  private era = 0;

  // async queue: groups[groupsHead…] are the live groups, oldest first
  private groups: Group[] = [];
  private groupsHead = 0;
  /** ordered target: items in the order their local writes completed, sendQueue[sendHead…] not yet looked at */
  private ordered = false;
  private sendQueue: Item[] = [];
  private sendHead = 0;
  /** forwards of the ordered queue in flight */
  private sending = 0;
  /** bumped when the queue is dropped: a forward of an older queue no longer counts in `sending` */
  private queueGeneration = 0;
  private open: Group;
  private nextGroupId = 1;
  private queued = 0;
  /** sending stops after this group (a checkpoint's cut) */
  private pauseAfter: number | undefined;
  private drainWaiters: Array<{ group: number; resolve: () => void; reject: (e: Error) => void }> = [];
  /** the slab payload copies are cut from now (the others are alive while a copy in them is) */
  private slab: Slab | undefined;
  /** bytes of the slabs alive: the queue's payload memory, bounded by queueLimit */
  private slabBytes = 0;
  /**
   * Emptied slabs of the standard size kept for the next ones (with slabBytes, at most queueLimit):
   * a slab dropped instead lives on until a major GC (it has been in the queue long enough to be
   * promoted), and under a full queue a primary emptied 20 a second (bench/pair async, 50 MiB of
   * garbage slabs in 10 s, most of its peak RSS's ArrayBuffers).
   */
  private readonly freeSlabs: Buffer[] = [];
  /** slabs allocated (not taken from freeSlabs) and exact-size copies made, for status-less tests */
  readonly slabStats = { allocated: 0, reused: 0, exact: 0 };
  /** queued writes not yet replied: with slabBytes, entries × QUEUE_ENTRY_BYTES ≤ queueLimit */
  private entries = 0;

  // sync holding (a checkpoint's cut) and requests in flight
  private holding: { promise: Promise<void>; release: () => void } | undefined;
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];

  // granules replied since the last forwarded FLUSH was sent (cleared from the peer bitmap when it succeeds)
  private replied: DirtyBitmap | undefined;

  /** counters, for status and tests */
  readonly stats = { forwardedWrites: 0, forwardedBytes: 0, forwardedFlushes: 0, degradations: 0 };

  constructor(next: BlockNode, options: ReplicationFilterOptions) {
    super(next);
    this.protocol = options.protocol;
    this.queueLimit = options.queueBytes ?? DEFAULT_QUEUE_BYTES;
    this.onCongestion = options.onCongestion ?? DEFAULT_ON_CONGESTION;
    this.congestionTimeoutMs = options.congestionTimeoutMs ?? DEFAULT_CONGESTION_TIMEOUT_MS;
    this.onCongestionChange = options.onCongestionChange;
    this.onDegraded = options.onDegraded;
    this.onLocalError = options.onLocalError;
    this.open = this.newGroup();
    if (options.peerBitmap) this.setPeerBitmap(options.peerBitmap);
  }

  get mode(): ReplicationMode {
    return this.current;
  }

  /** bytes waiting in the async queue (sent or not, not yet replied) */
  get queueBytes(): number {
    return this.queued;
  }

  /**
   * The memory the async queue really holds for payloads: the sizes of the distinct ArrayBuffers
   * behind the queued items' data (a slab counts whole), plus the current slab kept for reuse.
   * Slabs are counted against the queue's limit, so this stays ≤ queueLimit — a test checks it.
   */
  get retainedBytes(): number {
    const seen = new Set<ArrayBufferLike>();
    let total = 0;
    const count = (it: Item): void => {
      const b = it.slab?.buf.buffer ?? it.data?.buffer;
      if (b && !seen.has(b)) {
        seen.add(b);
        total += b.byteLength;
      }
    };
    for (const g of this.groups) for (const it of g.items) count(it);
    for (const it of this.sendQueue) count(it);
    const cur = this.slab?.buf.buffer;
    if (cur && !seen.has(cur)) total += cur.byteLength;
    for (const b of this.freeSlabs) total += b.length;
    return total;
  }

  get peerBitmap(): PersistentBitmap | undefined {
    return this.peer;
  }

  /** Configure for a new replication (detached only). */
  configure(options: ReplicationFilterOptions): void {
    if (this.current !== 'detached') throw new BlkrepError('ERR_PAIR_STATE', `the replication filter is ${this.current}: detach it first`);
    this.protocol = options.protocol;
    this.queueLimit = options.queueBytes ?? DEFAULT_QUEUE_BYTES;
    this.onCongestion = options.onCongestion ?? DEFAULT_ON_CONGESTION;
    this.congestionTimeoutMs = options.congestionTimeoutMs ?? DEFAULT_CONGESTION_TIMEOUT_MS;
    this.onCongestionChange = options.onCongestionChange;
    this.onDegraded = options.onDegraded;
    this.onLocalError = options.onLocalError;
    if (options.peerBitmap) this.setPeerBitmap(options.peerBitmap);
  }

  private setPeerBitmap(b: PersistentBitmap): void {
    if (b.bitmap.size !== this.size) throw new BlkrepError('ERR_PAIR_SIZE', `the peer bitmap ${b.path} covers ${b.bitmap.size} bytes, the disk is ${this.size}`, { errno: 'EINVAL' });
    this.peer = b;
    this.replied = new DirtyBitmap(this.size, { granularity: b.bitmap.granularity });
  }

  /**
   * Start forwarding to `target` (after the secondary equals the disk: a resync's consistent
   * instant). `ordered`: the target applies the writes of its one connection in arrival order.
   */
  attach(target: BlockNode, o: { ordered?: boolean } = {}): void {
    if (target.size !== this.size) {
      throw new BlkrepError('ERR_PAIR_SIZE', `the secondary ${target.description} is ${target.size} bytes and the disk is ${this.size}: a pair needs the same size`, {
        errno: 'EINVAL',
        details: { size: this.size, peerSize: target.size },
      });
    }
    this.target = completeNode(target);
    this.ordered = o.ordered === true;
    this.resyncFront = undefined;
    this.setMode('forwarding');
    this.replied?.clearAll();
    this.localFailed = undefined;
  }

  /** Writes go through `front` (a resync mirror's front end) and set peer bits until attach(). */
  resync(front: BlockNode): void {
    this.resyncFront = completeNode(front);
    this.setMode('resyncing');
  }

  /**
   * Before a resync's mirror copies the peer bitmap: new writes wait and the ones in flight
   * finish, so every write issued so far has set its bits. (A write issued to the disk while
   * degraded sets its bits only when it completes: completing after the mirror's copy, it would
   * be neither copied nor forwarded, and the consistent instant's clearAll would drop it.)
   * Call the returned function once the writes go through the resync's front end (resync()).
   */
  async quiesce(): Promise<() => void> {
    while (this.holding) await this.holding.promise;
    let release!: () => void;
    const promise = new Promise<void>((r) => (release = r));
    const hold = { promise, release };
    this.holding = hold;
    await this.idle();
    return () => {
      if (this.holding === hold) this.holding = undefined;
      hold.release();
    };
  }

  /** Back to resyncing's predecessor after a failed resync: writes set bits only. */
  degrade(reason: string, error?: BlkrepError): void {
    if (this.current === 'degraded' || this.current === 'detached') return;
    const from = this.current;
    this.stopForwarding();
    this.setMode('degraded');
    this.stats.degradations++;
    this.peer?.flush().catch(() => {});
    this.onDegraded?.(reason, error, from);
  }

  /** Stop everything: no forwarding, no bits (the peer bitmap is the caller's to close). */
  detach(): void {
    this.stopForwarding();
    this.resyncFront = undefined;
    this.setMode('detached');
    this.peer = undefined;
    this.replied = undefined;
  }

  private setMode(m: ReplicationMode): void {
    this.current = m;
    this.era++;
  }

  private stopForwarding(): void {
    this.target = undefined;
    for (const g of this.liveGroups()) {
      g.dropped = true;
      for (const it of g.items) {
        it.queuedBytes = 0; // a forward still in flight no longer counts when it completes
        it.entry = false;
        it.data = undefined; // a forward in flight holds its own reference until it completes
        it.slab = undefined; // its slab is dropped: never reused under a forward still in flight
        this.settleItem(it);
      }
    }
    this.groups = [];
    this.groupsHead = 0;
    this.sendQueue = [];
    this.sendHead = 0;
    this.sending = 0;
    this.queueGeneration++;
    this.open = this.newGroup();
    this.queued = 0;
    this.slab = undefined;
    this.slabBytes = 0;
    for (const b of this.freeSlabs.splice(0)) freeBufferNow(b);
    this.entries = 0;
    this.pauseAfter = undefined;
    const err = new BlkrepError('ERR_PAIR_LINK_DOWN', 'forwarding to the secondary stopped');
    for (const w of this.drainWaiters.splice(0)) w.reject(err);
    // writes waiting for room complete now, not forwarded: their tickets set the bits
    for (const w of this.waiters.splice(0)) {
      this.waited(w);
      this.settleItem(w.item);
      w.resolve();
    }
    this.endCongestion();
    this.releaseHold();
  }

  // ------------------------------------------------------------------------- modifying requests

  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    if (this.current === 'detached') return this.next.write(offset, data, o);
    return this.modify('write', offset, data.length, data, o);
  }

  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    if (this.current === 'detached') return this.next.writeZeroes(offset, length, o);
    return this.modify('write-zeroes', offset, length, undefined, o);
  }

  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    if (this.current === 'detached') return this.next.trim(offset, length, o);
    return this.modify('trim', offset, length, undefined, o);
  }

  private local(node: CompleteBlockNode, op: Op, offset: number, length: number, data: Buffer | undefined, o: ZeroOptions | undefined): Promise<void> {
    // a trim is written as write-zeroes (may punch) here too, as it is forwarded: a trim's content
    // is the disk's choice (a qcow2 disk ignores the part of a cluster a trim covers, keeping its
    // data), and the two disks must read the same after it
    const p = op === 'write' ? node.write(offset, data!, o) : node.writeZeroes(offset, length, op === 'trim' ? (o?.fua ? { fua: true } : {}) : o);
    return p.catch((err: unknown) => {
      this.localFailure(op, offset, length, err);
      throw err;
    });
  }

  private localFailure(op: Op, offset: number, length: number, err: unknown): void {
    if (this.peer) (this.localFailed ??= new DirtyBitmap(this.size, { granularity: this.peer.bitmap.granularity })).set(offset, length);
    this.onLocalError?.(op, offset, length, toBlkrepError(err));
  }

  private modify(op: Op, offset: number, length: number, data: Buffer | undefined, o: ZeroOptions | undefined): Promise<void> {
    // the common case of a pair that forwards, sync or async, without an async frame of its own:
    // nothing held, no overlapping write in flight, the peer bitmap's extents hot (modifySlow()
    // does the same in this case); the request leaves `modifying` in syncWrite's or asyncWrite's
    // own completion, not in a promise of its own
    if (!this.holding && this.current === 'forwarding' && !this.overlapsInFlight(offset, offset + length)) {
      const peer = this.peer;
      const ticket = peer?.beforeWriteSync(offset, length);
      if (!peer || ticket) {
        this.inFlight++;
        const mine: Modifying = { offset, end: offset + length, waiters: undefined };
        this.modifying.add(mine);
        return this.protocol === 'sync' ? this.syncWrite(op, offset, length, data, o, ticket, mine) : this.asyncWrite(op, offset, length, data, o, ticket, mine);
      }
    }
    return this.modifySlow(op, offset, length, data, o);
  }

  /** the local write of a forwarded request (a trim written as write-zeroes: local()); a synchronous throw becomes a rejection */
  private issueLocal(op: Op, offset: number, length: number, data: Buffer | undefined, o: ZeroOptions | undefined): Promise<void> {
    try {
      const node = this.next;
      return op === 'write' ? node.write(offset, data!, o) : node.writeZeroes(offset, length, op === 'trim' ? (o?.fua ? FUA : NO_FLAGS) : o);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private overlapsInFlight(offset: number, end: number): boolean {
    if (this.modifying.size > 0) for (const m of this.modifying) if (m.offset < end && offset < m.end) return true;
    return false;
  }

  /** a request in flight is done: later writes that overlap it go on; the cut waits for none in flight */
  private leave(mine: Modifying): void {
    this.modifying.delete(mine);
    if (mine.waiters) for (const w of mine.waiters) w();
    this.inFlight--;
    if (this.inFlight === 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  private async modifySlow(op: Op, offset: number, length: number, data: Buffer | undefined, o: ZeroOptions | undefined): Promise<void> {
    while (this.holding) await this.holding.promise;
    // counted before the ticket, so a checkpoint's cut waits for a write waiting on the log too
    this.inFlight++;
    // NBD leaves the order of overlapping writes in flight open; both disks must pick the same:
    // a write waits for the earlier ones it overlaps (their local write and their forward)
    const end = offset + length;
    const earlier: Array<Promise<void>> = [];
    if (this.modifying.size > 0) for (const m of this.modifying) if (m.offset < end && offset < m.end) earlier.push(new Promise<void>((r) => (m.waiters ??= []).push(r)));
    const mine: Modifying = { offset, end, waiters: undefined };
    this.modifying.add(mine);
    try {
      if (earlier.length > 0) await Promise.all(earlier);
      const peer = this.peer;
      const ticket = peer ? (peer.beforeWriteSync(offset, length) ?? (await peer.beforeWrite(offset, length))) : undefined;
      if (this.current === 'forwarding' && this.protocol === 'sync') return await this.syncWrite(op, offset, length, data, o, ticket);
      if (this.current === 'forwarding') return await this.asyncWrite(op, offset, length, data, o, ticket);
      const era = this.era;
      const node = this.current === 'resyncing' && this.resyncFront ? this.resyncFront : this.next;
      try {
        await this.local(node, op, offset, length, data, o);
      } finally {
        if (ticket) peer!.afterWrite(ticket);
      }
      // Forwarding started while this write was waiting in the resync's drain: the secondary
      // was made equal without it, so forward it now (its bits stay set until a forwarded flush).
      if (era !== this.era && (this.current as ReplicationMode) === 'forwarding' && this.target) {
        await this.forwardOne({ op, offset, length, ...(data ? { data } : {}), ...(o?.fua ? { fua: true } : {}), ...(o?.noHole ? { noHole: true } : {}), sent: false, done: false }).catch(() => {});
      }
    } finally {
      this.leave(mine);
    }
  }

  /**
   * A sync write: the forward and the local write issued together, the request done when both
   * settled. Every sync write passes here: one promise for the caller, one reaction on each of the
   * two (no spread copies, no Promise.allSettled arrays, no async frame, no promise chained on
   * another). `mine`: leave `modifying` on completion (modify()'s fast path).
   */
  private syncWrite(op: Op, offset: number, length: number, data: Buffer | undefined, o: ZeroOptions | undefined, ticket: WriteTicket | undefined, mine?: Modifying): Promise<void> {
    const item: Item = { op, offset, length, data, fua: o?.fua === true, noHole: o?.noHole === true, ticket, sent: false, done: false };
    return new Promise<void>((resolve, reject) => {
      let left = 2;
      let failed = false;
      let error: unknown;
      const done = (): void => {
        if (--left > 0) return;
        // the forward is settled (replied or dropped) before the bits are given back, success or not
        this.settleItem(item);
        if (mine) this.leave(mine);
        if (failed) reject(error);
        else resolve();
      };
      this.forwardThen(item, done);
      this.issueLocal(op, offset, length, data, o).then(done, (err: unknown) => {
        this.localFailure(op, offset, length, err);
        failed = true;
        error = err;
        done();
      });
    });
  }

  /**
   * An async write: the local write, then the queue (or a wait for room, block). A promise chain,
   * not an async function (every async write passes here). `mine`: leave `modifying` on
   * completion (modify()'s fast path).
   */
  private asyncWrite(op: Op, offset: number, length: number, data: Buffer | undefined, o: ZeroOptions | undefined, ticket: WriteTicket | undefined, mine?: Modifying): Promise<void> {
    const g = this.open;
    g.pendingLocal++;
    g.members++;
    if (g.members >= MAX_GROUP_WRITES) this.closeOpenGroup();
    // one shape for every queued item (no optional fields added later, none deleted)
    const item: Item = { op, group: g.id, offset, length, data: undefined, fua: o?.fua === true, noHole: o?.noHole === true, ticket, sent: false, done: false, queuedBytes: 0, entry: false, slab: undefined, at: 0, owner: undefined };
    return this.issueLocal(op, offset, length, data, o).then(
      () => {
        let wait: Promise<void> | undefined;
        try {
          wait = this.queueWritten(item, g, data, length);
        } catch (err) {
          if (mine) this.leave(mine);
          throw err;
        }
        if (!mine) return wait;
        if (!wait) return this.leave(mine);
        return wait.then(() => this.leave(mine));
      },
      (err: unknown) => {
        this.localFailure(op, offset, length, err);
        g.pendingLocal--;
        // not forwarded: the bits say the secondary may miss it
        this.settleItem(item);
        if (mine) this.leave(mine);
        this.pump();
        throw err;
      },
    );
  }

  /** An async write's local write completed: queue it; undefined when done, or the wait for room (block). */
  private queueWritten(item: Item, g: Group, data: Buffer | undefined, length: number): Promise<void> | undefined {
    if (this.current !== 'forwarding' || g.dropped) {
      g.pendingLocal--;
      this.settleItem(item);
      this.pump();
      return undefined;
    }
    // writes that waited for room before this one go first (first come, first queued)
    if (this.waiters.length === 0 && this.tryQueue(item, g, data, false)) {
      g.pendingLocal--;
      this.pump();
      return undefined;
    }
    if (this.onCongestion === 'pull-ahead') {
      g.pendingLocal--;
      this.settleItem(item);
      this.degrade('queue-full', this.queueFullError(item.op === 'write' ? length : 0));
      this.pump();
      return undefined;
    }
    // block: the write completes once it is in the queue (its group stays pending meanwhile)
    return new Promise<void>((resolve) => this.waitForRoom({ item, group: g, data, since: performance.now(), resolve }));
  }

  private queueFullError(bytes: number): BlkrepError {
    return new BlkrepError('ERR_PAIR_QUEUE_FULL', `the forwarding queue is full: ${this.entries} writes waiting, ${this.queued} bytes of payload in ${this.slabBytes} bytes of buffers and ${QUEUE_ENTRY_BYTES} bytes of bookkeeping each; ${bytes} more bytes are over the limit of ${this.queueLimit}`, {
      details: { queueBytes: this.queued, entries: this.entries, bufferBytes: this.slabBytes, limit: this.queueLimit },
    });
  }

  /**
   * Put a write whose local write completed into the queue, if it fits (or `force`: over the
   * limit). The room for payloads: the limit less every queued write's bookkeeping, this one's
   * too. A write alone in the queue always fits (a 32 MiB NBD write into an 8 MiB queue): the
   * queue then holds one write more than its limit, never more than one.
   */
  private tryQueue(item: Item, g: Group, data: Buffer | undefined, force: boolean): boolean {
    const bytes = item.op === 'write' ? item.length : 0;
    const room = force || this.entries === 0 ? Number.POSITIVE_INFINITY : this.queueLimit - (this.entries + 1) * QUEUE_ENTRY_BYTES;
    if (this.queued + bytes > room || (data !== undefined && !this.copyPayload(item, data, room))) return false;
    this.queued += bytes;
    item.queuedBytes = bytes;
    item.entry = true;
    this.entries++;
    this.addItem(g, item);
    if (this.ordered) this.sendQueue.push(item);
    // a write completing to the client closes the open group: later writes may depend on it
    if (this.open.members > 0) this.closeOpenGroup();
    return true;
  }

  // ------------------------------------------------------------------ congestion (block)

  /** block: a write waits for room; the first one starts a congestion episode and its timeout. */
  private waitForRoom(w: Waiter): void {
    this.waiters.push(w);
    this.cong.waits++;
    if (!this.episode) {
      this.episode = { since: w.since, waits: this.cong.waits - 1, waitedMs: this.cong.waitedMs };
      this.cong.episodes++;
      this.onCongestionChange?.('started', { queueBytes: this.queued, limit: this.queueLimit, waits: 0, waitedMs: 0, ms: 0 });
    }
    this.armCongestionTimer();
    // a reply may have made room meanwhile (or the write is the head group's, which the queue needs)
    this.pump();
  }

  /**
   * Let waiting writes into the queue: in order while they fit; out of order and over the limit
   * a write the queue cannot drain without (its barrier group is the head group and nothing of
   * that group is in flight, so no reply will make room while later groups wait for it; or it is
   * before a checkpoint's cut, whose drain waits for it while nothing after the cut is sent), so
   * a full queue never deadlocks. Such writes are bounded by the writes in flight at the time.
   */
  private admitWaiters(): void {
    if (this.waiters.length === 0 || this.current !== 'forwarding') return;
    const head = this.groups[this.groupsHead];
    // the head group has nothing in flight: no reply will make room, and later groups wait for it
    const headIdle = head !== undefined && head.undone === 0;
    let blocked = false;
    for (let i = 0; i < this.waiters.length; ) {
      // once one did not fit, only a write the queue needs may still go in (out of order)
      if (blocked && !headIdle && this.pauseAfter === undefined) break;
      const w = this.waiters[i]!;
      const needed = (headIdle && w.group === head) || (this.pauseAfter !== undefined && w.group.id <= this.pauseAfter);
      let queued = !blocked && this.tryQueue(w.item, w.group, w.data, false);
      if (!queued && needed) {
        queued = this.tryQueue(w.item, w.group, w.data, true);
        if (queued) this.cong.overLimit++;
      }
      if (!queued) {
        blocked = true;
        i++;
        continue;
      }
      this.waiters.splice(i, 1);
      w.group.pendingLocal--;
      this.waited(w);
      w.resolve();
    }
  }

  private waited(w: Waiter): void {
    const ms = performance.now() - w.since;
    this.cong.waitedMs += ms;
    if (ms > this.cong.maxWaitMs) this.cong.maxWaitMs = ms;
  }

  /** the episode ends when no write waits and the queue is at most half full (no event per reply) */
  private maybeEndCongestion(): void {
    if (this.episode && this.waiters.length === 0 && this.queued + this.entries * QUEUE_ENTRY_BYTES <= this.queueLimit / 2) this.endCongestion();
  }

  private endCongestion(): void {
    clearTimeout(this.congestionTimer);
    this.congestionTimer = undefined;
    const ep = this.episode;
    if (!ep) return;
    this.episode = undefined;
    const round = (x: number): number => Math.round(x * 10) / 10;
    this.onCongestionChange?.('ended', { queueBytes: this.queued, limit: this.queueLimit, waits: this.cong.waits - ep.waits, waitedMs: round(this.cong.waitedMs - ep.waitedMs), ms: round(performance.now() - ep.since) });
  }

  /**
   * A write waits and the secondary replied to nothing for congestionTimeoutMs (since the last
   * reply, or since the oldest wait began if later): degrade (congestion-timeout), which lets
   * every waiting write complete with its bits set.
   */
  private armCongestionTimer(): void {
    if (this.congestionTimer || this.waiters.length === 0) return;
    const from = Math.max(this.lastReplyAt, this.waiters[0]!.since);
    const delay = Math.max(0, from + this.congestionTimeoutMs - performance.now());
    this.congestionTimer = setTimeout(() => {
      this.congestionTimer = undefined;
      if (this.waiters.length === 0 || this.current !== 'forwarding') return;
      const stalled = performance.now() - Math.max(this.lastReplyAt, this.waiters[0]!.since);
      if (stalled + 1 >= this.congestionTimeoutMs) {
        this.degrade(
          'congestion-timeout',
          new BlkrepError('ERR_PAIR_TIMEOUT', `${this.waiters.length} writes waited for room in the forwarding queue (${this.queued} bytes of ${this.queueLimit}) and the secondary replied to nothing for ${Math.round(stalled)} ms (the congestion timeout is ${this.congestionTimeoutMs} ms)`, {
            details: { waiting: this.waiters.length, queueBytes: this.queued, limit: this.queueLimit, stalledMs: Math.round(stalled) },
          }),
        );
      } else {
        this.armCongestionTimer();
      }
    }, delay);
    this.congestionTimer.unref?.();
  }

  /** block: how long writes waited for room (status) */
  get congestion(): CongestionStats {
    return { ...this.cong, waitedMs: Math.round(this.cong.waitedMs), maxWaitMs: Math.round(this.cong.maxWaitMs), waiting: this.waiters.length };
  }

  /**
   * Forward one request to the target; a failure degrades the filter (and rejects). Not async:
   * every forwarded write passes here, and a promise chain is lighter than an async frame.
   */
  private forwardOne(item: Item): Promise<void> {
    const target = this.target;
    if (!target) return Promise.resolve();
    const sent = this.call(target, item);
    return sent.then(
      () => this.forwarded(target, item),
      (err: unknown) => this.forwardFailed(target, item, err),
    );
  }

  /** mark the item sent and make the target's call (a throw becomes a rejection) */
  private call(target: CompleteBlockNode, item: Item): Promise<void> {
    item.sent = true;
    try {
      return this.request(target, item);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /** the target's call for a forward */
  private request(target: CompleteBlockNode, item: Item): Promise<void> {
    if (item.op === 'write') return target.write(item.offset, item.data!, item.fua ? FUA : NO_FLAGS);
    if (item.op === 'write-zeroes') return target.writeZeroes(item.offset, item.length, { ...(item.fua ? { fua: true } : {}), ...(item.noHole ? { noHole: true } : {}) });
    // a trim is advisory (the target may ignore it: qemu-nbd without --discard=unmap): forwarded
    // as write-zeroes, which may punch holes, so both disks read the same after it
    if (item.op === 'trim') return target.writeZeroes(item.offset, item.length, item.fua ? FUA : NO_FLAGS);
    return this.forwardFlush(target);
  }

  private forwarded(target: CompleteBlockNode, item: Item): void {
    if (item.op === 'flush') return;
    this.stats.forwardedWrites++;
    this.stats.forwardedBytes += item.op === 'write' ? item.length : 0;
    if (this.target === target) this.replied?.set(item.offset, item.length);
  }

  private forwardFailed(target: CompleteBlockNode, item: Item, err: unknown): never {
    throw this.forwardError(target, item, err);
  }

  /** a forward failed: degrade (if it was to the current target); the error */
  private forwardError(target: CompleteBlockNode, item: Item, err: unknown): BlkrepError {
    const e = toBlkrepError(err, `forwarding a ${item.op} of ${item.length} bytes at offset ${item.offset} to ${target.description}`);
    if (this.target === target) this.degrade(`forward-failed: ${e.code}: ${e.message}`, e);
    return e;
  }

  /**
   * forwardOne() for the sync write path: `then` runs once the forward is settled, replied or
   * failed (a failure degrades; the client's request does not fail for it), without a promise of
   * its own.
   */
  private forwardThen(item: Item, then: () => void): void {
    const target = this.target;
    if (!target) return then();
    const sent = this.call(target, item);
    sent.then(
      () => {
        this.forwarded(target, item);
        then();
      },
      (err: unknown) => {
        this.forwardError(target, item, err);
        then();
      },
    );
  }

  /** A FLUSH to the target; on success, clear the granules replied before it was sent and not written since. */
  private async forwardFlush(target: CompleteBlockNode): Promise<void> {
    const snapshot = this.replied;
    if (snapshot) this.replied = new DirtyBitmap(this.size, { granularity: snapshot.granularity });
    try {
      await target.flush();
    } catch (err) {
      if (snapshot && this.replied) this.replied.merge(snapshot);
      throw err;
    }
    this.stats.forwardedFlushes++;
    const peer = this.peer;
    if (!snapshot || !peer || this.target !== target) return;
    const replied = this.replied!;
    // a region whose local write failed stays: the secondary may hold what this disk does not
    if (this.localFailed) replied.merge(this.localFailed);
    for (const run of [...snapshot.dirtyRuns()]) {
      // granules replied again since the flush was sent stay set, for the next one
      let s = run.offset;
      const end = run.offset + run.length;
      while (s < end) {
        const again = replied.nextDirty(s, end);
        const stop = again < 0 ? end : again;
        if (stop > s) peer.clear(s, stop - s);
        if (again < 0) break;
        const clean = replied.nextClean(again, end);
        if (clean < 0) break;
        s = clean;
      }
    }
  }

  private settleItem(item: Item): void {
    if (item.done) return;
    item.done = true;
    if (item.owner) item.owner.undone--;
    if (item.ticket) this.peer?.afterWrite(item.ticket);
  }

  // --------------------------------------------------------------------------- the async queue

  private newGroup(): Group {
    const g: Group = { id: this.nextGroupId++, pendingLocal: 0, members: 0, items: NO_ITEMS, undone: 0, sentUpTo: 0, closed: false, dropped: false };
    this.groups.push(g);
    return g;
  }

  private addItem(g: Group, item: Item): void {
    if (g.items === NO_ITEMS) g.items = [item];
    else g.items.push(item);
    item.owner = g;
    if (!item.done) g.undone++;
  }

  /**
   * The queue's copy of a payload, cut from the current slab (a new one when it has no room, a
   * slab of its own for a payload over a quarter of SLAB_BYTES). The copy frees the caller's
   * buffer at once (often a slice of a large receive buffer). False when the slabs would hold
   * more than `room` (the limit less the queued writes' bookkeeping): the queue is full.
   */
  private copyPayload(item: Item, data: Buffer, room: number): boolean {
    const n = data.length;
    // a slab is at most a quarter of the limit: copies waiting for their replies in older slabs
    // (replies out of order) keep little memory from the new ones
    const size = Math.min(SLAB_BYTES, Math.max(n, Math.floor(this.queueLimit / 4)));
    let slab = this.slab;
    const fits = slab !== undefined && slab.buf.length - slab.used >= n;
    if (n > SLAB_BYTES / 4 || (!fits && this.slabBytes + size > room)) {
      // a slab of its own (a large payload, or no room for a whole slab): freed with its one copy
      if (this.slabBytes + n > room) return false;
      this.makeRoomForSlab(n);
      const own: Slab = { buf: Buffer.allocUnsafeSlow(n), used: n, live: 1 };
      this.slabStats.exact++;
      this.slabBytes += n;
      data.copy(own.buf);
      item.data = own.buf;
      item.slab = own;
      return true;
    }
    if (!slab || !fits) {
      // the old current slab lives on while a copy in it does (freed by releasePayload)
      if (slab && slab.live === 0) this.dropSlab(slab.buf, true);
      let buf = this.freeSlabs.pop();
      if (buf?.length === size) this.slabStats.reused++;
      else {
        this.makeRoomForSlab(size);
        buf = Buffer.allocUnsafeSlow(size);
        this.slabStats.allocated++;
      }
      slab = { buf, used: 0, live: 0 };
      this.slabBytes += size;
      this.slab = slab;
    }
    data.copy(slab.buf, slab.used);
    item.at = slab.used;
    item.slab = slab;
    slab.used += n;
    slab.live++;
    return true;
  }

  /**
   * A payload copy replied or dropped: its slab is reused (current), or kept for reuse
   * (`replied`: no forward of it can still be sending) or freed once it holds no copy.
   */
  private releasePayload(item: Item, replied: boolean): void {
    const slab = item.slab;
    item.data = undefined;
    item.slab = undefined;
    if (!slab || --slab.live > 0) return;
    if (slab === this.slab) slab.used = 0;
    else this.dropSlab(slab.buf, replied);
  }

  /** A slab holding no copy leaves the queue: kept for reuse when it may be (standard size, room under the limit), else freed. */
  private dropSlab(buf: Buffer, reusable: boolean): void {
    this.slabBytes -= buf.length;
    const size = Math.min(SLAB_BYTES, Math.floor(this.queueLimit / 4));
    if (!reusable) return; // a forward that failed may still be sending it: left to the GC
    if (buf.length === size && this.slabBytes + (this.freeSlabs.length + 1) * size <= this.queueLimit) this.freeSlabs.push(buf);
    else freeBufferNow(buf);
  }

  /** Free kept slabs until `bytes` more fit beside them and the slabs in use under the limit. */
  private makeRoomForSlab(bytes: number): void {
    while (this.freeSlabs.length > 0 && this.slabBytes + bytes + this.freeSlabs.length * this.freeSlabs[0]!.length > this.queueLimit) freeBufferNow(this.freeSlabs.pop()!);
  }

  private closeOpenGroup(): void {
    this.open.closed = true;
    this.open = this.newGroup();
  }

  private liveGroups(): Group[] {
    return this.groups.slice(this.groupsHead);
  }

  /** Send one queued item; on its reply, pump again. */
  private send(item: Item, counted = false): void {
    item.sent = true;
    const slab = item.slab;
    if (slab && item.data === undefined) item.data = slab.buf.subarray(item.at, item.at! + item.length);
    const target = this.target;
    const generation = this.queueGeneration;
    if (counted) this.sending++;
    const done = (): void => {
      if (counted && this.queueGeneration === generation) this.sending--;
    };
    this.forwardOne(item).then(
      () => {
        done();
        this.lastReplyAt = performance.now();
        this.queued -= item.queuedBytes ?? 0;
        item.queuedBytes = 0;
        if (item.entry) {
          item.entry = false;
          this.entries--;
        }
        // replied: the payload is no longer needed (the item itself may stay in its group until
        // the group is replied, and in the arrays until they are compacted)
        this.releasePayload(item, true);
        this.settleItem(item);
        if (this.target === target) this.pump();
      },
      () => {
        done();
        this.releasePayload(item, false);
        this.settleItem(item);
      },
    );
  }

  /**
   * An ordered target: send the writes in the order their local writes completed, up to the
   * checkpoint's cut. A FLUSH is left to the head loop (sent once everything before it was
   * replied); items of a group before the cut that wait behind the cut are sent by the head loop too.
   */
  private sendInOrder(): void {
    while (this.sendHead < this.sendQueue.length && this.target) {
      const item = this.sendQueue[this.sendHead]!;
      if (!item.sent && item.op !== 'flush') {
        if (this.pauseAfter !== undefined && (item.group ?? 0) > this.pauseAfter) break;
        if (this.sending >= MAX_SENDING) break;
        this.send(item, true);
      }
      this.sendHead++;
    }
    if (this.sendHead > 1024 && this.sendHead * 2 > this.sendQueue.length) {
      this.sendQueue = this.sendQueue.slice(this.sendHead);
      this.sendHead = 0;
    }
  }

  /** Send what the head group holds; move on once it is closed, complete and replied. */
  private pump(): void {
    if (this.waiters.length > 0) this.admitWaiters();
    if (this.ordered) this.sendInOrder();
    while (this.groupsHead < this.groups.length && this.target) {
      const head = this.groups[this.groupsHead]!;
      if (this.pauseAfter !== undefined && head.id > this.pauseAfter) break;
      const items = head.items;
      for (let i = head.sentUpTo; i < items.length; i++) if (!items[i]!.sent) this.send(items[i]!);
      head.sentUpTo = items.length;
      if (!head.closed || head.pendingLocal > 0 || head.undone > 0) break;
      this.groupsHead++;
      if (this.drainWaiters.length > 0) {
        for (const w of this.drainWaiters.filter((w) => w.group <= head.id)) {
          this.drainWaiters.splice(this.drainWaiters.indexOf(w), 1);
          w.resolve();
        }
      }
    }
    if (this.groupsHead > 1024 && this.groupsHead * 2 > this.groups.length) {
      this.groups = this.groups.slice(this.groupsHead);
      this.groupsHead = 0;
    }
    if (this.waiters.length > 0) {
      // the head moved (a waiting write may be the new head's) or a reply made room
      const before = this.waiters.length;
      this.admitWaiters();
      if (this.waiters.length < before) this.pump();
      else this.armCongestionTimer();
    }
    if (this.episode) this.maybeEndCongestion();
  }

  // ------------------------------------------------------------------------------------ flush

  override async flush(o?: IoOptions): Promise<void> {
    if (this.current === 'detached') return this.next.flush(o);
    const peerFlush = this.peer ? this.peer.flush() : Promise.resolve();
    if (this.current === 'forwarding' && this.protocol === 'sync' && this.target) {
      const [local] = await Promise.allSettled([this.next.flush(o), this.forwardOne({ op: 'flush', offset: 0, length: 0, sent: false, done: false }).catch(() => {}), peerFlush]);
      if (local.status === 'rejected') throw local.reason;
      return;
    }
    if (this.current === 'forwarding') {
      // async: the FLUSH is a group of its own, sent once everything before it was replied
      this.closeOpenGroup();
      const g = this.open;
      const item: Item = { op: 'flush', group: g.id, offset: 0, length: 0, data: undefined, fua: false, noHole: false, ticket: undefined, sent: false, done: false, queuedBytes: 0, entry: false, slab: undefined, at: 0, owner: undefined };
      this.addItem(g, item);
      if (this.ordered) this.sendQueue.push(item);
      this.closeOpenGroup();
      this.pump();
    }
    const node = this.current === 'resyncing' && this.resyncFront ? this.resyncFront : this.next;
    await Promise.all([node.flush(o), peerFlush]);
  }

  // ------------------------------------------------------------------------- checkpoint's cut

  /**
   * Checkpoint steps 1–2 (replication.md §2): cut — sync: hold new writes; async: close the open
   * group and send nothing after it — then wait until every forwarded write before the cut was
   * replied, flush locally and forward a FLUSH. Rejects ERR_PAIR_LINK_DOWN when forwarding stops
   * meanwhile. release() ends the cut (whatever happened). Resolves with how long the drain
   * (in-flight writes done / forwarded writes replied) and the two flushes took.
   *
   * The peer bitmap is not flushed here (it was, in parallel): the cut's FLUSH clears replied
   * granules only in memory, once it succeeds, so a bitmap flush racing it did not make those
   * clears durable anyway, and a bitmap on disk with more bits set than needed only costs resync
   * time (every write's bit is durable before the write — the activity log — independently of
   * this flush). flushPeer() after the release makes the clears durable.
   */
  async cut(): Promise<{ preflushMs: number; drainMs: number; flushMs: number }> {
    const t0 = performance.now();
    if (this.current !== 'forwarding' || !this.target) throw new BlkrepError('ERR_PAIR_LINK_DOWN', `the filter is ${this.current}, not forwarding: no checkpoint`);
    if (this.protocol === 'sync') {
      // pre-flush, before the hold: write back what both disks hold dirty now while writes still
      // go, so that the flushes inside the hold have only this short window's writes to write.
      // The hold is mostly flush time (bench/pair: 70–100 ms of a 120 ms hold after 500 ms of
      // 4 KiB random writes). An extra flush changes nothing the crash rules rely on.
      await Promise.all([this.next.flush(), this.forwardOne({ op: 'flush', offset: 0, length: 0, sent: false, done: false })]);
      if (this.current !== 'forwarding' || !this.target) throw new BlkrepError('ERR_PAIR_LINK_DOWN', 'forwarding stopped during the checkpoint');
    }
    const started = performance.now();
    if (this.protocol === 'sync') {
      let release!: () => void;
      const promise = new Promise<void>((r) => (release = r));
      this.holding = { promise, release };
      if (this.inFlight > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
    } else {
      this.closeOpenGroup();
      const last = this.open.id - 1;
      this.pauseAfter = last;
      await new Promise<void>((resolve, reject) => {
        this.drainWaiters.push({ group: last, resolve, reject });
        this.pump();
      });
    }
    const target = this.target;
    if (this.current !== 'forwarding' || !target) throw new BlkrepError('ERR_PAIR_LINK_DOWN', 'forwarding stopped during the checkpoint');
    const drained = performance.now();
    await Promise.all([this.next.flush(), this.forwardOne({ op: 'flush', offset: 0, length: 0, sent: false, done: false })]);
    return { preflushMs: started - t0, drainMs: drained - started, flushMs: performance.now() - drained };
  }

  /** Make the peer bitmap durable (after a checkpoint's release: its clears). */
  async flushPeer(): Promise<void> {
    await this.peer?.flush();
  }

  /** End the cut: held writes go on, queued ones are sent. */
  release(): void {
    this.releaseHold();
    this.pauseAfter = undefined;
    this.pump();
  }

  private releaseHold(): void {
    const h = this.holding;
    this.holding = undefined;
    h?.release();
  }

  /** Requests in flight finished (for a clean stop). */
  async idle(): Promise<void> {
    if (this.inFlight > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
  }
}

/** block: a write whose local write completed, waiting for room in the async queue */
interface Waiter {
  item: Item;
  group: Group;
  /** the client's payload (copied into the queue when let in) */
  data: Buffer | undefined;
  /** performance.now() when it began to wait */
  since: number;
  resolve: () => void;
}

/** a modifying request in flight: a later one that overlaps it waits for it (waiters, made on demand) */
interface Modifying {
  offset: number;
  end: number;
  waiters: Array<() => void> | undefined;
}

/** a forward's options (shared: the target only reads them) */
const FUA: WriteOptions = Object.freeze({ fua: true });
const NO_FLAGS: WriteOptions = Object.freeze({});

