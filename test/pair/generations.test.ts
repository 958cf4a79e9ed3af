// test-pair-generations: the generation table of replication.md §5 (DRBD 8.4 drbd_uuid_compare),
// one case per rule and branch, each asserting the result AND the rule number; the disk-state
// and rr-conflict overrides; the life cycle moves (mint, resync start/end, adopt); and a
// property over simulated pair histories: both nodes always reach mirror-image decisions.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  EMPTY,
  JUST_CREATED,
  checkTuple,
  compareGenerations,
  decide,
  finishResyncAsSource,
  finishResyncAsTarget,
  freshTuple,
  mint,
  mirrorResult,
  onLineageEvent,
  startResyncAsSource,
  startResyncAsTarget,
  type GenerationTuple,
  type NodeView,
} from '../../src/pair/generations.js';

const SEED = 0x6e6e_0010;
/** a readable generation: 'a' then the number in 15 hex digits */
const g = (n: number) => `a${n.toString(16).padStart(15, '0')}`;
const off = (x: string) => (BigInt(`0x${x}`) + (1n << 48n)).toString(16).padStart(16, '0');
const t = (current: string, bitmap: string = EMPTY, history: string[] = []): GenerationTuple => ({ current, bitmap, history });
const v = (gi: GenerationTuple, o: Partial<NodeView> = {}): NodeView => ({ gi, crashedPrimary: false, ...o });

function both(self: NodeView, peer: NodeView) {
  const a = decide(self, peer);
  const b = decide(peer, self);
  return { a, b };
}

