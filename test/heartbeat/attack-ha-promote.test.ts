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
import { controlRequest as request, pairOf } from '../support/control.js';
import { fenceHook, freeUdpPort, pairKey, sparseImages, watch } from '../support/heartbeat.js';
import { makeTempDir, run, serve, unixUri, waitFor } from '../support/spawn.js';

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
    const dir = await makeTempDir();
    await sparseImages(dir, SIZE);
    const key = await pairKey(dir);
    const hook = await fenceHook(dir, 7);
    const [pa, pb] = [await freeUdpPort(), await freeUdpPort()];
    const beat = ['--heartbeat-key', key, '--heartbeat-interval', '0.1', '--heartbeat-misses', '5'];
    const [sSock, pSock, sCtl, pCtl] = ['s.sock', 'p.sock', 's.ctl', 'p.ctl'].map((f) => join(dir, f)) as [string, string, string, string];
    const sArgs = [join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sCtl, '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${pa}?listen=127.0.0.1:${pb}`, ...beat, '--auto-failover', '--fence-hook', hook];
    let s = await serve(sArgs, { env: { ...process.env, BLKREP_TEST_CRASH_AT: `failover-${step}` } });
    const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pCtl, '--replicate-to', unixUri(sSock), '--protocol', 'sync', '--node-id', 'alpha', '--peer-id', 'beta', '--heartbeat', `udp://127.0.0.1:${pb}?listen=127.0.0.1:${pa}`, ...beat]);
    try {
      await waitFor(async () => {
        const st = await pairOf<{ epoch: number; lastCheckpointAgeMs: number | null }>(pCtl);
        return st.epoch === 1 && st.lastCheckpointAgeMs !== null;
      }, 'checkpoint 1 after the initial sync', { timeoutMs: 30_000 });
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
