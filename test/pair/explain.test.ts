// test-pair-explain: explainConnect (status, the pair link's welcome/refuse) and explainFailover
// (failover --dry-run): rule, direction, full or bitmap, bytes, RPO, refusals with their stable
// codes, and the text — for the cases an operator meets.
import { describe, expect, it } from 'vitest';
import { EMPTY, mint, type GenerationTuple } from '../../src/pair/generations.js';
import { connectSideOf, explainConnect, explainFailover, linkDecision, type ConnectSide, type FailoverInput } from '../../src/pair/explain.js';
import { explainSecondaryFailover } from '../../src/pair/secondary-explain.js';
import type { DiskState } from '../../src/pair/messages.js';

const MiB = 1024 * 1024;
const C = 'a000000000000001';
const N = 'b000000000000002';
const M = 'c000000000000003';
const t = (current: string, bitmap = EMPTY, history: string[] = []): GenerationTuple => ({ current, bitmap, history });

function side(o: Partial<ConnectSide> & { nodeId: string }): ConnectSide {
  return { role: 'secondary', gi: t(C), diskState: 'UpToDate', crashedPrimary: false, bitmapBytes: 0, ...o };
}

describe('explainConnect', () => {
  it('in step: rule 40, nothing to copy; the link is welcomed with action none', () => {
    const e = explainConnect(side({ nodeId: 's' }), side({ nodeId: 'p', role: 'primary' }), { size: 64 * MiB });
    expect(e).toMatchObject({ rule: 40, result: 'no-sync', direction: 'none', mode: 'none', bytes: 0, bytesExact: true });
    expect(e.refused).toBeUndefined();
    expect(linkDecision(e)).toMatchObject({ rule: 40, action: 'none' });
    expect(e.text).toBe(
      [
        `this node: current ${C}, bitmap ${EMPTY}, history []`,
        `peer:      current ${C}, bitmap ${EMPTY}, history []`,
        'rule 40: same generation and neither node crashed as primary: the disks are in step',
        'nothing to copy',
      ].join('\n'),
    );
  });

  it('the primary lost the secondary and wrote: rule 50 on the secondary, bitmap resync from the peer, bytes = union or at most the sum', () => {
    const s = side({ nodeId: 's' });
    const p = side({ nodeId: 'p', role: 'primary', gi: mint(t(C), N), bitmapBytes: 3 * MiB });
    const e = explainConnect(s, p, { size: 64 * MiB });
    expect(e).toMatchObject({ rule: 50, result: 'target-bitmap', direction: 'from-peer', mode: 'bitmap', bytes: 3 * MiB, bytesExact: false });
    expect(e.text).toContain('bitmap resync from the peer to this node: at most 3 MiB (3145728 bytes)');
    expect(explainConnect(s, p, { size: 64 * MiB, unionBytes: 2 * MiB })).toMatchObject({ bytes: 2 * MiB, bytesExact: true });
    expect(linkDecision(e)).toMatchObject({ rule: 50, action: 'resync-bitmap' });
  });

  it('a new secondary: rule 20, full copy of the disk size', () => {
    const e = explainConnect(side({ nodeId: 's', gi: t('0000000000000004'), diskState: 'Inconsistent' }), side({ nodeId: 'p', role: 'primary' }), { size: 64 * MiB });
    expect(e).toMatchObject({ rule: 20, direction: 'from-peer', mode: 'full', bytes: 64 * MiB, bytesExact: true });
    expect(linkDecision(e).action).toBe('resync-full');
  });

  it('split brain, default policy: refused with ERR_PAIR_SPLIT_BRAIN, both tuples and the rule in the text', () => {
    const e = explainConnect(side({ nodeId: 's', role: 'primary', gi: mint(t(C), N), bitmapBytes: MiB }), side({ nodeId: 'p', role: 'primary', gi: mint(t(C), M), bitmapBytes: 2 * MiB }), { size: 64 * MiB });
    expect(e).toMatchObject({ rule: 90, result: 'split-brain', direction: 'none', mode: 'none', bytes: 0, refused: { code: 'ERR_PAIR_SPLIT_BRAIN' }, splitBrain: { primaries: 2, source: null } });
    expect(e.text).toContain(`this node: current ${N}, bitmap ${C}`);
    expect(e.text).toContain(`peer:      current ${M}, bitmap ${C}`);
    expect(e.text).toContain('rule 90: both nodes went on from the same generation');
    expect(e.text).toContain('refused (ERR_PAIR_SPLIT_BRAIN): nothing is copied');
    expect(linkDecision(e)).toMatchObject({ rule: 90, action: 'refuse' });
  });

  it('split brain resolved by discard-least-changes: the node with fewer changes is the target of a bitmap resync', () => {
    const e = explainConnect(side({ nodeId: 's', gi: mint(t(C), N), bitmapBytes: MiB }), side({ nodeId: 'p', gi: mint(t(C), M), bitmapBytes: 2 * MiB }), {
      size: 64 * MiB,
      policies: { zeroPrimaries: { policy: 'discard-least-changes' } },
    });
    expect(e).toMatchObject({ rule: 90, result: 'target-bitmap', direction: 'from-peer', mode: 'bitmap', bytes: 3 * MiB, splitBrain: { policy: 'discard-least-changes', victim: 'self' } });
    expect(e.refused).toBeUndefined();
  });

  it('discard-my-data naming a serving primary as the victim is refused (rr-conflict after the policy)', () => {
    const e = explainConnect(side({ nodeId: 's', role: 'primary', gi: mint(t(C), N), discardMyData: true }), side({ nodeId: 'p', gi: mint(t(C), M) }), { size: MiB });
    expect(e).toMatchObject({ rule: 90, direction: 'none', mode: 'none', bytes: 0, refused: { code: 'ERR_PAIR_ROLE' }, splitBrain: { policy: 'discard-my-data', victim: 'self' } });
    expect(e.text).toContain('but this node is a primary serving its data: refused');
  });

  it('unrelated data and a stale primary are refused with their codes; the secondary never becomes the source on the link', () => {
    expect(explainConnect(side({ nodeId: 's', gi: t(N) }), side({ nodeId: 'p', gi: t(M) }), { size: MiB })).toMatchObject({ rule: -1000, refused: { code: 'ERR_PAIR_UNRELATED' } });
    const stale = explainConnect(side({ nodeId: 's', role: 'primary', gi: mint(t(C), N) }), side({ nodeId: 'p', role: 'primary' }), { size: MiB });
    expect(stale).toMatchObject({ rule: 70, result: 'refused', refused: { code: 'ERR_PAIR_ROLE' } });
    const wrongWay = explainConnect(side({ nodeId: 's', gi: mint(t(C), N), bitmapBytes: MiB }), side({ nodeId: 'p', role: 'primary', crashedPrimary: false, diskState: 'Outdated' }), { size: MiB });
    expect(wrongWay.direction).toBe('to-peer');
    expect(linkDecision(wrongWay)).toMatchObject({ action: 'refuse', explanation: expect.stringContaining('the primary is always the source on the pair link') });
  });

  it('a hello summary becomes a connect side with its policy fields', () => {
    const hello = { nodeId: 'n1', role: 'primary' as const, gi: t(C), epoch: 3, diskState: 'UpToDate' as const, crashedPrimary: true, bitmapBytes: 7, name: 'db-1', primarySince: 42 };
    expect(connectSideOf(hello)).toEqual({ nodeId: 'n1', name: 'db-1', role: 'primary', gi: t(C), diskState: 'UpToDate', crashedPrimary: true, bitmapBytes: 7, primarySince: 42 });
    expect(connectSideOf({ ...hello, name: undefined, primarySince: undefined, discardMyData: true })).toMatchObject({ name: 'n1', primarySince: null, discardMyData: true });
  });

  it('negative or fractional numbers are a usage error naming the field', () => {
    expect(() => explainConnect(side({ nodeId: 's', bitmapBytes: -1 }), side({ nodeId: 'p' }), { size: MiB })).toThrow(expect.objectContaining({ code: 'ERR_USAGE', message: 'this node bitmapBytes is -1, not a byte count or count ≥ 0' }));
  });
});