describe('the generation table, one case per rule', () => {
  const C = g(1);
  const X = g(2);
  const R = g(3);

  it('rule 10: both just created → no sync (and EMPTY counts as just created)', () => {
    expect(decide(v(freshTuple()), v(freshTuple()))).toMatchObject({ rule: 10, result: 'no-sync' });
    expect(decide(v(t(EMPTY)), v(t(JUST_CREATED)))).toMatchObject({ rule: 10, result: 'no-sync' });
  });

  it('rule 20: this node has no generation → target of a full copy', () => {
    expect(decide(v(freshTuple()), v(t(C)))).toMatchObject({ rule: 20, result: 'target-full' });
    expect(decide(v(t(EMPTY)), v(t(C)))).toMatchObject({ rule: 20, result: 'target-full' });
  });

  it('rule 30: the peer has no generation → source of a full copy', () => {
    expect(decide(v(t(C)), v(freshTuple()))).toMatchObject({ rule: 30, result: 'source-full' });
  });

  it('rule 34: the source missed the end of its resync → source, and its tuple is corrected', () => {
    const src = t(C, off(X), [X, R]);
    const tgt = t(C, EMPTY, [off(X), X, R]);
    const { a, b } = both(v(src), v(tgt));
    expect(a).toMatchObject({ rule: 34, result: 'source-bitmap', corrected: { self: t(C, EMPTY, [off(X), X, R]) } });
    expect(b).toMatchObject({ rule: 35, result: 'target-bitmap', corrected: { peer: t(C, EMPTY, [off(X), X, R]) } });
  });

  it('rule 36 / 37: only one bitmap set, no missed end → resume the resync with its holder as source', () => {
    const { a, b } = both(v(t(C, X, [R])), v(t(C, EMPTY, [R])));
    expect(a).toMatchObject({ rule: 36, result: 'source-bitmap' });
    expect(a.corrected).toBeUndefined();
    expect(b).toMatchObject({ rule: 37, result: 'target-bitmap' });
  });

  it('rule 40: same generation, nobody crashed → no sync', () => {
    expect(decide(v(t(C, EMPTY, [R])), v(t(C, EMPTY, [R])))).toMatchObject({ rule: 40, result: 'no-sync' });
  });

  it('rule 40: this node crashed as primary → source of its activity log; the peer did → target', () => {
    const { a, b } = both(v(t(C), { crashedPrimary: true }), v(t(C)));
    expect(a).toMatchObject({ rule: 40, result: 'source-bitmap' });
    expect(b).toMatchObject({ rule: 40, result: 'target-bitmap' });
  });

  it('rule 40: both crashed as primary → the tiebreak (lower node id is source), the same from both sides', () => {
    const lo = v(t(C), { crashedPrimary: true, nodeId: '11111111-0000-4000-8000-000000000000' });
    const hi = v(t(C), { crashedPrimary: true, nodeId: '22222222-0000-4000-8000-000000000000' });
    expect(decide(lo, hi)).toMatchObject({ rule: 40, result: 'source-bitmap' });
    expect(decide(hi, lo)).toMatchObject({ rule: 40, result: 'target-bitmap' });
    expect(decide(lo, hi).explanation).toContain('tiebreak');
  });

  it('rule 40: both crashed as primary with equal node ids → manual split brain, never a guess', () => {
    const x = v(t(C), { crashedPrimary: true, nodeId: 'same' });
    expect(decide(x, { ...x })).toMatchObject({ rule: 40, result: 'split-brain-manual', code: 'ERR_PAIR_SPLIT_BRAIN' });
  });

  it('rule 41: a crash and a current primary → the primary is source; two primaries → manual split brain', () => {
    const { a, b } = both(v(t(C), { role: 'primary' }), v(t(C), { crashedPrimary: true }));
    expect(a).toMatchObject({ rule: 41, result: 'source-bitmap' });
    expect(b).toMatchObject({ rule: 41, result: 'target-bitmap' });
    expect(decide(v(t(C), { role: 'primary', crashedPrimary: true }), v(t(C), { role: 'primary' }))).toMatchObject({ rule: 41, result: 'split-brain-manual' });
  });

  it('rule 50 / 70: one node went on from the other generation → bitmap resync from it (failback after a crash)', () => {
    const promoted = mint(t(C, EMPTY, [R]), X);
    const { a, b } = both(v(t(C, EMPTY, [R]), { crashedPrimary: true }), v(promoted, { role: 'primary' }));
    expect(a).toMatchObject({ rule: 50, result: 'target-bitmap' });
    expect(b).toMatchObject({ rule: 70, result: 'source-bitmap' });
  });

  it('rule 51 / 71: the sync generation was lost at resync start → bitmap resync, the source undoes its start', () => {
    const { tuple: src } = startResyncAsSource(t(X, C, [R]));
    expect(src).toEqual(t(X, off(C), [C, R]));
    const tgt = t(C, EMPTY, [R]); // never got the sync generation
    const { a, b } = both(v(tgt), v(src));
    expect(a).toMatchObject({ rule: 51, result: 'target-bitmap', corrected: { peer: t(X, C, [R]) } });
    expect(b).toMatchObject({ rule: 71, result: 'source-bitmap', corrected: { self: t(X, C, [R]) } });
  });

  it('rule 60 / 80: a generation only in the other history → full copy', () => {
    const { a, b } = both(v(t(C, EMPTY, [R])), v(t(X, EMPTY, [g(9), C])));
    expect(a).toMatchObject({ rule: 60, result: 'target-full' });
    expect(b).toMatchObject({ rule: 80, result: 'source-full' });
  });

  it('rule 90: both went on from the same parent → split brain (auto-recoverable)', () => {
    const { a, b } = both(v(mint(t(C), X)), v(mint(t(C), R)));
    expect(a).toMatchObject({ rule: 90, result: 'split-brain', code: 'ERR_PAIR_SPLIT_BRAIN' });
    expect(b).toMatchObject({ rule: 90, result: 'split-brain', code: 'ERR_PAIR_SPLIT_BRAIN' });
  });

  it('rule 100: only an older history generation in common → split brain, manual', () => {
    const { a, b } = both(v(t(X, g(7), [R])), v(t(C, g(8), [g(9), R])));
    expect(a).toMatchObject({ rule: 100, result: 'split-brain-manual', code: 'ERR_PAIR_SPLIT_BRAIN' });
    expect(b).toMatchObject({ rule: 100, result: 'split-brain-manual' });
  });

  it('rule −1000: nothing in common → unrelated data', () => {
    const { a, b } = both(v(t(X, g(7), [g(5)])), v(t(C, g(8), [g(6)])));
    expect(a).toMatchObject({ rule: -1000, result: 'unrelated', code: 'ERR_PAIR_UNRELATED' });
    expect(b).toMatchObject({ rule: -1000, result: 'unrelated', code: 'ERR_PAIR_UNRELATED' });
  });
});

