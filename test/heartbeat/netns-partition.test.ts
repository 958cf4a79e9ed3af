/**
 * Partitions with network namespaces (root; replication.md §6, tls-heartbeat-ops.md §2.3): the
 * secondary runs in a namespace of its own, joined to the primary's by two veth pairs, two NICs,
 * one udp heartbeat path on each, and a third veth pair for the pair link (TCP). The pair link
 * is a path too (its ping/pong: a peer answering on it is alive; attack-hb-paths-cut.test.ts), so
 * a partition cuts it with the heartbeat.
 * - one NIC down: that path is dead, the peer is not, nothing happens;
 * - every NIC down (a full partition): the secondary declares the primary dead, fences and fails over
 *   once; the primary (--on-no-quorum io-error) has stopped writing by then: qemu-io gets EIO and
 *   its disk is unchanged, so only one side writes;
 * - the NICs back: the old primary hears its peer announce term 2 and is demoted.
 * Asymmetric partitions, with nftables rules in the secondary's namespace (nothing touches the
 * host's own rule set; the rules go with the namespace):
 * - primary → secondary dropped (heartbeat and pair link), the other way passes: the secondary declares the primary dead,
 *   fences it and fails over; the primary still hears it, hears term 2 announced as primary and
 *   is demoted: its writes fail (EIO) and its disk is unchanged, so only the new primary writes;
 * - secondary → primary dropped: the primary loses quorum (--on-no-quorum io-error: EIO, disk
 *   unchanged) while the secondary, hearing it, never takes over: nobody writes, nobody is split.
 * Without root (ip netns add fails) the file says so and fails: CI runs as root.
 */
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent } from '../../src/control/protocol.js';
import { BIN, makeTempDir, run, serve, start, unixUri, waitFor, type Started } from '../support/spawn.js';
import { fenceHook, pairKey, sparseImages, watch } from '../support/heartbeat.js';
import { controlRequest as request } from '../support/control.js';

const tag = `hb${process.pid % 100000}`;
const NS = `${tag}ns`;
const NICS = [
  { host: `${tag}a0`, ns: `${tag}a1`, hostIp: '10.213.71.1', nsIp: '10.213.71.2' },
  { host: `${tag}b0`, ns: `${tag}b1`, hostIp: '10.213.72.1', nsIp: '10.213.72.2' },
];
/** the pair link's NIC (TCP, no heartbeat path) */
const DATA = { host: `${tag}c0`, ns: `${tag}c1`, hostIp: '10.213.73.1', nsIp: '10.213.73.2' };

const sh = (...argv: string[]): void => {
  execFileSync(argv[0]!, argv.slice(1), { stdio: 'pipe' });
};

function setupNetns(): void {
  sh('ip', 'netns', 'add', NS);
  sh('ip', 'netns', 'exec', NS, 'ip', 'link', 'set', 'lo', 'up');
  for (const n of [...NICS, DATA]) {
    sh('ip', 'link', 'add', n.host, 'type', 'veth', 'peer', 'name', n.ns);
    sh('ip', 'link', 'set', n.ns, 'netns', NS);
    sh('ip', 'addr', 'add', `${n.hostIp}/30`, 'dev', n.host);
    sh('ip', 'link', 'set', n.host, 'up');
    sh('ip', 'netns', 'exec', NS, 'ip', 'addr', 'add', `${n.nsIp}/30`, 'dev', n.ns);
    sh('ip', 'netns', 'exec', NS, 'ip', 'link', 'set', n.ns, 'up');
  }
}

