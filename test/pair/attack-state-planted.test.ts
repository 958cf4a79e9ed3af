/**
 * Attack: a disk's directory is shared (an image directory, /tmp), and someone plants the pair
 * state's name before the node starts: DISK.pair.json as a symlink to another pair's state, or a
 * crafted file of another user, or a FIFO (whose open would wait for a writer). The pair state is the node's identity (nodeId), generations,
 * epoch and disk state: taken, the node would be the other pair's node (two nodes with one id,
 * its generations and epoch claimed over this disk's data).
 *
 * Before: serve-nbd read the state through the symlink (and its first write replaced the link
 * with a copy) or from the other user's file, and served. Now the start is refused,
 * ERR_PAIR_STATE naming the file and why; the planted target is left as it was.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { chown, readFile, symlink, truncate, writeFile, copyFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli, serve } from '../support/spawn.js';

const SIZE = 4 << 20;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('attack: a planted pair state', () => {
  it('a symlink to another pair\'s state, a file of another user: the start is refused (ERR_PAIR_STATE naming the file), the target untouched', async () => {
    const dir = await makeTempDir();
    for (const f of ['a.img', 'b.img', 'c.img']) {
      await writeFile(join(dir, f), Buffer.alloc(0));
      await truncate(join(dir, f), SIZE);
    }
    // pair a's secondary, started and stopped: its state exists
    const a = await serve([join(dir, 'a.img'), '--secondary', '--socket', join(dir, 'a.sock')]);
    expect(await a.stop()).toBe(0);
    const aState = join(dir, 'a.img.pair.json');
    const before = sha(await readFile(aState));

    // b's state name planted as a symlink to a's
    const bState = join(dir, 'b.img.pair.json');
    await symlink(aState, bState);
    const b = await runCli(['serve-nbd', join(dir, 'b.img'), '--secondary', '--socket', join(dir, 'b.sock'), '--json']);
    expect(b.code).toBe(1);
    expect(JSON.parse(b.stdout).error).toEqual({
      code: 'ERR_PAIR_STATE',
      message: `the pair state ${bState} is a symlink: refusing to follow it (someone may have planted it; a pair state is always a plain file blkrep wrote)`,
    });
    expect(sha(await readFile(aState))).toBe(before);

    // d's state name planted as a FIFO: refused at once, not waited on (an open for reading blocks
    // until a writer comes)
    const dState = join(dir, 'd.img.pair.json');
    await writeFile(join(dir, 'd.img'), Buffer.alloc(0));
    await truncate(join(dir, 'd.img'), SIZE);
    execFileSync('mkfifo', [dState]);
    const d = await runCli(['serve-nbd', join(dir, 'd.img'), '--secondary', '--socket', join(dir, 'd.sock'), '--json']);
    expect(d.code).toBe(1);
    expect(JSON.parse(d.stdout).error).toEqual({ code: 'ERR_PAIR_STATE', message: `the pair state ${dState} is not a plain file` });

    // c's state name planted as a copy owned by another user (root only can give a file away)
    if (process.getuid?.() !== 0) return;
    const cState = join(dir, 'c.img.pair.json');
    await copyFile(aState, cState);
    await chown(cState, 65534, 65534);
    const c = await runCli(['serve-nbd', join(dir, 'c.img'), '--secondary', '--socket', join(dir, 'c.sock'), '--json']);
    expect(c.code).toBe(1);
    expect(JSON.parse(c.stdout).error).toEqual({
      code: 'ERR_PAIR_STATE',
      message: `the pair state ${cState} is owned by uid 65534, not by this user (uid 0) or root: refusing to take it for this node's (someone may have planted it)`,
    });
  }, 60_000);
});
