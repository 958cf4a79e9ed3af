/**
 * Explain before acting (replication.md §5, §8): what connecting two nodes, or promoting one,
 * would do — the rule that decides, the direction, full copy or bitmap, the bytes, and how many
 * acknowledged writes would be lost — as one plain JSON object with a `text` rendering, for
 * `status` (a refused or split-brain link) and `failover --dry-run`. Pure: the callers (the
 * secondary's and the primary's pair roles) gather the numbers and pass them in; nothing here
 * reads a disk or the clock.
 *
 * Inputs are plain objects, documented field by field below, so they can be filled from a
 * `hello`/`welcome` message, the pair state file and the overlays' allocation counts.
 */
import { BlkrepError } from '../api/errors.js';
import { formatSize } from '../util/size.js';
import { decide, newGeneration, onLineageEvent, type Decision, type DecisionResult, type GenerationTuple } from './generations.js';
import type { DiskState, LinkDecision, NodeSummary } from './messages.js';
import { failoverRefusal, type SecondaryFailoverRule } from './secondary-explain.js';
import { resolveSplitBrain, type SplitBrainPolicies, type SplitBrainResolution } from './split-brain.js';

/** One node as the connect decision sees it. */
export interface ConnectSide {
  nodeId: string;
  /** for discard-node=NAME; default the nodeId */
  name?: string;
  role: 'primary' | 'secondary' | 'none';
  gi: GenerationTuple;
  diskState: DiskState;
  /** crashed as primary, activity-log resync owed */
  crashedPrimary: boolean;
  /** bytes its bitmap marks for the peer since the generations diverged (hello's bitmapBytes) */
  bitmapBytes: number;
  /** when it became primary in its diverged lineage (ms since the epoch); absent/null: it did not */
  primarySince?: number | null;
  /** the operator marked it the victim of a split brain */
  discardMyData?: boolean;
}

/** A hello/welcome's node summary as a ConnectSide (the optional policy fields carried over). */
export function connectSideOf(n: NodeSummary): ConnectSide {
  return {
    nodeId: n.nodeId,
    name: n.name ?? n.nodeId,
    role: n.role,
    gi: n.gi,
    diskState: n.diskState,
    crashedPrimary: n.crashedPrimary,
    bitmapBytes: n.bitmapBytes,
    primarySince: n.primarySince ?? null,
    ...(n.discardMyData ? { discardMyData: true } : {}),
  };
}

export interface ConnectOptions {
  /** the disk's length in bytes: what a full copy moves */
  size: number;
  /** after-split-brain policies (default: disconnect) */
  policies?: SplitBrainPolicies;
  /** bytes of the union of both bitmaps when the caller knows it; else the sum is given as an upper bound */
  unionBytes?: number;
}

export type Direction = 'to-peer' | 'from-peer' | 'none';
export type SyncMode = 'full' | 'bitmap' | 'none';

export interface ConnectExplanation {
  /** the generation table's rule (−1000: unrelated) */
  rule: number;
  /** the decision after overrides and, for a split brain, after the policy */
  result: DecisionResult;
  direction: Direction;
  mode: SyncMode;
  /** bytes the resync copies (0 when none) */
  bytes: number;
  /** false: `bytes` is an upper bound (the sum of both bitmaps) */
  bytesExact: boolean;
  /** set when the link is refused: stable code and why */
  refused?: { code: string; message: string };
  splitBrain?: SplitBrainResolution;
  /** tuple corrections the rule calls for (34–37, 51, 71) */
  corrected?: Decision['corrected'];
  self: GenerationTuple;
  peer: GenerationTuple;
  text: string;
}

export function formatTuple(t: GenerationTuple): string {
  return `current ${t.current}, bitmap ${t.bitmap}, history [${t.history.join(', ')}]`;
}

function directionOf(result: DecisionResult): Direction {
  if (result.startsWith('source-')) return 'to-peer';
  if (result.startsWith('target-')) return 'from-peer';
  return 'none';
}

