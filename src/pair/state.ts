/**
 * A node's pair state, kept durably beside its disk (IMAGE.pair.json, written by atomic replace +
 * fsync): node id, role, generations, the committed epoch and the checkpoint step in progress —
 * what the crash rules of replication.md §2 read after a restart (`restartPlan`).
 *
 * The daemon keeps `cleanShutdown` false while it serves as primary (`markRunning` before the
 * first write is accepted, `markStopped` after the last flush of a clean stop), so a restart
 * after a crash knows the node crashed as primary; that fact stays in `crashedPrimary` until the
 * activity-log resync it calls for is done (`clearCrashedPrimary`), even across more restarts.
 */
import { randomUUID } from 'node:crypto';
import { BlkrepError } from '../api/errors.js';
import { readOwnFile, replaceFile, UntrustedFileError } from '../util/safe-file.js';
import { checkTuple, freshTuple, type GenerationTuple } from './generations.js';
import type { DiskState } from './messages.js';
import { sideFileBase } from '../util/state-dir.js';

export interface PairState {
  version: 1;
  nodeId: string;
  role: 'primary' | 'secondary' | 'none';
  gi: GenerationTuple;
  /** last committed epoch */
  epoch: number;
  /** a checkpoint between step 5 and step 7 (replication.md §2): its number */
  committing: number | null;
  diskState: DiskState;
  /** false while a primary serves; true after a clean stop (a crashed primary resyncs its activity log) */
  cleanShutdown: boolean;
  /** this node crashed as primary and its activity-log resync is not done yet (absent = false) */
  crashedPrimary?: boolean;
  /** when this node last became primary (ms since the epoch; for discard-younger-primary); absent = never */
  primarySince?: number | null;
  /**
   * a failover of this secondary began and did not finish (replication.md §4 case 7): its target,
   * the epoch it fails over to, and whether the view was committed and flushed into the disk
   * already (then a retry only empties the overlays). Absent or null = none.
   */
  failingOver?: { to: 'checkpoint' | 'latest'; epoch: number; committed: boolean } | null;
  /** the node's name for discard-node=NAME (serve-nbd --node-name); absent = the host name */
  name?: string;
  /**
   * a secondary serves with a volatile hidden disk (--hidden-durability volatile): the boot id
   * (/proc/sys/kernel/random/boot_id) of the boot whose page cache holds its unsynced copies.
   * Set before the replica export takes a write, cleared by a clean stop (after a real sync of
   * the hidden disk) and by promotion. A start under another boot id: the hidden disk was lost.
   * Absent or null = none.
   */
  volatileHidden?: { bootId: string } | null;
  /**
   * why this secondary has no checkpoint to roll back to (a host crash lost its volatile hidden
   * disk): Inconsistent, the forced target of a full resync, never promotable, until the
   * checkpoint after that resync. Absent or null = it has one.
   */
  restorePointLost?: string | null;
  /**
   * a secondary took a full resync from this primary (node id) at that generation (its current):
   * the disk holds the primary's data wherever the primary's peer bitmap is clear, so a full
   * resync from the same primary at the same generation resumes by that bitmap (welcome
   * `resumeFull`). Durable before the resync's first write; cleared when the checkpoint after a
   * resync adopts the generations, and by a promotion. Absent or null = none.
   */
  fullSyncFrom?: { nodeId: string; gen: string } | null;
  /**
   * a secondary took a split brain's resync from this primary (node id): the policy that made this
   * side the victim, and the salvage overlay taken before it (null: nothing was salvaged: no range
   * to copy). Durable with the Inconsistent state, before the resync's first write; cleared when
   * the checkpoint after a resync adopts the generations, and by a promotion. While it is set and
   * the disk Inconsistent, a hello from that primary resumes the resync (the forced target,
   * no new salvage, whatever the policy would say of the half-copied disk now). Absent or null = none.
   */
  splitBrainResync?: { nodeId: string; policy: string; salvage: string | null } | null;
  /**
   * a secondary: the hidden disk's file it serves with (resolved path, device and inode numbers),
   * recorded at start when it changes. A restart as this disk's secondary whose --hidden names an
   * existing file of another inode number is refused (the device number is kept for the message:
   * it may change across a reboot) (a stale copy of the hidden disk would hold
   * another epoch's old data: a failover would commit it as the checkpoint); the same inode under
   * another path (mv) is the same disk. Absent or null = no record (older builds): not checked.
   */
  hiddenFile?: { path: string; dev: number; ino: number } | null;
  /**
   * a secondary: the stamp its hidden disk carries (hidden-stamp.ts: a blkrep qcow2 header
   * extension of 16 random bytes, hex), renewed at each start and each checkpoint that empties
   * the hidden disk. `next`: a start's new stamp, recorded before it is written into the hidden
   * disk (a kill -9 between leaves either); null once written. A restart as this disk's secondary
   * with no checkpoint committing whose hidden disk carries neither is refused (ERR_PAIR_OVERLAY):
   * a stale copy written over the same file in place. Absent or null = no record (older builds).
   */
  hiddenStamp?: { id: string | null; next: string | null } | null;
  /**
   * a primary: the checkpoint it asked its secondary to commit last (recorded durably before the
   * request is sent). Above `epoch`: its DONE never came back (a crash, a link loss), so the
   * secondary may hold that checkpoint: this disk, back as a secondary of the node that was its
   * secondary, may lag by up to it. Absent or null = none asked (or older builds).
   */
  checkpointSent?: number | null;
  /**
   * a primary's peer bitmap tracks a full resync to this secondary (node id): it was set whole and
   * durable before the copy began, and the copy clears it as the secondary holds data stably.
   * Absent or null = none.
   */
  fullSyncTo?: string | null;
  /**
   * a secondary: the primary's checkpoint request that made `committing` (when set) or `epoch`:
   * the primary's node id and the request's id (null: an older primary's request, which carries
   * none). Its "committed already" answer (checkpoint N <= epoch) is given only to that request
   * again. Absent or null: no primary's request (a checkpoint taken here for a plain primary, or
   * a state from before this field): no request matches.
   */
  checkpointBy?: { nodeId: string; id: string | null } | null;
  /**
   * a secondary's clean stop left its hidden disk mapping nothing at this epoch (no checkpoint
   * committing, copy-before-write on): the disk is CP_epoch, so a hidden disk absent at the next
   * start loses nothing (`hiddenEmptyAtStop`). Written after the hidden disk's last write (its
   * close), cleared durably before the replica export takes a write after a start (with the
   * start's other bookkeeping: one state write per start, none per epoch). Absent or null = not
   * known empty.
   */
  hiddenEmptyAt?: number | null;
}

