/**
 * The primary's side of fencing (replication.md §6, DRBD's `fencing` and `quorum` options): a gate
 * on the export's writes that the heartbeat opens and closes.
 *
 * - **Demotion.** Beats carry a fencing token, the term: a node that takes over announces its
 *   peer's term + 1. A primary that hears its peer announce itself primary with a higher term
 *   has been replaced: it is demoted, and from then on every write, zero, trim and flush fails
 *   with EIO (ERR_DEMOTED), whatever else is configured; nothing lifts it but a restart (then as a
 *   secondary, or after a resync). A frozen primary (SIGSTOP, a long pause) that wakes up cannot
 *   write in between: the write path reads the silence from the clock itself (`quorum()`), before
 *   any timer has run.
 * - **Quorum** (`--on-no-quorum suspend-io|io-error`): the primary has quorum while it heard the
 *   peer or a witness (any heartbeat path) within the bound the peer's detector uses, less one
 *   interval, so it stops writing before the peer can declare it dead. Without quorum, writes
 *   wait (suspend-io) until a beat comes back or `resume-io`, or fail with EIO (io-error). Like
 *   corosync's wait_for_all, a primary that never heard its peer has no quorum.
 * - **Fencing** (`--fencing resource-and-stonith`): when the peer is dead, or when the data link
 *   to it is lost (DRBD: a primary losing its connection freezes I/O and calls fence-peer), writes
 *   are frozen and the fence hook runs; they resume when the hook says 4 or 7, when the link is
 *   back (`linkBack()`), when the peer confirms it is Outdated (`peerConfirmedOutdated()`), or on
 *   `resume-io`. A frozen fence also holds the acknowledgement of every write that completes
 *   while it is frozen (`holdsAcks`): a write forwarded when the link broke is on this disk only,
 *   and its client hears nothing until the freeze is lifted. `resource-only` runs the hook and
 *   freezes nothing; `dont-care` does nothing.
 *
 * Reads always pass: a demoted or frozen primary may still be read.
 */
import type { BlockNode, FileRange, WriteOptions, ZeroOptions, IoOptions } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { Filter } from '../block/filter.js';

export type OnNoQuorum = 'suspend-io' | 'io-error';
export type FencingPolicy = 'dont-care' | 'resource-only' | 'resource-and-stonith';
export const FENCING_POLICIES: readonly FencingPolicy[] = ['dont-care', 'resource-only', 'resource-and-stonith'];
export const ON_NO_QUORUM: readonly OnNoQuorum[] = ['suspend-io', 'io-error'];

export type IoFenceState = 'open' | 'suspended' | 'demoted';
/** why writes are held: no quorum, the peer dead (heartbeat) or the data link lost (--fencing) */
export type IoSuspendCause = 'no-quorum' | 'peer-dead' | 'link-lost';

export interface IoFenceOptions {
  /** true while this node may write as primary (false: not primary, the gate always passes) */
  active: () => boolean;
  /** --on-no-quorum; undefined: quorum is not checked */
  onNoQuorum?: OnNoQuorum;
  /** is there quorum now (read synchronously on every write) */
  quorum: () => boolean;
  /** --lease: does this primary hold the etcd leader key before its local deadline (false: EIO) */
  lease?: () => boolean;
  /**
   * --fencing resource-and-stonith: a frozen fence holds the acknowledgement of writes that
   * complete while it is frozen (IoFenceFilter); otherwise completions pass untouched
   */
  holdsAcks?: boolean;
  publish?: (event: string, fields: Record<string, unknown>) => void;
  log?: (level: 'info' | 'warn' | 'error', message: string) => void;
}

export interface IoFenceStatus {
  state: IoFenceState;
  /** why writes are held or refused (null when open) */
  reason: string | null;
  /** suspended: no-quorum, peer-dead or link-lost (null otherwise) */
  cause: IoSuspendCause | null;
  /** writes waiting now */
  waiting: number;
  onNoQuorum: OnNoQuorum | null;
}

interface Waiter {
  resolve: () => void;
  reject: (err: BlkrepError) => void;
}

