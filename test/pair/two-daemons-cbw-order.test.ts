/**
 * The secondary's copy-before-write order chain follows the primary's protocol (hello
 * `protocol`, secondary.ts: the writer's chain, `writers.issue(peer, m.protocol !== 'sync')`), checked on two real daemons
 * as separate processes. The secondary's fault hook BLKREP_TEST_FAIL_AT=cbw-copy (crash-hook.ts)
 * fails the first copy-before-write with EIO. A client sends writes to fresh, non-overlapping
 * clusters at once, so they are in flight on the replica link together. Async: the requests that
 * arrived behind the failed one are refused ERR_PAIR_ORDER (the order chain), not applied.
 * Sync: only the failed one is refused; the others are applied. Seen in the secondary's disk
 * bytes, read after the primary is killed (before it could reconnect and resync) and the
 * secondary stopped.
 */
import { join } from 'node:path';
import { open } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { serve, unixUri } from '../support/spawn.js';
import { eventsOf, blankPair, firstCheckpoint } from '../support/control.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;

describe.each(['sync', 'async'] as const)('two daemons, --protocol %s: a failed copy-before-write on the secondary', (protocol) => {
  it(protocol === 'sync' ? 'fails only its own request (unordered)' : 'fails the requests behind it ERR_PAIR_ORDER (ordered)', async () => {
    const { dir, sSock, pSock, sControl, pControl } = await blankPair(SIZE);
    const sec = await serve([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sControl], { env: { ...process.env, BLKREP_TEST_FAIL_AT: 'cbw-copy' } });
    const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', protocol]);
    await firstCheckpoint(pControl);
    const sEv = await eventsOf(sControl);
    const pEv = await eventsOf(pControl);
    const pc = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
    try {
      // four writes to fresh clusters 1 MiB apart, sent together: on the link together
      await Promise.all([0, 1, 2, 3].map((i) => pc.write(4 * MiB + i * MiB, Buffer.alloc(64 * 1024, 0x41 + i))));
      const degraded = await pEv.next('replication-degraded');
      // the primary goes before it can reconnect and resync; the secondary stops (its requests in
      // flight finish): its disk is what the link applied
      p.child.kill('SIGKILL');
      await p.waitExit();
      await sec.stop();
      // the byte each written 64 KiB holds (-1: mixed)
      const bytesOf = async (img: string) => {
        const fd = await open(join(dir, img), 'r');
        const got: number[] = [];
        for (let i = 0; i < 4; i++) {
          const b = Buffer.alloc(64 * 1024);
          await fd.read(b, 0, b.length, 4 * MiB + i * MiB);
          got.push(b.every((x) => x === b[0]) ? b[0]! : -1);
        }
        await fd.close();
        return got;
      };
      const got = await bytesOf('s.img');
      // the client's writes all succeeded on the primary
      expect(await bytesOf('p.img')).toEqual([0x41, 0x42, 0x43, 0x44]);
      // the primary degrades for the failed copy: the first to reach the fault point, nearly always
      // the first write's (cluster 64); the others are 80, 96, 112 (1 MiB apart)
      expect(degraded).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR' });
      const m = /copy-before-write of cluster (\d+) \(bytes (\d+)–(\d+)\) into the hidden disk failed: injected fault at cbw-copy/.exec(String(degraded.reason));
      expect(m, String(degraded.reason)).not.toBeNull();
      const k = (Number(m![1]) - 64) / 16;
      expect([0, 1, 2, 3]).toContain(k);
      expect([Number(m![2]), Number(m![3])]).toEqual([4 * MiB + k * MiB, 4 * MiB + k * MiB + 64 * 1024]);
      expect(sEv.events.find((e) => e.event === 'replication-degraded')).toMatchObject({ code: 'ERR_PAIR_CBW', role: 'secondary' });
      expect(sEv.events.filter((e) => e.event === 'resync-started')).toEqual([]);
      // the failed write is not on the disk in either; the others: applied (sync, no order chain) or,
      // behind it, refused ERR_PAIR_ORDER (async). When the first write's copy failed (k = 0; the
      // async primary forwards in its own completion order, so only then is "behind" every other)
      const written = [0x41, 0x42, 0x43, 0x44];
      if (protocol === 'sync') expect(got).toEqual(written.map((v, i) => (i === k ? 0 : v)));
      else if (k === 0) expect(got).toEqual([0, 0, 0, 0]);
      else {
        expect(got[k]).toBe(0);
        got.forEach((v, i) => expect([0, written[i]]).toContain(v));
      }
    } finally {
      await pc.close().catch(() => {});
      await sEv.close();
      await pEv.close();
    }
  });
});