const ROLES = ['primary', 'secondary', 'none'];
const DISK_STATES = ['UpToDate', 'Consistent', 'Outdated', 'Inconsistent', 'Failed'];

/** Check every field of a state read from `path`; throws ERR_PAIR_STATE naming the field and value. */
export function validateState(v: unknown, path: string): PairState {
  const bad = (why: string) => new BlkrepError('ERR_PAIR_STATE', `the pair state ${path} ${why}`, { details: { path } });
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw bad('is not a JSON object');
  const s = v as Partial<PairState>;
  if (s.version !== 1 || typeof s.nodeId !== 'string' || typeof s.epoch !== 'number') throw bad('is not a version 1 blkrep pair state');
  if (s.nodeId === '') throw bad('has an empty nodeId');
  if (!ROLES.includes(s.role as string)) throw bad(`has role ${JSON.stringify(s.role)} (one of ${ROLES.join(', ')})`);
  if (!Number.isSafeInteger(s.epoch) || s.epoch < 0) throw bad(`has epoch ${s.epoch}, not a non-negative integer`);
  // a checkpoint being committed is past the epoch, not always epoch + 1: a primary numbers its
  // next checkpoint after its own epoch when that is ahead of this disk's (a restored or replaced
  // secondary, a failback's lag); a crash in steps 5–7 of it must restart, not be refused
  // (test/pair/attack-checkpoint-number-gap.test.ts)
  if (s.committing !== null && (typeof s.committing !== 'number' || !Number.isSafeInteger(s.committing) || s.committing <= s.epoch)) {
    throw bad(`has checkpoint ${JSON.stringify(s.committing)} committing with epoch ${s.epoch}: a checkpoint being committed is past the epoch (at least ${s.epoch + 1})`);
  }
  if (!DISK_STATES.includes(s.diskState as string)) throw bad(`has disk state ${JSON.stringify(s.diskState)} (one of ${DISK_STATES.join(', ')})`);
  if (typeof s.cleanShutdown !== 'boolean') throw bad(`has cleanShutdown ${JSON.stringify(s.cleanShutdown)}, not true or false`);
  if (s.crashedPrimary !== undefined && typeof s.crashedPrimary !== 'boolean') throw bad(`has crashedPrimary ${JSON.stringify(s.crashedPrimary)}, not true or false`);
  if (s.primarySince !== undefined && s.primarySince !== null && !Number.isSafeInteger(s.primarySince)) throw bad(`has primarySince ${JSON.stringify(s.primarySince)}, not a time in ms`);
  const fo = s.failingOver;
  if (fo !== undefined && fo !== null && (typeof fo !== 'object' || (fo.to !== 'checkpoint' && fo.to !== 'latest') || !Number.isSafeInteger(fo.epoch) || typeof fo.committed !== 'boolean')) {
    throw bad(`has failingOver ${JSON.stringify(fo)}, not {to: "checkpoint"|"latest", epoch, committed}`);
  }
  if (s.name !== undefined && (typeof s.name !== 'string' || s.name === '')) throw bad(`has name ${JSON.stringify(s.name)}, not a non-empty string`);
  const vh = s.volatileHidden;
  if (vh !== undefined && vh !== null && (typeof vh !== 'object' || typeof vh.bootId !== 'string' || vh.bootId === '')) throw bad(`has volatileHidden ${JSON.stringify(vh)}, not {bootId: "…"}`);
  if (s.restorePointLost !== undefined && s.restorePointLost !== null && typeof s.restorePointLost !== 'string') throw bad(`has restorePointLost ${JSON.stringify(s.restorePointLost)}, not a string`);
  const fsf = s.fullSyncFrom;
  if (fsf !== undefined && fsf !== null && (typeof fsf !== 'object' || typeof fsf.nodeId !== 'string' || fsf.nodeId === '' || typeof fsf.gen !== 'string' || fsf.gen === '')) {
    throw bad(`has fullSyncFrom ${JSON.stringify(fsf)}, not {nodeId: "…", gen: "…"}`);
  }
  const hf = s.hiddenFile;
  if (hf !== undefined && hf !== null && (typeof hf !== 'object' || typeof hf.path !== 'string' || !Number.isSafeInteger(hf.dev) || !Number.isSafeInteger(hf.ino))) {
    throw bad(`has hiddenFile ${JSON.stringify(hf)}, not {path: "…", dev: N, ino: N}`);
  }
  const hs = s.hiddenStamp;
  const stampOk = (x: unknown): boolean => x === null || (typeof x === 'string' && /^[0-9a-f]{32}$/.test(x));
  if (hs !== undefined && hs !== null && (typeof hs !== 'object' || !stampOk(hs.id) || !stampOk(hs.next))) {
    throw bad(`has hiddenStamp ${JSON.stringify(hs)}, not {id: 32 hex digits or null, next: 32 hex digits or null}`);
  }
  if (s.checkpointSent !== undefined && s.checkpointSent !== null && (!Number.isSafeInteger(s.checkpointSent) || s.checkpointSent < 1)) {
    throw bad(`has checkpointSent ${JSON.stringify(s.checkpointSent)}, not a checkpoint number (a positive integer) or null`);
  }
  const sbr = s.splitBrainResync;
  if (sbr !== undefined && sbr !== null && (typeof sbr !== 'object' || typeof sbr.nodeId !== 'string' || sbr.nodeId === '' || typeof sbr.policy !== 'string' || (sbr.salvage !== null && typeof sbr.salvage !== 'string'))) {
    throw bad(`has splitBrainResync ${JSON.stringify(sbr)}, not {nodeId: "…", policy: "…", salvage: "…" or null}`);
  }
  if (s.fullSyncTo !== undefined && s.fullSyncTo !== null && (typeof s.fullSyncTo !== 'string' || s.fullSyncTo === '')) throw bad(`has fullSyncTo ${JSON.stringify(s.fullSyncTo)}, not a node id`);
  const cb = s.checkpointBy;
  if (cb !== undefined && cb !== null && (typeof cb !== 'object' || typeof cb.nodeId !== 'string' || cb.nodeId === '' || (cb.id !== null && (typeof cb.id !== 'string' || cb.id === '')))) {
    throw bad(`has checkpointBy ${JSON.stringify(cb)}, not {nodeId: "…", id: "…" or null}`);
  }
  if (s.hiddenEmptyAt !== undefined && s.hiddenEmptyAt !== null && (!Number.isSafeInteger(s.hiddenEmptyAt) || s.hiddenEmptyAt < 0)) {
    throw bad(`has hiddenEmptyAt ${JSON.stringify(s.hiddenEmptyAt)}, not an epoch (a non-negative integer) or null`);
  }
  checkTuple(s.gi, `the pair state ${path}`, 'ERR_PAIR_STATE');
  return s as PairState;
}