function teardownNetns(): void {
  for (const n of [...NICS, DATA]) {
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

const link = (i: number, state: 'up' | 'down'): void => sh('ip', 'link', 'set', (NICS[i] ?? DATA).host, state);

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

/** `nft` inside the secondary's namespace */
const nft = (...args: string[]): void => sh('ip', 'netns', 'exec', NS, 'nft', ...args);

interface NsPair {
  dir: string;
  p: Started;
  s: Started;
  pCtl: string;
  sCtl: string;
  uri: string;
  port: number;
}

/** beta (secondary, in the namespace) and alpha (primary, outside), one udp path per NIC, checkpoint 1 taken, both paths alive */
async function startNsPair(): Promise<NsPair> {
  const dir = await makeTempDir();
  await sparseImages(dir, 4 << 20);
  const key = await pairKey(dir);
  const hook = await fenceHook(dir, 7);
  const port = 20000 + (process.pid % 20000);
  const beat = ['--heartbeat-key', key, '--heartbeat-interval', '0.1', '--heartbeat-misses', '5'];
  const [sSock, pSock, sCtl, pCtl] = ['s.sock', 'p.sock', 's.ctl', 'p.ctl'].map((f) => join(dir, f)) as [string, string, string, string];
  const s = await serveInNs([join(dir, 's.img'), '--secondary', '--socket', sSock, '--bind', DATA.nsIp, '--port', String(port), '--control', sCtl, '--node-id', 'beta', '--peer-id', 'alpha', ...NICS.flatMap((n) => ['--heartbeat', `udp://${n.hostIp}:${port}?listen=${n.nsIp}:${port}`]), ...beat, '--auto-failover', '--fence-hook', hook]);
  const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pCtl, '--replicate-to', `nbd://${DATA.nsIp}:${port}`, '--node-id', 'alpha', '--peer-id', 'beta', ...NICS.flatMap((n) => ['--heartbeat', `udp://${n.nsIp}:${port}?listen=${n.hostIp}:${port}`]), ...beat, '--on-no-quorum', 'io-error']);
  await waitFor(async () => {
    const st = await pairOf(pCtl);
    return st.epoch === 1 && st.lastCheckpointAgeMs !== null;
  }, 'checkpoint 1', { timeoutMs: 30_000 });
  await waitFor(async () => (await status(sCtl)).heartbeat.paths.every((x) => x.state === 'alive') && (await status(pCtl)).heartbeat.paths.every((x) => x.state === 'alive'), 'both paths alive on both');
  return { dir, p, s, pCtl, sCtl, uri: unixUri(pSock), port };
}

