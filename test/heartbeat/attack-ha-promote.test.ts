/**
 * Attack (round 3): kill -9 of the secondary during its automatic promotion (two daemons, udp
 * heartbeat, --auto-failover). The primary writes past checkpoint 2 (sync: the secondary's disk has
 * those writes, its hidden disk the checkpoint) and is killed -9; the secondary fences it and fails
 * over, and kills itself at the start of a failover step (BLKREP_TEST_CRASH_AT=failover-<step>).
 * Restarted with the same flags (systemd's restart): nothing is taken over on its own (the dead
 * peer is never heard, so never declared dead again), the role is still secondary, `status` says
 * so; `failover` finishes it, and the disk is checkpoint 2 byte for byte at every step.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request, firstCheckpoint, pairOf } from '../support/control.js';
import { heartbeatPairArgs, watch } from '../support/heartbeat.js';
import { run, serve, unixUri } from '../support/spawn.js';

const SIZE = 4 << 20;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface Pst {
  role: string;
  epoch: number;
  diskState: string;
  secondary?: { failoverFailed: { step: string } | null };
}

const STEPS = ['record-intent', 'seed-failback-bitmap', 'commit-hidden', 'commit-active', 'flush', 'empty-overlays', 'record-generation'];

describe('kill -9 of the secondary during its automatic promotion', () => {
  it.each(STEPS)('at failover-%s: restarted with the same flags it stays a secondary and takes nothing over; failover then gives checkpoint 2 exactly', async (step) => {
    const { dir, sArgs, pArgs, pSock, sCtl, pCtl } = await heartbeatPairArgs({ size: SIZE, p: ['--protocol', 'sync'], autoFailover: { fenceExit: 7 } });
    let s = await serve(sArgs, { env: { ...process.env, BLKREP_TEST_CRASH_AT: `failover-${step}` } });
    const p = await serve(pArgs);
    try {
      await firstCheckpoint(pCtl);
      const pUri = unixUri(pSock);
      expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', 'write -P 0x11 0 256k'])).code).toBe(0);
      expect((await request<{ epoch: number }>(pCtl, 'checkpoint')).epoch).toBe(2);
      const cp2 = await readFile(join(dir, 'p.img'));
      // past the checkpoint: in the secondary's disk, the checkpoint's data in its hidden disk
      expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', 'write -P 0x22 128k 256k'])).code).toBe(0);
      expect(sha(await readFile(join(dir, 's.img')))).toBe(sha(await readFile(join(dir, 'p.img'))));

      await p.stop('SIGKILL');
      expect((await s.waitExit(30_000)).signal).toBe('SIGKILL');

      s = await serve(sArgs);
      const w = await watch(sCtl, ['peer-alive', 'peer-dead', 'fence', 'failover-started', 'failover-done', 'auto-failover']);
      const st = await pairOf<Pst>(sCtl);
      expect(st).toMatchObject({ role: 'secondary', epoch: 2 });
      const dry = await request<{ rule: string; epoch: number; retry?: boolean }>(sCtl, 'failover', { dryRun: true });
      expect(dry).toMatchObject({ rule: 'failover-to-checkpoint', epoch: 2 });
      // a beat period and more: the dead primary is never heard, so nothing is taken over by itself
      const hb = await request<{ heartbeat: { state: string } }>(sCtl, 'status');
      expect(hb.heartbeat.state).toBe('unknown');
      expect(w.events).toEqual([]);
      await w.client.close();

      expect(await request<{ role: string; epoch: number }>(sCtl, 'failover', {})).toMatchObject({ role: 'primary', epoch: 2 });
      expect(sha(await readFile(join(dir, 's.img')))).toBe(sha(cp2));
      expect(await pairOf<Pst>(sCtl)).toMatchObject({ role: 'primary', diskState: 'UpToDate' });
    } finally {
      await p.stop('SIGKILL').catch(() => {});
      await s.stop('SIGKILL').catch(() => {});
    }
  }, 120_000);
});