describe('after the table: disk states and rr-conflict', () => {
  const C = g(1);
  const X = g(2);

  it('an Inconsistent side is forced target of a bitmap resync where the table said no sync', () => {
    const { a, b } = both(v(t(C)), v(t(C), { diskState: 'Inconsistent' }));
    expect(a).toMatchObject({ rule: 40, result: 'source-bitmap', tableResult: 'no-sync', override: 'inconsistent-target' });
    expect(b).toMatchObject({ rule: 40, result: 'target-bitmap', tableResult: 'no-sync', override: 'inconsistent-target' });
  });

  it('forced target after a manual split brain is a full copy, and carries no error code', () => {
    const a = decide(v(t(X, g(7), [g(3)]), { diskState: 'Outdated' }), v(t(C, g(8), [g(3)]), { diskState: 'Inconsistent' }));
    expect(a).toMatchObject({ rule: 100, result: 'source-full', tableResult: 'split-brain-manual', override: 'inconsistent-target' });
    expect(a.code).toBeUndefined();
  });

  it('the table making an Inconsistent side the source is refused (both Inconsistent)', () => {
    const a = decide(v(mint(t(C), X), { diskState: 'Inconsistent' }), v(t(C), { diskState: 'Inconsistent' }));
    expect(a).toMatchObject({ rule: 70, result: 'refused', tableResult: 'source-bitmap', override: 'inconsistent-source', code: 'ERR_PAIR_STATE' });
    const b = decide(v(t(C), { diskState: 'Inconsistent' }), v(mint(t(C), X), { diskState: 'Inconsistent' }));
    expect(b).toMatchObject({ rule: 50, result: 'refused', override: 'inconsistent-source', code: 'ERR_PAIR_STATE' });
  });

  it('rr-conflict: a current primary is never made the target (stale primary meets the promoted node)', () => {
    const stale = v(t(C), { role: 'primary' });
    const promoted = v(mint(t(C), X), { role: 'primary' });
    const { a, b } = both(stale, promoted);
    expect(a).toMatchObject({ rule: 50, result: 'refused', tableResult: 'target-bitmap', override: 'rr-conflict', code: 'ERR_PAIR_ROLE' });
    expect(b).toMatchObject({ rule: 70, result: 'refused', tableResult: 'source-bitmap', override: 'rr-conflict', code: 'ERR_PAIR_ROLE' });
    expect(a.explanation).toContain('primary');
  });

  it('a Failed disk takes no part', () => {
    expect(decide(v(t(C)), v(t(C), { diskState: 'Failed' }))).toMatchObject({ rule: 40, result: 'refused', override: 'failed-disk', code: 'ERR_PAIR_STATE' });
  });

  it('a malformed tuple is refused with the slot named: the peer with ERR_PAIR_PROTOCOL, this node with ERR_PAIR_STATE', () => {
    expect(() => decide(v(t(C)), v(t('xyz')))).toThrow(expect.objectContaining({ code: 'ERR_PAIR_PROTOCOL', message: expect.stringContaining('current "xyz"') }));
    expect(() => decide(v(t(C, EMPTY, [C, C, C, C, C])), v(t(C)))).toThrow(expect.objectContaining({ code: 'ERR_PAIR_STATE', message: expect.stringContaining('5 history slots') }));
    expect(() => checkTuple(null, 'hello')).toThrow(expect.objectContaining({ code: 'ERR_PAIR_PROTOCOL', message: 'hello: the generation tuple is missing' }));
    expect(() => checkTuple({ current: C, bitmap: EMPTY, history: [7] }, 'hello')).toThrow(/history\[0\] 7/);
  });
});

