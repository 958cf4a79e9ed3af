// test-pair-state: the pair state file (created, updated durably, every malformed field refused with
// ERR_PAIR_STATE naming it) and the crash rules of replication.md §2/§4 as a pure function:
// committing N → redo step 6 and commit N; otherwise restore point CP_epoch; a crashed primary →
// activity-log resync, remembered until cleared.
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EMPTY } from '../../src/pair/generations.js';
import {
  PairStateFile,
  clearCrashedPrimary,
  hiddenEmptyAtStop,
  initialState,
  markPromoted,
  markRunning,
  markSecondaryStopped,
  markStopped,
  noRestorePoint,
  pairStatePath,
  restartPlan,
  validateState,
  volatileHiddenLost,
  type PairState,
} from '../../src/pair/state.js';
import { makeTempDir } from '../support/spawn.js';

const base = (o: Partial<PairState> = {}): PairState => ({ ...initialState('secondary'), nodeId: 'n-1', epoch: 4, diskState: 'Consistent', ...o });

describe('the pair state file', () => {
  it('is created on first open, and update() has written the file when it resolves', async () => {
    const dir = await makeTempDir();
    const path = pairStatePath(join(dir, 'disk.img'));
    expect(path).toBe(join(dir, 'disk.img.pair.json'));
    const f = await PairStateFile.open(path, () => initialState('secondary'));
    expect(JSON.parse(await readFile(path, 'utf8'))).toEqual(f.state);
    await f.update((s) => ({ ...s, committing: 1 }));
    expect(JSON.parse(await readFile(path, 'utf8'))).toMatchObject({ committing: 1, epoch: 0 });
    const again = await PairStateFile.open(path, () => {
      throw new Error('must not create');
    });
    expect(again.state).toEqual(f.state);
  });

  it('refuses a damaged file, naming the field and the value', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.img.pair.json');
    const cases: Array<[unknown, string]> = [
      ['{not json', 'is not JSON'],
      [[], 'is not a JSON object'],
      [{ ...base(), version: 2 }, 'is not a version 1 blkrep pair state'],
      [{ ...base(), role: 'leader' }, 'has role "leader" (one of primary, secondary, none)'],
      [{ ...base(), epoch: -1 }, 'has epoch -1, not a non-negative integer'],
      [{ ...base(), committing: 4 }, 'has checkpoint 4 committing with epoch 4: a checkpoint being committed is past the epoch (at least 5)'],
      [{ ...base(), committing: 2 }, 'has checkpoint 2 committing with epoch 4: a checkpoint being committed is past the epoch (at least 5)'],
      [{ ...base(), committing: 5.5 }, 'has checkpoint 5.5 committing with epoch 4: a checkpoint being committed is past the epoch (at least 5)'],
      [{ ...base(), diskState: 'Fine' }, 'has disk state "Fine"'],
      [{ ...base(), cleanShutdown: 'yes' }, 'has cleanShutdown "yes", not true or false'],
      [{ ...base(), primarySince: 'noon' }, 'has primarySince "noon"'],
      [{ ...base(), gi: { current: 'zz', bitmap: EMPTY, history: [] } }, 'the generation tuple has current "zz", not 16 lowercase hex digits'],
      [{ ...base(), volatileHidden: { bootId: '' } }, 'has volatileHidden {"bootId":""}, not {bootId: "…"}'],
      [{ ...base(), restorePointLost: 5 }, 'has restorePointLost 5, not a string'],
      [{ ...base(), fullSyncFrom: { nodeId: 'n1' } }, 'has fullSyncFrom {"nodeId":"n1"}, not {nodeId: "…", gen: "…"}'],
      [{ ...base(), fullSyncTo: '' }, 'has fullSyncTo "", not a node id'],
      [{ ...base(), hiddenEmptyAt: 'yes' }, 'has hiddenEmptyAt "yes", not an epoch (a non-negative integer) or null'],
      [{ ...base(), hiddenEmptyAt: -1 }, 'has hiddenEmptyAt -1, not an epoch'],
      [{ ...base(), hiddenEmptyAt: 1.5 }, 'has hiddenEmptyAt 1.5, not an epoch'],
      [{ ...base(), hiddenStamp: { id: 'abc', next: null } }, 'has hiddenStamp {"id":"abc","next":null}, not {id: 32 hex digits or null, next: 32 hex digits or null}'],
      [{ ...base(), hiddenStamp: { id: null } }, 'has hiddenStamp {"id":null}, not {id: 32 hex digits'],
      [{ ...base(), checkpointSent: 0 }, 'has checkpointSent 0, not a checkpoint number (a positive integer) or null'],
      [{ ...base(), checkpointSent: '3' }, 'has checkpointSent "3", not a checkpoint number'],
    ];
    for (const [content, message] of cases) {
      await writeFile(path, typeof content === 'string' ? content : JSON.stringify(content));
      await expect(PairStateFile.open(path, () => base())).rejects.toMatchObject({ code: 'ERR_PAIR_STATE', message: expect.stringContaining(message) });
    }
  });
});

