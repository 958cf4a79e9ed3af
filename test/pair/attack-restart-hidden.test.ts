/**
 * Attack round 3 (issue 10), restarts with changed flags: the secondary restarted with --hidden
 * naming another file.
 *
 * - the hidden disk moved (mv, with its copies) and --hidden naming it: the restore point is
 *   kept; a failover gives the checkpoint exactly.
 * - --hidden naming a stale copy of the hidden disk (taken at an earlier epoch): its clusters are
 *   another epoch's old data. Found on main (session 14): started, and `failover` committed it as
 *   checkpoint 3: X (written and committed in epoch 2) rolled back to its old bytes, Y (written
 *   after checkpoint 3) kept. Now refused at start (ERR_PAIR_OVERLAY, the recorded file and inode).
 * - the same stale copy written over the hidden disk in place (same inode: cp onto it, dd
 *   conv=notrunc, a restore that keeps the inode). Found on main (session 14, issue 10): started,
 *   and failover committed X's old bytes. Now refused at start by the hidden disk's stamp
 *   (hidden-stamp.ts; ERR_PAIR_OVERLAY naming both stamps); the right hidden disk put back in
 *   place: the failover gives the checkpoint exactly.
 * - kill -9 after a start wrote the hidden disk's new stamp and before the state recorded it:
 *   the restart is not refused (the state's `next` names it).
 */
import { copyFile, readFile, rename, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request, firstCheckpoint, pairOf, stampedPair } from '../support/control.js';
import { writeFlushed } from '../support/pair-bytes.js';
import { run, runCli, serve, unixUri, waitFor, type Served } from '../support/spawn.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 8 * MiB;
const X = 1 * MiB;
const Y = 3 * MiB;
const LEN = 64 * KiB;

async function setup() {
  const { dir, p, content } = await stampedPair(SIZE);
  const sArgs = [p.sImg, '--secondary', '--socket', p.sSock, '--control', p.sControl];
  const pArgs = [p.pImg, '--socket', p.pSock, '--control', p.pControl, '--replicate-to', unixUri(p.sSock), '--protocol', 'sync'];
  return { dir, p, content, sArgs, pArgs, hidden: `${p.sImg}.hidden.qcow2` };
}

/**
 * The stale-copy scenario's first half: the pair up to checkpoint 1; in epoch 2 X written (0x11;
 * hidden keeps CP_1's X) and a copy of that hidden disk kept aside as DIR/stale-hidden.qcow2 (the
 * secondary stopped for it, then back); checkpoint `epoch` taken (X = 0x11); Y written (0x22) in
 * the next epoch; the primary stopped and the secondary killed -9.
 */
async function staleHiddenAside(
  { dir, p, sArgs, pArgs, hidden }: Pick<Awaited<ReturnType<typeof setup>>, 'dir' | 'p' | 'sArgs' | 'pArgs' | 'hidden'>,
  track: (s: Served) => Served,
): Promise<{ stale: string; epoch: number }> {
  let s = track(await serve(sArgs));
  const pr = track(await serve(pArgs));
  await firstCheckpoint(p.pControl, 60_000);
  // epoch 2 runs: X written (hidden keeps CP_1's X); a copy of that hidden disk is kept aside
  await writeFlushed(p.pSock, X, 0x11, LEN);
  expect(await s.stop()).toBe(0);
  const stale = join(dir, 'stale-hidden.qcow2');
  await copyFile(hidden, stale);
  s = track(await serve(sArgs));
  await waitFor(async () => (await pairOf(p.pControl)).link === 'connected', 'the primary reconnected', { timeoutMs: 30_000 });
  const cp = await runCli(['checkpoint', '--control', p.pControl, '--json']);
  expect(cp.code, cp.stderr).toBe(0);
  const epoch = (await pairOf(p.pControl)).epoch;
  await writeFlushed(p.pSock, Y, 0x22, LEN);
  expect(await pr.stop()).toBe(0);
  s.child.kill('SIGKILL');
  await s.waitExit();
  return { stale, epoch };
}

/** The secondary started again: its failover gives checkpoint `epoch` exactly (X = 0x11, Y rolled back). */
async function expectFailoverToCheckpoint({ p, content, sArgs }: Pick<Awaited<ReturnType<typeof setup>>, 'p' | 'content' | 'sArgs'>, epoch: number, track: (s: Served) => Served): Promise<void> {
  const s2 = track(await serve(sArgs));
  const r = await request<{ role: string; epoch: number }>(p.sControl, 'failover', {});
  expect(r).toMatchObject({ role: 'primary', epoch });
  expect(await s2.stop()).toBe(0);
  const want = Buffer.from(content);
  want.fill(0x11, X, X + LEN);
  expect((await readFile(p.sImg)).equals(want)).toBe(true);
}

