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
  initialState,
  markPromoted,
  markRunning,
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
      [{ ...base(), committing: 7 }, 'has checkpoint 7 committing with epoch 4: a checkpoint being committed is always epoch + 1 (5)'],
      [{ ...base(), diskState: 'Fine' }, 'has disk state "Fine"'],
      [{ ...base(), cleanShutdown: 'yes' }, 'has cleanShutdown "yes", not true or false'],
      [{ ...base(), primarySince: 'noon' }, 'has primarySince "noon"'],
      [{ ...base(), gi: { current: 'zz', bitmap: EMPTY, history: [] } }, 'the generation tuple has current "zz", not 16 lowercase hex digits'],
      [{ ...base(), volatileHidden: { bootId: '' } }, 'has volatileHidden {"bootId":""}, not {bootId: "…"}'],
      [{ ...base(), restorePointLost: 5 }, 'has restorePointLost 5, not a string'],
      [{ ...base(), fullSyncFrom: { nodeId: 'n1' } }, 'has fullSyncFrom {"nodeId":"n1"}, not {nodeId: "…", gen: "…"}'],
      [{ ...base(), fullSyncTo: '' }, 'has fullSyncTo "", not a node id'],
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
  });

  it('secondary crashed before step 5 (nothing committing): restore point is the committed epoch, overlays kept', () => {
    const plan = restartPlan(base({ cleanShutdown: false }));
    expect(plan.actions).toEqual([{ kind: 'keep-restore-point', epoch: 4 }]);
    expect(plan.next).toEqual(base({ cleanShutdown: false }));
    expect(plan.restorePoint).toBe(4);
  });

  it('a lost hidden disk after an unclean stop makes the secondary Inconsistent; after a clean stop it does not matter', () => {
    const plan = restartPlan(base({ cleanShutdown: false }), { hiddenLost: true });
    expect(plan.actions).toEqual([{ kind: 'mark-inconsistent', reason: expect.stringContaining('cannot be rolled back to CP_4') }]);
    expect(plan.next.diskState).toBe('Inconsistent');
    expect(restartPlan(base({ cleanShutdown: true }), { hiddenLost: true }).actions).toEqual([{ kind: 'keep-restore-point', epoch: 4 }]);
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
    expect(() => restartPlan(base({ committing: 9 }), {}, 'd.pair.json')).toThrow(expect.objectContaining({ code: 'ERR_PAIR_STATE', message: expect.stringContaining('the pair state d.pair.json has checkpoint 9 committing with epoch 4') }));
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
  });
});
