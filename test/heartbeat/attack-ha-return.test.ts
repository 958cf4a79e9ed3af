/**
 * Attack (round 3): the old primary coming back, and the promoted node restarted, each with the
 * flags it had (systemd restarts a unit with its own command line). Two daemons, udp heartbeat,
 * --auto-failover on the secondary.
 * - The old primary restarted (same flags) while the secondary is promoted: its start fails with
 *   ERR_PAIR_ROLE (the promoted node has no pair link for it), so it serves nothing; the promoted
 *   disk is unchanged and its term is 2.
 * - The promoted node written, killed -9, restarted with its --secondary: a secondary again
 *   (UpToDate, its promoted generation, the heartbeat's peer never heard: nothing taken over);
 *   the old primary restarted then is refused by rule 70 (the secondary went on from its
 *   generation) and does not start; `failover` on the node keeps the promoted write byte for byte.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request, firstCheckpoint, pairOf } from '../support/control.js';
import { heartbeatPairArgs, watch } from '../support/heartbeat.js';
import { run, serve, unixUri, waitFor, type Served } from '../support/spawn.js';

const SIZE = 4 << 20;
const MiB = 1 << 20;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface Pst {
  role: string;
  epoch: number;
  diskState: string;
  link: string;
  gi: { current: string };
}

function setup(pExtra: string[] = []) {
  return heartbeatPairArgs({ size: SIZE, p: ['--protocol', 'sync', ...pExtra], autoFailover: { fenceExit: 7 } });
}

describe('the old primary and the promoted node restarted with their own flags', () => {
  it('the old primary restarted while the secondary is promoted: it refuses to start (ERR_PAIR_ROLE), nothing reaches the promoted disk', async () => {
    const e = await setup();
    const s = await serve(e.sArgs);
    let p: Served | undefined = await serve(e.pArgs);
    try {
      await firstCheckpoint(e.pCtl);
      expect((await run('qemu-io', ['-f', 'raw', unixUri(e.pSock), '-c', 'write -P 0x11 0 64k'])).code).toBe(0);
      const ws = await watch(e.sCtl, ['auto-failover']);
      await p.stop('SIGKILL');
      p = undefined;
      await waitFor(() => ws.events.find((x) => x.event === 'auto-failover'), 'auto-failover', { timeoutMs: 20_000 });
      await ws.client.close();
      expect((await run('qemu-io', ['-f', 'raw', unixUri(e.sSock), '-c', `write -P 0x33 ${MiB} 64k`])).code).toBe(0);
      const promoted = sha(await readFile(join(e.dir, 's.img')));
      await expect(serve(e.pArgs)).rejects.toThrow(/"code":"ERR_PAIR_ROLE"/);
      expect(await pairOf<Pst>(e.sCtl)).toMatchObject({ role: 'primary', epoch: 1, diskState: 'UpToDate' });
      expect((await request<{ heartbeat: { term: string } }>(e.sCtl, 'status')).heartbeat.term).toBe('2');
      expect(sha(await readFile(join(e.dir, 's.img')))).toBe(promoted);
    } finally {
      await p?.stop('SIGKILL').catch(() => {});
      await s.stop('SIGKILL').catch(() => {});
    }
  }, 120_000);

  it('the promoted node written, killed -9 and restarted with --secondary (as configured): a secondary, UpToDate, taking nothing over; the old primary restarted is refused (rule 70, ERR_PAIR_ROLE); failover keeps the promoted write', async () => {
    const e = await setup();
    let s: Served | undefined = await serve(e.sArgs);
    let p: Served | undefined = await serve(e.pArgs);
    try {
      await firstCheckpoint(e.pCtl);
      expect((await run('qemu-io', ['-f', 'raw', unixUri(e.pSock), '-c', 'write -P 0x11 0 64k'])).code).toBe(0);
      expect((await request<{ epoch: number }>(e.pCtl, 'checkpoint')).epoch).toBe(2);
      const ws = await watch(e.sCtl, ['auto-failover']);
      await p.stop('SIGKILL');
      p = undefined;
      await waitFor(() => ws.events.find((x) => x.event === 'auto-failover'), 'auto-failover', { timeoutMs: 20_000 });
      await ws.client.close();
      const gi = (await pairOf<Pst>(e.sCtl)).gi.current;
      expect((await run('qemu-io', ['-f', 'raw', unixUri(e.sSock), '-c', `write -P 0x33 ${MiB} 64k`])).code).toBe(0);
      const promoted = await readFile(join(e.dir, 's.img'));
      await s.stop('SIGKILL');
      s = await serve(e.sArgs);
      expect(await pairOf<Pst>(e.sCtl)).toMatchObject({ role: 'secondary', epoch: 2, diskState: 'UpToDate', link: 'none', gi: { current: gi } });
      await expect(serve(e.pArgs)).rejects.toThrow(/"code":"ERR_PAIR_ROLE".*rule 70/);
      expect(sha(await readFile(join(e.dir, 's.img')))).toBe(sha(promoted));
      expect((await request<{ heartbeat: { state: string } }>(e.sCtl, 'status')).heartbeat.state).not.toBe('dead');
      // the operator promotes it again: the promoted write is there
      expect(await request<{ role: string }>(e.sCtl, 'failover', {})).toMatchObject({ role: 'primary', epoch: 2 });
      const disk = await readFile(join(e.dir, 's.img'));
      expect(disk.subarray(MiB, MiB + 65536).equals(Buffer.alloc(65536, 0x33))).toBe(true);
      expect(sha(disk)).toBe(sha(promoted));
    } finally {
      await p?.stop('SIGKILL').catch(() => {});
      await s?.stop('SIGKILL').catch(() => {});
    }
  }, 120_000);
});
