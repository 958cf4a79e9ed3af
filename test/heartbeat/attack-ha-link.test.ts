/**
 * Attack (round 3): the pair's data link cut while the heartbeat still passes (two daemons, a
 * Unix-socket proxy between them that is killed -9, the udp heartbeat untouched).
 *
 * The primary loses its link, keeps serving (it acknowledges writes the secondary never gets) and
 * mints a new generation; its beats carry that generation. The secondary's link is gone too, but
 * the secondary hears the primary alive, so nothing is failed over. Then the primary is killed
 * -9: the secondary declares it dead. Its disk is Outdated (it heard the primary's new
 * generation while its link was down: the primary wrote after its checkpoint without it), so the
 * automatic failover is refused (ERR_PAIR_OUTDATED) as DRBD refuses to promote Outdated data,
 * before the fence hook runs (fencing a peer nobody takes over from makes an outage); the
 * operator's `failover --force` gives the checkpoint exactly. Before, the secondary stayed Consistent (the primary's
 * `replication-degraded` could not cross the cut link) and the automatic failover promoted it,
 * dropping the primary's acknowledged writes since the cut without a word.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request, pairOf } from '../support/control.js';
import { startLinkCutPair } from '../support/heartbeat.js';
import { run, waitFor } from '../support/spawn.js';

const KiB = 1024;
const SIZE = 4 << 20;
const EVENTS = ['peer-suspect', 'peer-dead', 'fence', 'failover-started', 'failover-done', 'failover-failed', 'auto-failover', 'demoted'];

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface SecStatus {
  role: string;
  epoch: number;
  gi: { current: string };
  diskState: string;
  link?: string;
}

describe('data link cut, heartbeat alive (two daemons, a proxy killed -9)', () => {
  it('the primary writes on alone; killed -9 later, the secondary is Outdated: the automatic failover is refused, --force gives the checkpoint exactly', async () => {
    const pair = await startLinkCutPair({ size: SIZE, events: EVENTS });
    const { dir, p, x, ws, pCtl, sCtl, pUri, cp2 } = pair;
    try {
      expect(sha(cp2)).toBe(sha(await readFile(join(dir, 'p.img'))));

      // the data link cut; the heartbeat passes
      const giBefore = (await pairOf<SecStatus>(pCtl)).gi.current;
      await x.stop('SIGKILL');
      await waitFor(async () => (await pairOf<SecStatus>(pCtl)).gi.current !== giBefore, 'the primary to mint a generation (it lost its peer)');
      // the primary acknowledges a write the secondary never gets
      expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', 'write -P 0x22 64k 64k'])).code).toBe(0);
      const pGi = (await pairOf<SecStatus>(pCtl)).gi.current;
      await waitFor(async () => (await request<{ heartbeat: { peerAnnounced: { generation: string } | null } }>(sCtl, 'status')).heartbeat.peerAnnounced?.generation === pGi, 'the secondary to hear the new generation');
      await waitFor(async () => (await pairOf<SecStatus>(sCtl)).diskState === 'Outdated', 'the secondary to know it is Outdated', { timeoutMs: 5_000 });
      expect(await pairOf<SecStatus>(sCtl)).toMatchObject({ role: 'secondary', epoch: 2 });
      expect(ws.events.map((e) => e.event)).toEqual([]);

      // the primary dies: the Outdated disk is not promoted without --force, and nothing is fenced for it
      await p.stop('SIGKILL');
      await waitFor(() => ws.events.find((e) => e.event === 'auto-failover'), 'auto-failover on the secondary', { timeoutMs: 20_000 });
      expect(ws.events.map((e) => e.event)).toEqual(['peer-suspect', 'peer-dead', 'auto-failover']);
      expect(ws.events[2]).toMatchObject({ peer: 'alpha', failedOver: false, fence: null, code: 'ERR_PAIR_OUTDATED' });
      expect(ws.events[2]!.reason).toMatch(/^peer "alpha" is dead but this node's failover is refused, so nothing is fenced: the secondary is Outdated \(the primary degraded after checkpoint 2\)/);
      expect(await pairOf<SecStatus>(sCtl)).toMatchObject({ role: 'secondary', epoch: 2, diskState: 'Outdated' });
      expect(sha(await readFile(join(dir, 's.img')))).toBe(sha(cp2));

      // the operator knows what is lost and forces: the disk is checkpoint 2 exactly
      const forced = await request<{ role: string; epoch: number }>(sCtl, 'failover', { force: true });
      expect(forced).toMatchObject({ role: 'primary', epoch: 2 });
      const disk = await readFile(join(dir, 's.img'));
      expect(disk.subarray(0, 64 * KiB).equals(Buffer.alloc(64 * KiB, 0x11))).toBe(true);
      expect(disk.subarray(64 * KiB, 128 * KiB).equals(Buffer.alloc(64 * KiB))).toBe(true);
      expect(sha(disk)).toBe(sha(cp2));
    } finally {
      await pair.stop();
    }
  });
});
