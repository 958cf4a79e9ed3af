// test-pair-split-brain: each after-split-brain policy picks the documented side (replication.md §5,
// DRBD drbd_asb_recover_0p/1p), the same from both nodes, defaults to disconnect, and bad policy
// values are refused with ERR_USAGE.
import { describe, expect, it } from 'vitest';
import { EMPTY, mint, type Decision } from '../../src/pair/generations.js';
import { parseAfterSb0, parseAfterSb1, resolveSplitBrain, type SplitBrainPolicies, type SplitBrainSide } from '../../src/pair/split-brain.js';

const C = 'a000000000000001';
const rule90: Pick<Decision, 'rule' | 'result'> = { rule: 90, result: 'split-brain' };
const rule100: Pick<Decision, 'rule' | 'result'> = { rule: 100, result: 'split-brain-manual' };

function side(o: Partial<SplitBrainSide> & { nodeId: string }): SplitBrainSide {
  return { name: o.nodeId, role: 'secondary', gi: mint({ current: C, bitmap: EMPTY, history: [] }), changedBytes: 0, primarySince: null, ...o };
}

/** resolve from both nodes; both must agree on who keeps its data */
function resolve(a: SplitBrainSide, b: SplitBrainSide, policies: SplitBrainPolicies, decision = rule90) {
  const ra = resolveSplitBrain(decision, a, b, policies);
  const rb = resolveSplitBrain(decision, b, a, policies);
  const flip = { self: 'peer', peer: 'self' } as const;
  expect(rb.source).toBe(ra.source === null ? null : flip[ra.source]);
  expect(rb.policy).toBe(ra.policy);
  expect(rb.tiebreak).toBe(ra.tiebreak);
  return ra;
}

const A = side({ nodeId: 'aaaa', name: 'alpha', changedBytes: 65536, primarySince: 1_000 });
const B = side({ nodeId: 'bbbb', name: 'beta', changedBytes: 4096, primarySince: 2_000 });

describe('zero primaries', () => {
  it('default: disconnect, nothing copied, explained', () => {
    const r = resolve(A, B, {});
    expect(r).toMatchObject({ policy: 'disconnect', source: null, victim: null, mode: null, primaries: 0 });
    expect(r.explanation).toBe('split brain (rule 90, 0 primaries): the policy for zero primaries is disconnect; disconnected: nothing is copied until an operator decides');
  });

  it('discard-younger-primary discards the node promoted later', () => {
    expect(resolve(A, B, { zeroPrimaries: { policy: 'discard-younger-primary' } })).toMatchObject({ policy: 'discard-younger-primary', source: 'self', victim: 'peer', mode: 'bitmap', tiebreak: false });
  });

  it('discard-older-primary discards the node promoted first', () => {
    expect(resolve(A, B, { zeroPrimaries: { policy: 'discard-older-primary' } })).toMatchObject({ policy: 'discard-older-primary', source: 'peer', victim: 'self' });
  });

  it('a node that never became primary is the older one; equal times fall through to least changes', () => {
    expect(resolve({ ...A, primarySince: null }, B, { zeroPrimaries: { policy: 'discard-younger-primary' } })).toMatchObject({ source: 'self' });
    const r = resolve({ ...A, primarySince: 5 }, { ...B, primarySince: 5 }, { zeroPrimaries: { policy: 'discard-younger-primary' } });
    expect(r).toMatchObject({ policy: 'discard-least-changes', source: 'self', victim: 'peer' });
    expect(r.explanation).toContain('discard-younger-primary does not tell');
  });

  it('discard-zero-changes keeps the only node that wrote, else disconnects', () => {
    expect(resolve({ ...A, changedBytes: 0 }, B, { zeroPrimaries: { policy: 'discard-zero-changes' } })).toMatchObject({ source: 'peer', victim: 'self', tiebreak: false });
    expect(resolve(A, B, { zeroPrimaries: { policy: 'discard-zero-changes' } })).toMatchObject({ policy: 'discard-zero-changes', source: null });
  });

  it('discard-zero-changes with nothing written on either side: the tiebreak flag (lower node id kept)', () => {
    expect(resolve({ ...A, changedBytes: 0 }, { ...B, changedBytes: 0 }, { zeroPrimaries: { policy: 'discard-zero-changes' } })).toMatchObject({ source: 'self', tiebreak: true });
  });

  it('discard-least-changes keeps the node with more changed bytes; a tie uses the flag', () => {
    expect(resolve(A, B, { zeroPrimaries: { policy: 'discard-least-changes' } })).toMatchObject({ source: 'self', victim: 'peer', tiebreak: false });
    const tie = resolve({ ...A, changedBytes: 4096 }, B, { zeroPrimaries: { policy: 'discard-least-changes' } });
    expect(tie).toMatchObject({ source: 'self', tiebreak: true });
    expect(tie.explanation).toContain('both nodes changed 4096 bytes: the tiebreak');
  });

  it('a tie between equal node ids disconnects instead of guessing', () => {
    expect(resolveSplitBrain(rule90, { ...A, changedBytes: 1 }, { ...A, changedBytes: 1 }, { zeroPrimaries: { policy: 'discard-least-changes' } })).toMatchObject({ source: null });
  });

  it('discard-node NAME discards the named node; an unknown name disconnects and says the names', () => {
    expect(resolve(A, B, { zeroPrimaries: { policy: 'discard-node', node: 'alpha' } })).toMatchObject({ policy: 'discard-node=alpha', source: 'peer', victim: 'self' });
    const r = resolve(A, B, { zeroPrimaries: { policy: 'discard-node', node: 'gamma' } });
    expect(r.source).toBeNull();
    expect(r.explanation).toContain('neither node is named "gamma" (they are "alpha" and "beta")');
  });
});

