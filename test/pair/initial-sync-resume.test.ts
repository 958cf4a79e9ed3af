/**
 * An interrupted initial full sync resumes (DRBD resumes an interrupted initial sync too): the
 * full resync clears from the primary's peer bitmap what the secondary holds stably as it goes
 * (the mirror's onStable), the secondary records durably whose copy its disk takes (pair state
 * fullSyncFrom: the primary's node id and generation) and the primary which secondary its peer
 * bitmap tracks (fullSyncTo). After a kill -9 of either daemon mid-copy, the next hello still
 * decides a full resync (the secondary has no generation yet), but the welcome says resumeFull,
 * and the primary copies what its peer bitmap still marks (plus what was written meanwhile),
 * not the whole disk again.
 *
 * Setup: a 64 MiB primary full of data, a blank secondary whose disk writes are delayed 3 s each
 * (64 copies of 256 KiB in flight: four rounds), interrupted once the primary's peer bitmap file
 * shows at least a quarter cleared and some left.
 */
import { truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { BIN, makeTempDir, run, serve, start, unixUri, waitFor, type Served, type Started } from '../support/spawn.js';
import { eventsOf, pairOf, pairPaths } from '../support/control.js';
import { PersistentBitmap } from '../../src/bitmap/persistent.js';
import { peerBitmapPath } from '../../src/pair/primary.js';
import type { PairStatus } from '../../src/pair/role.js';

const MiB = 1 << 20;
const SIZE = 64 * MiB;

type WithResync = PairStatus & { lastResync?: { bytes: number; dirtyBytes: number; full: boolean; resumed?: boolean } };

interface Pair {
  pImg: string;
  sImg: string;
  pSock: string;
  pArgs: string[];
  sArgs: string[];
  pControl: string;
  sControl: string;
  p: Started;
  s: Served;
  /** what the primary's peer bitmap file still marked just before the copy was interrupted */
  behind: number;
}

/** A primary full of data, a blank secondary with a slow disk: the initial full sync under way and at most 3/4 done. */
async function fullSyncUnderWay(): Promise<Pair> {
  const dir = await makeTempDir();
  const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
  const data = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4096) data.fill(((i / 4096) % 251) + 1, i, i + 4096);
  await writeFile(pImg, data);
  await writeFile(sImg, Buffer.alloc(0));
  await truncate(sImg, SIZE);
  const sArgs = [sImg, '--secondary', '--socket', sSock, '--control', sControl];
  const pArgs = [pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock)];
  const s = await serve([...sArgs, '--filter', 'delay:write=3000,at=disk']);
  // started, not served: its listening line comes once its first link attempt ended (the whole copy here)
  const p = start(process.execPath, [BIN, 'serve-nbd', ...pArgs, '--json']);
  // the primary's control socket answers only once its first link attempt ended: the progress is
  // read from its peer bitmap file (what a crash would leave)
  const behind = await waitFor(
    async () => {
      const { bitmap } = await PersistentBitmap.open(peerBitmapPath(pImg), { readOnly: true });
      const dirty = bitmap.bitmap.dirtyBytes;
      await bitmap.close();
      return dirty <= (SIZE * 3) / 4 && dirty > 0 ? dirty : undefined;
    },
    'the initial full sync to clear a quarter of the peer bitmap file',
    { timeoutMs: 60_000, intervalMs: 50 },
  );
  return { pImg, sImg, pSock, pArgs, sArgs, pControl, sControl, p, s, behind };
}

async function expectEqual(pImg: string, sImg: string): Promise<void> {
  const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', pImg, sImg]);
  expect(cmp.stdout).toContain('Images are identical.');
}

/** 1 MiB written on the primary at offset 0 (copied already: the copy goes up from 0) */
async function writeMeanwhile(pSock: string): Promise<void> {
  const w = await run('qemu-io', ['-f', 'raw', unixUri(pSock), '-c', 'write -P 0xee 0 1M', '-c', 'flush']);
  expect(w.code, w.stderr).toBe(0);
}

