/**
 * Generations (GI): 64-bit random ids of a data lineage, kept as DRBD keeps its UUID tuple
 * {current, bitmap, history[4]}, and the decision two nodes take on connect (replication.md §5,
 * DRBD 8.4 `drbd_uuid_compare` and `drbd_sync_handshake`). Pure: no I/O, no clock.
 *
 * Values are 16 lowercase hex digits; EMPTY is "no generation". The role is not kept in the GI
 * (DRBD keeps "was primary" in bit 0), so nothing is masked when comparing.
 *
 * Life cycle (who changes which slot, and when):
 *
 *   event                                   node                 tuple change
 *   initial full sync                       the source           current: new (was just created)
 *   promotion while disconnected, failover  the promoted node    mint: bitmap ← current, current: new
 *   a primary losing its peer               the primary          mint (same)
 *   resync start                            source               history ← bitmap, bitmap ← bitmap + 2^48 (or new)
 *                                           target               current ← that sync GI, bitmap ← EMPTY
 *   resync end                              source               history ← bitmap, bitmap ← EMPTY
 *                                           target               adopts the source's tuple
 *
 * A node mints only while its bitmap slot is EMPTY (DRBD: `drbd_uuid_new_current` only when
 * the bitmap UUID is 0): a bitmap GI already names the last generation both nodes shared, and
 * keeping it is what lets rule 50/70 find it on reconnect. Epochs advance per checkpoint and never
 * mint (a GI per checkpoint would overflow the history in seconds and turn reconnects into full
 * syncs).
 *
 * "bitmap" results resync the union of both nodes' bitmaps (DRBD exchanges them on connect); a
 * crashed primary's bitmap includes its activity-log extents and persisted windows.
 */
import { randomBytes } from 'node:crypto';
import { BlkrepError } from '../api/errors.js';

/** messages.ts's DiskState, spelled out here because messages.ts imports this file (no cycles) */
type DiskState = 'UpToDate' | 'Consistent' | 'Outdated' | 'Inconsistent' | 'Failed';

export const EMPTY = '0000000000000000';
/** DRBD's UUID_JUST_CREATED: a disk nobody has written as part of a pair */
export const JUST_CREATED = '0000000000000004';
export const HISTORY_SLOTS = 4;
/** DRBD's UUID_NEW_BM_OFFSET: the sync GI of a resumed lineage is its bitmap GI plus this */
export const NEW_BITMAP_OFFSET = 1n << 48n;

const GI_PATTERN = /^[0-9a-f]{16}$/;

export interface GenerationTuple {
  current: string;
  bitmap: string;
  history: string[];
}

export function newGeneration(): string {
  for (;;) {
    const g = randomBytes(8).toString('hex');
    if (g !== EMPTY && g !== JUST_CREATED) return g;
  }
}

export function freshTuple(): GenerationTuple {
  return { current: JUST_CREATED, bitmap: EMPTY, history: [] };
}

/** The tuple holds no data lineage yet (just created, or nothing at all). */
export function hasNoGeneration(t: GenerationTuple): boolean {
  return t.current === EMPTY || t.current === JUST_CREATED;
}

/**
 * Check a tuple read from a state file or received from a peer; throws `code` naming the slot
 * and the value. Returns the tuple, so it can wrap a parse.
 */
export function checkTuple(t: unknown, what: string, code = 'ERR_PAIR_PROTOCOL'): GenerationTuple {
  const bad = (why: string) => new BlkrepError(code, `${what}: the generation tuple ${why}`, { errno: 'EINVAL', details: { tuple: t as object } });
  if (typeof t !== 'object' || t === null) throw bad('is missing');
  const v = t as Partial<GenerationTuple>;
  for (const slot of ['current', 'bitmap'] as const) {
    if (typeof v[slot] !== 'string' || !GI_PATTERN.test(v[slot])) throw bad(`has ${slot} ${JSON.stringify(v[slot])}, not 16 lowercase hex digits`);
  }
  if (!Array.isArray(v.history)) throw bad('has no history list');
  if (v.history.length > HISTORY_SLOTS) throw bad(`has ${v.history.length} history slots, at most ${HISTORY_SLOTS} are allowed`);
  v.history.forEach((h, i) => {
    if (typeof h !== 'string' || !GI_PATTERN.test(h)) throw bad(`has history[${i}] ${JSON.stringify(h)}, not 16 lowercase hex digits`);
  });
  return t as GenerationTuple;
}

