/**
 * Leadership on a real etcd (Debian etcd-server, started here on tmpfs and free ports):
 * - the lease client: one leader, the other sees the holder; a leader that dies without revoking
 *   is replaced once its lease expires; revoking hands over at once; a frozen etcd (SIGSTOP) makes
 *   the leader stop at its own deadline (last keep-alive + TTL − margin), before etcd's expiry.
 * - two daemons with --lease (and a second heartbeat path through the same etcd): kill -9 the
 *   primary, the secondary takes the key and fails over, its term the key's create revision
 *   (no fence hook: the lease fences); a frozen etcd makes the primary's writes fail (qemu-io EIO);
 *   etcd killed and restarted: the primary stops writing and leads again under a higher revision,
 *   the secondary never promotes (roles sampled all along).
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent } from '../../src/control/protocol.js';
import { EtcdLease, parseLeaseUri } from '../../src/heartbeat/etcd-lease.js';
import { run, runCli, unixUri, waitFor } from '../support/spawn.js';
import { controlRequest as request } from '../support/control.js';
import { startEtcd, type Etcd } from '../support/etcd.js';
import { startHeartbeatPair, watch } from '../support/heartbeat.js';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

function lease(etcd: Etcd, node: string, ttlS = 2, events: Array<[string, Record<string, unknown>]> = []): EtcdLease {
  const l = new EtcdLease({ target: parseLeaseUri(etcd.uri('/pair1')), node, ttlS, publish: (e, f) => events.push([e, f]) });
  cleanups.push(() => l.stop(false));
  return l;
}

describe('etcd lease URI', () => {
  it.each([
    ['http://127.0.0.1:2379/p', 'the scheme is not etcd://'],
    ['etcd://127.0.0.1/p', 'no port'],
    ['etcd://127.0.0.1:2379', 'no key prefix'],
    ['etcd://127.0.0.1:2379/', 'no key prefix'],
    ['etcd://127.0.0.1:2379/p?x=1', 'no query'],
    ['etcd://127.0.0.1:99999/p', 'not a URL'],
  ])('%s → ERR_BAD_LEASE (%s)', (uri, why) => {
    expect(() => parseLeaseUri(uri)).toThrow(expect.objectContaining({ code: 'ERR_BAD_LEASE', message: expect.stringContaining(why) }));
  });

  it('parses host, port and prefix', () => {
    expect(parseLeaseUri('etcd://10.0.0.5:2379/blkrep/pair1/')).toEqual({ endpoint: 'http://10.0.0.5:2379', prefix: '/blkrep/pair1' });
  });
});

describe('etcd lease on a real etcd', () => {
  it('one leader; a leader killed without revoking is replaced only once its lease expired; revoking hands over at once', async () => {
    const etcd = await startEtcd();
    const a = lease(etcd, 'alpha');
    const b = lease(etcd, 'beta');
    expect(await a.campaign()).toBe(true);
    expect(a.status()).toMatchObject({ state: 'leader', holder: 'alpha', key: '/pair1/leader', ttlS: 2 });
    expect(a.valid()).toBe(true);
    expect(await b.campaign()).toBe(false);
    expect(b.status()).toMatchObject({ state: 'follower', holder: 'alpha' });
    // alpha "crashes": no more keep-alives, no revoke
    await a.stop(false);
    const t0 = performance.now();
    expect(await b.acquire(10_000, 100)).toBe(true);
    const waited = performance.now() - t0;
    // not before the lease could expire: at most one keep-alive period (TTL/3) had passed since the last
    expect(waited).toBeGreaterThan(2000 - 2000 / 3 - 100);
    expect(BigInt(b.status().revision!)).toBeGreaterThan(BigInt(a.status().revision ?? '0'));
    // a clean stop revokes: the next node leads at once
    await b.stop(true);
    const c = lease(etcd, 'gamma');
    expect(await c.campaign()).toBe(true);
  });

  it('etcd frozen (SIGSTOP): the leader stops at its own deadline (last keep-alive + TTL − TTL/4), says lease-lost, and leads again once etcd is back', async () => {
    const etcd = await startEtcd();
    const events: Array<[string, Record<string, unknown>]> = [];
    const a = lease(etcd, 'alpha', 2, events);
    a.hold();
    await waitFor(() => a.valid(), 'alpha to lead');
    const frozenAt = performance.now();
    etcd.proc.child.kill('SIGSTOP');
    await waitFor(() => !a.valid(), 'the local deadline', { timeoutMs: 5000, intervalMs: 10 });
    // the deadline comes before the TTL counted from the freeze could end on the server
    expect(performance.now() - frozenAt).toBeLessThan(2000);
    await waitFor(() => events.find((e) => e[0] === 'lease-lost'), 'lease-lost', { timeoutMs: 5000 });
    expect(a.state).toBe('lost');
    etcd.proc.child.kill('SIGCONT');
    await waitFor(() => a.valid(), 'alpha to lead again', { timeoutMs: 15_000, intervalMs: 50 });
    expect(events.map((e) => e[0])).toEqual(['lease-acquired', 'lease-lost', 'lease-acquired']);
  });
});

// ------------------------------------------------------------------------------------------------

const MiB = 1 << 20;
const SIZE = 4 * MiB;

interface Status {
  exports: Array<{ pair?: { role: string; epoch: number; lastCheckpointAgeMs: number | null } }>;
  heartbeat: { state: string; term: string; peerAnnounced: { epoch: string; primary: boolean } | null; paths: Array<{ uri: string; state: string; backend: string }>; lease: { state: string; holder: string | null; revision: string | null } | null };
}
const status = (ctl: string) => request<Status>(ctl, 'status');
const roleOf = (st: Status): string => st.exports.find((e) => e.pair)!.pair!.role;

describe('two daemons with --lease', () => {
  /** the pair of test/support/heartbeat.ts, with --lease and a second heartbeat path through the same etcd */
  async function startPair(etcd: Etcd) {
    const onEtcd = ['--lease', etcd.uri('/pairs/p1'), '--lease-ttl', '2', '--heartbeat', etcd.uri('/pairs/p1')];
    const pair = await startHeartbeatPair({ size: SIZE, beat: ['--heartbeat-interval', '0.1'], s: [...onEtcd, '--auto-failover'], p: onEtcd });
    await waitFor(async () => (await status(pair.pCtl)).heartbeat.lease?.state === 'leader', 'the primary to lead on etcd');
    await waitFor(async () => (await status(pair.sCtl)).heartbeat.paths.every((x) => x.state === 'alive'), 'both paths alive on the secondary');
    return pair;
  }

  it('kill -9 the primary: the secondary takes the leader key once the lease expired, then fails over (no fence hook)', async () => {
    const etcd = await startEtcd();
    const pair = await startPair(etcd);
    expect((await status(pair.sCtl)).heartbeat.lease).toMatchObject({ state: 'none' });
    const w = await ControlClient.connect(pair.sCtl, { timeoutMs: 10_000 });
    const events: ControlEvent[] = [];
    await w.subscribe(['peer-suspect', 'peer-dead', 'fence', 'lease-acquired', 'failover-started', 'failover-done', 'auto-failover'], (e) => events.push(e));
    try {
      const wr = await run('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x31 0 1M', '-c', 'flush']);
      expect(wr.code, wr.stderr).toBe(0);
      expect((await request<{ epoch: number }>(pair.pCtl, 'checkpoint')).epoch).toBe(2);
      const oldTerm = (await status(pair.pCtl)).heartbeat.term;
      expect(oldTerm).toBe((await status(pair.pCtl)).heartbeat.lease!.revision);
      pair.p.child.kill('SIGKILL');
      const done = await waitFor(() => events.find((e) => e.event === 'auto-failover'), 'auto-failover', { timeoutMs: 20_000 });
      expect(done).toMatchObject({ failedOver: true, fence: null });
      expect(events.map((e) => e.event)).toEqual(['peer-suspect', 'peer-dead', 'lease-acquired', 'failover-started', 'failover-done', 'auto-failover']);
      const after = (await status(pair.sCtl)).heartbeat;
      expect(after.lease).toMatchObject({ state: 'leader', holder: 'beta' });
      // the new primary's term is the create revision of the leader key it holds: above the old one's
      expect(after.term).toBe(after.lease!.revision);
      expect(BigInt(after.term)).toBeGreaterThan(BigInt(oldTerm));
      const rd = await run('qemu-io', ['-f', 'raw', '-r', unixUri(pair.sSock), '-c', 'read -P 0x31 0 1M']);
      expect(rd.code, rd.stderr).toBe(0);
      expect(rd.stdout).not.toContain('Pattern verification failed');
    } finally {
      await w.close();
    }
  });

  it('etcd frozen: the primary stops writing at its deadline (qemu-io gets EIO, the disk is unchanged), and writes again once etcd is back', async () => {
    const etcd = await startEtcd();
    const pair = await startPair(etcd);
    const uri = unixUri(pair.pSock);
    expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x41 0 64k'])).code).toBe(0);
    const before = createHash('sha256').update(await readFile(join(pair.dir, 'p.img'))).digest('hex');
    etcd.proc.child.kill('SIGSTOP');
    await waitFor(async () => (await status(pair.pCtl)).heartbeat.lease?.state === 'lost', 'the primary to lose its lease', { timeoutMs: 10_000 });
    const late = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x42 0 64k']);
    expect(late.stdout + late.stderr).toContain('write failed: Input/output error');
    expect(createHash('sha256').update(await readFile(join(pair.dir, 'p.img'))).digest('hex')).toBe(before);
    etcd.proc.child.kill('SIGCONT');
    await waitFor(async () => (await status(pair.pCtl)).heartbeat.lease?.state === 'leader', 'the primary to lead again', { timeoutMs: 20_000 });
    expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x43 0 64k'])).code).toBe(0);
  });

  it('etcd killed (-9) and restarted while the pair runs: the primary stops writing, leads again under a higher revision (its new term); the secondary never promotes: never two primaries', async () => {
    const etcd = await startEtcd();
    const pair = await startPair(etcd);
    const uri = unixUri(pair.pSock);
    const term1 = (await status(pair.pCtl)).heartbeat.term;
    expect(term1).toBe((await status(pair.pCtl)).heartbeat.lease!.revision);
    const watched = ['peer-suspect', 'peer-dead', 'peer-alive', 'lease-acquired', 'lease-lost', 'failover-started', 'failover-done', 'auto-failover', 'demoted'];
    const [wp, ws] = [await watch(pair.pCtl, watched), await watch(pair.sCtl, watched)];
    // the roles on both sides, sampled all along
    const roles = new Set<string>();
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        const [p, s] = [await status(pair.pCtl), await status(pair.sCtl)];
        roles.add(`${roleOf(p)}/${roleOf(s)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    try {
      expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x51 0 64k'])).code).toBe(0);
      const before = createHash('sha256').update(await readFile(join(pair.dir, 'p.img'))).digest('hex');
      await etcd.kill();
      await waitFor(async () => (await status(pair.pCtl)).heartbeat.lease?.state === 'lost', 'the primary to lose its lease', { timeoutMs: 10_000 });
      const late = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x52 0 64k']);
      expect(late.stdout + late.stderr).toContain('write failed: Input/output error');
      expect(createHash('sha256').update(await readFile(join(pair.dir, 'p.img'))).digest('hex')).toBe(before);
      // the etcd path is dead on both sides, the udp one carries the peer: nobody is suspected
      await waitFor(async () => (await status(pair.sCtl)).heartbeat.paths.find((x) => x.backend === 'etcd')?.state === 'dead', 'the etcd path dead on the secondary');
      expect((await status(pair.sCtl)).heartbeat.state).toBe('alive');
      await etcd.restart();
      await waitFor(async () => (await status(pair.pCtl)).heartbeat.lease?.state === 'leader', 'the primary to lead again', { timeoutMs: 20_000 });
      const back = (await status(pair.pCtl)).heartbeat;
      expect(back.lease!.holder).toBe('alpha');
      expect(back.term).toBe(back.lease!.revision);
      expect(BigInt(back.term)).toBeGreaterThan(BigInt(term1));
      expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x53 0 64k'])).code).toBe(0);
      await waitFor(async () => (await status(pair.sCtl)).heartbeat.paths.every((x) => x.state === 'alive'), 'both paths alive again');
      // a loaded machine may delay a beat past the suspicion bound (two intervals): suspicion
      // changes no role, so peer-suspect/peer-alive are left out; nobody is ever declared dead
      const roleEvents = (w: typeof wp): string[] => w.events.map((e) => e.event).filter((e) => e !== 'peer-suspect' && e !== 'peer-alive');
      expect(roleEvents(wp)).toEqual(['lease-lost', 'lease-acquired']);
      expect(wp.events.find((e) => e.event === 'lease-acquired')).toMatchObject({ revision: back.term });
      expect(roleEvents(ws)).toEqual([]);
      // the new term reaches the secondary with the primary's next beat, which may follow the
      // paths' recovery: wait for it rather than read it once
      await waitFor(async () => (await status(pair.sCtl)).heartbeat.peerAnnounced?.epoch === back.term, 'the secondary to hear the new term');
      expect((await status(pair.sCtl)).heartbeat.peerAnnounced).toMatchObject({ epoch: back.term, primary: true });
    } finally {
      sampling = false;
      await sampler;
      await wp.client.close();
      await ws.client.close();
    }
    expect([...roles]).toEqual(['primary/secondary']);
  });

  it('flags: a bad --lease URI is ERR_BAD_LEASE (exit 1); --auto-failover without --fence-hook or --lease is a usage error', async () => {
    const hb = ['serve-nbd', 'memory:1M', '--json', '--heartbeat', 'udp://127.0.0.1:9', '--peer-id', 'b', '--node-id', 'a'];
    const r = await runCli([...hb, '--lease', 'etcd://127.0.0.1/p']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout.trim().split('\n')[0]!).error).toMatchObject({ code: 'ERR_BAD_LEASE', message: expect.stringContaining('no port') });
    const t = await runCli([...hb, '--lease', 'etcd://127.0.0.1:2/p', '--lease-ttl', '0']);
    expect(t.code).toBe(2);
    expect(JSON.parse(t.stdout.trim().split('\n')[0]!).error.message).toContain('--lease-ttl "0" is not a number of seconds from 1 to 60');
    const u = await runCli([...hb, '--auto-failover']);
    expect(u.code).toBe(2);
    expect(JSON.parse(u.stdout.trim().split('\n')[0]!).error.message).toContain('--auto-failover needs --fence-hook (or --lease, whose expiry fences)');
  });
});