describe('crash rules after a restart', () => {
  it('secondary crashed between steps 5 and 7 of checkpoint N: redo step 6, commit N', () => {
    const plan = restartPlan(base({ committing: 5, cleanShutdown: false }));
    expect(plan.actions).toEqual([{ kind: 'finish-checkpoint', n: 5 }]);
    expect(plan.next).toMatchObject({ epoch: 5, committing: null });
    expect(plan.restorePoint).toBe(5);
    expect(plan.explanation).toContain('the disk is CP_5');
    // numbered past epoch + 1 by a primary ahead of this disk: the same rule
    const gap = restartPlan(base({ committing: 9, cleanShutdown: false }));
    expect(gap.actions).toEqual([{ kind: 'finish-checkpoint', n: 9 }]);
    expect(gap.next).toMatchObject({ epoch: 9, committing: null });
  });

  it('secondary crashed before step 5 (nothing committing): restore point is the committed epoch, overlays kept', () => {
    const plan = restartPlan(base({ cleanShutdown: false }));
    expect(plan.actions).toEqual([{ kind: 'keep-restore-point', epoch: 4 }]);
    expect(plan.next).toEqual(base({ cleanShutdown: false }));
    expect(plan.restorePoint).toBe(4);
  });

  it('a lost hidden disk makes the secondary Inconsistent, after a clean stop too (hidden keeps its copies over a stop)', () => {
    const plan = restartPlan(base({ cleanShutdown: false }), { hiddenLost: true });
    expect(plan.actions).toEqual([{ kind: 'mark-inconsistent', reason: expect.stringContaining('cannot be rolled back to CP_4') }]);
    expect(plan.next).toMatchObject({ diskState: 'Inconsistent', restorePointLost: expect.stringContaining('did not survive the unclean stop') });
    const clean = restartPlan(base({ cleanShutdown: true }), { hiddenLost: true });
    expect(clean.actions).toEqual([{ kind: 'mark-inconsistent', reason: expect.stringContaining('did not survive the stop and the state does not record it empty') }]);
    // a hidden disk that survived: nothing to do
    expect(restartPlan(base({ cleanShutdown: true })).actions).toEqual([{ kind: 'keep-restore-point', epoch: 4 }]);
  });

  it('a lost hidden disk recorded empty at the clean stop of this epoch loses nothing; the record goes before the node serves', () => {
    const plan = restartPlan(base({ hiddenEmptyAt: 4 }), { hiddenLost: true });
    expect(plan.actions).toEqual([{ kind: 'keep-restore-point', epoch: 4 }]);
    expect(plan.restorePoint).toBe(4);
    expect(plan.explanation).toContain('hidden was empty at the clean stop of epoch 4: nothing lost');
    expect(plan.next).toEqual(base({ hiddenEmptyAt: null }));
    // a hidden disk that survived: the record goes too (the node writes copies from now on)
    expect(restartPlan(base({ hiddenEmptyAt: 4 })).next.hiddenEmptyAt).toBe(null);
    // recorded at another epoch (a checkpoint since without a clean stop): not this restore point
    expect(restartPlan(base({ hiddenEmptyAt: 3 }), { hiddenLost: true }).actions[0]!.kind).toBe('mark-inconsistent');
    // the restore point was lost already: the record does not bring it back
    expect(restartPlan(base({ hiddenEmptyAt: 4, restorePointLost: 'a host crash' }), { hiddenLost: true }).actions[0]!.kind).toBe('mark-inconsistent');
    // a primary's state: the disk took writes without a hidden disk
    expect(restartPlan(base({ role: 'primary', hiddenEmptyAt: 4 }), { hiddenLost: true }).actions[0]).toEqual({ kind: 'keep-restore-point', epoch: 4 });
    expect(hiddenEmptyAtStop(base({ role: 'primary', hiddenEmptyAt: 4 }))).toBe(null);
    // committing wins: the disk is CP_5 and step 6 is redone
    expect(restartPlan(base({ hiddenEmptyAt: 4, committing: 5 }), { hiddenLost: true }).actions).toEqual([{ kind: 'finish-checkpoint', n: 5 }]);
  });

  it('the clean-stop record: empty at the epoch held, or null (not empty, or a checkpoint committing)', () => {
    expect(markSecondaryStopped(base(), true).hiddenEmptyAt).toBe(4);
    expect(markSecondaryStopped(base({ hiddenEmptyAt: 4 }), false).hiddenEmptyAt).toBe(null);
    expect(markSecondaryStopped(base({ committing: 5 }), true).hiddenEmptyAt).toBe(null);
    expect(hiddenEmptyAtStop(markSecondaryStopped(base(), true))).toBe(4);
    expect(hiddenEmptyAtStop(base())).toBe(null);
    expect(hiddenEmptyAtStop(base({ hiddenEmptyAt: null }))).toBe(null);
    // an older build's state (no field) stays valid
    expect(validateState(base(), 'x').hiddenEmptyAt).toBe(undefined);
    expect(validateState(base({ hiddenEmptyAt: 0 }), 'x').hiddenEmptyAt).toBe(0);
  });

  it('committing wins over a lost hidden disk: the disk already is CP_N', () => {
    expect(restartPlan(base({ committing: 5, cleanShutdown: false }), { hiddenLost: true }).actions).toEqual([{ kind: 'finish-checkpoint', n: 5 }]);
  });

  it('a primary that did not stop cleanly is a crashed primary: activity-log resync, remembered in the state', () => {
    const plan = restartPlan(base({ role: 'primary', cleanShutdown: false }));
    expect(plan.actions).toEqual([{ kind: 'keep-restore-point', epoch: 4 }, { kind: 'activity-log-resync' }]);
    expect(plan.next.crashedPrimary).toBe(true);
    // restarted as a secondary (failback) and crashed again before the resync: still owed
    const later = restartPlan({ ...plan.next, role: 'secondary', cleanShutdown: false });
    expect(later.actions).toContainEqual({ kind: 'activity-log-resync' });
    expect(restartPlan(clearCrashedPrimary(later.next)).actions).toEqual([{ kind: 'keep-restore-point', epoch: 4 }]);
  });

  it('a primary after a clean stop has nothing to do', () => {
    expect(restartPlan(base({ role: 'primary', cleanShutdown: true })).actions).toEqual([{ kind: 'keep-restore-point', epoch: 4 }]);
  });

  it('a state no crash can leave is refused, not guessed at', () => {
    expect(() => restartPlan(base({ committing: 3 }), {}, 'd.pair.json')).toThrow(expect.objectContaining({ code: 'ERR_PAIR_STATE', message: expect.stringContaining('the pair state d.pair.json has checkpoint 3 committing with epoch 4') }));
  });

  it('the markers: running / stopped / promoted', () => {
    const s = markPromoted(base(), 1234);
    expect(s).toMatchObject({ role: 'primary', primarySince: 1234 });
    expect(markRunning(s).cleanShutdown).toBe(false);
    expect(markStopped(markRunning(s)).cleanShutdown).toBe(true);
    expect(validateState(markRunning(s), 'x')).toEqual(markRunning(s));
  });
});

