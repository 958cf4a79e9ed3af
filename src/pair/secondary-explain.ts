/**
 * What a secondary's failover would do, as data and as a sentence (failover --dry-run). Pure.
 * The rules that refuse a failover are written once, here (failoverRefusal): the daemon's
 * failover and its dry run, and the pair-wide explanation (src/pair/explain.ts, explainFailover,
 * which adds the RPO and what reconnecting the old primary later gives) all ask it.
 */
import type { GenerationTuple } from './generations.js';
import type { DiskState } from './messages.js';

export interface SecondaryFailoverFacts {
  exportName: string;
  to: 'checkpoint' | 'latest';
  force: boolean;
  epoch: number;
  gi: GenerationTuple;
  diskState: DiskState;
  committing: number | null;
  /** why there is no checkpoint to roll back to (state.ts noRestorePoint), or null */
  noRestorePoint: string | null;
  linkUp: boolean;
  protocol: 'sync' | 'async' | null;
  hiddenRuns: Array<{ offset: number; length: number }>;
  activeRuns: Array<{ offset: number; length: number }>;
  hiddenBytes: number;
  activeBytes: number;
}

/** The rule that decides a secondary's failover: failover --dry-run --json's `rule` (blkrep-failover(1), JSON). */
export type SecondaryFailoverRule = 'failover-to-checkpoint' | 'failover-to-latest' | 'refused-outdated' | 'refused-latest' | 'refused-failed' | 'refused-inconsistent';

export interface FailoverRefusal {
  rule: Exclude<SecondaryFailoverRule, 'failover-to-checkpoint' | 'failover-to-latest'>;
  code: string;
  message: string;
}

export type FailoverRefusalFacts = Pick<SecondaryFailoverFacts, 'to' | 'force' | 'epoch' | 'diskState' | 'committing' | 'noRestorePoint' | 'protocol'>;

/**
 * Why this failover is refused, or undefined: the rules in the order they apply (blkrep-failover(1),
 * WHICH STATE). A checkpoint whose step 5 was durable (`committing`) makes the disk that
 * checkpoint, with replica writes held since: the Inconsistent rules and --to latest's do not
 * apply to it (--to latest is that checkpoint too).
 */
export function failoverRefusal(f: FailoverRefusalFacts): FailoverRefusal | undefined {
  if (f.diskState === 'Failed') return { rule: 'refused-failed', code: 'ERR_PAIR_STATE', message: "the secondary's disk has Failed (an I/O error): it is not promotable" };
  // DRBD never promotes Inconsistent data, forced or not: there is no state of the primary to promote
  if (f.noRestorePoint !== null && f.committing === null) {
    return {
      rule: 'refused-inconsistent',
      code: 'ERR_PAIR_INCONSISTENT',
      message: `the secondary is Inconsistent with no checkpoint to roll back to (${f.noRestorePoint}): it is not promotable, with or without --force; let the primary resync it and take a checkpoint first`,
    };
  }
  if (f.diskState === 'Outdated' && !f.force) {
    return { rule: 'refused-outdated', code: 'ERR_PAIR_OUTDATED', message: `the secondary is Outdated (the primary degraded after checkpoint ${f.epoch}): failing over loses the primary's writes since; add --force to fail over anyway` };
  }
  // a resync copies into the disk: the primary wrote after the checkpoint, as for an Outdated secondary; the hidden disk keeps the checkpoint
  if (f.diskState === 'Inconsistent' && f.committing === null && !f.force) {
    return {
      rule: 'refused-outdated',
      code: 'ERR_PAIR_OUTDATED',
      message: `the secondary is Inconsistent: a resync from the primary was copying into it (the primary wrote after checkpoint ${f.epoch}); failing over loses the primary's writes since; --force fails over to checkpoint ${f.epoch} exactly (the hidden disk kept it), with none of the resync's writes`,
    };
  }
  if (f.to === 'latest' && f.committing === null) {
    if (f.protocol !== 'sync') {
      return {
        rule: 'refused-latest',
        code: 'ERR_PAIR_STATE',
        message: `--to latest needs a primary that replicated with --protocol sync (it was ${f.protocol ?? 'unknown: no primary connected since the start'}): only then is the disk a state the primary acknowledged; fail over --to checkpoint`,
      };
    }
    if (f.diskState === 'Inconsistent') return { rule: 'refused-latest', code: 'ERR_PAIR_STATE', message: 'the disk is Inconsistent (a resync was running): --to latest is not a state the primary was in; fail over --to checkpoint' };
  }
  return undefined;
}