function pushHistory(history: string[], g: string): string[] {
  return g === EMPTY ? history : [g, ...history].slice(0, HISTORY_SLOTS);
}

/** The node starts a new lineage (promotion while disconnected, a primary losing its peer, failover). */
export function mint(t: GenerationTuple, g: string = newGeneration()): GenerationTuple {
  return { current: g, bitmap: t.bitmap === EMPTY ? t.current : t.bitmap, history: t.bitmap === EMPTY ? t.history : pushHistory(t.history, t.current) };
}

/** Events of a node's life that may start a new lineage. */
export type LineageEvent =
  /** this node becomes the source of the first full sync of the pair */
  | { kind: 'initial-sync-source' }
  /** this node becomes primary; `connected`: a peer is connected and in step */
  | { kind: 'promote'; connected: boolean }
  /** this node, a primary, lost its peer (link down, forwarding stopped, `failover` on a primary) */
  | { kind: 'peer-lost'; role: 'primary' | 'secondary' | 'none' }
  /** a secondary is promoted by `failover` (its primary is gone) */
  | { kind: 'failover' };

/**
 * The tuple after `event` (replication.md §5: new GI on initial full sync, a disconnected node
 * becoming primary, a primary disconnecting). Returns `t` itself when nothing changes, so callers
 * persist only when `result !== t`.
 */
export function onLineageEvent(t: GenerationTuple, event: LineageEvent, g: string = newGeneration()): GenerationTuple {
  switch (event.kind) {
    case 'initial-sync-source':
      return hasNoGeneration(t) ? { current: g, bitmap: EMPTY, history: t.history } : t;
    case 'promote':
      return !event.connected && t.bitmap === EMPTY ? mint(t, g) : t;
    case 'peer-lost':
      return event.role === 'primary' && t.bitmap === EMPTY ? mint(t, g) : t;
    case 'failover':
      return t.bitmap === EMPTY ? mint(t, g) : t;
  }
}

function addOffset(g: string): string {
  return ((BigInt(`0x${g}`) + NEW_BITMAP_OFFSET) & 0xffffffffffffffffn).toString(16).padStart(16, '0');
}

/**
 * The resync source starts: its bitmap GI goes to history and the bitmap slot gets the sync GI
 * (bitmap GI + 2^48, or a new one when it had none), which the target takes as its current.
 */
export function startResyncAsSource(t: GenerationTuple, g: string = newGeneration()): { tuple: GenerationTuple; syncGi: string } {
  const syncGi = t.bitmap !== EMPTY && t.bitmap !== JUST_CREATED ? addOffset(t.bitmap) : g;
  return { tuple: { current: t.current, bitmap: syncGi, history: pushHistory(t.history, t.bitmap) }, syncGi };
}

/** The resync target starts: its current becomes the source's sync GI (it is Inconsistent now). */
export function startResyncAsTarget(t: GenerationTuple, syncGi: string): GenerationTuple {
  return { current: syncGi, bitmap: EMPTY, history: t.history };
}

/** The resync source finished: the bitmap GI moves into history. */
export function finishResyncAsSource(t: GenerationTuple): GenerationTuple {
  return { current: t.current, bitmap: EMPTY, history: pushHistory(t.history, t.bitmap) };
}

/** The resync target finished: it adopts the source's tuple (as the source has it after finishing). */
export function finishResyncAsTarget(source: GenerationTuple): GenerationTuple {
  return finishResyncAsSource(source);
}

export type DecisionResult =
  | 'no-sync'
  | 'source-bitmap'
  | 'target-bitmap'
  | 'source-full'
  | 'target-full'
  /** rule 90: both went on from a common parent; an after-split-brain policy may resolve it */
  | 'split-brain'
  /** rule 100 (and 41 with two primaries): only an operator resolves it (discard-my-data) */
  | 'split-brain-manual'
  | 'unrelated'
  /** the table's result is not allowed: see `override` and `code` */
  | 'refused';

