/**
 * Attack (session 15, hb 2): a primary killed -9 while connected, restarted while its pair link is
 * cut (the Unix-socket proxy killed too), the udp heartbeat untouched: it never reaches its
 * secondary in this run and serves writes alone.
 *
 * Its first connect fails before its listeners open, so it mints a generation then (DRBD: a
 * primary without its peer starts a new current UUID), durably, before any write is served; its
 * beats carry it, and the secondary whose link is down marks itself Outdated (peerBeat). When the
 * primary dies again, the automatic failover is refused (ERR_PAIR_OUTDATED) and nothing is fenced:
 * the writes the restarted primary acknowledged are not rolled back without the operator's word.
 * Before: the restarted primary kept its generation, the secondary stayed Consistent, and the
 * automatic failover went back to the checkpoint, dropping them silently.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { pairOf } from '../support/control.js';
import { startLinkCutPair } from '../support/heartbeat.js';
import { run, serve, waitFor } from '../support/spawn.js';

const KiB = 1024;
const SIZE = 4 << 20;
const EVENTS = ['peer-dead', 'fence', 'failover-started', 'auto-failover'];
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface St {
  role: string;
  epoch: number;
  gi: { current: string };
  diskState: string;
  link: string;
}

describe('a primary restarted after a crash without reaching its secondary (two daemons)', () => {
  it('mints a generation before serving; the secondary hears it and is Outdated: the automatic failover after its next death is refused', async () => {
    // death after 150 × 0.1 s: the primary's restart fits inside it even on a loaded host (with
    // 100, a restart that took over 10 s let the secondary take over and demote it: qemu-io EIO)
    const pair = await startLinkCutPair({ size: SIZE, beat: ['--heartbeat-interval', '0.1', '--heartbeat-misses', '150'], events: EVENTS });
    const { dir, x, ws, pCtl, sCtl, pArgs, pUri, cp2 } = pair;
    try {
      const gi2 = (await pairOf<St>(sCtl)).gi.current;
      expect((await pairOf<St>(pCtl)).gi.current).toBe(gi2);

      // the primary crashes while connected; its pair link is cut before it comes back
      await pair.p.stop('SIGKILL');
      await x.stop('SIGKILL');
      await waitFor(async () => (await pairOf<St>(sCtl)).link === 'none', 'the secondary to see its link gone');
      expect(await pairOf<St>(sCtl)).toMatchObject({ role: 'secondary', epoch: 2, diskState: 'Consistent', gi: { current: gi2 } });
      pair.p = await serve(pArgs);
      const restarted = await pairOf<St>(pCtl);
      expect(restarted.link).toBe('degraded');
      expect(restarted.gi.current).not.toBe(gi2);
      // it acknowledges a write the secondary never gets
      expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', 'write -P 0x22 64k 64k'])).code).toBe(0);
      await waitFor(async () => (await pairOf<St>(sCtl)).diskState === 'Outdated', 'the secondary to hear the new generation and be Outdated', { timeoutMs: 10_000 });
      expect(ws.events.map((e) => e.event)).toEqual([]);

      // the primary dies again: no automatic rollback past its acknowledged write, nothing fenced
      await pair.p.stop('SIGKILL');
      await waitFor(() => ws.events.find((e) => e.event === 'auto-failover'), 'auto-failover on the secondary', { timeoutMs: 30_000 });
      expect(ws.events.map((e) => e.event)).toEqual(['peer-dead', 'auto-failover']);
      expect(ws.events[1]).toMatchObject({ peer: 'alpha', failedOver: false, fence: null, code: 'ERR_PAIR_OUTDATED' });
      expect(await pairOf<St>(sCtl)).toMatchObject({ role: 'secondary', epoch: 2, diskState: 'Outdated' });
      expect(sha(await readFile(join(dir, 's.img')))).toBe(sha(cp2));
      const pDisk = await readFile(join(dir, 'p.img'));
      expect(pDisk.subarray(0, 64 * KiB).equals(Buffer.alloc(64 * KiB, 0x11))).toBe(true);
      expect(pDisk.subarray(64 * KiB, 128 * KiB).equals(Buffer.alloc(64 * KiB, 0x22))).toBe(true);
    } finally {
      await pair.stop();
    }
  });
});
