/**
 * Partitions with network namespaces (root; replication.md §6, tls-heartbeat-ops.md §2.3): the
 * secondary runs in a namespace of its own, joined to the primary's by two veth pairs, two NICs,
 * one udp heartbeat path on each. The pair link itself is a Unix socket (a path in the file
 * system crosses namespaces), so only the heartbeat is cut.
 * - one NIC down: that path is dead, the peer is not, nothing happens;
 * - both down (a full partition): the secondary declares the primary dead, fences and fails over
 *   once; the primary (--on-no-quorum io-error) has stopped writing by then: qemu-io gets EIO and
 *   its disk is unchanged, so only one side writes;
 * - the NICs back: the old primary hears its peer announce term 2 and is demoted.
 * Without root (ip netns add fails) the file says so and fails: CI runs as root.
 */
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { chmod, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent } from '../../src/control/protocol.js';
import { BIN, makeTempDir, run, serve, start, unixUri, waitFor, type Started } from '../support/spawn.js';
import { controlRequest as request } from '../support/control.js';

const tag = `hb${process.pid % 100000}`;
const NS = `${tag}ns`;
const NICS = [
  { host: `${tag}a0`, ns: `${tag}a1`, hostIp: '10.213.71.1', nsIp: '10.213.71.2' },
  { host: `${tag}b0`, ns: `${tag}b1`, hostIp: '10.213.72.1', nsIp: '10.213.72.2' },
];

const sh = (...argv: string[]): void => {
  execFileSync(argv[0]!, argv.slice(1), { stdio: 'pipe' });
};

function setupNetns(): void {
  sh('ip', 'netns', 'add', NS);
  sh('ip', 'netns', 'exec', NS, 'ip', 'link', 'set', 'lo', 'up');
  for (const n of NICS) {
    sh('ip', 'link', 'add', n.host, 'type', 'veth', 'peer', 'name', n.ns);
    sh('ip', 'link', 'set', n.ns, 'netns', NS);
    sh('ip', 'addr', 'add', `${n.hostIp}/30`, 'dev', n.host);
    sh('ip', 'link', 'set', n.host, 'up');
    sh('ip', 'netns', 'exec', NS, 'ip', 'addr', 'add', `${n.nsIp}/30`, 'dev', n.ns);
    sh('ip', 'netns', 'exec', NS, 'ip', 'link', 'set', n.ns, 'up');
  }
}

function teardownNetns(): void {
  for (const n of NICS) {
    try {
      sh('ip', 'link', 'del', n.host);
    } catch {
      /* gone with the namespace */
    }
  }
  try {
    sh('ip', 'netns', 'del', NS);
  } catch {
    /* never made */
  }
}

const link = (i: number, state: 'up' | 'down'): void => sh('ip', 'link', 'set', NICS[i]!.host, state);

afterEach(() => teardownNetns());

/** serve-nbd inside the namespace; resolves at its listening line */
async function serveInNs(args: string[]): Promise<Started> {
  const p = start('ip', ['netns', 'exec', NS, process.execPath, BIN, 'serve-nbd', ...args, '--json']);
  await waitFor(() => p.stdout().includes('"listening"') || (p.child.exitCode !== null && Promise.reject(new Error(`serve-nbd in ${NS} exited: ${p.stderr()}`))), `serve-nbd in ${NS}`, { timeoutMs: 30_000 });
  return p;
}