export interface SecondaryFailoverExplanation {
  role: 'primary';
  dryRun: boolean;
  to: 'checkpoint' | 'latest';
  epoch: number;
  gi: GenerationTuple;
  bytes: number;
  ms: number;
  explanation: string;
  /** which rule decided */
  rule: SecondaryFailoverRule;
  direction: string;
  hiddenBytes: number;
  activeBytes: number;
  /** bytes the primary wrote after the checkpoint that the failover drops (upper bound: hidden's clusters) */
  droppedBytes: number;
  allowed: boolean;
  refusal?: { code: string; message: string };
}

export function explainSecondaryFailover(f: SecondaryFailoverFacts, dryRun = true): SecondaryFailoverExplanation {
  const base = {
    role: 'primary' as const,
    dryRun,
    to: f.to,
    epoch: f.epoch,
    gi: f.gi,
    ms: 0,
    hiddenBytes: f.hiddenBytes,
    activeBytes: f.activeBytes,
    direction: `this node (secondary of "${f.exportName}") becomes the primary; the old primary must resync from it (failback bitmap "failback")`,
  };
  const refused = (rule: SecondaryFailoverRule, code: string, message: string): SecondaryFailoverExplanation => ({
    ...base,
    rule,
    bytes: 0,
    droppedBytes: 0,
    allowed: false,
    refusal: { code, message },
    explanation: `refused: ${message}`,
  });
  const refusal = failoverRefusal(f);
  if (refusal) return refused(refusal.rule, refusal.code, refusal.message);
  if (f.to === 'latest' && f.committing === null) {
    return {
      ...base,
      rule: 'failover-to-latest',
      bytes: f.activeBytes,
      droppedBytes: 0,
      allowed: true,
      explanation: `fail over to the latest write: the hidden disk (${f.hiddenBytes} bytes of checkpoint ${f.epoch}'s old data) is dropped, the active disk (${f.activeBytes} bytes of the secondary's own writes) is committed into the disk; a new generation; the disk is served read-write as "${f.exportName}"`,
    };
  }
  if (f.committing !== null) {
    // step 5 of that checkpoint was durable, its step 6 failed: replica writes are held since, so the disk is that checkpoint
    return {
      ...base,
      epoch: f.committing,
      rule: 'failover-to-checkpoint',
      bytes: 0,
      droppedBytes: 0,
      allowed: true,
      explanation: `fail over to checkpoint ${f.committing}, whose emptying of the overlays did not finish: the disk already is checkpoint ${f.committing}; both overlays (${f.hiddenBytes} + ${f.activeBytes} bytes) are discarded; a new generation; the disk is served read-write as "${f.exportName}"${f.linkUp ? '; the connected primary is demoted' : ''}`,
    };
  }
  return {
    ...base,
    rule: 'failover-to-checkpoint',
    bytes: f.hiddenBytes + f.activeBytes,
    droppedBytes: f.hiddenBytes,
    allowed: true,
    explanation: `fail over to checkpoint ${f.epoch}${f.diskState === 'Inconsistent' ? ` exactly, though a resync was copying into the disk (its writes are rolled back with the primary's others)` : ''}: the hidden disk (${f.hiddenBytes} bytes) and then the active disk (${f.activeBytes} bytes) are committed into the disk, dropping up to ${f.hiddenBytes} bytes the primary wrote after checkpoint ${f.epoch}; a new generation; the disk is served read-write as "${f.exportName}"${f.linkUp ? '; the connected primary is demoted' : ''}`,
  };
}
