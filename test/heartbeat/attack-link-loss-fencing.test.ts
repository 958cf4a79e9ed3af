/**
 * Attack (session 16, issue 10): a sync primary loses its data link and, before any beat tells its
 * secondary of the new generation, dies (kill -9). The secondary is still Consistent; its
 * automatic failover fences the primary and promotes its last checkpoint.
 *
 * Before: `--fencing resource-and-stonith` acted on peer-dead only; a primary that lost its link
 * degraded and acknowledged every write at once, writes the secondary never got: the failover
 * dropped them without a word. Now (DRBD: a primary losing its connection freezes I/O and calls
 * fence-peer) the link loss freezes writes and runs the hook once; nothing is acknowledged until
 * the hook says 4 or 7, the link is back, the secondary reports its disk Outdated (beat version 2),
 * or resume-io.
 *
 * Two daemons (heartbeat every 0.1 s, dead after 10 misses); the data link through a Unix-socket proxy killed -9; the udp heartbeat through
 * relays in this process, closed to cut it.
 */
import { createHash } from 'node:crypto';
import dgram from 'node:dgram';
import { chmod, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request, pairOf, firstCheckpoint } from '../support/control.js';
import { freeUdpPort, fenceHook, pairKey, sparseImages, unixProxy, watch } from '../support/heartbeat.js';
import { makeTempDir, run, serve, start, unixUri, waitFor, type Started } from '../support/spawn.js';

const KiB = 1024;
const SIZE = 4 << 20;
const P_EVENTS = ['replication-degraded', 'replication-connected', 'io-suspended', 'io-resumed', 'fence', 'peer-dead', 'demoted'];
const S_EVENTS = ['peer-alive', 'peer-suspect', 'peer-dead', 'fence', 'failover-started', 'failover-done', 'failover-failed', 'auto-failover', 'demoted'];
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** udp datagrams to `listen` go on to `target` (dropped while `drop` is set), until closed */
async function relay(listen: number, target: number): Promise<{ close: () => Promise<void>; drop: (on: boolean) => void }> {
  const sock = dgram.createSocket('udp4');
  let dropping = false;
  sock.on('message', (msg) => {
    if (!dropping) sock.send(msg, target, '127.0.0.1');
  });
  await new Promise<void>((resolve) => sock.bind(listen, '127.0.0.1', resolve));
  return { close: () => new Promise((resolve) => sock.close(() => resolve())), drop: (on) => (dropping = on) };
}

/**
 * The primary's fence hook: appends "NODE fenced PEER" to DIR/fence.log, waits for DIR/fence.go
 * (the test lets it finish), removes it and exits with the code in DIR/fence.exit; every test lets
 * it go when it ends (stopAll).
 */
async function gatedHook(dir: string): Promise<string> {
  const hook = join(dir, 'p-fence.sh');
  const go = join(dir, 'fence.go');
  // bounded: a hook the test never lets go (its primary killed, the test over, DIR removed) ends by itself within 60 s
  await writeFile(hook, `#!/bin/sh\necho "$BLKREP_NODE fenced $BLKREP_PEER" >> ${join(dir, 'fence.log')}\nn=0\nwhile [ ! -e ${go} ] && [ -d ${dir} ] && [ $n -lt 3000 ]; do sleep 0.02; n=$((n+1)); done\nrm -f ${go}\nexit $(cat ${join(dir, 'fence.exit')} 2>/dev/null || echo 5)\n`);
  await chmod(hook, 0o700);
  return hook;
}

interface Io {
  heartbeat: { io: { state: string; reason: string | null; cause: string | null; waiting: number } };
}
const io = async (ctl: string): Promise<Io['heartbeat']['io']> => (await request<Io>(ctl, 'status')).heartbeat.io;

/** a qemu-io write of 64 KiB of `byte` at `offset`, in its own process (it may never be acknowledged) */
const writer = (uri: string, byte: number, offset: number): Started => start('qemu-io', ['-f', 'raw', uri, '-c', `write -P 0x${byte.toString(16)} ${offset} 64k`]);

/** true once the process exited (a write acknowledged or failed), false while it waits */
const exited = (w: Started): boolean => w.child.exitCode !== null || w.child.signalCode !== null;

