/**
 * After-split-brain policies (replication.md §5; DRBD 8.4 `drbd_asb_recover_0p/1p/2p`,
 * drbdsetup `after-sb-0pri`, `after-sb-1pri`, `after-sb-2pri`). Applied when the generation
 * table says split brain with a common parent (rule 90); rule 100 (and 41 with two primaries) is
 * resolved only by hand (`discardMyData` on the victim). Every policy defaults to `disconnect`:
 * refuse and explain. Pure: both nodes compute the same answer from the same two sides.
 *
 * "Changes" are the bytes each side's bitmap marks since the generations diverged. Ties are
 * broken by the same deterministic flag as the generation table (the lower node id is the
 * source), and the answer says so (`tiebreak: true`).
 *
 * Resolved split brain resyncs the union of both bitmaps (rule 90 keeps a bitmap resync; a
 * manually resolved rule 100 is a full copy). Before the victim's clusters are overwritten they
 * are copied into a salvage overlay (salvage.ts).
 */
import { BlkrepError } from '../api/errors.js';
import { tiebreakSource, type Decision, type GenerationTuple } from './generations.js';

export type AfterSb0Policy =
  | { policy: 'disconnect' }
  | { policy: 'discard-younger-primary' }
  | { policy: 'discard-older-primary' }
  | { policy: 'discard-zero-changes' }
  | { policy: 'discard-least-changes' }
  | { policy: 'discard-node'; node: string };

export type AfterSb1Policy = { policy: 'disconnect' } | { policy: 'consensus' } | { policy: 'discard-secondary' };

export interface SplitBrainPolicies {
  /** neither node is primary now; default disconnect */
  zeroPrimaries?: AfterSb0Policy;
  /** one node is primary now; default disconnect */
  onePrimary?: AfterSb1Policy;
  // two primaries: always disconnect (DRBD's only other choice is the call-pri-lost-after-sb hook)
}

export interface SplitBrainSide {
  nodeId: string;
  /** the node's name for discard-node (the daemon's --name, or its host name) */
  name: string;
  role: 'primary' | 'secondary' | 'none';
  gi: GenerationTuple;
  /** bytes its bitmap marks since the generations diverged */
  changedBytes: number;
  /** when it became primary in its diverged lineage (ms since the epoch); null: it did not */
  primarySince: number | null;
  /** the operator named this node the victim (DRBD's --discard-my-data) */
  discardMyData?: boolean;
}

export interface SplitBrainResolution {
  /** the policy that decided (after fall-through: discard-younger-primary may end in discard-least-changes) */
  policy: string;
  primaries: 0 | 1 | 2;
  /** which node keeps its data and becomes the resync source; null: disconnect */
  source: 'self' | 'peer' | null;
  /** the node whose diverged clusters are overwritten (after salvage); null: disconnect */
  victim: 'self' | 'peer' | null;
  /** decided by the deterministic tie flag (equal changes) */
  tiebreak: boolean;
  /** full copy (manual resolution of rule 100/41) or the union of both bitmaps (rule 90) */
  mode: 'bitmap' | 'full' | null;
  explanation: string;
}

const ZERO_PRIMARY_POLICIES = ['disconnect', 'discard-younger-primary', 'discard-older-primary', 'discard-zero-changes', 'discard-least-changes', 'discard-node'] as const;
const ONE_PRIMARY_POLICIES = ['disconnect', 'consensus', 'discard-secondary'] as const;

/** Parse an after-sb-0pri value: one of the policies, `discard-node=NAME` or DRBD's `discard-node-NAME`. */
export function parseAfterSb0(text: string): AfterSb0Policy {
  const m = /^discard-node[=-](.+)$/.exec(text);
  if (m) return { policy: 'discard-node', node: m[1]! };
  if ((ZERO_PRIMARY_POLICIES as readonly string[]).includes(text) && text !== 'discard-node') return { policy: text } as AfterSb0Policy;
  throw new BlkrepError('ERR_USAGE', `"${text}" is not an after-split-brain policy for zero primaries (one of ${ZERO_PRIMARY_POLICIES.filter((p) => p !== 'discard-node').join(', ')}, discard-node=NAME)`, {
    errno: 'EINVAL',
    details: { value: text },
  });
}