/** What a restarted node does before it serves (replication.md §2 crash rules, §4 activity log). */
export type RestartAction =
  /** crashed between steps 5 and 7 of checkpoint n: the disk is CP_n; redo step 6 (reset the CBW bitmap, empty active, then hidden: they are garbage and never read), then commit epoch n (step 7) */
  | { kind: 'finish-checkpoint'; n: number }
  /** nothing in flight was durable, or a checkpoint crashed before step 5: the view (active → hidden → disk) is CP_epoch plus the node's own writes; keep the overlays (a lost hidden disk recorded empty at a clean stop of this epoch: created empty, nothing lost) */
  | { kind: 'keep-restore-point'; epoch: number }
  /** the hidden disk was lost (volatile storage, deleted) and not recorded empty at a clean stop: the disk may hold writes of an unfinished epoch without their old data: Inconsistent until resynced */
  | { kind: 'mark-inconsistent'; reason: string }
  /** the node crashed as primary: announce crashedPrimary on hello and resync the persisted windows ∪ activity-log extents to the peer */
  | { kind: 'activity-log-resync' };

export interface RestartPlan {
  actions: RestartAction[];
  /** the state to persist once the actions are done */
  next: PairState;
  /** the committed epoch the node's data stands at after the actions */
  restorePoint: number;
  explanation: string;
}