export type DecisionOverride =
  /** an Inconsistent side becomes the target, whatever the table said */
  | 'inconsistent-target'
  /** the table makes an Inconsistent side the source: refused */
  | 'inconsistent-source'
  /** the table makes a current primary (with consistent data) the target: refused (DRBD rr-conflict disconnect) */
  | 'rr-conflict'
  /** a side's disk has Failed: nothing is synced to or from it */
  | 'failed-disk';

export interface Decision {
  /** the rule number of the table (DRBD's), −1000 for unrelated data */
  rule: number;
  /** from this node's point of view */
  result: DecisionResult;
  explanation: string;
  /** the table's result before an override changed or refused it */
  tableResult?: DecisionResult;
  override?: DecisionOverride;
  /** the stable error code when the link is refused (split brain, unrelated, refused) */
  code?: 'ERR_PAIR_SPLIT_BRAIN' | 'ERR_PAIR_UNRELATED' | 'ERR_PAIR_ROLE' | 'ERR_PAIR_STATE';
  /**
   * Rules 34–37, 51, 71 repair a tuple whose last update was lost (a crash or a lost message at
   * resync start or end): the corrected tuple of this node (persist it) and what this node now
   * assumes of the peer's.
   */
  corrected?: { self?: GenerationTuple; peer?: GenerationTuple };
}

export interface NodeView {
  gi: GenerationTuple;
  /** this node was a primary and did not stop cleanly (its activity log must be resynced) */
  crashedPrimary: boolean;
  /** the role now; absent = secondary */
  role?: 'primary' | 'secondary' | 'none';
  /** absent = UpToDate */
  diskState?: DiskState;
  /** the node id (tiebreaks); absent = '' */
  nodeId?: string;
}

/**
 * The deterministic tiebreak both nodes compute alike (DRBD's RESOLVE_CONFLICTS flag): the node
 * whose id sorts first is the source. Null when the ids are equal (a copied pair state).
 */
export function tiebreakSource(selfId: string, peerId: string): 'self' | 'peer' | null {
  if (selfId === peerId) return null;
  return selfId < peerId ? 'self' : 'peer';
}

function d(rule: number, result: DecisionResult, explanation: string, extra: Partial<Decision> = {}): Decision {
  const code = result === 'split-brain' || result === 'split-brain-manual' ? 'ERR_PAIR_SPLIT_BRAIN' : result === 'unrelated' ? 'ERR_PAIR_UNRELATED' : undefined;
  return { rule, result, explanation, ...(code ? { code } : {}), ...extra };
}

const same = (a: string | undefined, b: string | undefined) => a !== undefined && a !== EMPTY && a === b;

/** Currents equal, exactly one bitmap set: an interrupted resync (rules 34–37). */
function interruptedResync(s: GenerationTuple, p: GenerationTuple): Decision | undefined {
  if (s.bitmap !== EMPTY && p.bitmap === EMPTY) {
    if (same(s.bitmap, p.history[0]) && (s.history[0] ?? EMPTY) === (p.history[1] ?? EMPTY)) {
      return d(34, 'source-bitmap', 'same generation; this node was the resync source and missed the end of the resync: it moves its bitmap generation into history and goes on as source', {
        corrected: { self: finishResyncAsSource(s) },
      });
    }
    return d(36, 'source-bitmap', 'same generation; only this node has a bitmap generation: an interrupted resync resumes with this node as source');
  }
  if (s.bitmap === EMPTY && p.bitmap !== EMPTY) {
    if (same(p.bitmap, s.history[0]) && (p.history[0] ?? EMPTY) === (s.history[1] ?? EMPTY)) {
      return d(35, 'target-bitmap', 'same generation; the peer was the resync source and missed the end of the resync: it moves its bitmap generation into history and goes on as source', {
        corrected: { peer: finishResyncAsSource(p) },
      });
    }
    return d(37, 'target-bitmap', 'same generation; only the peer has a bitmap generation: an interrupted resync resumes with the peer as source');
  }
  return undefined;
}