describe('volatile hidden disk and restore points', () => {
  it('a host crash is another boot id than the one recorded (or none readable); no record, no loss', () => {
    expect(volatileHiddenLost(base({ volatileHidden: { bootId: 'a' } }), 'a')).toBe(false);
    expect(volatileHiddenLost(base({ volatileHidden: { bootId: 'a' } }), 'b')).toBe(true);
    expect(volatileHiddenLost(base({ volatileHidden: { bootId: 'a' } }), null)).toBe(true);
    expect(volatileHiddenLost(base({ volatileHidden: null }), 'b')).toBe(false);
    expect(volatileHiddenLost(base(), 'b')).toBe(false);
  });

  it('no restore point: a lost one, or epoch 0, Inconsistent and nothing kept in hidden (the first resync); else there is one', () => {
    expect(noRestorePoint(base({ restorePointLost: 'a host crash' }), false)).toBe('a host crash');
    expect(noRestorePoint(base({ epoch: 0, diskState: 'Inconsistent' }), true)).toContain('never committed a checkpoint');
    // hidden keeps the disk's first state (copy-before-write ran before the resync): checkpoint 0
    expect(noRestorePoint(base({ epoch: 0, diskState: 'Inconsistent' }), false)).toBe(null);
    expect(noRestorePoint(base({ epoch: 0, diskState: 'UpToDate' }), true)).toBe(null);
    // a resync after a checkpoint: hidden still holds CP_N (replication.md §2)
    expect(noRestorePoint(base({ epoch: 3, diskState: 'Inconsistent' }), true)).toBe(null);
    // a record of hidden empty at a clean stop changes none of this (the first resync has no restore point to keep)
    expect(noRestorePoint(base({ epoch: 0, diskState: 'Inconsistent', hiddenEmptyAt: 0 }), true)).toContain('never committed a checkpoint');
    expect(noRestorePoint(base({ hiddenEmptyAt: 4, restorePointLost: 'a host crash' }), true)).toBe('a host crash');
  });
});