export interface RestartFacts {
  /** the hidden overlay did not survive (tmpfs after a host crash, or deleted) */
  hiddenLost?: boolean;
}

/**
 * The crash rules as a pure function of the persisted state after a restart. Throws
 * ERR_PAIR_STATE for a state no crash can leave (validateState).
 */
export function restartPlan(state: PairState, facts: RestartFacts = {}, path = 'pair state'): RestartPlan {
  validateState(state, path);
  const next: PairState = structuredClone(state);
  const actions: RestartAction[] = [];
  const why: string[] = [];
  if (state.committing !== null) {
    const n = state.committing;
    actions.push({ kind: 'finish-checkpoint', n });
    next.epoch = n;
    next.committing = null;
    why.push(`checkpoint ${n} was being committed (steps 5–7): the disk is CP_${n}, so step 6 is redone and epoch ${n} committed`);
  } else if (facts.hiddenLost && hiddenEmptyAtStop(state) !== null) {
    actions.push({ kind: 'keep-restore-point', epoch: state.epoch });
    why.push(hiddenEmptyNote(state.epoch));
  } else if (state.role === 'secondary' && facts.hiddenLost) {
    // a clean stop does not empty hidden: its copies are the old data of the disk's writes since CP_epoch
    const reason = `the hidden disk did not survive the ${state.cleanShutdown ? '' : 'unclean '}stop and the state does not record it empty, so writes of epoch ${state.epoch + 1} on the disk cannot be rolled back to CP_${state.epoch}`;
    actions.push({ kind: 'mark-inconsistent', reason });
    next.diskState = 'Inconsistent';
    next.restorePointLost = reason;
    why.push(`${reason}: Inconsistent until resynced from the primary`);
  } else {
    actions.push({ kind: 'keep-restore-point', epoch: state.epoch });
    why.push(state.cleanShutdown ? `clean stop at epoch ${state.epoch}` : `no checkpoint was being committed: the restore point is CP_${state.epoch} (a checkpoint cut before step 5 is not committed)`);
  }
  // the record of an empty hidden disk holds until the node serves again (it may write from then on)
  if (next.hiddenEmptyAt != null) next.hiddenEmptyAt = null;
  if (state.crashedPrimary === true || (state.role === 'primary' && !state.cleanShutdown)) {
    actions.push({ kind: 'activity-log-resync' });
    next.crashedPrimary = true;
    why.push('the node crashed as primary: its persisted windows and activity-log extents are resynced to the peer');
  }
  return { actions, next, restorePoint: next.epoch, explanation: why.join('; ') };
}