export class IoFence {
  private stateNow: IoFenceState = 'open';
  private reasonNow: string | null = null;
  private causeNow: IoSuspendCause | null = null;
  /** the suspension is for quorum only: a beat lifts it (a fencing freeze needs the hook or resume-io) */
  private quorumOnly = false;
  /** resume-io lifted a quorum suspension: quorum is not checked again until the peer is heard */
  private waived = false;
  private waiters: Waiter[] = [];

  constructor(private readonly options: IoFenceOptions) {}

  get state(): IoFenceState {
    return this.stateNow;
  }

  /** --fencing resource-and-stonith: completions are held while frozen (fixed at construction) */
  get holdsAcks(): boolean {
    return this.options.holdsAcks === true;
  }

  /** a fencing freeze (not a quorum suspension) is on: the hook, the link, the peer or resume-io lifts it */
  get frozen(): boolean {
    return this.stateNow === 'suspended' && !this.quorumOnly;
  }

  /**
   * A write (zero, trim, flush) completed below the gate: may its client hear it now? undefined:
   * yes; otherwise a promise that resolves when the freeze is lifted, or rejects with EIO (demoted).
   * Only a fencing freeze holds acknowledgements, and only with holdsAcks.
   */
  release(): Promise<void> | undefined {
    if (this.stateNow === 'demoted') return Promise.reject(this.demotedError());
    if (!this.frozen || !this.holdsAcks) return undefined;
    return new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  status(): IoFenceStatus {
    return { state: this.stateNow, reason: this.reasonNow, cause: this.stateNow === 'suspended' ? this.causeNow : null, waiting: this.waiters.length, onNoQuorum: this.options.onNoQuorum ?? null };
  }

  /**
   * May a write go now? undefined: yes, at once (the common case costs two calls and no promise);
   * otherwise a promise that resolves when it may, or rejects with EIO.
   */
  admit(): Promise<void> | undefined {
    if (this.stateNow === 'demoted') return Promise.reject(this.demotedError());
    if (!this.options.active()) return undefined;
    if (this.options.lease && !this.options.lease()) {
      return Promise.reject(new BlkrepError('ERR_LEASE_LOST', 'write refused: this primary does not hold the etcd leader key (or its keep-alive deadline passed)', { errno: 'EIO' }));
    }
    if (this.stateNow === 'open' && this.options.onNoQuorum !== undefined && !this.waived && !this.options.quorum()) {
      if (this.options.onNoQuorum === 'io-error') {
        return Promise.reject(new BlkrepError('ERR_NO_QUORUM', 'write refused: this primary has not heard its peer or a witness within the bound (--on-no-quorum io-error)', { errno: 'EIO' }));
      }
      this.suspend('no-quorum: the peer and every witness are silent', true);
    }
    if (this.stateNow === 'open') return undefined;
    return new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /**
   * Hold writes until resume() (or, for quorum, until the peer is heard: quorumBack()). `cause`
   * (event io-suspended, status): no-quorum, peer-dead (--fencing, the heartbeat), link-lost
   * (--fencing, the data link). A fencing freeze over a quorum suspension takes it over (a beat
   * no longer lifts it); over a freeze, nothing changes.
   */
  suspend(reason: string, quorumOnly = false, cause: IoSuspendCause = quorumOnly ? 'no-quorum' : 'peer-dead'): void {
    const upgrade = this.stateNow === 'suspended' && this.quorumOnly && !quorumOnly;
    if (this.stateNow !== 'open' && !upgrade) return;
    this.stateNow = 'suspended';
    this.reasonNow = reason;
    this.causeNow = cause;
    this.quorumOnly = quorumOnly;
    this.options.log?.('warn', `writes suspended: ${reason}`);
    this.options.publish?.('io-suspended', { reason, cause });
  }

  /** A beat came: a suspension for quorum alone ends. */
  quorumBack(): void {
    this.waived = false;
    if (this.stateNow === 'suspended' && this.quorumOnly) this.resume('quorum');
  }

  /**
   * The data link to the peer is back (hello and welcome done; a resync may run): the peer has
   * heard this node's new generation, so it cannot take over from its stale copy. Lifts a fencing
   * freeze (link-back); a quorum suspension is the beats' to lift.
   */
  linkBack(): boolean {
    if (!this.frozen) return false;
    return this.resume('link-back').resumed;
  }

  /**
   * The peer confirmed it is Outdated (it knows this primary went on without it and will not
   * take over from its copy): lifts a fencing freeze (peer-outdated), as a fence hook exiting 4
   * does. Called by the daemon (Daemon.peerOutdated) once the secondary of every lost link
   * reports its disk Outdated in a version 2 beat.
   */
  peerConfirmedOutdated(): boolean {
    if (!this.frozen) return false;
    return this.resume('peer-outdated').resumed;
  }

  /** Let writes go again (resume-io, a fence hook that confirmed, quorum back, link back, peer outdated). Refused when demoted. */
  resume(by: string): { resumed: boolean; waiting: number } {
    if (this.stateNow === 'demoted') throw this.demotedError();
    if (this.stateNow === 'open') return { resumed: false, waiting: 0 };
    if (by === 'resume-io') this.waived = true;
    const waiting = this.waiters.length;
    this.stateNow = 'open';
    const reason = this.reasonNow;
    this.reasonNow = null;
    this.causeNow = null;
    this.quorumOnly = false;
    for (const w of this.waiters.splice(0)) w.resolve();
    this.options.log?.('info', `writes resumed (${by}; they were suspended: ${reason ?? 'no reason'}); ${waiting} waiting`);
    this.options.publish?.('io-resumed', { by, waiting });
    return { resumed: true, waiting };
  }

  /** The peer took over: refuse every write from now on, those waiting included. */
  demote(reason: string): void {
    if (this.stateNow === 'demoted') return;
    this.stateNow = 'demoted';
    this.reasonNow = reason;
    const err = this.demotedError();
    const waiting = this.waiters.length;
    for (const w of this.waiters.splice(0)) w.reject(err);
    this.options.log?.('error', `this node is demoted: ${reason}; every write fails with EIO from now on`);
    this.options.publish?.('demoted', { reason, refusedWaiting: waiting });
  }

  private demotedError(): BlkrepError {
    return new BlkrepError('ERR_DEMOTED', `write refused: this node was primary and its peer took over (${this.reasonNow ?? 'demoted'}); restart it as a secondary`, { errno: 'EIO' });
  }
}

/** The gate as a filter over the export: writes, zeroes, trims and flushes pass admit() first. */
export class IoFenceFilter extends Filter {
  readonly driver = 'io-fence';

  /** holdsAcks: a completion passes release() (held while frozen); else the promise as it is */
  private readonly ack: ((p: Promise<void>) => Promise<void>) | undefined;

  constructor(
    next: BlockNode,
    private readonly fence: IoFence,
  ) {
    super(next);
    const release = (): Promise<void> | undefined => fence.release();
    this.ack = fence.holdsAcks ? (p) => p.then(release) : undefined;
  }

  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    const wait = this.fence.admit();
    const p = wait === undefined ? this.next.write(offset, data, o) : wait.then(() => this.next.write(offset, data, o));
    return this.ack ? this.ack(p) : p;
  }

  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    const wait = this.fence.admit();
    const p = wait === undefined ? this.next.writeZeroes(offset, length, o) : wait.then(() => this.next.writeZeroes(offset, length, o));
    return this.ack ? this.ack(p) : p;
  }

  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    const wait = this.fence.admit();
    const p = wait === undefined ? this.next.trim(offset, length, o) : wait.then(() => this.next.trim(offset, length, o));
    return this.ack ? this.ack(p) : p;
  }

  override flush(o?: IoOptions): Promise<void> {
    const wait = this.fence.admit();
    const p = wait === undefined ? this.next.flush(o) : wait.then(() => this.next.flush(o));
    return this.ack ? this.ack(p) : p;
  }

  /** reads always pass: so does a range sent from the file */
  override fileRange(offset: number, length: number): FileRange | undefined {
    return this.passFileRange(offset, length);
  }

  /** the export's stack is not this filter's to close */
  override close(): Promise<void> {
    return Promise.resolve();
  }
}
