/**
 * Attack: the pair state (IMAGE.pair.json, beside the disk) planted by another user of a shared
 * directory. A FIFO at the name hung serve-nbd --secondary (and a primary) at start, before the
 * listening line; a file of theirs set the node's generations and role. Now only a regular file
 * owned by the daemon's user (or root) that no other user may write is read; anything else is
 * ERR_PAIR_STATE, exit 1, at once, saying what is wrong.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, chown, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli, serve } from '../support/spawn.js';

async function secondaryWith(plant: (stateFile: string, dir: string) => Promise<void>): Promise<{ code: number | null; message: string; stateFile: string }> {
  const dir = await makeTempDir();
  const img = join(dir, 's.img');
  await writeFile(img, Buffer.alloc(1 << 20));
  const stateFile = `${img}.pair.json`;
  await plant(stateFile, dir);
  // bounded: a hang is a failure (runCli kills it and rejects)
  const r = await runCli(['serve-nbd', img, '--secondary', '--socket', join(dir, 's.sock'), '--json'], { timeoutMs: 15_000 });
  const error = (JSON.parse(r.stdout.trim().split('\n')[0]!) as { error: { code: string; message: string } }).error;
  expect(error.code).toBe('ERR_PAIR_STATE');
  return { code: r.code, message: error.message, stateFile };
}

describe('serve-nbd --secondary: a pair state file it did not write is refused at once (ERR_PAIR_STATE, exit 1)', () => {
  it('a FIFO', async () => {
    const r = await secondaryWith(async (p) => void execFileSync('mkfifo', [p]));
    expect(r.code).toBe(1);
    expect(r.message).toBe(`the pair state ${r.stateFile} is not a regular file: not one this daemon wrote, not trusted`);
  });

  it('a symlink to another pair\'s state: not followed, its target untouched', async () => {
    const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
    let target = '';
    let before = '';
    const r = await secondaryWith(async (p, dir) => {
      // another pair's secondary, started and stopped: its state is a real one
      const other = join(dir, 'other.img');
      await writeFile(other, Buffer.alloc(1 << 20));
      target = `${other}.pair.json`;
      const a = await serve([other, '--secondary', '--socket', join(dir, 'other.sock')]);
      expect(await a.stop()).toBe(0);
      before = sha(await readFile(target));
      await symlink(target, p);
    });
    expect(r.code).toBe(1);
    expect(r.message).toBe(`the pair state ${r.stateFile} is a symlink: not one this daemon wrote, not trusted`);
    expect(sha(await readFile(target))).toBe(before);
  });

  it.runIf(process.getuid?.() === 0)('a file of another user (root only can give a file away)', async () => {
    const r = await secondaryWith(async (p) => {
      await writeFile(p, '{}', { mode: 0o600 });
      await chown(p, 65534, 65534);
    });
    expect(r.code).toBe(1);
    expect(r.message).toBe(`the pair state ${r.stateFile} is owned by uid 65534, not by this daemon's user (uid 0): not one this daemon wrote, not trusted`);
  });

  it('a file others may write (0666)', async () => {
    const r = await secondaryWith(async (p) => {
      await writeFile(p, '{}');
      await chmod(p, 0o666);
    });
    expect(r.code).toBe(1);
    expect(r.message).toBe(`the pair state ${r.stateFile} has mode 0666: other users may write it: not one this daemon wrote, not trusted`);
  });
});
