/**
 * Attack: the largest requests a client may send the primary (two real daemons), sync and async:
 * a WRITE of the whole 32 MiB payload the server advertises (twice the async queue's default
 * 16 MiB), unaligned; WRITE_ZEROES and TRIM of the whole disk in one request. Checked: the view
 * keeps checkpoint 1 byte for byte until checkpoint 2 (every cluster copied before the disk
 * changed), then both disks are equal; after a degrade (the secondary stopped) the peer bitmap
 * marks exactly the 64 KiB granules those requests touched, and the resync makes the disks equal.
 */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, serve, unixUri, waitFor } from '../support/spawn.js';
import { NbdClient } from '../../src/nbd/client.js';
import { pattern, readExport, sha } from '../support/pair-bytes.js';
import { controlRequest, eventsOf, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 64 * MiB;
const GRANULE = 64 * KiB;

const readAll = (uri: string): Promise<Buffer> => readExport(uri, SIZE, 32 * MiB);

/** bytes of the 64 KiB granules that [offset, offset+length) touches */
function granules(offset: number, length: number): number {
  return (Math.ceil((offset + length) / GRANULE) - Math.floor(offset / GRANULE)) * GRANULE;
}

describe('attack: the largest requests through the pair', () => {
  for (const protocol of ['sync', 'async'] as const) {
    it(`${protocol}: a 32 MiB unaligned write, whole-disk write-zeroes and trim: the view is checkpoint 1 until checkpoint 2, then both disks equal; degraded, the peer bitmap marks exactly the granules written and the resync makes the disks equal`, async () => {
      const dir = await makeTempDir();
      const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
      const cp1 = pattern(21, SIZE);
      await writeFile(pImg, cp1);
      await writeFile(sImg, Buffer.alloc(0));
      await truncate(sImg, SIZE);
      const sArgs = [sImg, '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view', '--view-read-only'];
      let s = await serve(sArgs);
      const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', protocol, ...(protocol === 'async' ? ['--queue', '96M'] : [])]);
      await firstCheckpoint(pControl);
      const pEv = await eventsOf(pControl, 60_000);
      const c = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
      const expected = Buffer.from(cp1);
      const big = pattern(22, 32 * MiB);
      await c.write(5 * MiB + 512, big);
      big.copy(expected, 5 * MiB + 512);
      await c.writeZeroes(0, SIZE);
      expected.fill(0);
      const w1 = pattern(23, 32 * MiB);
      await c.write(SIZE - 32 * MiB, w1, { fua: true });
      w1.copy(expected, SIZE - 32 * MiB);
      await c.trim(0, SIZE);
      expected.fill(0);
      const w2 = pattern(24, 32 * MiB);
      await c.write(7 * MiB - 4096, w2);
      w2.copy(expected, 7 * MiB - 4096);
      await c.writeZeroes(20 * MiB + 100, 30 * MiB, { noHole: true });
      expected.fill(0, 20 * MiB + 100, 50 * MiB + 100);
      await c.flush();
      expect(sha(await readAll(unixUri(pSock)))).toBe(sha(expected));
      expect(sha(await readAll(unixUri(sSock, 'view')))).toBe(sha(cp1));
      // (a queue of 96 MiB holds these writes: no degrade, no resync, no checkpoint after one)
      expect(pEv.events.map((e) => e.event).filter((e) => e !== 'connection' && e !== 'disconnect')).toEqual([]);
      await pEv.close();
      expect((await controlRequest<{ epoch: number }>(pControl, 'checkpoint')).epoch).toBe(2);
      expect(await pairOf(pControl)).toMatchObject({ link: 'connected', epoch: 2, bytesBehind: 0 });
      expect(sha(await readAll(unixUri(sSock, 'view')))).toBe(sha(expected));

      // degraded: the peer bitmap marks exactly what the primary wrote since
      expect(await s.stop()).toBe(0);
      await waitFor(async () => (await pairOf(pControl)).link === 'degraded', 'the primary degraded');
      expect((await pairOf(pControl)).bytesBehind).toBe(0);
      const w3 = pattern(25, 32 * MiB);
      await c.write(MiB + 512, w3);
      w3.copy(expected, MiB + 512);
      expect((await pairOf(pControl)).bytesBehind).toBe(granules(MiB + 512, 32 * MiB));
      await c.writeZeroes(48 * MiB + 4096, 8 * MiB);
      expected.fill(0, 48 * MiB + 4096, 56 * MiB + 4096);
      expect((await pairOf(pControl)).bytesBehind).toBe(granules(MiB + 512, 32 * MiB) + granules(48 * MiB + 4096, 8 * MiB));
      await c.trim(0, SIZE);
      expected.fill(0);
      expect((await pairOf(pControl)).bytesBehind).toBe(SIZE);
      const w4 = pattern(26, 32 * MiB);
      await c.write(3 * MiB, w4);
      w4.copy(expected, 3 * MiB);
      await c.flush();
      const ev = await eventsOf(pControl, 60_000);
      s = await serve(sArgs);
      expect(await ev.next('resync-started')).toMatchObject({ full: false, bytes: SIZE });
      await ev.next('resync-done');
      // the primary's checkpoint after a resync (replication.md §3), then one asked for
      expect(await ev.next('checkpoint')).toMatchObject({ epoch: 3 });
      await ev.close();
      expect((await controlRequest<{ epoch: number }>(pControl, 'checkpoint')).epoch).toBe(4);
      expect(sha(await readAll(unixUri(sSock, 'view')))).toBe(sha(expected));
      await c.close();
      expect(await p.stop()).toBe(0);
      expect(await s.stop()).toBe(0);
      expect(sha(await readFile(pImg))).toBe(sha(expected));
      expect(sha(await readFile(sImg))).toBe(sha(expected));
    }, 120_000);
  }
});
