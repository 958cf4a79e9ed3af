/**
 * An async primary under congestion, two real daemons (DRBD's on-congestion; src/pair/README.md
 * "On congestion"): the secondary's disk is slowed (delay filter, 200 ms per write) behind a
 * 1 MiB queue, so a burst of 64 KiB writes fills it.
 *
 * - block (the default): writes wait for room; no degrade, no resync, every write acknowledged,
 *   the events replication-congested / replication-uncongested and status pair.congestion say
 *   how long they waited; the disks are equal after a checkpoint.
 * - a secondary killed (-9) while writes wait: its connection closes, replication degrades and
 *   the waiting writes complete. A secondary that stops answering (SIGSTOP): the congestion
 *   timeout degrades (congestion-timeout, ERR_PAIR_TIMEOUT) and the writes complete; resumed, it
 *   is resynced by bitmap and the disks are equal.
 * - the flags are refused with --protocol sync (no queue).
 * - pull-ahead: the exact event (queue-full, ERR_PAIR_QUEUE_FULL), twice, each resync by bitmap.
 *   Found 2026-12-06 (helper oc): the second degrade (after the checkpoint that ended the first
 *   resync) resynced in full, every time: the primary never moved its bitmap GI into history
 *   after a resync, so the next mint kept the old bitmap GI and the secondary's current (the
 *   adopted one) was only in the primary's history: rule 60. Fixed in PrimaryRole.checkpointNow
 *   (finishResyncAsSource at the checkpoint that ends a resync).
 */
import { truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, unixUri, waitFor, withTimeout } from '../support/spawn.js';
import { controlRequest, eventsOf, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';
import type { PairStatus } from '../../src/pair/role.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 8 * MiB;
/** the client's burst: 64 writes of 64 KiB at distinct 64 KiB-aligned places (4 MiB of the 8) */
const WRITES = 64;

async function blank(path: string): Promise<void> {
  await writeFile(path, Buffer.alloc(0));
  await truncate(path, SIZE);
}

function burst(pSock: string, seed = 0) {
  const cmds: string[] = [];
  for (let i = 0; i < WRITES; i++) cmds.push('-c', `write -P ${((i + seed) % 250) + 1} ${((i * 79) % 128) * 64 * KiB} 64k`);
  return run('qemu-io', ['-f', 'raw', unixUri(pSock), ...cmds, '-c', 'flush']);
}

/** a pair whose secondary writes its disk 200 ms late; the primary async with a 1 MiB queue */
async function slowPair(primaryFlags: string[]) {
  const dir = await makeTempDir();
  const paths = pairPaths(dir);
  await blank(paths.pImg);
  await blank(paths.sImg);
  const s = await serve([paths.sImg, '--secondary', '--socket', paths.sSock, '--control', paths.sControl, '--filter', 'delay:write=200,at=disk']);
  const p = await serve([paths.pImg, '--socket', paths.pSock, '--control', paths.pControl, '--replicate-to', unixUri(paths.sSock), '--protocol', 'async', '--queue', '1M', ...primaryFlags]);
  const pEv = await eventsOf(paths.pControl, 60_000);
  await firstCheckpoint(paths.pControl);
  return { ...paths, s, p, pEv, mark: pEv.events.length };
}

async function identical(a: string, b: string): Promise<void> {
  const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', a, b]);
  expect(cmp.stdout).toContain('Images are identical.');
}

describe('async primary, on congestion', () => {
  it('block (the default): a full queue makes writes wait; no degrade, no resync, every write acknowledged, the waits in status and events; disks equal after a checkpoint', async () => {
    const { pImg, sImg, pSock, pControl, p, pEv, mark } = await slowPair(['--metrics', '127.0.0.1:0']);
    const w = await burst(pSock);
    expect(w.code).toBe(0);
    expect(w.stdout + w.stderr).not.toContain('failed');
    const st = await pairOf(pControl);
    expect(st.onCongestion).toBe('block');
    expect(st.link).toBe('connected');
    expect(st.congestion!.waits).toBeGreaterThan(0);
    expect(st.congestion!.waitedMs).toBeGreaterThan(0);
    await waitFor(async () => (await pairOf(pControl)).queueBytes === 0, 'the queue drained', { timeoutMs: 60_000 });
    const cp = await runCli(['checkpoint', '--control', pControl, '--json']);
    expect(cp.code).toBe(0);
    await pEv.next('replication-uncongested', mark);
    const evs = pEv.events.slice(mark);
    expect(evs.filter((e) => ['replication-degraded', 'resync-started'].includes(e.event))).toEqual([]);
    const congested = evs.filter((e) => e.event === 'replication-congested');
    expect(congested.length).toBeGreaterThan(0);
    expect(congested[0]).toMatchObject({ limit: MiB });
    const ended = evs.filter((e) => e.event === 'replication-uncongested');
    expect(ended.reduce((n, e) => n + (e.waits as number), 0)).toBe(st.congestion!.waits);
    const metrics = await (await fetch(new URL('/metrics', JSON.parse(p.listeningLine).metrics as string))).text();
    expect(metrics).toContain(`blkrep_pair_congestion_waits_total{export=""} ${st.congestion!.waits}\n`);
    expect(metrics).toMatch(/blkrep_pair_congestion_wait_seconds_total\{export=""\} [0-9.]+\n/);
    const text = await runCli(['status', '--control', pControl]);
    expect(text.stdout).toMatch(/on congestion block: \d+ writes waited \d+ ms, 0 waiting/);
    await pEv.close();
    expect(await p.stop()).toBe(0);
    await identical(pImg, sImg);
  });

  it('block: a secondary killed while writes wait degrades replication (its connection closed) and the writes complete', async () => {
    const { pSock, s, p, pEv, mark } = await slowPair([]);
    const w = burst(pSock);
    await pEv.next('replication-congested', mark);
    s.child.kill('SIGKILL');
    const r = await withTimeout(w, 30_000, 'the writes after the secondary died');
    expect(r.code).toBe(0);
    expect(r.stdout + r.stderr).not.toContain('failed');
    const degraded = await pEv.next('replication-degraded', mark);
    expect(degraded.reason).toMatch(/^(forward-failed|link-down)/);
    await pEv.close();
    expect(await p.stop()).toBe(0);
  });

  it('block: a secondary that stops answering (SIGSTOP) is given up after --congestion-timeout (congestion-timeout, ERR_PAIR_TIMEOUT), the writes complete; resumed, it is resynced by bitmap and the disks are equal', async () => {
    const { pImg, sImg, pSock, pControl, s, p, pEv, mark } = await slowPair(['--congestion-timeout', '1']);
    const w = burst(pSock);
    await pEv.next('replication-congested', mark);
    process.kill(s.pid, 'SIGSTOP');
    let r;
    try {
      r = await withTimeout(w, 30_000, 'the writes while the secondary is stopped');
    } finally {
      process.kill(s.pid, 'SIGCONT');
    }
    expect(r.code).toBe(0);
    expect(r.stdout + r.stderr).not.toContain('failed');
    const degraded = await pEv.next('replication-degraded', mark);
    expect(degraded).toMatchObject({ reason: 'congestion-timeout', code: 'ERR_PAIR_TIMEOUT' });
    const resync = await pEv.next('resync-started', mark);
    expect(resync.full).toBe(false);
    await waitFor(async () => {
      const st = await pairOf(pControl);
      return st.link === 'connected' && st.bytesBehind === 0 && st.queueBytes === 0;
    }, 'the primary connected again, nothing behind', { timeoutMs: 60_000 });
    const cp = await runCli(['checkpoint', '--control', pControl, '--json']);
    expect(cp.code).toBe(0);
    await pEv.close();
    expect(await p.stop()).toBe(0);
    await identical(pImg, sImg);
  });

  it('pull-ahead: a full queue degrades at once (queue-full, ERR_PAIR_QUEUE_FULL) and resyncs by bitmap; a second degrade after the checkpoint that ended the first resync resyncs by bitmap too; disks equal', async () => {
    const { pImg, sImg, pSock, pControl, p, pEv } = await slowPair(['--on-congestion', 'pull-ahead']);
    for (let round = 1; round <= 2; round++) {
      const mark = pEv.events.length;
      const w = await burst(pSock, round);
      expect(w.code).toBe(0);
      expect(w.stdout + w.stderr).not.toContain('failed');
      expect(await pEv.next('replication-degraded', mark)).toMatchObject({ reason: 'queue-full', code: 'ERR_PAIR_QUEUE_FULL' });
      await waitFor(async () => {
        const st = await pairOf(pControl);
        return st.link === 'connected' && st.bytesBehind === 0 && st.queueBytes === 0;
      }, `round ${round}: connected again, nothing behind`, { timeoutMs: 60_000 });
      // the checkpoint after the resync (the secondary adopts the generations)
      await pEv.next('checkpoint', mark);
      const starts = pEv.events.slice(mark).filter((e) => e.event === 'resync-started');
      expect(starts.length).toBeGreaterThan(0);
      expect(starts.map((e) => e.full)).toEqual(starts.map(() => false));
      expect((await pairOf(pControl)).onCongestion).toBe('pull-ahead');
    }
    await pEv.close();
    expect(await p.stop()).toBe(0);
    await identical(pImg, sImg);
  });

  it('--on-congestion and --congestion-timeout are refused with --protocol sync (serve-nbd, replicate: exit 2; the replicate verb: ERR_BAD_REQUEST)', async () => {
    const dir = await makeTempDir();
    const { pImg, pSock, pControl } = pairPaths(dir);
    await blank(pImg);
    const a = await runCli(['serve-nbd', pImg, '--socket', pSock, '--replicate-to', 'nbd://127.0.0.1:1/x', '--on-congestion', 'block']);
    expect(a.code).toBe(2);
    expect(a.stderr).toContain('--on-congestion block needs --protocol async: a sync primary has no queue');
    const b = await runCli(['serve-nbd', pImg, '--socket', pSock, '--replicate-to', 'nbd://127.0.0.1:1/x', '--protocol', 'async', '--on-congestion', 'pull-ahead', '--congestion-timeout', '5']);
    expect(b.code).toBe(2);
    expect(b.stderr).toContain('--congestion-timeout is for --on-congestion block: pull-ahead never waits');
    const c = await runCli(['replicate', '--control', pControl, '--on-congestion', 'pull-ahead', 'nbd://127.0.0.1:1/x']);
    expect(c.code).toBe(2);
    expect(c.stderr).toContain('--on-congestion pull-ahead needs --protocol async');
    const p = await serve([pImg, '--socket', pSock, '--control', pControl]);
    await expect(controlRequest(pControl, 'replicate', { uri: 'nbd://127.0.0.1:1/x', protocol: 'sync', onCongestion: 'block' })).rejects.toMatchObject({
      code: 'ERR_BAD_REQUEST',
      message: expect.stringContaining('onCongestion block is for protocol async'),
    });
    const st = await controlRequest<{ exports: Array<{ pair?: PairStatus }> }>(pControl, 'status');
    expect(st.exports.map((e) => e.pair)).toEqual([undefined]);
    expect(await p.stop()).toBe(0);
  });
});