export function parseAfterSb1(text: string): AfterSb1Policy {
  if ((ONE_PRIMARY_POLICIES as readonly string[]).includes(text)) return { policy: text } as AfterSb1Policy;
  throw new BlkrepError('ERR_USAGE', `"${text}" is not an after-split-brain policy for one primary (one of ${ONE_PRIMARY_POLICIES.join(', ')})`, { errno: 'EINVAL', details: { value: text } });
}

export function formatPolicy(p: AfterSb0Policy | AfterSb1Policy): string {
  return p.policy === 'discard-node' ? `discard-node=${p.node}` : p.policy;
}

type Verdict = { source: 'self' | 'peer' | null; tiebreak: boolean; policy: string; why: string };

const other = (w: 'self' | 'peer'): 'self' | 'peer' => (w === 'self' ? 'peer' : 'self');

function tie(self: SplitBrainSide, peer: SplitBrainSide, policy: string, why: string): Verdict {
  const source = tiebreakSource(self.nodeId, peer.nodeId);
  if (source === null) return { source: null, tiebreak: false, policy, why: `${why}, and the node ids are equal (a copied pair state?): no tiebreak` };
  return { source, tiebreak: true, policy, why: `${why}: the tiebreak (the lower node id) keeps ${source === 'self' ? 'this node' : 'the peer'}` };
}

function leastChanges(self: SplitBrainSide, peer: SplitBrainSide, policy = 'discard-least-changes'): Verdict {
  if (self.changedBytes < peer.changedBytes) return { source: 'peer', tiebreak: false, policy, why: `this node changed ${self.changedBytes} bytes, the peer ${peer.changedBytes}: this node's changes are discarded` };
  if (self.changedBytes > peer.changedBytes) return { source: 'self', tiebreak: false, policy, why: `this node changed ${self.changedBytes} bytes, the peer ${peer.changedBytes}: the peer's changes are discarded` };
  return tie(self, peer, policy, `both nodes changed ${self.changedBytes} bytes`);
}

function zeroChanges(self: SplitBrainSide, peer: SplitBrainSide): Verdict | undefined {
  const policy = 'discard-zero-changes';
  if (self.changedBytes === 0 && peer.changedBytes === 0) return tie(self, peer, policy, 'neither node changed anything');
  if (peer.changedBytes === 0) return { source: 'self', tiebreak: false, policy, why: `the peer changed nothing, this node ${self.changedBytes} bytes: this node is kept` };
  if (self.changedBytes === 0) return { source: 'peer', tiebreak: false, policy, why: `this node changed nothing, the peer ${peer.changedBytes} bytes: the peer is kept` };
  return undefined;
}

/** DRBD's younger/older primary: who became primary later. Undefined when it does not tell. */
function byPromotion(self: SplitBrainSide, peer: SplitBrainSide, discardYounger: boolean): Verdict | undefined {
  const s = self.primarySince;
  const p = peer.primarySince;
  let younger: 'self' | 'peer' | undefined;
  if (s !== null && (p === null || s > p)) younger = 'self';
  else if (p !== null && (s === null || p > s)) younger = 'peer';
  if (younger === undefined) return undefined;
  const victim = discardYounger ? younger : other(younger);
  const when = (x: number | null) => (x === null ? 'never' : new Date(x).toISOString());
  return {
    source: other(victim),
    tiebreak: false,
    policy: discardYounger ? 'discard-younger-primary' : 'discard-older-primary',
    why: `this node became primary ${when(s)}, the peer ${when(p)}: the ${discardYounger ? 'younger' : 'older'} primary (${victim === 'self' ? 'this node' : 'the peer'}) is discarded`,
  };
}

function recover0(policy: AfterSb0Policy, self: SplitBrainSide, peer: SplitBrainSide): Verdict {
  switch (policy.policy) {
    case 'disconnect':
      return { source: null, tiebreak: false, policy: 'disconnect', why: 'the policy for zero primaries is disconnect' };
    case 'discard-node': {
      const s = self.name === policy.node;
      const p = peer.name === policy.node;
      if (s && p) return { source: null, tiebreak: false, policy: formatPolicy(policy), why: `both nodes are named "${policy.node}"` };
      if (!s && !p) return { source: null, tiebreak: false, policy: formatPolicy(policy), why: `neither node is named "${policy.node}" (they are "${self.name}" and "${peer.name}")` };
      return { source: s ? 'peer' : 'self', tiebreak: false, policy: formatPolicy(policy), why: `node "${policy.node}" is discarded` };
    }
    case 'discard-zero-changes':
      return zeroChanges(self, peer) ?? { source: null, tiebreak: false, policy: 'discard-zero-changes', why: `both nodes changed data (this node ${self.changedBytes} bytes, the peer ${peer.changedBytes})` };
    case 'discard-least-changes':
      return zeroChanges(self, peer) ?? leastChanges(self, peer);
    case 'discard-younger-primary':
    case 'discard-older-primary': {
      const v = byPromotion(self, peer, policy.policy === 'discard-younger-primary');
      if (v) return v;
      const fall = zeroChanges(self, peer) ?? leastChanges(self, peer);
      return { ...fall, why: `${policy.policy} does not tell (promotion times ${self.primarySince ?? 'never'} and ${peer.primarySince ?? 'never'}), so ${fall.policy}: ${fall.why}` };
    }
  }
}

