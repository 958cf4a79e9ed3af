/**
 * A bitmap resync's secondary copies the clusters the resync will write into its hidden disk
 * (CbwFilter.precopy: claimed before its welcome, then plain writes and a flush per round beside
 * the resync's writes, which wait for their cluster's round), instead of one FUA copy per resync
 * write (bench/pair outage: the FUA copies were most of a short resync's time). Checked on two daemons: the secondary's status reports the batch (every cluster of the
 * outage), its view still shows the last checkpoint while the resync writes its disk (the batch
 * holds the checkpoint's data, not the outage's), and the disks end equal. A hidden disk that
 * fails the batch costs only the speed: the resync's own copies fail as case 3 (failure-cases).
 */
import { truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { eventsOf, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 32 * MiB;
const BLOCKS = 32;
/** 32 distinct 64 KiB blocks of the 512 (i*79 mod 512 never repeats for i < 512); those below 4 MiB hold 0x11 at checkpoint 2 */
const blocks = Array.from({ length: BLOCKS }, (_, i) => ((i * 79) % 512) * 64 * KiB);

async function blank(path: string): Promise<void> {
  await writeFile(path, Buffer.alloc(0));
  await truncate(path, SIZE);
}

describe('a bitmap resync copies the clusters it writes into the hidden disk first', () => {
  it('after an outage: status lastPrecopy covers the outage\'s clusters; the view shows checkpoint 2 during the resync; disks equal', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    await blank(pImg);
    await blank(sImg);
    const sArgs = [sImg, '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view'];
    let s = await serve(sArgs);
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock)]);
    await firstCheckpoint(pControl);
    // checkpoint 2 holds 0x11 in [0, 4 MiB), zeros after
    expect((await run('qemu-io', ['-f', 'raw', unixUri(pSock), '-c', 'write -P 0x11 0 4M'])).code).toBe(0);
    expect((await runCli(['checkpoint', '--control', pControl, '--json'])).code).toBe(0);
    expect(await s.stop()).toBe(0);
    await waitFor(async () => (await pairOf(pControl)).link === 'degraded', 'the primary degraded');
    const cmds = blocks.flatMap((o) => ['-c', `write -P 0x22 ${o} 64k`]);
    expect((await run('qemu-io', ['-f', 'raw', unixUri(pSock), ...cmds, '-c', 'flush'])).code).toBe(0);
    expect((await pairOf(pControl)).bytesBehind).toBe(BLOCKS * 64 * KiB);
    const pEv = await eventsOf(pControl, 60_000);
    // the resync's disk writes take 3 s each on the secondary: the view is read while they are in flight
    s = await serve([...sArgs, '--filter', 'delay:write=3000,at=disk']);
    await pEv.next('resync-started');
    // the clusters were claimed before the welcome; their copies go on beside the resync's writes
    type Precopy = { clusters: number; bytes: number; claimed: number; rounds: number; waited: number; ms: number };
    const st = await waitFor(async () => {
      const x = await pairOf<{ link: string; secondary: { lastPrecopy: Precopy | null; copiedClusters: number } }>(sControl);
      return x.secondary.lastPrecopy ? x : undefined;
    }, 'the precopy done');
    expect(st.secondary.lastPrecopy).toMatchObject({ clusters: BLOCKS, claimed: BLOCKS, bytes: BLOCKS * 64 * KiB });
    expect(st.secondary.lastPrecopy!.rounds).toBeGreaterThan(0);
    // the resync's writes that waited for a claimed cluster's copy: a count of clusters, at most the claims
    expect(st.secondary.lastPrecopy!.waited).toBeGreaterThanOrEqual(0);
    expect(st.secondary.lastPrecopy!.waited).toBeLessThanOrEqual(BLOCKS);
    expect(st.secondary.copiedClusters).toBe(BLOCKS);
    const low = blocks.filter((o) => o < 4 * MiB);
    expect(low.length).toBeGreaterThan(0);
    expect(low.length).toBeLessThan(BLOCKS);
    const reads = blocks.flatMap((o) => ['-c', `read -P ${o < 4 * MiB ? '0x11' : '0'} ${o} 64k`]);
    const view = await run('qemu-io', ['-f', 'raw', '-r', unixUri(sSock, 'view'), ...reads]);
    expect(view.stdout).not.toContain('Pattern verification failed');
    expect(view.code).toBe(0);
    // the reads ran during the resync (its first disk writes take 3 s)
    expect((await pairOf(pControl)).link).toBe('resyncing');
    const done = await pEv.next('resync-done');
    expect(done).toMatchObject({ bytes: BLOCKS * 64 * KiB, dirtyBytes: BLOCKS * 64 * KiB });
    await pEv.next('checkpoint');
    await pEv.close();
    expect(await p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });
});
