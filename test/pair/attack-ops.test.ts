/**
 * Attacks on a pair for silent divergence (both sides connected and equal by epoch, the bytes
 * not): every kind of request a client may send the primary, forwarded sync and async, compared
 * byte for byte (sha256 of both disks, and of the view before and after a checkpoint):
 * - WRITE_ZEROES with and without NO_HOLE, TRIM (the copy-before-write must keep their old data),
 * - unaligned writes across the 64 KiB cluster boundaries, a write larger than a cluster and than
 *   the forward's 1 MiB pieces, FUA,
 * - concurrent overlapping writes (NBD leaves their order open: both sides must pick the same;
 *   before the primary ordered them, 32 at once × 100 rounds diverged in about 2 runs of 3),
 * - a trim on a qcow2 primary, which keeps a partial cluster's data (the primary writes a trim as
 *   write-zeroes, as it forwards it: before, the secondary read zeroes there, the primary not).
 */
import { join } from 'node:path';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, serve, unixUri } from '../support/spawn.js';
import { NbdClient } from '../../src/nbd/client.js';
import { seededRandom as rng } from '../../src/block/filters/error.js';
import { pattern, readExport, sha } from '../support/pair-bytes.js';
import { controlRequest, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 32 * MiB;
const CLUSTER = 64 * KiB;

/** the 4 KiB blocks where a and b differ, as ranges */
function differences(a: Buffer, b: Buffer): string[] {
  const out: string[] = [];
  for (let at = 0; at < a.length; at += 4096) {
    if (!a.subarray(at, at + 4096).equals(b.subarray(at, at + 4096))) out.push(`${at}`);
  }
  return out.slice(0, 20);
}

const readAll = (uri: string): Promise<Buffer> => readExport(uri, SIZE, 4 * MiB);

describe('attack: every request kind through the pair', () => {
  for (const protocol of ['sync', 'async'] as const) {
    it(`${protocol}: zeroes (NO_HOLE and not), trim, unaligned, large, FUA and concurrent overlapping writes: the view keeps checkpoint 1 exactly until checkpoint 2, then both disks and the view are equal`, async () => {
      const dir = await makeTempDir();
      const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
      const cp1 = pattern(7, SIZE);
      await writeFile(pImg, cp1);
      await writeFile(sImg, Buffer.alloc(0));
      await truncate(sImg, SIZE);
      const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view', '--view-read-only']);
      const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', protocol]);
      await firstCheckpoint(pControl);
      const c = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
      const ops: Array<Promise<void>> = [];
      // unaligned, across cluster boundaries
      ops.push(c.write(3 * CLUSTER - 777, pattern(1, 5000)));
      ops.push(c.write(10 * CLUSTER + 1, pattern(2, 3 * CLUSTER + 3)));
      // zeroes: may punch, must not punch, unaligned ends; trim
      ops.push(c.writeZeroes(2 * MiB + 512, MiB));
      ops.push(c.writeZeroes(4 * MiB + 4096, MiB + 12 * KiB, { noHole: true }));
      ops.push(c.writeZeroes(6 * MiB - 100, 300, { fua: true }));
      ops.push(c.trim(8 * MiB, 2 * MiB));
      ops.push(c.trim(11 * MiB + 4096, 200 * KiB));
      // larger than a cluster and than the forward's pieces; FUA
      ops.push(c.write(13 * MiB + 4096, pattern(3, 9 * MiB)));
      ops.push(c.write(23 * MiB, pattern(4, 3 * CLUSTER), { fua: true }));
      await Promise.all(ops);
      // concurrent overlapping writes: NBD leaves their order open; both sides must apply the same
      const r = rng(11);
      for (let round = 0; round < 100; round++) {
        const at = 26 * MiB + Math.floor(r() * 64) * 4096;
        await Promise.all(Array.from({ length: 32 }, (_, k) => c.write(at + k * 512, pattern(100 + round * 32 + k, 32 * KiB))));
      }
      await c.flush();
      // before checkpoint 2 the view is checkpoint 1, every byte (zeroes and trims copied before the disk changed)
      expect(sha(await readAll(unixUri(sSock, 'view')))).toBe(sha(cp1));
      const cp = await controlRequest<{ epoch: number }>(pControl, 'checkpoint');
      expect(cp.epoch).toBe(2);
      expect(await pairOf(pControl)).toMatchObject({ link: 'connected', epoch: 2, bytesBehind: 0 });
      const primary = await readAll(unixUri(pSock));
      const viewed = await readAll(unixUri(sSock, 'view'));
      expect(differences(viewed, primary)).toEqual([]);
      await c.close();
      expect(await p.stop()).toBe(0);
      expect(await s.stop()).toBe(0);
      expect(sha(await readFile(sImg))).toBe(sha(await readFile(pImg)));
    });
  }

  it('a qcow2 primary: trims of partial clusters (which qcow2 may ignore) read as zeroes on both sides, as do zeroes; both disks equal after checkpoint 2', async () => {
    const dir = await makeTempDir();
    const { sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    const pImg = join(dir, 'p.qcow2');
    expect((await run('qemu-img', ['create', '-q', '-f', 'qcow2', pImg, String(8 * MiB)])).code).toBe(0);
    await writeFile(sImg, Buffer.alloc(0));
    await truncate(sImg, 8 * MiB);
    const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sControl]);
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'sync']);
    await firstCheckpoint(pControl);
    const c = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
    await c.write(0, Buffer.alloc(2 * MiB, 0x22));
    await c.trim(4096, 8192);
    await c.trim(MiB, CLUSTER);
    await c.trim(300_000, 100_000);
    await c.writeZeroes(1_500_000, 5000);
    await c.flush();
    const primary = Buffer.alloc(2 * MiB);
    await c.read(0, primary);
    const expected = Buffer.alloc(2 * MiB, 0x22);
    for (const [at, n] of [[4096, 8192], [MiB, CLUSTER], [300_000, 100_000], [1_500_000, 5000]] as const) expected.fill(0, at, at + n);
    expect(sha(primary)).toBe(sha(expected));
    expect((await controlRequest<{ epoch: number }>(pControl, 'checkpoint')).epoch).toBe(2);
    await c.close();
    expect(await p.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', pImg, sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });
});
