/**
 * The failure cases of replication.md §4 injected on two real daemons (separate processes), each
 * checked against the table's expected outcome: the errno the NBD client sees (qemu-io's message),
 * the events, the `status` fields, and the bytes of both disks after repair + resync.
 *
 * Faults below the pair's filters come from `--filter error:…,at=disk|active|hidden` (the disk,
 * a secondary's active or hidden disk fails, as a failing disk would, under the replication and
 * copy-before-write filters; blkrep-filters(7)); case 6 from the test hook
 * BLKREP_TEST_FAIL_AT=checkpoint-step-6 (crash-hook.ts).
 */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { eventsOf, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 8 * MiB;

async function blank(path: string): Promise<void> {
  await writeFile(path, Buffer.alloc(0));
  await truncate(path, SIZE);
}

function qemuIo(socket: string, command: string) {
  return run('qemu-io', ['-f', 'raw', unixUri(socket), '-c', command]);
}

describe('failure cases of replication.md §4 on two daemons', () => {
  it('case 1, an I/O error on the primary\'s disk: the client gets EIO, event primary-io-error, the region stays in the peer bitmap; after repair the resync copies it; disks equal', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    await blank(pImg);
    await blank(sImg);
    const sArgs = [sImg, '--secondary', '--socket', sSock, '--control', sControl];
    const s1 = await serve(sArgs);
    const pArgs = [pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'sync'];
    const p1 = await serve([...pArgs, '--filter', 'error:ops=write,range=1M-2M,errno=EIO,at=disk']);
    const ev = await eventsOf(pControl);
    await firstCheckpoint(pControl);
    expect(await pairOf(pControl)).toMatchObject({ link: 'connected', bytesBehind: 0 });

    const bad = await qemuIo(pSock, 'write -P 0x22 1M 64k');
    expect(bad.stderr + bad.stdout).toContain('write failed: Input/output error');
    const failed = await ev.next('primary-io-error');
    expect(failed).toMatchObject({ event: 'primary-io-error', export: '', op: 'write', offset: MiB, length: 64 * KiB, errno: 'EIO', code: 'ERR_INJECTED' });
    // the rest of the disk works; the forwarded FLUSH leaves the failed region in the peer bitmap
    const good = await qemuIo(pSock, 'write -P 0x33 4M 64k');
    expect(good.code).toBe(0);
    expect((await qemuIo(pSock, 'flush')).code).toBe(0);
    const st = await pairOf(pControl);
    expect(st).toMatchObject({ link: 'connected', epoch: 1, diskState: 'UpToDate' });
    expect(st.bytesBehind).toBe(64 * KiB);
    expect(ev.events.some((e) => e.event === 'replication-degraded')).toBe(false);
    // the secondary may hold the write the primary's disk refused (sync forwards concurrently)
    const p = await readFile(pImg);
    expect(p.subarray(MiB, MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB))).toBe(true);
    expect(p.subarray(4 * MiB, 4 * MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB, 0x33))).toBe(true);
    await ev.close();

    // repair: the primary restarts on a good disk (the secondary after it, so that the events
    // are watched from the link's start); the resync copies the region, not the disk
    expect(await p1.stop()).toBe(0);
    expect(await s1.stop()).toBe(0);
    const p2 = await serve(pArgs);
    const ev2 = await eventsOf(pControl);
    const s2 = await serve(sArgs);
    const started = await ev2.next('resync-started');
    const done = await ev2.next('resync-done');
    expect(started).toMatchObject({ full: false, bytes: 64 * KiB });
    expect(done.bytes as number).toBeLessThanOrEqual(1.1 * 64 * KiB);
    await waitFor(async () => (await pairOf(pControl)).link === 'connected' && (await pairOf(pControl)).bytesBehind === 0, 'connected, nothing behind', { timeoutMs: 30_000 });
    await ev2.close();
    expect(await p2.stop()).toBe(0);
    expect(await s2.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });

  it('case 5, an I/O error on the active disk: the secondary\'s own client gets EIO; replication, checkpoints and the disks are unaffected', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    await blank(pImg);
    await blank(sImg);
    const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view', '--filter', 'error:ops=write,range=1M-2M,errno=EIO,at=active']);
    const sEv = await eventsOf(sControl);
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'sync']);
    const pEv = await eventsOf(pControl);
    await firstCheckpoint(pControl);

    const bad = await run('qemu-io', ['-f', 'raw', unixUri(sSock, 'view'), '-c', 'write -P 0x55 1M 64k']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr + bad.stdout).toContain('write failed: Input/output error');
    // the view's other writes work and read back
    expect((await run('qemu-io', ['-f', 'raw', unixUri(sSock, 'view'), '-c', 'write -P 0x66 3M 64k'])).code).toBe(0);
    // the primary's writes go on, a checkpoint commits (and drops the view's own writes, COLO)
    expect((await qemuIo(pSock, 'write -P 0x22 1M 128k')).code).toBe(0);
    expect((await qemuIo(pSock, 'flush')).code).toBe(0);
    const cp = await runCli(['checkpoint', '--control', pControl, '--json']);
    expect(cp.code).toBe(0);
    expect(JSON.parse(cp.stdout)).toMatchObject({ epoch: 2 });
    expect(await pairOf(pControl)).toMatchObject({ link: 'connected', epoch: 2, bytesBehind: 0 });
    expect(await pairOf(sControl)).toMatchObject({ link: 'connected', epoch: 2, diskState: 'UpToDate' });
    expect(pEv.events.filter((e) => e.event === 'replication-degraded')).toEqual([]);
    expect(sEv.events.filter((e) => e.event === 'secondary-failed' || e.event === 'replication-degraded')).toEqual([]);
    const view = await run('qemu-io', ['-f', 'raw', unixUri(sSock, 'view'), '-c', 'read -P 0x22 1M 128k', '-c', 'read -P 0 3M 64k']);
    expect(view.stdout).not.toContain('Pattern verification failed');
    expect(view.code).toBe(0);
    await pEv.close();
    await sEv.close();
    expect(await p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });

  it('case 6, emptying the hidden disk fails in a checkpoint: not committed (epoch stays 1, step 5 durable: committing 2), event checkpoint-failed on both; the secondary redoes step 6 and commits 2, the primary\'s retry finds it; view and disks equal', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    await writeFile(pImg, Buffer.alloc(SIZE, 0x11));
    await blank(sImg);
    // the primary first, so that its events are watched from the link's start. The initial sync
    // copies without copy-before-write, so checkpoint 1 has an empty hidden disk and nothing to
    // empty; the hook fails the first emptying of a hidden disk that holds clusters: checkpoint 2
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'sync']);
    const pEv = await eventsOf(pControl);
    const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view'], { env: { ...process.env, BLKREP_TEST_FAIL_AT: 'checkpoint-step-6' } });
    const sEv = await eventsOf(sControl);
    expect(await pEv.next('checkpoint')).toMatchObject({ epoch: 1 });
    // copied into hidden (old 0x11) before the disk takes 0x22
    expect((await qemuIo(pSock, 'write -P 0x22 1M 128k')).code).toBe(0);
    const bad = await runCli(['checkpoint', '--control', pControl, '--json']);
    expect(bad.code).not.toBe(0);
    const failed = await pEv.next('checkpoint-failed');
    expect(failed).toMatchObject({ n: 2, code: 'ERR_TEST_FAULT', message: 'the secondary failed checkpoint 2: injected fault at checkpoint-step-6 (BLKREP_TEST_FAIL_AT)' });
    expect(await sEv.next('checkpoint-failed')).toMatchObject({ n: 2, code: 'ERR_TEST_FAULT' });
    expect(await pairOf(pControl)).toMatchObject({ link: 'connected', epoch: 1 });
    // the secondary redoes step 6 itself (replica writes held meanwhile: checkpoint-failed-window.test.ts) and commits 2
    expect(await sEv.next('checkpoint', sEv.events.findIndex((e) => e.event === 'checkpoint-failed'))).toMatchObject({ epoch: 2 });
    expect(await pairOf(sControl)).toMatchObject({ epoch: 2, secondary: { committing: null } });
    // writes go on; the primary's retry finds checkpoint 2 committed
    expect((await qemuIo(pSock, 'write -P 0x33 4M 64k')).code).toBe(0);
    const cp = await runCli(['checkpoint', '--control', pControl, '--json']);
    expect(cp.code).toBe(0);
    expect(JSON.parse(cp.stdout)).toMatchObject({ epoch: 2 });
    expect(await pairOf(pControl)).toMatchObject({ link: 'connected', epoch: 2, bytesBehind: 0 });
    expect(await pairOf(sControl)).toMatchObject({ link: 'connected', epoch: 2, diskState: 'UpToDate', secondary: { committing: null } });
    expect(pEv.events.filter((e) => e.event === 'replication-degraded')).toEqual([]);
    // the view is the secondary's checkpoint 2, committed before the 0x33 write (its old 0x11 in hidden)
    const view = await run('qemu-io', ['-f', 'raw', unixUri(sSock, 'view'), '-c', 'read -P 0x22 1M 128k', '-c', 'read -P 0x11 0 1M', '-c', 'read -P 0x11 4M 64k', '-c', 'read -P 0x11 2M 2M']);
    expect(view.stdout).not.toContain('Pattern verification failed');
    expect(view.code).toBe(0);
    await pEv.close();
    await sEv.close();
    expect(await p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });

  it('cases 2 and 4, an I/O error on the secondary\'s disk: the primary\'s client succeeds, the primary degrades (peer bitmap); the secondary is Failed, not promotable; after repair the resync copies what was dirty; disks equal', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    await blank(pImg);
    await blank(sImg);
    const sArgs = [sImg, '--secondary', '--socket', sSock, '--control', sControl];
    const s1 = await serve([...sArgs, '--filter', 'error:ops=write,range=1M-2M,errno=EIO,at=disk']);
    const sEv = await eventsOf(sControl);
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'sync']);
    const pEv = await eventsOf(pControl);
    await firstCheckpoint(pControl);
    // case 2 for the primary's client: the forward fails, the write does not
    const w = await qemuIo(pSock, 'write -P 0x22 1M 64k');
    expect(w.code).toBe(0);
    // case 2 on the primary: degraded, the region in the peer bitmap, a new generation
    const degraded = await pEv.next('replication-degraded');
    expect(degraded).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR' });
    expect(degraded.reason as string).toMatch(/^forward-failed: ERR_NBD_SERVER_ERROR: NBD write of 65536 bytes at offset 1048576 failed on the server: EIO/);
    // the primary reconnects at once (backoff from 100 ms) and the secondary takes the hello, so
    // the link cycles degraded → connecting → resyncing → degraded (the resync's write at 1M fails
    // again) while the fault stays: a status read after the event sees any of the three, never
    // connected; the region stays in the peer bitmap throughout
    const pSt = await pairOf(pControl);
    expect(pSt).toMatchObject({ epoch: 1, bytesBehind: 64 * KiB, diskState: 'UpToDate' });
    expect(['degraded', 'connecting', 'resyncing']).toContain(pSt.link);
    // case 4 on the secondary: Failed, why, not promotable; its disk does not have the write
    expect(await sEv.next('replication-degraded')).toMatchObject({ code: 'ERR_INJECTED', diskState: 'Failed' });
    const sSt = await pairOf<{ diskState: string; epoch: number; secondary: { failedReason: string } }>(sControl);
    expect(sSt).toMatchObject({ diskState: 'Failed', epoch: 1 });
    expect(sSt.secondary.failedReason).toMatch(/^a write to the disk failed: injected EIO: write of 65536 bytes at offset 1048576/);
    const f = await runCli(['failover', '--control', sControl, '--json']);
    expect(f.code).toBe(1);
    expect(JSON.parse(f.stdout).error).toEqual({ code: 'ERR_PAIR_STATE', message: "the secondary's disk has Failed (an I/O error): it is not promotable" });
    expect((await readFile(sImg)).subarray(MiB, MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB))).toBe(true);
    // the primary's clients see nothing of it
    expect((await qemuIo(pSock, 'write -P 0x33 4M 64k')).code).toBe(0);
    await sEv.close();
    expect(await s1.stop()).toBe(0);
    const mark = pEv.events.length;
    const s2 = await serve(sArgs);
    const started = await pEv.next('resync-started', mark);
    const done = await pEv.next('resync-done', mark);
    expect(started).toMatchObject({ full: false, bytes: 128 * KiB });
    expect(done.bytes as number).toBeLessThanOrEqual(1.1 * 128 * KiB);
    await pEv.next('checkpoint', mark);
    await pEv.close();
    expect(await p.stop()).toBe(0);
    expect(await s2.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });

  it('case 3, the copy-before-write copy fails on the secondary: its disk keeps the old data, checkpoint 1 intact; the primary treats it as case 2 (client succeeds, degraded); after repair a resync; disks equal', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    await blank(pImg);
    await blank(sImg);
    const sArgs = [sImg, '--secondary', '--socket', sSock, '--control', sControl];
    // the initial sync copies before writing too: the fault goes in once checkpoint 1 is taken
    const s0 = await serve(sArgs);
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'sync']);
    const pEv = await eventsOf(pControl);
    await firstCheckpoint(pControl);
    const back = pEv.events.length;
    expect(await s0.stop()).toBe(0);
    const s1 = await serve([...sArgs, '--view-export', 'view', '--filter', 'error:ops=write,range=1M-2M,errno=ENOSPC,at=hidden']);
    const sEv = await eventsOf(sControl);
    await pEv.next('replication-connected', back);
    // case 2 for the primary's client: the write succeeds
    const mark0 = pEv.events.length;
    expect((await qemuIo(pSock, 'write -P 0x22 1M 64k')).code).toBe(0);
    const sDegraded = await sEv.next('replication-degraded');
    expect(sDegraded).toMatchObject({ role: 'secondary', code: 'ERR_PAIR_CBW' });
    expect(sDegraded.reason as string).toMatch(/^copy-before-write of cluster 16 \(bytes 1048576–1114112\) into the hidden disk failed: injected ENOSPC: .*; the disk was not written$/);
    const degraded = await pEv.next('replication-degraded', mark0);
    expect(degraded.reason as string).toMatch(/^forward-failed: ERR_NBD_SERVER_ERROR: NBD write of 65536 bytes at offset 1048576 failed on the server: ENOSPC/);
    expect((await pairOf(pControl)).bytesBehind).toBeGreaterThanOrEqual(64 * KiB);
    // the secondary's disk did not take the write; the view still shows checkpoint 1 there
    expect((await readFile(sImg)).subarray(MiB, MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB))).toBe(true);
    const view = await run('qemu-io', ['-f', 'raw', unixUri(sSock, 'view'), '-c', 'read -P 0 1M 64k']);
    expect(view.stdout).not.toContain('Pattern verification failed');
    expect(view.code).toBe(0);
    await sEv.close();
    expect(await s1.stop()).toBe(0);
    const mark = pEv.events.length;
    const s2 = await serve(sArgs);
    const started = await pEv.next('resync-started', mark);
    const done = await pEv.next('resync-done', mark);
    // (full: the secondary was stopped inside the resync the fault kept failing, Inconsistent)
    expect(done.bytes as number).toBeLessThanOrEqual(1.1 * (started.bytes as number));
    await pEv.next('checkpoint', mark);
    await pEv.close();
    expect(await p.stop()).toBe(0);
    expect(await s2.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });

  it('forwarding failing again and again (every 40th replica write fails, the secondary\'s disk delayed): the client sees no error; degraded, resynced, connected at the end; disks equal', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    await blank(pImg);
    await blank(sImg);
    await serve([sImg, '--secondary', '--socket', sSock, '--control', sControl, '--filter', 'error:ops=write,every=40,errno=EIO', '--filter', 'delay:write=2,at=disk']);
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'async']);
    const pEv = await eventsOf(pControl);
    await firstCheckpoint(pControl);
    const mark = pEv.events.length;
    // 256 writes of 16 KiB spread over the disk, in one client session: none may fail
    const cmds: string[] = [];
    for (let i = 0; i < 256; i++) cmds.push('-c', `write -P ${(i % 250) + 1} ${((i * 7919) % 512) * 16 * KiB} 16k`);
    const w = await run('qemu-io', ['-f', 'raw', unixUri(pSock), ...cmds, '-c', 'flush']);
    expect(w.code).toBe(0);
    expect(w.stdout + w.stderr).not.toContain('failed');
    await waitFor(async () => {
      const st = await pairOf(pControl);
      return st.link === 'connected' && st.bytesBehind === 0 && st.queueBytes === 0;
    }, 'the primary connected, nothing behind', { timeoutMs: 60_000 });
    const evs = pEv.events.slice(mark);
    const degraded = evs.filter((e) => e.event === 'replication-degraded');
    const starts = evs.filter((e) => e.event === 'resync-started');
    const dones = evs.filter((e) => e.event === 'resync-done');
    expect(degraded.length).toBeGreaterThan(0);
    expect(starts.length).toBeGreaterThan(0);
    expect(dones.length).toBeGreaterThan(0);
    expect(degraded.every((e) => e.code === 'ERR_NBD_SERVER_ERROR')).toBe(true);
    // (a resync the fault interrupts leaves the secondary Inconsistent: the next one is a full copy
    // today, where DRBD resumes by the bitmap: the byte bound is checked in cases 1, 2 and 4)
    // a checkpoint flushes both and makes sure the secondary applied everything forwarded
    const cp = await runCli(['checkpoint', '--control', pControl, '--json']);
    expect(cp.code).toBe(0);
    await pEv.close();
    expect(await p.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });
});