describe('an interrupted initial full sync resumes', () => {
  it('the secondary is killed -9 mid-copy and started again: the full resync resumes (resumed: true) and copies what is left plus what was written meanwhile, < the disk; disks equal', async () => {
    const pair = await fullSyncUnderWay();
    pair.s.child.kill('SIGKILL');
    await pair.s.waitExit();
    await waitFor(async () => (await pairOf(pair.pControl)).link === 'degraded', 'the primary degraded', { timeoutMs: 30_000 });
    const still = (await pairOf(pair.pControl)).bytesBehind;
    expect(still).toBeLessThanOrEqual(pair.behind);
    await writeMeanwhile(pair.pSock);
    const left = (await pairOf(pair.pControl)).bytesBehind;
    expect(left).toBeLessThanOrEqual(still + MiB);
    const pEv = await eventsOf(pair.pControl, 60_000);
    const s = await serve(pair.sArgs);
    const started = await pEv.next('resync-started');
    expect(started).toMatchObject({ bytes: left, full: true, resumed: true });
    const done = await pEv.next('resync-done');
    expect(done).toMatchObject({ full: true, resumed: true, dirtyBytes: left });
    expect(done.bytes as number).toBeGreaterThan(0);
    expect(done.bytes as number).toBeLessThanOrEqual(1.1 * left);
    expect(done.bytes as number).toBeLessThan(SIZE);
    await pEv.close();
    await waitFor(async () => (await pairOf(pair.pControl)).epoch >= 1, 'checkpoint 1 after the resync', { timeoutMs: 30_000 });
    expect(await pairOf(pair.sControl)).toMatchObject({ epoch: 1, diskState: 'UpToDate' });
    expect(await pair.p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    await expectEqual(pair.pImg, pair.sImg);
  });

  it('the primary is killed -9 mid-copy and started again: the full resync resumes from its peer bitmap file, copies < the disk; disks equal', async () => {
    const pair = await fullSyncUnderWay();
    pair.p.child.kill('SIGKILL');
    await pair.p.waitExit();
    // the secondary without the slow disk: the second attempt runs at full speed
    expect(await pair.s.stop()).toBe(0);
    const s = await serve(pair.sArgs);
    const p = await serve(pair.pArgs);
    const st = await waitFor(async () => {
      const x = await pairOf<WithResync>(pair.pControl);
      return x.link === 'connected' && x.lastResync ? x : undefined;
    }, 'the resync after the restart', { timeoutMs: 60_000 });
    const r = st.lastResync!;
    expect(r).toMatchObject({ full: true, resumed: true });
    // the clears reached the bitmap file before the kill: it marks no more than status showed then
    expect(r.dirtyBytes).toBeGreaterThan(0);
    expect(r.dirtyBytes).toBeLessThanOrEqual(pair.behind);
    expect(r.bytes).toBeGreaterThan(0);
    expect(r.bytes).toBeLessThanOrEqual(1.1 * r.dirtyBytes);
    expect(r.bytes).toBeLessThan(SIZE);
    await waitFor(async () => (await pairOf(pair.pControl)).epoch >= 1, 'checkpoint 1 after the resync', { timeoutMs: 30_000 });
    expect(await p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    await expectEqual(pair.pImg, pair.sImg);
  });

  it('a full resync to another secondary starts from zero (its welcome does not say resumeFull): copies the whole disk', async () => {
    const pair = await fullSyncUnderWay();
    pair.s.child.kill('SIGKILL');
    await pair.s.waitExit();
    await waitFor(async () => (await pairOf(pair.pControl)).link === 'degraded', 'the primary degraded', { timeoutMs: 30_000 });
    // a new blank secondary on the same socket: another node id, no record of this copy
    const s2Img = `${pair.sImg}.2`;
    await writeFile(s2Img, Buffer.alloc(0));
    await truncate(s2Img, SIZE);
    const pEv = await eventsOf(pair.pControl, 60_000);
    const s = await serve([s2Img, ...pair.sArgs.slice(1)]);
    const started = await pEv.next('resync-started');
    expect(started).toMatchObject({ bytes: SIZE, full: true });
    expect(started.resumed).toBeUndefined();
    const done = await pEv.next('resync-done');
    expect(done).toMatchObject({ bytes: SIZE, full: true });
    await pEv.close();
    await waitFor(async () => (await pairOf(pair.pControl)).epoch >= 1, 'checkpoint 1 after the resync', { timeoutMs: 30_000 });
    expect(await pair.p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    await expectEqual(pair.pImg, s2Img);
  });
});