/**
 * A secondary's start: did a host crash lose its volatile hidden disk? True when the state
 * records a volatile hidden disk of another boot than `bootId` (null: the boot id cannot be
 * read, so nothing says the page cache survived).
 */
export function volatileHiddenLost(s: Readonly<PairState>, bootId: string | null): boolean {
  return s.volatileHidden != null && s.volatileHidden.bootId !== bootId;
}

/**
 * Why the secondary has no checkpoint to roll back to, or null when it has one: a host crash
 * lost its volatile hidden disk, or it never committed a checkpoint, its disk is Inconsistent
 * (a fresh disk, the initial full sync) and its hidden disk keeps nothing (`hiddenEmpty`; a
 * hidden disk that kept the disk's first state since the start is checkpoint 0, and stays so
 * during a resync). Then the replica export writes the disk without copy-before-write (there is
 * nothing to keep, so hidden stays empty) and failover refuses (ERR_PAIR_INCONSISTENT).
 */
export function noRestorePoint(s: Readonly<PairState>, hiddenEmpty: boolean): string | null {
  if (s.restorePointLost) return s.restorePointLost;
  if (s.epoch === 0 && s.diskState === 'Inconsistent' && hiddenEmpty) return 'it never committed a checkpoint and its first resync has not ended (the disk holds part of the primary\'s data)';
  return null;
}

/**
 * A secondary's start with its hidden disk absent: the epoch whose checkpoint the disk is when
 * the state records that a clean stop at that epoch left hidden empty (and no checkpoint is
 * committing, and no restore point was lost since), else null. Then the absent hidden disk lost
 * nothing: a new empty one keeps the restore point.
 */
export function hiddenEmptyAtStop(s: Readonly<PairState>): number | null {
  if (s.role !== 'secondary' || s.committing !== null || s.restorePointLost) return null;
  return s.hiddenEmptyAt != null && s.hiddenEmptyAt === s.epoch ? s.epoch : null;
}