/** Currents equal, no bitmaps: in step, or a crash (rules 40/41). */
function crashRecovery(self: NodeView, peer: NodeView): Decision {
  if (!self.crashedPrimary && !peer.crashedPrimary) return d(40, 'no-sync', 'same generation and neither node crashed as primary: the disks are in step');
  const selfPri = self.role === 'primary';
  const peerPri = peer.role === 'primary';
  if (selfPri && peerPri) return d(41, 'split-brain-manual', 'same generation, a crashed primary, and both nodes are primary now: cannot tell which disk holds the last writes');
  if (selfPri) return d(41, 'source-bitmap', 'same generation and a crashed primary; this node is primary now: its activity log is resynced to the peer');
  if (peerPri) return d(41, 'target-bitmap', 'same generation and a crashed primary; the peer is primary now: its activity log is resynced here');
  if (self.crashedPrimary && !peer.crashedPrimary) return d(40, 'source-bitmap', 'same generation; this node crashed as primary: its activity log is resynced to the peer');
  if (peer.crashedPrimary && !self.crashedPrimary) return d(40, 'target-bitmap', 'same generation; the peer crashed as primary: its activity log is resynced here');
  const tb = tiebreakSource(self.nodeId ?? '', peer.nodeId ?? '');
  if (tb === null) return d(40, 'split-brain-manual', 'same generation, both nodes crashed as primary, and their node ids are equal (a copied pair state?): the tie cannot be broken');
  return tb === 'self'
    ? d(40, 'source-bitmap', 'same generation; both nodes crashed as primary: the tiebreak (the lower node id) makes this node the source of the activity-log resync')
    : d(40, 'target-bitmap', 'same generation; both nodes crashed as primary: the tiebreak (the lower node id) makes the peer the source of the activity-log resync');
}

/**
 * The generation table alone (replication.md §5, DRBD 8.4 `drbd_uuid_compare`), evaluated top
 * down, from this node's point of view. EMPTY counts as just created, so rule 10 is symmetric.
 */
export function compareGenerations(self: NodeView, peer: NodeView): Decision {
  const s = self.gi;
  const p = peer.gi;
  if (hasNoGeneration(s) && hasNoGeneration(p)) return d(10, 'no-sync', 'both disks are just created: nothing to compare (the first full sync picks its source)');
  if (hasNoGeneration(s)) return d(20, 'target-full', 'this node has no generation: it receives a full copy');
  if (hasNoGeneration(p)) return d(30, 'source-full', 'the peer has no generation: it receives a full copy');
  if (s.current === p.current) return interruptedResync(s, p) ?? crashRecovery(self, peer);
  if (s.current === p.bitmap) return d(50, 'target-bitmap', "the peer went on from this node's generation: this node receives what the peer's bitmap marks");
  if (same(s.current, p.history[0]) && addOffset(p.history[0]!) === p.bitmap) {
    const fixed = { current: p.current, bitmap: p.history[0]!, history: p.history.slice(1) };
    return d(51, 'target-bitmap', "the peer started a resync to this node but its sync generation never arrived here: the peer's resync start is undone and it resumes by bitmap", { corrected: { peer: fixed } });
  }
  if (p.history.includes(s.current)) return d(60, 'target-full', "this node's generation is in the peer's history, too old for a bitmap: it receives a full copy");
  if (s.bitmap === p.current) return d(70, 'source-bitmap', "this node went on from the peer's generation: the peer receives what this node's bitmap marks");
  if (same(s.history[0], p.current) && addOffset(s.history[0]!) === s.bitmap) {
    const fixed = { current: s.current, bitmap: s.history[0]!, history: s.history.slice(1) };
    return d(71, 'source-bitmap', "this node started a resync to the peer but its sync generation never arrived there: this node's resync start is undone and it resumes by bitmap", { corrected: { self: fixed } });
  }
  if (s.history.includes(p.current)) return d(80, 'source-full', "the peer's generation is in this node's history, too old for a bitmap: the peer receives a full copy");
  if (s.bitmap !== EMPTY && s.bitmap === p.bitmap) return d(90, 'split-brain', 'both nodes went on from the same generation and both have written since: split brain with a common parent');
  if (s.history.some((h) => h !== EMPTY && p.history.includes(h))) return d(100, 'split-brain-manual', 'the nodes share only an older generation in their histories: split brain, resolved only by hand');
  return d(-1000, 'unrelated', 'the generations share no history: unrelated data');
}