const secondary = (o: Partial<FailoverInput> = {}): FailoverInput => ({
  role: 'secondary',
  to: 'checkpoint',
  force: false,
  gi: t(C, EMPTY, ['d000000000000004']),
  epoch: 7,
  committing: null,
  diskState: 'Consistent',
  protocol: 'sync',
  linkUp: false,
  hiddenBytes: 4 * MiB,
  activeBytes: MiB,
  writesSinceCheckpoint: 120,
  peerGi: t(C, EMPTY, ['d000000000000004']),
  size: 64 * MiB,
  newGeneration: N,
  ...o,
});

describe('explainFailover on a secondary', () => {
  it('--to checkpoint: commit hidden+active, RPO = writes since the checkpoint, failback by rule 70 bitmap', () => {
    const e = explainFailover(secondary());
    expect(e).toMatchObject({
      allowed: true,
      epoch: 7,
      commitBytes: 5 * MiB,
      rpoWrites: 120,
      rpoExact: true,
      gi: { after: t(N, C, ['d000000000000004']) },
      rule: 70,
      direction: 'to-peer',
      mode: 'bitmap',
      bytes: 5 * MiB,
      alternative: { rule: 90, result: 'split-brain' },
    });
    expect(e.text.split('\n')[0]).toBe('failover --to checkpoint would promote this secondary at epoch 7; RPO: 120 acknowledged writes lost');
    expect(e.text).toContain('rule 70 (');
    expect(e.text).toContain('bitmap resync from this node to the peer: at least 5 MiB');
  });

  it('--to latest in sync mode loses nothing and commits only active', () => {
    expect(explainFailover(secondary({ to: 'latest' }))).toMatchObject({ allowed: true, commitBytes: MiB, rpoWrites: 0, rpoExact: true });
  });

  it('async: --to checkpoint gives a lower bound; --to latest is refused (refused-latest), as the daemon refuses it', () => {
    expect(explainFailover(secondary({ protocol: 'async' }))).toMatchObject({ allowed: true, failoverRule: 'failover-to-checkpoint', rpoWrites: 120, rpoExact: false });
    expect(explainFailover(secondary({ protocol: 'async', to: 'latest' }))).toMatchObject({
      allowed: false,
      failoverRule: 'refused-latest',
      refused: { code: 'ERR_PAIR_STATE', message: '--to latest needs a primary that replicated with --protocol sync (it was async): only then is the disk a state the primary acknowledged; fail over --to checkpoint' },
    });
    expect(explainFailover(secondary({ protocol: null, to: 'latest' })).refused?.message).toContain('(it was unknown: no primary connected since the start)');
  });

  it('an Outdated secondary needs --force (ERR_PAIR_OUTDATED, refused-outdated)', () => {
    const e = explainFailover(secondary({ diskState: 'Outdated' }));
    expect(e).toMatchObject({ allowed: false, failoverRule: 'refused-outdated', refused: { code: 'ERR_PAIR_OUTDATED' } });
    expect(e.text.split('\n')[0]).toBe("failover refused (ERR_PAIR_OUTDATED): the secondary is Outdated (the primary degraded after checkpoint 7): failing over loses the primary's writes since; add --force to fail over anyway");
    expect(explainFailover(secondary({ diskState: 'Outdated', force: true }))).toMatchObject({ allowed: true, failoverRule: 'failover-to-checkpoint' });
  });

  it('an Inconsistent secondary that still has its restore point (a resync was copying into it) needs --force too, to the checkpoint; --to latest never', () => {
    const e = explainFailover(secondary({ diskState: 'Inconsistent' }));
    expect(e).toMatchObject({ allowed: false, failoverRule: 'refused-outdated', refused: { code: 'ERR_PAIR_OUTDATED' } });
    expect(e.refused!.message).toBe("the secondary is Inconsistent: a resync from the primary was copying into it (the primary wrote after checkpoint 7); failing over loses the primary's writes since; --force fails over to checkpoint 7 exactly (the hidden disk kept it), with none of the resync's writes");
    expect(explainFailover(secondary({ diskState: 'Inconsistent', force: true }))).toMatchObject({ allowed: true, failoverRule: 'failover-to-checkpoint', epoch: 7 });
    expect(explainFailover(secondary({ diskState: 'Inconsistent', to: 'latest' }))).toMatchObject({ allowed: false, failoverRule: 'refused-outdated' });
    expect(explainFailover(secondary({ diskState: 'Inconsistent', to: 'latest', force: true }))).toMatchObject({ allowed: false, failoverRule: 'refused-latest', refused: { code: 'ERR_PAIR_STATE' } });
  });

  it('a connected primary is told to demote (planned switchover): failback by rule 70; if it goes on writing, rule 90', () => {
    const e = explainFailover(secondary({ linkUp: true, hiddenBytes: 0, activeBytes: 0, writesSinceCheckpoint: 0 }));
    expect(e).toMatchObject({ allowed: true, rpoWrites: 0, commitBytes: 0, rule: 70, direction: 'to-peer', mode: 'bitmap', bytes: 0, alternative: { rule: 90, result: 'split-brain' } });
    expect(e.steps[0]).toBe('tell the connected primary to demote (stop forwarding), close the pair link and the replica export');
  });

  it('during a checkpoint commit: the disk is CP_N+1, nothing to commit, nothing lost; --to latest is the same state (allowed, as the daemon does)', () => {
    expect(explainFailover(secondary({ committing: 8 }))).toMatchObject({ allowed: true, failoverRule: 'failover-to-checkpoint', epoch: 8, commitBytes: 0, rpoWrites: 0 });
    expect(explainFailover(secondary({ committing: 8, to: 'latest' }))).toMatchObject({ allowed: true, failoverRule: 'failover-to-checkpoint', epoch: 8, commitBytes: 0, rpoWrites: 0 });
    // a commit in progress is promotable even Inconsistent or without a restore point: the disk is that checkpoint
    expect(explainFailover(secondary({ committing: 8, diskState: 'Inconsistent', noRestorePoint: 'the hidden disk was lost' })).allowed).toBe(true);
  });

  it('a Failed disk is refused (ERR_PAIR_STATE, refused-failed), even with --force or during a commit', () => {
    for (const o of [{}, { force: true }, { committing: 8 }]) {
      expect(explainFailover(secondary({ diskState: 'Failed', ...o }))).toMatchObject({ allowed: false, failoverRule: 'refused-failed', refused: { code: 'ERR_PAIR_STATE', message: "the secondary's disk has Failed (an I/O error): it is not promotable" } });
    }
  });

  it('no checkpoint to roll back to: ERR_PAIR_INCONSISTENT (refused-inconsistent), --force or not', () => {
    for (const force of [false, true]) {
      const e = explainFailover(secondary({ noRestorePoint: 'a host crash lost the volatile hidden disk', diskState: 'Inconsistent', force }));
      expect(e).toMatchObject({ allowed: false, failoverRule: 'refused-inconsistent', refused: { code: 'ERR_PAIR_INCONSISTENT' } });
      expect(e.refused!.message).toBe('the secondary is Inconsistent with no checkpoint to roll back to (a host crash lost the volatile hidden disk): it is not promotable, with or without --force; let the primary resync it and take a checkpoint first');
    }
  });
});