describe('one primary', () => {
  const P = { ...A, role: 'primary' as const };

  it('default: disconnect', () => {
    expect(resolve(P, B, {})).toMatchObject({ policy: 'disconnect', source: null, primaries: 1 });
  });

  it('discard-secondary keeps the primary', () => {
    expect(resolve(P, B, { onePrimary: { policy: 'discard-secondary' } })).toMatchObject({ source: 'self', victim: 'peer' });
    expect(resolve(B, P, { onePrimary: { policy: 'discard-secondary' } })).toMatchObject({ source: 'peer', victim: 'self' });
  });

  it('consensus follows the zero-primaries policy only when it discards the secondary', () => {
    // least changes discards B (the secondary): agreed
    expect(resolve(P, B, { onePrimary: { policy: 'consensus' }, zeroPrimaries: { policy: 'discard-least-changes' } })).toMatchObject({ policy: 'consensus (discard-least-changes)', source: 'self' });
    // least changes would discard the primary: disconnect
    const r = resolve({ ...P, changedBytes: 1 }, B, { onePrimary: { policy: 'consensus' }, zeroPrimaries: { policy: 'discard-least-changes' } });
    expect(r).toMatchObject({ source: null });
    expect(r.explanation).toContain('consensus only discards the secondary');
  });
});

describe('two primaries and manual resolution', () => {
  it('two primaries always disconnect, whatever the policies', () => {
    expect(resolve({ ...A, role: 'primary' }, { ...B, role: 'primary' }, { zeroPrimaries: { policy: 'discard-least-changes' }, onePrimary: { policy: 'discard-secondary' } })).toMatchObject({ primaries: 2, source: null });
  });

  it('rule 100 ignores the policies; discard-my-data on one node resolves it as a full copy', () => {
    expect(resolve(A, B, { zeroPrimaries: { policy: 'discard-least-changes' } }, rule100)).toMatchObject({ source: null, mode: null });
    expect(resolve(A, { ...B, discardMyData: true }, {}, rule100)).toMatchObject({ policy: 'discard-my-data', source: 'self', victim: 'peer', mode: 'full' });
    expect(resolve({ ...A, discardMyData: true }, { ...B, discardMyData: true }, {}, rule100)).toMatchObject({ source: null });
  });

  it('discard-my-data also settles rule 90 after a disconnect policy (bitmap)', () => {
    expect(resolve({ ...A, discardMyData: true }, B, {})).toMatchObject({ policy: 'discard-my-data', source: 'peer', mode: 'bitmap' });
  });

  it('a decision that is not a split brain is a usage error', () => {
    expect(() => resolveSplitBrain({ rule: 70, result: 'source-bitmap' }, A, B)).toThrow(expect.objectContaining({ code: 'ERR_USAGE', message: 'rule 70 (source-bitmap) is not a split brain: no after-split-brain policy applies' }));
  });
});

describe('policy values', () => {
  it('parses every policy, discard-node in both spellings', () => {
    for (const p of ['disconnect', 'discard-younger-primary', 'discard-older-primary', 'discard-zero-changes', 'discard-least-changes']) expect(parseAfterSb0(p)).toEqual({ policy: p });
    expect(parseAfterSb0('discard-node=db-2')).toEqual({ policy: 'discard-node', node: 'db-2' });
    expect(parseAfterSb0('discard-node-db-2')).toEqual({ policy: 'discard-node', node: 'db-2' });
    for (const p of ['disconnect', 'consensus', 'discard-secondary']) expect(parseAfterSb1(p)).toEqual({ policy: p });
  });

  it('refuses unknown values with ERR_USAGE naming the choices', () => {
    expect(() => parseAfterSb0('discard-node')).toThrow(expect.objectContaining({ code: 'ERR_USAGE', message: expect.stringContaining('discard-node=NAME') }));
    expect(() => parseAfterSb0('newest')).toThrow(expect.objectContaining({ code: 'ERR_USAGE', message: expect.stringContaining('"newest" is not an after-split-brain policy for zero primaries') }));
    expect(() => parseAfterSb1('discard-least-changes')).toThrow(expect.objectContaining({ code: 'ERR_USAGE', message: expect.stringContaining('(one of disconnect, consensus, discard-secondary)') }));
  });
});