function recover1(policies: SplitBrainPolicies, self: SplitBrainSide, peer: SplitBrainSide): Verdict {
  const policy = policies.onePrimary ?? { policy: 'disconnect' };
  const primary: 'self' | 'peer' = self.role === 'primary' ? 'self' : 'peer';
  switch (policy.policy) {
    case 'disconnect':
      return { source: null, tiebreak: false, policy: 'disconnect', why: 'the policy for one primary is disconnect' };
    case 'discard-secondary':
      return { source: primary, tiebreak: false, policy: 'discard-secondary', why: `the secondary (${primary === 'self' ? 'the peer' : 'this node'}) is discarded` };
    case 'consensus': {
      const v = recover0(policies.zeroPrimaries ?? { policy: 'disconnect' }, self, peer);
      if (v.source === primary) return { ...v, policy: `consensus (${v.policy})`, why: `${v.why}; that discards the secondary, so consensus agrees` };
      return { source: null, tiebreak: false, policy: `consensus (${v.policy})`, why: `${v.why}; consensus only discards the secondary, so: disconnect` };
    }
  }
}

/** DRBD's manual resolution: the node the operator marked with discard-my-data loses. */
function manual(self: SplitBrainSide, peer: SplitBrainSide): Verdict | undefined {
  const s = self.discardMyData === true;
  const p = peer.discardMyData === true;
  if (s === p) return undefined;
  return { source: s ? 'peer' : 'self', tiebreak: false, policy: 'discard-my-data', why: `the operator discards the data of ${s ? 'this node' : 'the peer'}` };
}

/**
 * Resolve a split brain the generation table found (`decision.result` split-brain or
 * split-brain-manual). Throws ERR_USAGE for a decision that is not a split brain.
 */
export function resolveSplitBrain(decision: Pick<Decision, 'rule' | 'result'>, self: SplitBrainSide, peer: SplitBrainSide, policies: SplitBrainPolicies = {}): SplitBrainResolution {
  if (decision.result !== 'split-brain' && decision.result !== 'split-brain-manual') {
    throw new BlkrepError('ERR_USAGE', `rule ${decision.rule} (${decision.result}) is not a split brain: no after-split-brain policy applies`, { errno: 'EINVAL' });
  }
  const primaries = ((self.role === 'primary' ? 1 : 0) + (peer.role === 'primary' ? 1 : 0)) as 0 | 1 | 2;
  let v: Verdict;
  if (decision.result === 'split-brain-manual') {
    v = { source: null, tiebreak: false, policy: 'disconnect', why: `rule ${decision.rule} is resolved only by hand (discard-my-data on the victim)` };
  } else if (primaries === 0) {
    v = recover0(policies.zeroPrimaries ?? { policy: 'disconnect' }, self, peer);
  } else if (primaries === 1) {
    v = recover1(policies, self, peer);
  } else {
    v = { source: null, tiebreak: false, policy: 'disconnect', why: 'both nodes are primary: only disconnect is possible' };
  }
  if (v.source === null) v = manual(self, peer) ?? v;
  const mode = v.source === null ? null : decision.result === 'split-brain-manual' ? 'full' : 'bitmap';
  const head = `split brain (rule ${decision.rule}, ${primaries} primar${primaries === 1 ? 'y' : 'ies'})`;
  const tail = v.source === null ? 'disconnected: nothing is copied until an operator decides' : `resolved by ${v.policy}: ${v.source === 'self' ? 'this node' : 'the peer'} is the source of a ${mode} resync`;
  return {
    policy: v.policy,
    primaries,
    source: v.source,
    victim: v.source === null ? null : other(v.source),
    tiebreak: v.tiebreak,
    mode,
    explanation: `${head}: ${v.why}; ${tail}`,
  };
}