interface Status {
  exports: Array<{ pair?: { role: string; epoch: number; lastCheckpointAgeMs: number | null } }>;
  heartbeat: { state: string; term: string; io: { state: string } | null; paths: Array<{ state: string }> };
}
const status = (ctl: string) => request<Status>(ctl, 'status');
const pairOf = async (ctl: string) => (await status(ctl)).exports.find((e) => e.pair)!.pair!;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('partitions in network namespaces (two NICs)', () => {
  it('one NIC down: no failover; both down: one failover, the old primary writes nothing; NICs back: it is demoted', async () => {
    teardownNetns();
    setupNetns();
    const dir = await makeTempDir();
    for (const f of ['p.img', 's.img']) {
      await writeFile(join(dir, f), Buffer.alloc(0));
      await truncate(join(dir, f), 4 << 20);
    }
    const key = join(dir, 'pair.key');
    await writeFile(key, 'a pair key of thirty-two bytes!!');
    await chmod(key, 0o600);
    const hook = join(dir, 'fence.sh');
    await writeFile(hook, '#!/bin/sh\nexit 7\n');
    await chmod(hook, 0o700);
    const port = 20000 + (process.pid % 20000);
    const beat = ['--heartbeat-key', key, '--heartbeat-interval', '0.1', '--heartbeat-misses', '5'];
    const sSock = join(dir, 's.sock');
    const pSock = join(dir, 'p.sock');
    const sCtl = join(dir, 's.ctl');
    const pCtl = join(dir, 'p.ctl');
    const s = await serveInNs([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sCtl, '--node-id', 'beta', '--peer-id', 'alpha', ...NICS.flatMap((n) => ['--heartbeat', `udp://${n.hostIp}:${port}?listen=${n.nsIp}:${port}`]), ...beat, '--auto-failover', '--fence-hook', hook]);
    const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pCtl, '--replicate-to', unixUri(sSock), '--node-id', 'alpha', '--peer-id', 'beta', ...NICS.flatMap((n) => ['--heartbeat', `udp://${n.nsIp}:${port}?listen=${n.hostIp}:${port}`]), ...beat, '--on-no-quorum', 'io-error']);
    try {
      await waitFor(async () => {
        const st = await pairOf(pCtl);
        return st.epoch === 1 && st.lastCheckpointAgeMs !== null;
      }, 'checkpoint 1', { timeoutMs: 30_000 });
      await waitFor(async () => (await status(sCtl)).heartbeat.paths.every((x) => x.state === 'alive') && (await status(pCtl)).heartbeat.state === 'alive', 'both paths alive');
      const w = await ControlClient.connect(sCtl, { timeoutMs: 10_000 });
      const events: ControlEvent[] = [];
      await w.subscribe(['peer-suspect', 'peer-dead', 'fence', 'failover-done', 'auto-failover'], (e) => events.push(e));
      const uri = unixUri(pSock);
      expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x21 0 64k'])).code).toBe(0);

      // one NIC down: its path dies, the peer stays alive on the other
      link(0, 'down');
      await waitFor(async () => (await status(sCtl)).heartbeat.paths[0]!.state === 'dead', 'path 1 dead on the secondary');
      expect((await status(sCtl)).heartbeat.state).toBe('alive');
      expect(events).toEqual([]);
      expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x22 0 64k'])).code).toBe(0);

      // both down: a full partition
      const before = sha(await readFile(join(dir, 'p.img')));
      link(1, 'down');
      await waitFor(() => events.find((e) => e.event === 'auto-failover'), 'auto-failover', { timeoutMs: 20_000 });
      expect(events.map((e) => e.event)).toEqual(['peer-suspect', 'peer-dead', 'fence', 'failover-done', 'auto-failover']);
      expect(await pairOf(sCtl)).toMatchObject({ role: 'primary' });
      // the primary has no quorum: qemu-io's write fails and nothing reaches its disk
      const cut = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x23 0 64k']);
      expect(cut.stdout + cut.stderr).toContain('write failed: Input/output error');
      expect(sha(await readFile(join(dir, 'p.img')))).toBe(before);

      // the NICs back: the old primary hears term 2 and is demoted
      link(0, 'up');
      link(1, 'up');
      await waitFor(async () => (await status(pCtl)).heartbeat.io?.state === 'demoted', 'the old primary demoted', { timeoutMs: 10_000 });
      const after = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x24 0 64k']);
      expect(after.stdout + after.stderr).toContain('write failed: Input/output error');
      expect(sha(await readFile(join(dir, 'p.img')))).toBe(before);
      expect(events.filter((e) => e.event === 'auto-failover')).toHaveLength(1);
      await w.close();
    } finally {
      await p.stop('SIGKILL').catch(() => {});
      await s.stop('SIGKILL').catch(() => {});
    }
  });
});