/** status and failover --dry-run: why an absent hidden disk kept the restore point. */
export function hiddenEmptyNote(epoch: number): string {
  return `hidden was empty at the clean stop of epoch ${epoch}: nothing lost (the disk is checkpoint ${epoch}; the hidden disk was created empty)`;
}

/**
 * A secondary's clean stop, after the hidden disk's last write: record whether hidden maps
 * nothing at this epoch (`hiddenEmptyAtStop`). `empty` only when copy-before-write was on (a
 * bypassed one leaves hidden empty with the disk changed) and no checkpoint is committing.
 */
export function markSecondaryStopped(s: PairState, empty: boolean): PairState {
  return { ...s, hiddenEmptyAt: empty && s.committing === null ? s.epoch : null };
}

/** The node becomes primary (promotion, failover) at `now` (ms since the epoch). */
export function markPromoted(s: PairState, now: number): PairState {
  return { ...s, role: 'primary', primarySince: now };
}

/** The node starts serving as primary: a crash from now on is a crashed primary. */
export function markRunning(s: PairState): PairState {
  return { ...s, cleanShutdown: false };
}

/** A clean stop: everything is flushed. */
export function markStopped(s: PairState): PairState {
  return { ...s, cleanShutdown: true };
}

/** The activity-log resync of a crashed primary finished. */
export function clearCrashedPrimary(s: PairState): PairState {
  return { ...s, crashedPrimary: false };
}

export function pairStatePath(imagePath: string): string {
  return `${sideFileBase(imagePath)}.pair.json`;
}

export function initialState(role: PairState['role']): PairState {
  return { version: 1, nodeId: randomUUID(), role, gi: freshTuple(), epoch: 0, committing: null, diskState: 'Inconsistent', cleanShutdown: true };
}

export class PairStateFile {
  private constructor(
    readonly path: string,
    private current: PairState,
  ) {}

  /** Load the state at `path`, or create it with `init()` when there is none. */
  static async open(path: string, init: () => PairState): Promise<PairStateFile> {
    let text: string | undefined;
    try {
      // never through a symlink, never waiting on a FIFO, only a file this user could have written
      // (the disk's directory may be shared: test/pair/pair-state-untrusted.test.ts)
      text = await readOwnFile(path);
    } catch (err) {
      if (err instanceof UntrustedFileError) throw new BlkrepError('ERR_PAIR_STATE', `the pair state ${path} ${err.why}: not one this daemon wrote, not trusted`, { errno: 'EINVAL', details: { path } });
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new BlkrepError('ERR_PAIR_STATE', `cannot read the pair state ${path}: ${(err as Error).message}`, { cause: err });
    }
    if (text === undefined) {
      const f = new PairStateFile(path, init());
      await f.write();
      return f;
    }
    let v: PairState;
    try {
      v = JSON.parse(text) as PairState;
    } catch {
      throw new BlkrepError('ERR_PAIR_STATE', `the pair state ${path} is not JSON (not written by blkrep, or damaged)`);
    }
    return new PairStateFile(path, validateState(v, path));
  }

  get state(): Readonly<PairState> {
    return this.current;
  }

  /**
   * Change the state and make it durable before resolving. The file is replaced one write at a
   * time, in the order of the changes: two replacements at once (a stop's record while the link's
   * close writes the disk state, a checkpoint's commit beside either) could rename the older
   * state last, and a crash then would find a state older than what was acknowledged.
   */
  async update(change: (s: PairState) => PairState): Promise<void> {
    this.current = change(structuredClone(this.current));
    const text = JSON.stringify(this.current, null, 2) + '\n';
    const done = this.writing.then(() => this.write(text));
    this.writing = done.catch(() => {});
    await done;
  }

  /** the last write queued (settled: a failed one does not stop the next) */
  private writing: Promise<void> = Promise.resolve();

  private async write(text = JSON.stringify(this.current, null, 2) + '\n'): Promise<void> {
    await replaceFile(this.path, text, { mode: 0o600, what: 'pair state' });
  }
}