function modeOf(result: DecisionResult): SyncMode {
  if (result.endsWith('-full')) return 'full';
  if (result.endsWith('-bitmap')) return 'bitmap';
  return 'none';
}

function resyncBytes(mode: SyncMode, self: ConnectSide, peer: ConnectSide, o: ConnectOptions): { bytes: number; exact: boolean } {
  if (mode === 'full') return { bytes: o.size, exact: true };
  if (mode === 'none') return { bytes: 0, exact: true };
  if (o.unionBytes !== undefined) return { bytes: o.unionBytes, exact: true };
  return { bytes: Math.min(o.size, self.bitmapBytes + peer.bitmapBytes), exact: false };
}

function checkNumbers(o: Record<string, number | null | undefined>): void {
  for (const [name, v] of Object.entries(o)) {
    if (v === undefined || v === null) continue;
    if (!Number.isSafeInteger(v) || v < 0) throw new BlkrepError('ERR_USAGE', `${name} is ${v}, not a byte count or count ≥ 0`, { errno: 'EINVAL', details: { [name]: v } });
  }
}

function describeResync(direction: Direction, mode: SyncMode, bytes: number, exact: boolean): string {
  if (mode === 'none') return 'nothing to copy';
  const dir = direction === 'to-peer' ? 'from this node to the peer' : 'from the peer to this node';
  return `${mode === 'full' ? 'full copy' : 'bitmap resync'} ${dir}: ${exact ? '' : 'at most '}${formatSize(bytes)} (${bytes} bytes)`;
}

/** What connecting `self` to `peer` would do (both nodes compute the same, mirrored). */
export function explainConnect(self: ConnectSide, peer: ConnectSide, options: ConnectOptions): ConnectExplanation {
  checkNumbers({ size: options.size, 'this node bitmapBytes': self.bitmapBytes, 'peer bitmapBytes': peer.bitmapBytes, unionBytes: options.unionBytes });
  const decision = decide({ ...self }, { ...peer });
  let result = decision.result;
  let refused: ConnectExplanation['refused'];
  let splitBrain: SplitBrainResolution | undefined;
  let why = `rule ${decision.rule}: ${decision.explanation}`;
  if (result === 'split-brain' || result === 'split-brain-manual') {
    const side = (s: ConnectSide) => ({ nodeId: s.nodeId, name: s.name ?? s.nodeId, role: s.role, gi: s.gi, changedBytes: s.bitmapBytes, primarySince: s.primarySince ?? null, ...(s.discardMyData ? { discardMyData: true } : {}) });
    splitBrain = resolveSplitBrain(decision, side(self), side(peer), options.policies);
    why += `\n${splitBrain.explanation}`;
    const victim = splitBrain.victim === 'self' ? self : splitBrain.victim === 'peer' ? peer : undefined;
    if (splitBrain.source === null) {
      refused = { code: 'ERR_PAIR_SPLIT_BRAIN', message: splitBrain.explanation };
    } else if (victim?.role === 'primary') {
      // rr-conflict after the policy, as DRBD: a serving primary is never overwritten
      refused = { code: 'ERR_PAIR_ROLE', message: `${splitBrain.explanation}; but ${victim === self ? 'this node' : 'the peer'} is a primary serving its data: refused` };
      why += `\n${refused.message}`;
    } else {
      result = `${splitBrain.source === 'self' ? 'source' : 'target'}-${splitBrain.mode}` as DecisionResult;
    }
  } else if (decision.code) {
    refused = { code: decision.code, message: decision.explanation };
  }
  const direction = refused ? 'none' : directionOf(result);
  const mode = refused ? 'none' : modeOf(result);
  const { bytes, exact } = resyncBytes(mode, self, peer, options);
  const lines = [`this node: ${formatTuple(self.gi)}`, `peer:      ${formatTuple(peer.gi)}`, why, refused ? `refused (${refused.code}): nothing is copied` : describeResync(direction, mode, bytes, exact)];
  return {
    rule: decision.rule,
    result,
    direction,
    mode,
    bytes,
    bytesExact: exact,
    ...(refused ? { refused } : {}),
    ...(splitBrain ? { splitBrain } : {}),
    ...(decision.corrected ? { corrected: decision.corrected } : {}),
    self: self.gi,
    peer: peer.gi,
    text: lines.join('\n'),
  };
}