describe('explainFailover and the daemon\'s failover --dry-run decide alike', () => {
  it('every disk state × --to × --force × commit in progress × restore point × protocol: the same rule, code and message', () => {
    let cases = 0;
    for (const diskState of ['UpToDate', 'Consistent', 'Outdated', 'Inconsistent', 'Failed'] as DiskState[]) {
      for (const to of ['checkpoint', 'latest'] as const) {
        for (const force of [false, true]) {
          for (const committing of [null, 8]) {
            for (const noRestorePoint of [null, 'before its first checkpoint']) {
              for (const protocol of ['sync', 'async', null] as const) {
                const input = secondary({ diskState, to, force, committing, noRestorePoint, protocol });
                const daemon = explainSecondaryFailover({ ...input, exportName: 'disk', noRestorePoint, hiddenRuns: [], activeRuns: [] });
                const pair = explainFailover(input);
                const what = JSON.stringify({ diskState, to, force, committing, noRestorePoint, protocol });
                // epoch: the checkpoint failed over to (a refused one fails over to none)
                expect({ what, rule: pair.failoverRule, allowed: pair.allowed, refusal: pair.refused, epoch: pair.allowed ? pair.epoch : null }).toEqual({ what, rule: daemon.rule, allowed: daemon.allowed, refusal: daemon.refusal, epoch: daemon.allowed ? daemon.epoch : null });
                cases++;
              }
            }
          }
        }
      }
    }
    expect(cases).toBe(5 * 2 * 2 * 2 * 2 * 3);
  });
});

