/**
 * PairStateFile writes its changes in order: a change made while an earlier one is still being
 * written must not be overwritten by it on disk (the earlier replacement renamed last). Seen as a
 * secondary's clean stop whose record (hiddenEmptyAt) was lost to the link-close's disk-state
 * write still under way. The first replacement is held at a gate while the second change is made.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { makeTempDir } from '../support/spawn.js';

const gate: { held: Promise<void> | null } = { held: null };

vi.mock('../../src/util/safe-file.js', async (importOriginal) => {
  const real = await importOriginal<typeof import('../../src/util/safe-file.js')>();
  return {
    ...real,
    replaceFile: async (...args: Parameters<typeof real.replaceFile>) => {
      const held = gate.held;
      gate.held = null;
      if (held) await held;
      return real.replaceFile(...args);
    },
  };
});

const { initialState, PairStateFile } = await import('../../src/pair/state.js');

describe('PairStateFile: writes in the order of the changes', () => {
  it('a change made while the previous one is being written ends on disk (not the previous one renamed after it)', async () => {
    const path = join(await makeTempDir(), 'd.img.pair.json');
    const f = await PairStateFile.open(path, () => initialState('secondary'));
    let release!: () => void;
    gate.held = new Promise<void>((r) => (release = r));
    const first = f.update((s) => ({ ...s, diskState: 'Consistent' }));
    const second = f.update((s) => ({ ...s, hiddenEmptyAt: 0 }));
    let secondDone = false;
    void second.then(() => (secondDone = true));
    await new Promise((r) => setImmediate(r));
    // the second is not durable while the first write waits (its promise says durable)
    expect(secondDone).toBe(false);
    release();
    await Promise.all([first, second]);
    expect(JSON.parse(await readFile(path, 'utf8'))).toMatchObject({ diskState: 'Consistent', hiddenEmptyAt: 0 });
    expect(f.state).toMatchObject({ diskState: 'Consistent', hiddenEmptyAt: 0 });
  });

  it('a failed write does not stop the next one', async () => {
    const path = join(await makeTempDir(), 'd.img.pair.json');
    const f = await PairStateFile.open(path, () => initialState('secondary'));
    gate.held = Promise.reject(Object.assign(new Error('EIO (injected)'), { code: 'EIO' }));
    await expect(f.update((s) => ({ ...s, epoch: 1 }))).rejects.toThrow('EIO (injected)');
    await f.update((s) => ({ ...s, epoch: 2 }));
    expect(JSON.parse(await readFile(path, 'utf8'))).toMatchObject({ epoch: 2 });
  });
});