describe('the life cycle', () => {
  const C = g(1);
  const N = g(0xbeef);

  it('initial full sync: the source takes a generation once', () => {
    const first = onLineageEvent(freshTuple(), { kind: 'initial-sync-source' }, N);
    expect(first).toEqual(t(N));
    expect(onLineageEvent(first, { kind: 'initial-sync-source' }, g(5))).toBe(first);
  });

  it('promotion mints only while disconnected and only while no bitmap generation is kept', () => {
    expect(onLineageEvent(t(C), { kind: 'promote', connected: false }, N)).toEqual(t(N, C));
    const same = t(C);
    expect(onLineageEvent(same, { kind: 'promote', connected: true }, N)).toBe(same);
    const tracking = t(N, C);
    expect(onLineageEvent(tracking, { kind: 'promote', connected: false }, g(6))).toBe(tracking);
  });

  it('a primary losing its peer mints; a secondary losing it does not; failover mints', () => {
    expect(onLineageEvent(t(C), { kind: 'peer-lost', role: 'primary' }, N)).toEqual(t(N, C));
    const sec = t(C);
    expect(onLineageEvent(sec, { kind: 'peer-lost', role: 'secondary' }, N)).toBe(sec);
    expect(onLineageEvent(t(C, EMPTY, [g(3)]), { kind: 'failover' }, N)).toEqual(t(N, C, [g(3)]));
  });

  it('mint with a bitmap already set keeps it and pushes current into history (bounded to 4)', () => {
    expect(mint(t(C, g(2), [g(3), g(4), g(5), g(6)]), N)).toEqual(t(N, g(2), [C, g(3), g(4), g(5)]));
  });

  it('resync start and end: bitmap GI → history, the target takes the sync GI then adopts the source', () => {
    const src0 = t(N, C, [g(3)]);
    const { tuple: src1, syncGi } = startResyncAsSource(src0);
    expect(syncGi).toBe(off(C));
    expect(src1).toEqual(t(N, off(C), [C, g(3)]));
    const tgt1 = startResyncAsTarget(t(C, EMPTY, [g(3)]), syncGi);
    expect(tgt1).toEqual(t(off(C), EMPTY, [g(3)]));
    // interrupted here: reconnecting resumes by bitmap (rule 50 / 70)
    expect(decide(v(tgt1), v(src1))).toMatchObject({ rule: 50, result: 'target-bitmap' });
    const src2 = finishResyncAsSource(src1);
    expect(src2).toEqual(t(N, EMPTY, [off(C), C, g(3)]));
    expect(finishResyncAsTarget(src1)).toEqual(src2);
    expect(decide(v(src2), v(finishResyncAsTarget(src1)))).toMatchObject({ rule: 40, result: 'no-sync' });
  });

  it('resync from a source without a bitmap GI (initial full sync) uses a new sync GI', () => {
    const { tuple, syncGi } = startResyncAsSource(t(C), N);
    expect(syncGi).toBe(N);
    expect(tuple).toEqual(t(C, N));
  });
});

// ---------------------------------------------------------------------------------------------
// property: simulate a pair (connect with resync, disconnect, crash, failover, lost messages)
// and check at every connect that the two nodes reach mirror-image decisions.

interface Node {
  gi: GenerationTuple;
  role: 'primary' | 'secondary';
  crashed: boolean;
  id: string;
  inconsistent: boolean;
}

type Step = 'disconnect' | 'crash-primary' | 'crash-primary-restart' | 'failover' | 'promote-other' | 'connect' | 'connect-interrupted' | 'connect-lost-start' | 'connect-lost-end';

function view(n: Node): NodeView {
  return { gi: n.gi, crashedPrimary: n.crashed, role: n.role, nodeId: n.id, diskState: n.inconsistent ? 'Inconsistent' : 'UpToDate' };
}