/**
 * The pair. `relays`: the heartbeat through relays in this process (cutHeartbeat, muteSecondary);
 * `misses`: the bound of both detectors, in 0.1 s intervals (default 10).
 */
async function pair(dir: string, o: { relays: boolean; misses?: number }) {
  await sparseImages(dir, SIZE);
  const key = await pairKey(dir);
  const sHook = await fenceHook(dir, 7, undefined, 's-fence.sh');
  const pHook = await gatedHook(dir);
  const [pa, pb, ra, rb] = [await freeUdpPort(), await freeUdpPort(), await freeUdpPort(), await freeUdpPort()];
  // p listens on pa, s on pb; with relays, p sends to rb (→ pb) and s to ra (→ pa)
  const cut = o.relays ? [await relay(rb, pb), await relay(ra, pa)] : [];
  const [toS, toP] = o.relays ? [rb, ra] : [pb, pa];
  const beat = ['--heartbeat-key', key, '--heartbeat-interval', '0.1', '--heartbeat-misses', String(o.misses ?? 10)];
  const [sSock, pSock, sCtl, pCtl, xSock] = ['s.sock', 'p.sock', 's.ctl', 'p.ctl', 'x.sock'].map((f) => join(dir, f)) as [string, string, string, string, string];
  const s = await serve([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sCtl, '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${toP}?listen=127.0.0.1:${pb}`, ...beat, '--auto-failover', '--fence-hook', sHook]);
  let x = await unixProxy(dir, xSock, sSock);
  const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pCtl, '--replicate-to', unixUri(xSock), '--protocol', 'sync', '--node-id', 'alpha', '--peer-id', 'beta', '--heartbeat', `udp://127.0.0.1:${toS}?listen=127.0.0.1:${pa}`, ...beat, '--fencing', 'resource-and-stonith', '--fence-hook', pHook]);
  await firstCheckpoint(pCtl);
  return {
    s,
    p,
    sCtl,
    pCtl,
    pUri: unixUri(pSock),
    cutHeartbeat: async () => {
      for (const c of cut) await c.close();
    },
    /** the secondary's beats to the primary dropped (its Outdated report never arrives); the primary's still go */
    muteSecondary: () => cut[1]!.drop(true),
    cutLink: () => x.stop('SIGKILL'),
    /** the link's proxy stopped (SIGSTOP): what is sent on it stays in flight */
    stallLink: () => void x.child.kill('SIGSTOP'),
    restoreLink: async () => {
      await rm(xSock, { force: true });
      x = await unixProxy(dir, xSock, sSock);
    },
    stopAll: async () => {
      await writeFile(join(dir, 'fence.go'), '').catch(() => {}); // a hook still waiting ends
      await p.stop('SIGKILL').catch(() => {});
      await x.stop('SIGKILL').catch(() => {});
      await s.stop('SIGKILL').catch(() => {});
      for (const c of cut) await c.close().catch(() => {});
    },
  };
}

const names = (w: { events: Array<{ event: string }> }, from = 0): string[] => w.events.slice(from).map((e) => e.event);