/**
 * The pair link's answer on hello, from the secondary's point of view (`self` = the secondary):
 * the primary is always the source on the link, so a decision that would make the secondary the
 * source is refused (the old primary must come back as a secondary, or resync the other way).
 */
export function linkDecision(e: ConnectExplanation): LinkDecision {
  const text = e.text;
  if (e.refused) return { rule: e.rule, action: 'refuse', explanation: text };
  if (e.direction === 'none') return { rule: e.rule, action: 'none', explanation: text };
  if (e.direction === 'to-peer') return { rule: e.rule, action: 'refuse', explanation: `${text}\nrefused: the primary is always the source on the pair link; this node would be the source` };
  return { rule: e.rule, action: e.mode === 'full' ? 'resync-full' : 'resync-bitmap', explanation: text };
}

/** What `failover` on a node would do (`failover --dry-run`). */
export interface FailoverInput {
  /** the node asked: a secondary promotes; a primary stops forwarding and tracks */
  role: 'primary' | 'secondary';
  to: 'checkpoint' | 'latest';
  force: boolean;
  gi: GenerationTuple;
  /** committed epoch, and the checkpoint between steps 5 and 7 if any (pair state) */
  epoch: number;
  committing: number | null;
  diskState: DiskState;
  protocol: 'sync' | 'async' | null;
  /** the pair link to the peer is up: a secondary's primary is alive and is told to demote (a planned switchover) */
  linkUp: boolean;
  /**
   * why the secondary has no checkpoint to roll back to (state.ts noRestorePoint: before its first
   * checkpoint, the initial full sync, a lost volatile hidden disk), or null/absent: it has one
   */
  noRestorePoint?: string | null;
  /** bytes allocated in the hidden and active overlays (secondary) */
  hiddenBytes: number;
  activeBytes: number;
  /** forwarded writes applied since the last checkpoint: what --to checkpoint rolls back; null = not counted */
  writesSinceCheckpoint: number | null;
  /** the peer's last known tuple (from hello); null: never connected (then assumed equal to this node's) */
  peerGi: GenerationTuple | null;
  /** primary: bytes its peer bitmap marks (what the secondary misses) */
  bitmapBytes?: number;
  /** the disk's length */
  size: number;
  /** the generation the promotion mints (default: a new random one) */
  newGeneration?: string;
}

export interface FailoverExplanation {
  allowed: boolean;
  refused?: { code: string; message: string };
  /**
   * secondary: the rule that decides the failover itself, as the daemon's failover --dry-run
   * --json names it in its `rule` (failover-to-checkpoint, refused-outdated, …; the same rules:
   * secondary-explain.ts failoverRefusal). `rule` below is the generation table's, for the reconnect.
   */
  failoverRule?: SecondaryFailoverRule;
  role: 'primary' | 'secondary';
  to: 'checkpoint' | 'latest';
  /** the epoch the promoted disk stands at (secondary) */
  epoch: number;
  /** bytes committed into the disk now (the overlays) */
  commitBytes: number;
  /** acknowledged writes lost (RPO); null: not known (async queue, or not counted) */
  rpoWrites: number | null;
  /** false: rpoWrites is a lower bound */
  rpoExact: boolean;
  gi: { before: GenerationTuple; after: GenerationTuple };
  /** what reconnecting the old peer later gives (failback, or the secondary's return): */
  rule: number;
  direction: Direction;
  mode: SyncMode;
  /** at least these bytes (the failback bitmap seeded now; writes after the failover add to it) */
  bytes: number;
  /** the other outcome of that reconnect: a secondary's old primary alive and writing, or a primary's secondary promoted meanwhile */
  alternative?: { when: string; rule: number; result: DecisionResult };
  steps: string[];
  text: string;
}