describe('property: both nodes decide alike', () => {
  it('decide(a, b) is the mirror of decide(b, a) over simulated histories', () => {
    let counter = 100;
    const rules = new Set<number>();
    const next = () => g(counter++);
    fc.assert(
      fc.property(fc.array(fc.constantFrom<Step>('disconnect', 'crash-primary', 'crash-primary-restart', 'failover', 'promote-other', 'connect', 'connect-interrupted', 'connect-lost-start', 'connect-lost-end'), { minLength: 1, maxLength: 30 }), (steps) => {
        const c = next();
        const a: Node = { gi: t(c, EMPTY, []), role: 'primary', crashed: false, id: 'node-a', inconsistent: false };
        const b: Node = { gi: t(c, EMPTY, []), role: 'secondary', crashed: false, id: 'node-b', inconsistent: false };
        let connected = true;
        for (const step of steps) {
          const [p, s] = a.role === 'primary' ? [a, b] : [b, a];
          if (step === 'disconnect' && connected) {
            connected = false;
            p.gi = onLineageEvent(p.gi, { kind: 'peer-lost', role: 'primary' }, next());
          } else if ((step === 'crash-primary' || step === 'crash-primary-restart') && connected) {
            connected = false;
            p.crashed = true;
            if (step === 'crash-primary') p.role = 'secondary'; // it restarts waiting for its peer (else as primary)
          } else if (step === 'failover' && !connected) {
            s.gi = onLineageEvent(s.gi, { kind: 'failover' }, next());
            s.role = 'primary';
            p.role = 'secondary';
          } else if (step === 'promote-other' && !connected) {
            s.gi = onLineageEvent(s.gi, { kind: 'promote', connected: false }, next());
            s.role = 'primary';
          } else if (step.startsWith('connect') && !connected) {
            const da = decide(view(a), view(b));
            const db = decide(view(b), view(a));
            expect(db.result).toBe(mirrorResult(da.result));
            expect(db.code).toBe(da.code);
            rules.add(da.rule);
            if (!/^(source|target)-/.test(da.result)) {
              if (da.result === 'no-sync') {
                connected = true;
                if (a.role === 'primary' && b.role === 'primary') b.role = 'secondary';
              }
              continue;
            }
            if (da.corrected?.self) a.gi = da.corrected.self;
            if (da.corrected?.peer) b.gi = da.corrected.peer;
            const [src, tgt] = da.result.startsWith('source') ? [a, b] : [b, a];
            const started = startResyncAsSource(src.gi, next());
            src.gi = started.tuple;
            if (step !== 'connect-lost-start') {
              tgt.gi = startResyncAsTarget(tgt.gi, started.syncGi);
              tgt.inconsistent = true;
            }
            if (step === 'connect-interrupted' || step === 'connect-lost-start') continue;
            const srcBefore = src.gi;
            if (step !== 'connect-lost-end') src.gi = finishResyncAsSource(src.gi);
            tgt.gi = finishResyncAsTarget(srcBefore);
            tgt.inconsistent = false;
            src.crashed = false;
            tgt.crashed = false;
            tgt.role = 'secondary';
            src.role = 'primary';
            connected = step !== 'connect-lost-end';
          }
        }
      }),
      { seed: SEED, numRuns: 3000 },
    );
    // the histories reach the rules a pair meets in life (long ones also overflow the history: 100, −1000)
    for (const r of [34, 35, 36, 37, 40, 41, 50, 51, 70, 71, 90]) expect(rules).toContain(r);
  });

  it('random unrelated tuples: never a throw, always mirrored', () => {
    const gi = fc.constantFrom(g(1), g(2), g(3), g(4), EMPTY, JUST_CREATED);
    const tuple = fc.record({ current: gi, bitmap: gi, history: fc.uniqueArray(fc.constantFrom(g(1), g(2), g(3), g(4)), { maxLength: 4 }) });
    // lineages without cycles: no node descends from the other while the other descends from it
    const acyclic = (x: GenerationTuple, y: GenerationTuple) =>
      !((x.current === y.bitmap || y.history.includes(x.current)) && (y.current === x.bitmap || x.history.includes(y.current))) &&
      !(x.current === y.bitmap && x.bitmap === y.current);
    fc.assert(
      fc.property(tuple, tuple, fc.boolean(), fc.boolean(), (x, y, cx, cy) => {
        fc.pre(acyclic(x, y) && acyclic(y, x) && x.current !== y.current);
        const a = compareGenerations(v(x, { crashedPrimary: cx, nodeId: 'a' }), v(y, { crashedPrimary: cy, nodeId: 'b' }));
        const b = compareGenerations(v(y, { crashedPrimary: cy, nodeId: 'b' }), v(x, { crashedPrimary: cx, nodeId: 'a' }));
        expect(b.result).toBe(mirrorResult(a.result));
      }),
      { seed: SEED, numRuns: 2000 },
    );
  });
});