describe('a sync primary with --fencing resource-and-stonith loses its data link (two daemons)', () => {
  it('link and heartbeat cut, a write issued, the primary killed -9: the write was never acknowledged, the secondary fails over to a disk holding every acknowledged write', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'fence.exit'), '5');
    const t = await pair(dir, { relays: true });
    const wp = await watch(t.pCtl, P_EVENTS);
    const ws = await watch(t.sCtl, S_EVENTS);
    let issued: Started | undefined;
    try {
      expect((await run('qemu-io', ['-f', 'raw', t.pUri, '-c', 'write -P 0x11 0 64k'])).code).toBe(0);
      expect((await request<{ epoch: number }>(t.pCtl, 'checkpoint')).epoch).toBe(2);
      const cp2 = await readFile(join(dir, 's.img'));
      expect(sha(cp2)).toBe(sha(await readFile(join(dir, 'p.img'))));

      // the heartbeat first (no beat carries the primary's new generation), then the data link
      await t.cutHeartbeat();
      await t.cutLink();
      await waitFor(() => wp.events.find((e) => e.event === 'replication-degraded'), 'the primary to lose its link');
      // W, issued once the primary knows its link is lost, long before its peer is declared dead
      // (1 s): held (before the fix it was acknowledged at once, on the primary's disk alone)
      issued = writer(t.pUri, 0x33, 128 * KiB);
      const w = issued;
      await waitFor(async () => exited(w) || (await io(t.pCtl)).waiting === 1, 'the write to wait at the gate (or be acknowledged)');
      expect(exited(w) ? `acknowledged, exit ${w.child.exitCode}` : 'waiting').toBe('waiting');
      expect(wp.events.find((e) => e.event === 'peer-dead')).toBeUndefined();
      expect(await io(t.pCtl)).toMatchObject({ state: 'suspended', cause: 'link-lost' });
      await waitFor(async () => (await readFile(join(dir, 'fence.log'), 'utf8').catch(() => '')) !== '', 'the fence hook to run');
      expect((await io(t.pCtl)).reason).toBe('--fencing resource-and-stonith: the data link to peer "beta" was lost (link-down); the fence hook runs');
      // the primary hears its peer dead too: the hook is not run a second time meanwhile
      await waitFor(() => wp.events.find((e) => e.event === 'peer-dead'), 'the primary to declare its peer dead', { timeoutMs: 10_000 });
      expect(names(wp)).toEqual(['replication-degraded', 'io-suspended', 'peer-dead']);
      expect(wp.events[0]).toMatchObject({ reason: 'link-down' });
      expect(wp.events[1]).toMatchObject({ cause: 'link-lost' });
      expect(exited(issued)).toBe(false);

      // the primary dies with W unacknowledged
      await t.p.stop('SIGKILL');
      const wExit = await issued.exited;
      expect(wExit.code).not.toBe(0);
      expect((await readFile(join(dir, 'fence.log'), 'utf8')).trim().split('\n')).toEqual(['alpha fenced beta']);

      // the secondary (Consistent: it never heard the new generation) fences and promotes checkpoint 2
      const done = await waitFor(() => ws.events.find((e) => e.event === 'auto-failover'), 'auto-failover on the secondary', { timeoutMs: 20_000 });
      // (on a loaded machine the secondary may go suspect and hear the primary again, on the link,
      // between the heartbeat's cut and the link's: suspect/alive before the last suspect, nothing else)
      const seen = names(ws);
      const last = seen.lastIndexOf('peer-suspect');
      expect(seen.slice(last)).toEqual(['peer-suspect', 'peer-dead', 'fence', 'failover-started', 'failover-done', 'auto-failover']);
      expect(seen.slice(0, last).filter((n) => n !== 'peer-suspect' && n !== 'peer-alive')).toEqual([]);
      expect(done).toMatchObject({ peer: 'alpha', failedOver: true, fence: 'fenced', code: null });
      expect(ws.events.find((e) => e.event === 'failover-done')).toMatchObject({ epoch: 2 });
      // every write acknowledged by the primary is on the disk the secondary serves: checkpoint 2 exactly
      const disk = await readFile(join(dir, 's.img'));
      expect(disk.subarray(0, 64 * KiB).equals(Buffer.alloc(64 * KiB, 0x11))).toBe(true);
      expect(sha(disk)).toBe(sha(cp2));
    } finally {
      issued?.child.kill('SIGKILL');
      await wp.client.close().catch(() => {});
      await ws.client.close();
      await t.stopAll();
    }
  });

  // the next two: the primary's beats reach the secondary, the secondary's are dropped, so its
  // Outdated report (which lifts the freeze: the last test) never arrives; dead after 30 s only
  it('link cut, the secondary\'s beats lost: the hook exiting 5 keeps writes frozen; resume-io lets them go; link back lifts the next freeze; a hook exiting 4 lifts the third', async () => {
    const dir = await makeTempDir();
    const t = await pair(dir, { relays: true, misses: 300 });
    const wp = await watch(t.pCtl, P_EVENTS);
    const go = (): Promise<void> => writeFile(join(dir, 'fence.go'), '');
    try {
      // 1. hook exits 5: frozen; resume-io
      await writeFile(join(dir, 'fence.exit'), '5');
      t.muteSecondary();
      await t.cutLink();
      await waitFor(() => wp.events.find((e) => e.event === 'io-suspended'), 'the primary to freeze');
      const w1 = writer(t.pUri, 0x41, 0);
      await waitFor(async () => (await io(t.pCtl)).waiting === 1, 'w1 to wait');
      await go();
      await waitFor(() => wp.events.find((e) => e.event === 'fence'), 'the hook to finish');
      expect(await io(t.pCtl)).toMatchObject({ state: 'suspended', cause: 'link-lost', waiting: 1 });
      expect(exited(w1)).toBe(false);
      expect(await request(t.pCtl, 'resume-io')).toEqual({ resumed: true, waiting: 1 });
      expect((await w1.exited).code).toBe(0);
      expect(names(wp)).toEqual(['replication-degraded', 'io-suspended', 'fence', 'io-resumed']);
      expect(wp.events[2]).toMatchObject({ peer: 'beta', exitCode: 5, proceed: false, policy: 'resource-and-stonith', cause: 'link-lost' });
      expect(wp.events[3]).toMatchObject({ by: 'resume-io', waiting: 1 });

      // 2. the link back: the resync carries w1; the next loss freezes again, the link's return lifts it
      await t.restoreLink();
      await waitFor(() => wp.events.find((e) => e.event === 'replication-connected'), 'the link back', { timeoutMs: 20_000 });
      let mark = wp.events.length;
      await t.cutLink();
      await waitFor(() => wp.events.slice(mark).find((e) => e.event === 'io-suspended'), 'the second freeze');
      const w2 = writer(t.pUri, 0x42, 64 * KiB);
      await waitFor(async () => (await io(t.pCtl)).waiting === 1, 'w2 to wait');
      await t.restoreLink();
      await waitFor(() => wp.events.slice(mark).find((e) => e.event === 'io-resumed'), 'the link back to lift the freeze', { timeoutMs: 20_000 });
      expect((await w2.exited).code).toBe(0);
      await waitFor(() => wp.events.slice(mark).find((e) => e.event === 'replication-connected'), 'forwarding again', { timeoutMs: 20_000 });
      await go(); // the second loss's hook (exit 5) ends; its verdict changes nothing now
      await waitFor(() => wp.events.slice(mark).find((e) => e.event === 'fence'), 'the second hook to finish');
      expect(names(wp, mark)).toEqual(['replication-degraded', 'io-suspended', 'io-resumed', 'replication-connected', 'fence']);
      expect(wp.events[mark + 2]).toMatchObject({ by: 'link-back', waiting: 1 });
      expect(sha(await readFile(join(dir, 's.img')))).toBe(sha(await readFile(join(dir, 'p.img'))));

      // 3. the hook exits 4 (peer outdated): writes resume
      await writeFile(join(dir, 'fence.exit'), '4');
      mark = wp.events.length;
      await t.cutLink();
      await waitFor(() => wp.events.slice(mark).find((e) => e.event === 'io-suspended'), 'the third freeze');
      const w3 = writer(t.pUri, 0x43, 128 * KiB);
      await waitFor(async () => (await io(t.pCtl)).waiting === 1, 'w3 to wait');
      expect(exited(w3)).toBe(false);
      await go();
      expect((await w3.exited).code).toBe(0);
      expect(names(wp, mark)).toEqual(['replication-degraded', 'io-suspended', 'fence', 'io-resumed']);
      expect(wp.events[mark + 2]).toMatchObject({ exitCode: 4, proceed: true, cause: 'link-lost' });
      expect(wp.events[mark + 3]).toMatchObject({ by: 'fence', waiting: 1 });
      expect(await io(t.pCtl)).toMatchObject({ state: 'open', cause: null });
      expect((await readFile(join(dir, 'fence.log'), 'utf8')).trim().split('\n')).toEqual(['alpha fenced beta', 'alpha fenced beta', 'alpha fenced beta']);
    } finally {
      await wp.client.close().catch(() => {});
      await t.stopAll();
    }
  });

  it('a write in flight when the link breaks (its forward cut): on the primary disk, not acknowledged until resume-io', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'fence.exit'), '5');
    const t = await pair(dir, { relays: true, misses: 300 });
    const wp = await watch(t.pCtl, P_EVENTS);
    let w: Started | undefined;
    try {
      t.muteSecondary();
      t.stallLink();
      w = writer(t.pUri, 0x5e, 192 * KiB);
      const inFlight = w;
      // the local write done, the forward held in the stopped proxy
      await waitFor(async () => (await readFile(join(dir, 'p.img'))).subarray(192 * KiB, 256 * KiB).equals(Buffer.alloc(64 * KiB, 0x5e)), 'the local write');
      expect(exited(inFlight)).toBe(false);
      expect(wp.events).toEqual([]);
      await t.cutLink();
      await waitFor(() => wp.events.find((e) => e.event === 'replication-degraded'), 'the primary to lose its link');
      // completed below the gate (before: acknowledged here, on this disk alone), held at it
      await waitFor(async () => exited(inFlight) || (await io(t.pCtl)).waiting === 1, 'the write held (or acknowledged)');
      expect(exited(inFlight) ? `acknowledged, exit ${inFlight.child.exitCode}` : 'held').toBe('held');
      expect(await io(t.pCtl)).toMatchObject({ state: 'suspended', cause: 'link-lost' });
      await writeFile(join(dir, 'fence.go'), '');
      await waitFor(() => wp.events.find((e) => e.event === 'fence'), 'the hook (exit 5)');
      expect(exited(inFlight)).toBe(false);
      expect(await request(t.pCtl, 'resume-io')).toEqual({ resumed: true, waiting: 1 });
      expect((await inFlight.exited).code).toBe(0);
      expect(names(wp)).toEqual(['replication-degraded', 'io-suspended', 'fence', 'io-resumed']);
    } finally {
      w?.child.kill('SIGKILL');
      await wp.client.close().catch(() => {});
      await t.stopAll();
    }
  });

  it('link cut, heartbeat alive both ways: the secondary hears the new generation, reports its disk Outdated (beat version 2), and that lifts the freeze while the hook still runs', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'fence.exit'), '5');
    const t = await pair(dir, { relays: false });
    const wp = await watch(t.pCtl, [...P_EVENTS, 'peer-outdated']);
    let w: Started | undefined;
    try {
      const gi = async (ctl: string): Promise<string> => (await pairOf<{ gi: { current: string } }>(ctl)).gi.current;
      const before = await gi(t.sCtl);
      await t.cutLink();
      await waitFor(() => wp.events.find((e) => e.event === 'io-suspended'), 'the primary to freeze');
      w = writer(t.pUri, 0x6f, 256 * KiB);
      const held = w;
      // the hook (gated: it never finishes in this test) runs; the secondary's word comes first
      await waitFor(async () => (await readFile(join(dir, 'fence.log'), 'utf8').catch(() => '')) !== '', 'the fence hook to run');
      await waitFor(() => wp.events.find((e) => e.event === 'io-resumed'), 'the Outdated report to lift the freeze', { timeoutMs: 15_000 });
      expect((await held.exited).code).toBe(0);
      expect(names(wp)).toEqual(['replication-degraded', 'io-suspended', 'peer-outdated', 'io-resumed']);
      expect(wp.events[1]).toMatchObject({ cause: 'link-lost' });
      expect(wp.events[2]).toMatchObject({ peer: 'beta', export: '', generation: before });
      expect(wp.events[3]).toMatchObject({ by: 'peer-outdated' });
      expect(await pairOf<{ diskState: string; gi: { current: string } }>(t.sCtl)).toMatchObject({ diskState: 'Outdated', gi: { current: before } });
      expect(await gi(t.pCtl)).not.toBe(before);
      expect(await io(t.pCtl)).toMatchObject({ state: 'open', cause: null });
      expect((await readFile(join(dir, 'p.img'))).subarray(256 * KiB, 320 * KiB).equals(Buffer.alloc(64 * KiB, 0x6f))).toBe(true);
    } finally {
      w?.child.kill('SIGKILL');
      await wp.client.close().catch(() => {});
      await t.stopAll();
    }
  });
});
