/**
 * Generations (GI): 64-bit random ids of a data lineage, kept as DRBD keeps its UUID tuple
 * {current, bitmap, history[2]}, and the decision two nodes take on connect (replication.md §5,
 * DRBD 8.4 drbd_uuid_compare). Pure: no I/O.
 *
 * Values are 16 lowercase hex digits; EMPTY is "no generation".
 *
 * STATUS: interface fixed; `decide` implements only rules 10/20/30/40/50/70 and otherwise says
 * split brain or unrelated — the complete table and the after-split-brain policies are being
 * written (issue 10).
 */
import { randomBytes } from 'node:crypto';

export const EMPTY = '0000000000000000';
/** DRBD's UUID_JUST_CREATED: a disk nobody has written as part of a pair */
export const JUST_CREATED = '0000000000000004';
export const HISTORY_SLOTS = 4;

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

/** The node starts a new lineage (promotion while disconnected, a primary losing its peer, failover). */
export function mint(t: GenerationTuple, g: string = newGeneration()): GenerationTuple {
  return { current: g, bitmap: t.bitmap === EMPTY ? t.current : t.bitmap, history: t.bitmap === EMPTY ? t.history : [t.current, ...t.history].slice(0, HISTORY_SLOTS) };
}

export type DecisionResult =
  | 'no-sync'
  | 'source-bitmap'
  | 'target-bitmap'
  | 'source-full'
  | 'target-full'
  | 'split-brain'
  | 'split-brain-manual'
  | 'unrelated';

export interface Decision {
  /** the rule number of the table (DRBD's), −1000 for unrelated data */
  rule: number;
  /** from this node's point of view */
  result: DecisionResult;
  explanation: string;
}

export interface NodeView {
  gi: GenerationTuple;
  crashedPrimary: boolean;
}

export function decide(self: NodeView, peer: NodeView): Decision {
  const s = self.gi;
  const p = peer.gi;
  if (s.current === JUST_CREATED && p.current === JUST_CREATED) return { rule: 10, result: 'no-sync', explanation: 'both disks are just created: nothing to compare' };
  if (s.current === EMPTY || s.current === JUST_CREATED) return { rule: 20, result: 'target-full', explanation: 'this node has no generation: it receives a full copy' };
  if (p.current === EMPTY || p.current === JUST_CREATED) return { rule: 30, result: 'source-full', explanation: 'the peer has no generation: it receives a full copy' };
  if (s.current === p.current) {
    if (self.crashedPrimary && !peer.crashedPrimary) return { rule: 40, result: 'source-bitmap', explanation: 'same generation; this node crashed as primary: its activity log is resynced to the peer' };
    if (peer.crashedPrimary && !self.crashedPrimary) return { rule: 40, result: 'target-bitmap', explanation: 'same generation; the peer crashed as primary: its activity log is resynced here' };
    return { rule: 40, result: 'no-sync', explanation: 'same generation: the disks are in step' };
  }
  if (s.current === p.bitmap) return { rule: 50, result: 'target-bitmap', explanation: 'the peer went on from this node\'s generation: this node receives the peer\'s bitmap' };
  if (s.bitmap === p.current) return { rule: 70, result: 'source-bitmap', explanation: 'this node went on from the peer\'s generation: the peer receives this node\'s bitmap' };
  if (s.bitmap !== EMPTY && s.bitmap === p.bitmap) return { rule: 90, result: 'split-brain', explanation: 'both nodes went on from the same generation: split brain' };
  return { rule: -1000, result: 'unrelated', explanation: 'the generations share no history: unrelated data' };
}