describe('partitions in network namespaces (two NICs)', () => {
  it('one NIC down: no failover; both down: one failover, the old primary writes nothing; NICs back: it is demoted', async () => {
    teardownNetns();
    setupNetns();
    const { dir, p, s, pCtl, sCtl, uri } = await startNsPair();
    try {
      const w = await ControlClient.connect(sCtl, { timeoutMs: 10_000 });
      const events: ControlEvent[] = [];
      await w.subscribe(['peer-suspect', 'peer-dead', 'fence', 'failover-done', 'auto-failover'], (e) => events.push(e));
      expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x21 0 64k'])).code).toBe(0);

      // one NIC down: its path dies, the peer stays alive on the other
      link(0, 'down');
      await waitFor(async () => (await status(sCtl)).heartbeat.paths[0]!.state === 'dead', 'path 1 dead on the secondary');
      expect((await status(sCtl)).heartbeat.state).toBe('alive');
      expect(events).toEqual([]);
      expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x22 0 64k'])).code).toBe(0);

      // every NIC down (the pair link's too): a full partition
      const before = sha(await readFile(join(dir, 'p.img')));
      // from here: a late beat and pong on a loaded host may have made the peer suspect a moment before
      const from = events.length;
      link(1, 'down');
      link(2, 'down');
      await waitFor(() => events.find((e) => e.event === 'auto-failover'), 'auto-failover', { timeoutMs: 20_000 });
      expect(events.slice(from).map((e) => e.event), JSON.stringify(events)).toEqual(['peer-suspect', 'peer-dead', 'fence', 'failover-done', 'auto-failover']);
      expect(await pairOf(sCtl)).toMatchObject({ role: 'primary' });
      // the primary has no quorum: qemu-io's write fails and nothing reaches its disk
      const cut = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x23 0 64k']);
      expect(cut.stdout + cut.stderr).toContain('write failed: Input/output error');
      expect(sha(await readFile(join(dir, 'p.img')))).toBe(before);

      // the NICs back: the old primary hears term 2 and is demoted
      link(0, 'up');
      link(1, 'up');
      link(2, 'up');
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

describe('asymmetric partitions with nftables (the rules in the secondary\'s namespace)', () => {
  const SIDE_EVENTS = ['peer-suspect', 'peer-dead', 'fence', 'failover-done', 'auto-failover', 'demoted', 'io-suspended'];

  it('primary → secondary dropped: the secondary takes over, the primary (still hearing it) is demoted and writes nothing', async () => {
    teardownNetns();
    setupNetns();
    const pair = await startNsPair();
    const [wp, ws] = [await watch(pair.pCtl, SIDE_EVENTS), await watch(pair.sCtl, SIDE_EVENTS)];
    try {
      expect((await run('qemu-io', ['-f', 'raw', pair.uri, '-c', 'write -P 0x61 0 64k'])).code).toBe(0);
      nft('add', 'table', 'inet', 'hbpart');
      nft('add', 'chain', 'inet', 'hbpart', 'in', '{ type filter hook input priority 0; }');
      nft('add', 'rule', 'inet', 'hbpart', 'in', 'udp', 'dport', String(pair.port), 'drop');
      // the pair link's segments from the primary (to the secondary's NBD port) too
      nft('add', 'rule', 'inet', 'hbpart', 'in', 'tcp', 'dport', String(pair.port), 'drop');
      await waitFor(() => ws.events.find((e) => e.event === 'auto-failover'), 'auto-failover on the secondary', { timeoutMs: 20_000 });
      expect(ws.events.map((e) => e.event)).toEqual(['peer-suspect', 'peer-dead', 'fence', 'failover-done', 'auto-failover']);
      expect(ws.events.find((e) => e.event === 'fence')).toMatchObject({ verdict: 'fenced', proceed: true });
      expect(await pairOf(pair.sCtl)).toMatchObject({ role: 'primary' });
      await waitFor(async () => (await status(pair.pCtl)).heartbeat.io?.state === 'demoted', 'the old primary demoted', { timeoutMs: 10_000 });
      // it heard its peer all along: demoted by the term, not by a lost quorum
      expect(wp.events.map((e) => e.event)).toEqual(['demoted']);
      expect(wp.events[0]).toMatchObject({ reason: 'peer "beta" announces itself primary with term 2, this node\'s is 1' });
      expect((await status(pair.pCtl)).heartbeat.state).toBe('alive');
      const before = sha(await readFile(join(pair.dir, 'p.img')));
      const late = await run('qemu-io', ['-f', 'raw', pair.uri, '-c', 'write -P 0x62 0 64k']);
      expect(late.stdout + late.stderr).toContain('write failed: Input/output error');
      expect(sha(await readFile(join(pair.dir, 'p.img')))).toBe(before);
    } finally {
      await wp.client.close();
      await ws.client.close();
      await pair.p.stop('SIGKILL').catch(() => {});
      await pair.s.stop('SIGKILL').catch(() => {});
    }
  });

  it('secondary → primary dropped: the primary loses quorum and stops writing; the secondary, hearing it, never takes over', async () => {
    teardownNetns();
    setupNetns();
    const pair = await startNsPair();
    const [wp, ws] = [await watch(pair.pCtl, SIDE_EVENTS), await watch(pair.sCtl, SIDE_EVENTS)];
    try {
      expect((await run('qemu-io', ['-f', 'raw', pair.uri, '-c', 'write -P 0x71 0 64k'])).code).toBe(0);
      nft('add', 'table', 'inet', 'hbpart');
      nft('add', 'chain', 'inet', 'hbpart', 'out', '{ type filter hook output priority 0; }');
      nft('add', 'rule', 'inet', 'hbpart', 'out', 'udp', 'dport', String(pair.port), 'drop');
      // the pair link's segments from the secondary (its NBD port) too
      nft('add', 'rule', 'inet', 'hbpart', 'out', 'tcp', 'sport', String(pair.port), 'drop');
      await waitFor(() => wp.events.find((e) => e.event === 'peer-dead'), 'peer-dead on the primary', { timeoutMs: 20_000 });
      const before = sha(await readFile(join(pair.dir, 'p.img')));
      const cut = await run('qemu-io', ['-f', 'raw', pair.uri, '-c', 'write -P 0x72 0 64k']);
      expect(cut.stdout + cut.stderr).toContain('write failed: Input/output error');
      expect(sha(await readFile(join(pair.dir, 'p.img')))).toBe(before);
      // the secondary hears the primary on both paths: it suspects nothing and stays secondary
      expect((await status(pair.sCtl)).heartbeat.state).toBe('alive');
      expect(await pairOf(pair.sCtl)).toMatchObject({ role: 'secondary' });
      expect(ws.events.map((e) => e.event)).toEqual([]);
      expect(wp.events.map((e) => e.event)).toEqual(['peer-suspect', 'peer-dead']);
      // the link heals: the primary hears its peer again and writes
      nft('delete', 'table', 'inet', 'hbpart');
      await waitFor(async () => (await status(pair.pCtl)).heartbeat.state === 'alive', 'the primary to hear its peer again');
      expect((await run('qemu-io', ['-f', 'raw', pair.uri, '-c', 'write -P 0x73 0 64k'])).code).toBe(0);
      expect(await pairOf(pair.sCtl)).toMatchObject({ role: 'secondary' });
    } finally {
      await wp.client.close();
      await ws.client.close();
      await pair.p.stop('SIGKILL').catch(() => {});
      await pair.s.stop('SIGKILL').catch(() => {});
    }
  });
});