/** The daemon's refusal rules (secondary-explain.ts), on this input. */
function refusal(input: FailoverInput): ReturnType<typeof failoverRefusal> {
  if (input.role === 'primary') return undefined;
  return failoverRefusal({ to: input.to, force: input.force, epoch: input.epoch, diskState: input.diskState, committing: input.committing, noRestorePoint: input.noRestorePoint ?? null, protocol: input.protocol });
}

/** What `failover` with these options would do, without doing it. */
export function explainFailover(input: FailoverInput): FailoverExplanation {
  checkNumbers({ epoch: input.epoch, hiddenBytes: input.hiddenBytes, activeBytes: input.activeBytes, writesSinceCheckpoint: input.writesSinceCheckpoint, bitmapBytes: input.bitmapBytes, size: input.size });
  const refused = refusal(input);
  const g = input.newGeneration ?? newGeneration();
  const peerGi = input.peerGi ?? input.gi;
  return input.role === 'primary' ? primaryFailover(input, g, peerGi) : secondaryFailover(input, g, peerGi, refused);
}

function secondaryFailover(input: FailoverInput, g: string, peerGi: GenerationTuple, refusal: ReturnType<typeof failoverRefusal>): FailoverExplanation {
  const refused = refusal ? { code: refusal.code, message: refusal.message } : undefined;
  // --to latest during a commit is that checkpoint (the disk already is it)
  const failoverRule: SecondaryFailoverRule = refusal?.rule ?? (input.to === 'latest' && input.committing === null ? 'failover-to-latest' : 'failover-to-checkpoint');
  const after = onLineageEvent(input.gi, { kind: 'failover' }, g);
  const committing = input.committing !== null;
  const epoch = committing ? input.committing! : input.epoch;
  const commitBytes = committing ? 0 : input.to === 'checkpoint' ? input.hiddenBytes + input.activeBytes : input.activeBytes;
  const failbackBytes = Math.min(input.size, input.hiddenBytes + input.activeBytes);
  // the old primary comes back as a secondary: crashed (link down now), or demoted over the link
  const mainDecision = decide({ gi: after, crashedPrimary: false, role: 'primary' }, { gi: peerGi, crashedPrimary: !input.linkUp, role: 'secondary' });
  const alive = decide({ gi: after, crashedPrimary: false, role: 'primary' }, { gi: onLineageEvent(peerGi, { kind: 'peer-lost', role: 'primary' }, newGeneration()), crashedPrimary: false, role: 'secondary' });
  let rpoWrites: number | null;
  let rpoExact: boolean;
  if (input.to === 'latest' && !committing) {
    rpoWrites = input.protocol === 'sync' ? 0 : null;
    rpoExact = input.protocol === 'sync';
  } else {
    rpoWrites = committing ? 0 : input.writesSinceCheckpoint;
    rpoExact = input.protocol === 'sync' && rpoWrites !== null;
  }
  const steps = [
    input.linkUp ? 'tell the connected primary to demote (stop forwarding), close the pair link and the replica export' : 'close the replica export and refuse the old primary (its token is void)',
    committing
      ? `finish checkpoint ${input.committing}: the disk already is CP_${input.committing}; discard both overlays`
      : input.to === 'checkpoint'
        ? `commit the view into the disk: hidden then active (${formatSize(commitBytes)}), so the disk is CP_${input.epoch} plus this node's own writes`
        : `drop hidden, commit active (${formatSize(commitBytes)}): the disk keeps every forwarded write`,
    `seed the failback bitmap with the clusters allocated in hidden ∪ active (${formatSize(failbackBytes)})`,
    'flush, empty both overlays',
    `mint a generation: ${formatTuple(after)}`,
    'serve the export read-write as primary',
  ];
  const rpo = rpoWrites === null ? 'unknown (writes still queued on the old primary are lost)' : `${rpoExact ? '' : 'at least '}${rpoWrites} acknowledged write${rpoWrites === 1 ? '' : 's'} lost`;
  const head = refused ? `failover refused (${refused.code}): ${refused.message}` : `failover --to ${input.to} would promote this secondary at epoch ${epoch}; RPO: ${rpo}`;
  const backText = `when the old primary returns as a secondary: rule ${mainDecision.rule} (${mainDecision.explanation}), ${describeResync(directionOf(mainDecision.result), modeOf(mainDecision.result), failbackBytes, false).replace('at most', 'at least')}`;
  const aliveText = `if the old primary goes on writing as a primary, it mints a generation of its own: rule ${alive.rule} (${alive.result}) on reconnect`;
  return {
    allowed: refused === undefined,
    ...(refused ? { refused } : {}),
    failoverRule,
    role: 'secondary',
    to: input.to,
    epoch,
    commitBytes,
    rpoWrites,
    rpoExact,
    gi: { before: input.gi, after },
    rule: mainDecision.rule,
    direction: directionOf(mainDecision.result),
    mode: modeOf(mainDecision.result),
    bytes: modeOf(mainDecision.result) === 'full' ? input.size : modeOf(mainDecision.result) === 'none' ? 0 : failbackBytes,
    alternative: { when: 'the old primary goes on writing as a primary', rule: alive.rule, result: alive.result },
    steps,
    text: [head, ...(refused ? [] : steps.map((s, i) => `  ${i + 1}. ${s}`)), backText, aliveText].join('\n'),
  };
}

