/**
 * A bitmap file another user could have written is never trusted (issue 14, defect 4): owned by
 * another user (not root), or writable by its group or others, it loads all-dirty with the
 * reason (fault foreign-owner / writable-by-others), and the read-write open replaces it with a
 * file of the daemon's own (0644). A normal file is trusted as before. Tests run as root: the
 * other user is nobody (65534). Through serve-nbd: the listening line, `status` and `bitmap list`
 * say why.
 */
import { chmod, chown, lstat, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { PersistentBitmap } from '../../src/bitmap/persistent.js';
import { trustProblem } from '../../src/bitmap/trust.js';
import { makeTempDir, runCli, serve } from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;
const NOBODY = 65534;

/** A clean bitmap file with 64 KiB dirty at 1 MiB. */
async function cleanFile(path: string): Promise<void> {
  const pb = await PersistentBitmap.create(path, { size: SIZE });
  pb.fill(MiB, 64 * KiB);
  await pb.flush();
  await pb.close();
}

describe('bitmap file trust', () => {
  it('trustProblem: owner and mode', () => {
    expect(trustProblem({ uid: 1000, mode: 0o100644 }, 1000)).toBeUndefined();
    expect(trustProblem({ uid: 0, mode: 0o100600 }, 1000)).toBeUndefined();
    expect(trustProblem({ uid: 1001, mode: 0o100644 }, 1000)).toEqual({
      fault: 'foreign-owner',
      reason: "the file is owned by uid 1001, neither this process's user (uid 1000) nor root: that user could have replaced its bits",
    });
    expect(trustProblem({ uid: 1000, mode: 0o100664 }, 1000)).toEqual({ fault: 'writable-by-others', reason: 'the file is writable by its group (mode 0664): someone else could have replaced its bits' });
    expect(trustProblem({ uid: 1000, mode: 0o100646 }, 1000)?.reason).toBe('the file is writable by every user (mode 0646): someone else could have replaced its bits');
  });

  it('a normal file (ours, 0644) is trusted: loaded clean with its bits', async () => {
    const path = join(await makeTempDir(), 'disk.img.b0.bitmap');
    await cleanFile(path);
    const { bitmap, loadState } = await PersistentBitmap.open(path, { size: SIZE, readOnly: true });
    expect(loadState).toEqual({ state: 'clean' });
    expect(bitmap.bitmap.dirtyGranules).toBe(1);
    await bitmap.close();
  });

  it.each([
    ['o+w (0646)', async (p: string) => chmod(p, 0o646), 'writable-by-others', 'writable by every user (mode 0646)'],
    ['g+w (0664)', async (p: string) => chmod(p, 0o664), 'writable-by-others', 'writable by its group (mode 0664)'],
    ['chown nobody', async (p: string) => chown(p, NOBODY, NOBODY), 'foreign-owner', `owned by uid ${NOBODY}`],
  ])('%s: loaded all-dirty with the reason; read-write replaces it with a file of our own, 0644', async (_what, spoil, fault, why) => {
    const path = join(await makeTempDir(), 'disk.img.b0.bitmap');
    await cleanFile(path);
    await spoil(path);
    // read-only: all dirty, the file left alone
    const before = await readFile(path);
    const ro = await PersistentBitmap.open(path, { size: SIZE, readOnly: true });
    expect(ro.loadState).toMatchObject({ state: 'all-dirty', fault });
    expect((ro.loadState as { reason: string }).reason).toContain(why);
    expect(ro.bitmap.bitmap.dirtyGranules).toBe(SIZE / (64 * KiB));
    await ro.bitmap.close();
    expect(await readFile(path)).toEqual(before);
    // strict (an incremental backup's read): refused, never trusted
    await expect(PersistentBitmap.open(path, { size: SIZE, readOnly: true, strict: true })).rejects.toMatchObject({ code: 'ERR_BITMAP_CORRUPT', details: { fault } });
    // read-write: all dirty, and the file is ours from now on
    const rw = await PersistentBitmap.open(path, { size: SIZE });
    expect(rw.loadState).toMatchObject({ state: 'all-dirty', fault });
    expect(rw.bitmap.bitmap.dirtyGranules).toBe(SIZE / (64 * KiB));
    await rw.bitmap.close();
    const st = await lstat(path);
    expect([st.uid, st.mode & 0o7777]).toEqual([process.getuid!(), 0o644]);
    const again = await PersistentBitmap.open(path, { size: SIZE, readOnly: true });
    expect(again.loadState).toEqual({ state: 'clean' });
    expect(again.bitmap.bitmap.dirtyGranules).toBe(SIZE / (64 * KiB));
    await again.bitmap.close();
  });

  it('serve-nbd: a bitmap file writable by others loads all-dirty; the listening line, status and bitmap list say why; a normal one loads clean', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.img');
    await writeFile(image, Buffer.alloc(0));
    await chmod(image, 0o644);
    await truncate(image, SIZE);
    await cleanFile(`${image}.spoiled.bitmap`);
    await cleanFile(`${image}.fine.bitmap`);
    await chmod(`${image}.spoiled.bitmap`, 0o666);
    const ctl = join(dir, 'ctl');
    const s = await serve([image, '--socket', join(dir, 'nbd'), '--control', ctl]);
    const line = JSON.parse(s.listeningLine) as { bitmaps: Array<{ name: string; state: string; fault?: string; reason?: string }> };
    expect(line.bitmaps.map((b) => [b.name, b.state, b.fault])).toEqual([
      ['fine', 'clean', undefined],
      ['spoiled', 'all-dirty', 'writable-by-others'],
    ]);
    expect(s.stderr()).toContain(`dirty bitmap "spoiled" of export "" (${image}.spoiled.bitmap) cannot be trusted (the file is writable by every user (mode 0666)`);
    const text = await runCli(['status', '--control', ctl]);
    expect(text.stdout).toContain('loaded ALL-DIRTY (writable-by-others): the file is writable by every user (mode 0666): someone else could have replaced its bits');
    const list = await runCli(['bitmap', 'list', '--control', ctl, '--json']);
    expect(list.code, list.stderr).toBe(0);
    const infos = JSON.parse(list.stdout) as Array<{ name: string; dirtyBytes: number; loadState: { state: string; fault?: string } }>;
    expect(infos.map((b) => [b.name, b.loadState.state, b.loadState.fault ?? null, b.dirtyBytes])).toEqual([
      ['fine', 'clean', null, 64 * KiB],
      ['spoiled', 'all-dirty', 'writable-by-others', SIZE],
    ]);
    expect(await s.stop()).toBe(0);
  });
});