describe('attack: the secondary restarted with --hidden naming another file', () => {
  it('the hidden disk moved with its copies: the restore point is kept, failover gives the checkpoint exactly', async () => {
    const { dir, p, content, sArgs, pArgs, hidden } = await setup();
    const procs: Served[] = [];
    const track = (s: Served) => (procs.push(s), s);
    try {
      const s = track(await serve(sArgs));
      const pr = track(await serve(pArgs));
      await firstCheckpoint(p.pControl, 60_000);
      await writeFlushed(p.pSock, X, 0x11, LEN);
      expect(await pr.stop()).toBe(0);
      s.child.kill('SIGKILL');
      await s.waitExit();
      const moved = join(dir, 'moved-hidden.qcow2');
      await rename(hidden, moved);
      const s2 = track(await serve([...sArgs, '--hidden', moved]));
      const r = await request<{ role: string; epoch: number }>(p.sControl, 'failover', {});
      expect(r).toMatchObject({ role: 'primary', epoch: 1 });
      expect(await s2.stop()).toBe(0);
      expect((await readFile(p.sImg)).equals(content)).toBe(true);
    } finally {
      for (const x of procs) await x.stop().catch(() => {});
    }
  }, 120_000);

  it('--hidden naming a stale copy from an earlier epoch: a failover never commits it as the checkpoint', async () => {
    const { dir, p, content, sArgs, pArgs, hidden } = await setup();
    const procs: Served[] = [];
    const track = (s: Served) => (procs.push(s), s);
    try {
      const { stale, epoch } = await staleHiddenAside({ dir, p, sArgs, pArgs, hidden }, track);
      // refused at start, clearly (which file, which inode), nothing written
      const refused = await serve([...sArgs, '--hidden', stale]).catch((e: unknown) => e as Error);
      expect(refused).toBeInstanceOf(Error);
      expect((refused as Error).message).toContain('ERR_PAIR_OVERLAY');
      expect((refused as Error).message).toContain(`the hidden disk ${stale} is not the file this secondary last served with (${hidden}`);
      // with the right hidden disk: the failover gives CP_epoch exactly (X = 0x11, Y rolled back)
      await expectFailoverToCheckpoint({ p, content, sArgs }, epoch, track);
    } finally {
      for (const x of procs) await x.stop().catch(() => {});
    }
  }, 120_000);

  it('a stale copy written over the hidden disk in place (same inode): refused by its stamp; the right one back: failover gives the checkpoint', async () => {
    const { dir, p, content, sArgs, pArgs, hidden } = await setup();
    const procs: Served[] = [];
    const track = (s: Served) => (procs.push(s), s);
    try {
      const { stale, epoch } = await staleHiddenAside({ dir, p, sArgs, pArgs, hidden }, track);
      // the stale copy written over the hidden disk in place, the right one kept aside
      const right = join(dir, 'right-hidden.qcow2');
      await copyFile(hidden, right);
      const ino = (await stat(hidden)).ino;
      expect((await run('dd', [`if=${stale}`, `of=${hidden}`, 'bs=64k', 'conv=notrunc,fsync', 'status=none'])).code).toBe(0);
      expect((await run('truncate', ['-s', String((await stat(stale)).size), hidden])).code).toBe(0);
      expect((await stat(hidden)).ino).toBe(ino);
      expect((await readFile(hidden)).equals(await readFile(stale))).toBe(true);
      const refused = await serve(sArgs).catch((e: unknown) => e as Error);
      expect(refused).toBeInstanceOf(Error);
      expect((refused as Error).message).toContain('ERR_PAIR_OVERLAY');
      expect((refused as Error).message).toContain(`the hidden disk ${hidden} is not the hidden disk this secondary last served with: it carries stamp `);
      // nothing written: the state and the disk are as they were
      expect((await readFile(hidden)).equals(await readFile(stale))).toBe(true);
      // the right hidden disk back in place: the failover gives CP_epoch exactly (X = 0x11, Y rolled back)
      await copyFile(right, hidden);
      expect((await stat(hidden)).ino).toBe(ino);
      await expectFailoverToCheckpoint({ p, content, sArgs }, epoch, track);
      // the hidden disk with blkrep's stamp extension is a clean qcow2 for QEMU
      const chk = await run('qemu-img', ['check', '-f', 'qcow2', hidden]);
      expect(chk.code, chk.stdout + chk.stderr).toBe(0);
    } finally {
      for (const x of procs) await x.stop().catch(() => {});
    }
  }, 120_000);

  it('kill -9 after a start wrote the new stamp, before the state recorded it: the restart is not refused, failover gives the checkpoint', async () => {
    const { p, content, sArgs, pArgs } = await setup();
    const procs: Served[] = [];
    const track = (s: Served) => (procs.push(s), s);
    try {
      const s = track(await serve(sArgs));
      const pr = track(await serve(pArgs));
      await firstCheckpoint(p.pControl, 60_000);
      await writeFlushed(p.pSock, X, 0x11, LEN);
      expect(await pr.stop()).toBe(0);
      s.child.kill('SIGKILL');
      await s.waitExit();
      // the start dies right after the hidden disk's new stamp is synced
      const dying = await serve(sArgs, { env: { ...process.env, BLKREP_TEST_CRASH_AT: 'hidden-stamp-written' } }).catch((e: unknown) => e as Error);
      expect(dying).toBeInstanceOf(Error);
      const st = JSON.parse(await readFile(`${p.sImg}.pair.json`, 'utf8')) as { hiddenStamp: { id: string; next: string | null } };
      expect(st.hiddenStamp.next).toMatch(/^[0-9a-f]{32}$/);
      const s2 = track(await serve(sArgs));
      const r = await request<{ role: string; epoch: number }>(p.sControl, 'failover', {});
      expect(r).toMatchObject({ role: 'primary', epoch: 1 });
      expect(await s2.stop()).toBe(0);
      expect((await readFile(p.sImg)).equals(content)).toBe(true);
    } finally {
      for (const x of procs) await x.stop().catch(() => {});
    }
  }, 120_000);
});