function primaryFailover(input: FailoverInput, g: string, peerGi: GenerationTuple): FailoverExplanation {
  const after = onLineageEvent(input.gi, { kind: 'peer-lost', role: 'primary' }, g);
  const dirty = input.bitmapBytes ?? 0;
  const back = decide({ gi: after, crashedPrimary: false, role: 'primary' }, { gi: peerGi, crashedPrimary: false, role: 'secondary' });
  const promoted = decide({ gi: after, crashedPrimary: false, role: 'primary' }, { gi: onLineageEvent(peerGi, { kind: 'failover' }, newGeneration()), crashedPrimary: false, role: 'secondary' });
  const steps = [
    'stop forwarding to the secondary and close the pair link',
    `track every write in the peer bitmap (${formatSize(dirty)} marked now)`,
    after === input.gi ? `keep the generation (a bitmap generation is already kept): ${formatTuple(after)}` : `mint a generation: ${formatTuple(after)}`,
    'keep serving the export read-write',
  ];
  const backText = `when the secondary reconnects unchanged: rule ${back.rule} (${back.explanation}), ${describeResync(directionOf(back.result), modeOf(back.result), dirty, false).replace('at most', 'at least')}`;
  const promotedText = `if the secondary was promoted meanwhile: rule ${promoted.rule} (${promoted.result}) on reconnect`;
  return {
    allowed: true,
    role: 'primary',
    to: input.to,
    epoch: input.epoch,
    commitBytes: 0,
    rpoWrites: 0,
    rpoExact: true,
    gi: { before: input.gi, after },
    rule: back.rule,
    direction: directionOf(back.result),
    mode: modeOf(back.result),
    bytes: dirty,
    alternative: { when: 'the secondary was promoted meanwhile', rule: promoted.rule, result: promoted.result },
    steps,
    text: ['failover on the primary: the secondary is given up; no acknowledged write is lost', ...steps.map((s, i) => `  ${i + 1}. ${s}`), backText, promotedText].join('\n'),
  };
}