const IS_SOURCE = new Set<DecisionResult>(['source-bitmap', 'source-full']);
const IS_TARGET = new Set<DecisionResult>(['target-bitmap', 'target-full']);
const CONSISTENT_RANK: Record<DiskState, number> = { Failed: 0, Inconsistent: 1, Outdated: 2, Consistent: 3, UpToDate: 4 };

function rank(v: NodeView): number {
  return CONSISTENT_RANK[v.diskState ?? 'UpToDate'];
}

function refuse(table: Decision, override: DecisionOverride, code: 'ERR_PAIR_ROLE' | 'ERR_PAIR_STATE', why: string): Decision {
  return { rule: table.rule, result: 'refused', tableResult: table.result, override, code, explanation: `${table.explanation}; but ${why}: refused`, ...(table.corrected ? { corrected: table.corrected } : {}) };
}

/**
 * What two nodes do on connect: the generation table, then the disk states (an Inconsistent
 * side is forced target; it can never be the source; a Failed disk takes no part), then
 * rr-conflict (a current primary with consistent data is never made the target). Symmetric:
 * both nodes reach mirror-image decisions from the same two views.
 */
export function decide(self: NodeView, peer: NodeView): Decision {
  checkTuple(self.gi, 'this node', 'ERR_PAIR_STATE');
  checkTuple(peer.gi, 'the peer');
  const table = compareGenerations(self, peer);
  if (table.result === 'unrelated') return table;
  if (self.diskState === 'Failed' || peer.diskState === 'Failed') {
    return refuse(table, 'failed-disk', 'ERR_PAIR_STATE', `${self.diskState === 'Failed' ? "this node's" : "the peer's"} disk has Failed`);
  }
  let out = table;
  const sr = rank(self);
  const pr = rank(peer);
  if ((sr === 1 && pr > 1) || (pr === 1 && sr > 1)) {
    const full = table.result === 'split-brain-manual' || table.result.endsWith('-full');
    const selfSource = sr > 1;
    const result: DecisionResult = `${selfSource ? 'source' : 'target'}-${full ? 'full' : 'bitmap'}`;
    if (result !== table.result) {
      out = {
        ...table,
        result,
        tableResult: table.result,
        override: 'inconsistent-target',
        explanation: `${table.explanation}; but ${selfSource ? 'the peer' : 'this node'} is Inconsistent, so it is the target${full ? ' of a full copy' : ''}`,
      };
      delete out.code;
    }
  }
  if (IS_SOURCE.has(out.result) && sr <= 1) return refuse(table, 'inconsistent-source', 'ERR_PAIR_STATE', 'this node would be the source and its disk is Inconsistent');
  if (IS_TARGET.has(out.result) && pr <= 1) return refuse(table, 'inconsistent-source', 'ERR_PAIR_STATE', 'the peer would be the source and its disk is Inconsistent');
  if (IS_TARGET.has(out.result) && self.role === 'primary' && sr >= 3) return refuse(table, 'rr-conflict', 'ERR_PAIR_ROLE', 'this node would be the target and it is a primary serving its data');
  if (IS_SOURCE.has(out.result) && peer.role === 'primary' && pr >= 3) return refuse(table, 'rr-conflict', 'ERR_PAIR_ROLE', 'the peer would be the target and it is a primary serving its data');
  return out;
}

/** The same decision seen from the other node (source ↔ target). */
export function mirrorResult(r: DecisionResult): DecisionResult {
  if (r.startsWith('source-')) return r.replace('source-', 'target-') as DecisionResult;
  if (r.startsWith('target-')) return r.replace('target-', 'source-') as DecisionResult;
  return r;
}