describe('explainFailover on a primary', () => {
  it('stops forwarding, keeps serving, mints; the secondary reconnecting gives rule 70 by the peer bitmap; promoted meanwhile: 90', () => {
    const e = explainFailover({ ...secondary(), role: 'primary', bitmapBytes: 2 * MiB });
    expect(e).toMatchObject({
      allowed: true,
      role: 'primary',
      commitBytes: 0,
      rpoWrites: 0,
      gi: { after: t(N, C, ['d000000000000004']) },
      rule: 70,
      direction: 'to-peer',
      mode: 'bitmap',
      bytes: 2 * MiB,
      alternative: { rule: 90, result: 'split-brain' },
    });
    expect(e.text.split('\n')[0]).toBe('failover on the primary: the secondary is given up; no acknowledged write is lost');
  });
});

describe('both nodes explain the same connect', () => {
  const pairs: Array<[string, ConnectSide, ConnectSide]> = [
    ['in step', side({ nodeId: 'a' }), side({ nodeId: 'b', role: 'primary' })],
    ['failback', side({ nodeId: 'a', gi: t(C), crashedPrimary: true }), side({ nodeId: 'b', role: 'primary', gi: mint(t(C), N), bitmapBytes: MiB })],
    ['split brain, least changes', side({ nodeId: 'a', gi: mint(t(C), N), bitmapBytes: MiB }), side({ nodeId: 'b', gi: mint(t(C), M), bitmapBytes: 2 * MiB })],
    ['split brain, default', side({ nodeId: 'a', role: 'primary', gi: mint(t(C), N) }), side({ nodeId: 'b', gi: mint(t(C), M) })],
    ['unrelated', side({ nodeId: 'a', gi: t(N) }), side({ nodeId: 'b', gi: t(M) })],
    ['new disk', side({ nodeId: 'a', gi: t('0000000000000004'), diskState: 'Inconsistent' }), side({ nodeId: 'b', role: 'primary' })],
  ];
  const flip = { 'to-peer': 'from-peer', 'from-peer': 'to-peer', none: 'none' } as const;
  for (const [name, a, b] of pairs) {
    it(name, () => {
      const o = { size: 64 * MiB, policies: { zeroPrimaries: { policy: 'discard-least-changes' as const } } };
      const x = explainConnect(a, b, o);
      const y = explainConnect(b, a, o);
      expect({ direction: y.direction, mode: y.mode, bytes: y.bytes, code: y.refused?.code }).toEqual({ direction: flip[x.direction], mode: x.mode, bytes: x.bytes, code: x.refused?.code });
    });
  }
});
