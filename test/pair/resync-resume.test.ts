/**
 * An interrupted resync resumes by the peer bitmap (DRBD resumes a resync where it stopped): the
 * resync clears from the peer bitmap what the secondary holds stably as it goes (the mirror's
 * onStable, a target flush every 2 s) and makes the clears durable, so the next
 * resync — after the link dropped or the primary restarted — copies what is still dirty, not
 * the whole outage again. (A primary killed with -9 also resyncs the activity log's hot extents,
 * as DRBD does: writes there may have reached its disk without their bits; that bound is the
 * bitmap module's, up to 1024 × 4 MiB.)
 *
 * Setup: a pair in step (checkpoint 1), the secondary stopped, 16 MiB written on the primary in
 * 256 scattered 64 KiB blocks (the outage), the secondary started again with its disk writes
 * delayed 2 s each (64 copies in flight: the resync takes about 8 s), interrupted once the
 * primary's bytesBehind shows it at most 3/4 done. Found 2026-12-06 (helper fi): the next resync
 * copied all of the outage again (the mirror kept the peer bitmap until its consistent instant).
 */
import { truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, unixUri, waitFor, type Served } from '../support/spawn.js';
import { eventsOf, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';
import type { PairStatus } from '../../src/pair/role.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 32 * MiB;
const BLOCKS = 256;
const OUTAGE = BLOCKS * 64 * KiB;

async function blank(path: string): Promise<void> {
  await writeFile(path, Buffer.alloc(0));
  await truncate(path, SIZE);
}

interface Pair {
  dir: string;
  pImg: string;
  sImg: string;
  pArgs: string[];
  sArgs: string[];
  pControl: string;
  sControl: string;
  p: Served;
  s: Served;
}

/** A pair in step, the secondary stopped, the outage written, the secondary back with a slow disk: the resync is under way and at most 3/4 done. */
async function outageResyncUnderWay(): Promise<Pair & { firstDirty: number; behind: number }> {
  const dir = await makeTempDir();
  const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
  await blank(pImg);
  await blank(sImg);
  const sArgs = [sImg, '--secondary', '--socket', sSock, '--control', sControl];
  const pArgs = [pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock)];
  let s = await serve(sArgs);
  const p = await serve(pArgs);
  await firstCheckpoint(pControl);
  expect(await s.stop()).toBe(0);
  await waitFor(async () => (await pairOf(pControl)).link === 'degraded', 'the primary degraded');
  const cmds: string[] = [];
  // 256 distinct 64 KiB blocks of the 512 (step 79 is odd: i*79 mod 512 never repeats for i < 512)
  for (let i = 0; i < BLOCKS; i++) cmds.push('-c', `write -P ${(i % 250) + 1} ${((i * 79) % 512) * 64 * KiB} 64k`);
  const w = await run('qemu-io', ['-f', 'raw', unixUri(pSock), ...cmds, '-c', 'flush']);
  expect(w.code).toBe(0);
  expect((await pairOf(pControl)).bytesBehind).toBe(OUTAGE);
  const pEv = await eventsOf(pControl, 60_000);
  s = await serve([...sArgs, '--filter', 'delay:write=2000,at=disk']);
  const started = await pEv.next('resync-started');
  expect(started).toMatchObject({ bytes: OUTAGE, full: false });
  // progress is visible (and kept) before the resync ends: without it this wait times out
  const behind = await waitFor(
    async () => {
      const st = await pairOf(pControl);
      expect(st.link).toBe('resyncing');
      return st.bytesBehind <= (OUTAGE * 3) / 4 && st.bytesBehind > 0 ? st.bytesBehind : undefined;
    },
    'the resync to clear a quarter of the peer bitmap',
    { timeoutMs: 30_000, intervalMs: 50 },
  );
  await pEv.close();
  return { dir, pImg, sImg, pArgs, sArgs, pControl, sControl, p, s, firstDirty: OUTAGE, behind };
}

async function expectEqual(pImg: string, sImg: string): Promise<void> {
  const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
  expect(cmp.stdout).toContain('Images are identical.');
}

describe('an interrupted resync resumes by bitmap', () => {
  it('the link drops mid-resync (secondary killed -9, started again): the next resync copies <= 1.1x what was still dirty; disks equal', async () => {
    const pair = await outageResyncUnderWay();
    const pEv = await eventsOf(pair.pControl, 60_000);
    pair.s.child.kill('SIGKILL');
    await pair.s.waitExit();
    await waitFor(async () => (await pairOf(pair.pControl)).link === 'degraded', 'the primary degraded');
    // no writes since: what is dirty now is what the interrupted resync left
    const still = (await pairOf(pair.pControl)).bytesBehind;
    expect(still).toBeLessThanOrEqual(pair.behind);
    const mark = pEv.events.length;
    const s = await serve(pair.sArgs);
    const done = await pEv.next('resync-done', mark);
    const started = pEv.events.slice(mark).find((e) => e.event === 'resync-started')!;
    expect(started).toMatchObject({ bytes: still, full: false });
    expect(done.bytes as number).toBeGreaterThan(0);
    expect(done.bytes as number).toBeLessThanOrEqual(1.1 * still);
    expect(done.bytes as number).toBeLessThan(pair.firstDirty);
    await pEv.close();
    const cp = await runCli(['checkpoint', '--control', pair.pControl, '--json']);
    expect(cp.code).toBe(0);
    expect(await pair.p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    await expectEqual(pair.pImg, pair.sImg);
  });

  it('the primary restarts mid-resync (SIGTERM, started again): the next resync copies <= 1.1x what its peer bitmap still marks, not the outage again; disks equal', async () => {
    const pair = await outageResyncUnderWay();
    expect(await pair.p.stop()).toBe(0);
    // the secondary without the slow disk: the second resync runs at full speed
    expect(await pair.s.stop()).toBe(0);
    const s = await serve(pair.sArgs);
    const p = await serve(pair.pArgs);
    const st = await waitFor(async () => {
      const x = await pairOf<PairStatus & { lastResync?: { bytes: number; dirtyBytes: number; full: boolean } }>(pair.pControl);
      return x.link === 'connected' && x.lastResync ? x : undefined;
    }, 'the resync after the restart', { timeoutMs: 60_000 });
    const r = st.lastResync!;
    expect(r.full).toBe(false);
    // the clears reached the bitmap file: it marks no more than status showed before the stop
    expect(r.dirtyBytes).toBeGreaterThan(0);
    expect(r.dirtyBytes).toBeLessThanOrEqual(pair.behind);
    expect(r.bytes).toBeGreaterThan(0);
    expect(r.bytes).toBeLessThanOrEqual(1.1 * r.dirtyBytes);
    const cp = await runCli(['checkpoint', '--control', pair.pControl, '--json']);
    expect(cp.code).toBe(0);
    expect(await p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    await expectEqual(pair.pImg, pair.sImg);
  });
});
