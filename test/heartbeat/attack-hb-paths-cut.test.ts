/**
 * Attack (session 15, hb 1): every heartbeat path cut while the pair's data link stays up and the
 * primary is alive (two daemons; the udp heartbeat goes through relays in this process, closed to
 * cut it; the pair link is a Unix socket left alone).
 *
 * The replication link is itself evidence that the peer lives (DRBD's ping on the replication
 * connection; corosync counts any ring): both daemons ping on the pair link once per heartbeat
 * interval and a pong counts as a path. The secondary must not declare the primary dead (no
 * fence, no takeover) while the primary still replicates to it, and the primary's quorum
 * (--on-no-quorum io-error) holds: its writes still reach both disks. An event says the heartbeat
 * paths are down while the peer answers over the link, and another when they come back.
 * Before: the secondary declared the primary dead after interval × misses, fenced it and
 * promoted itself while the primary was replicating to it (two primaries).
 */
import { createHash } from 'node:crypto';
import dgram from 'node:dgram';
import { access, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request, pairOf, firstCheckpoint } from '../support/control.js';
import { fenceHook, freeUdpPort, pairKey, sparseImages, watch } from '../support/heartbeat.js';
import { makeTempDir, run, serve, unixUri, waitFor } from '../support/spawn.js';

const SIZE = 4 << 20;
const EVENTS = ['peer-suspect', 'peer-dead', 'peer-alive', 'fence', 'auto-failover', 'failover-started', 'demoted', 'io-suspended', 'heartbeat-paths-down', 'heartbeat-paths-up'];
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** udp datagrams to `listen` go on to `target`, until closed */
async function relay(listen: number, target: number): Promise<() => Promise<void>> {
  const sock = dgram.createSocket('udp4');
  sock.on('message', (msg) => sock.send(msg, target, '127.0.0.1'));
  await new Promise<void>((resolve) => sock.bind(listen, '127.0.0.1', resolve));
  return () => new Promise((resolve) => sock.close(() => resolve()));
}

interface Hb {
  heartbeat: { state: string; paths: Array<{ state: string }>; link: { state: string; pongs: number } | null };
}

describe('every heartbeat path cut, the pair link up (two daemons)', () => {
  it('the secondary never declares the live primary dead: no fence, no takeover; the primary keeps quorum and both disks get its writes', async () => {
    const dir = await makeTempDir();
    await sparseImages(dir, SIZE);
    const key = await pairKey(dir);
    const fenced = join(dir, 'fenced');
    const hook = await fenceHook(dir, 7, fenced);
    // p listens on la and sends to ra; the relay at ra forwards to s's lb, the relay at rb to p's la
    const [la, lb, ra, rb] = [await freeUdpPort(), await freeUdpPort(), await freeUdpPort(), await freeUdpPort()];
    let relays = [await relay(ra, lb), await relay(rb, la)];
    const beat = ['--heartbeat-key', key, '--heartbeat-interval', '0.1', '--heartbeat-misses', '5'];
    const [sSock, pSock, sCtl, pCtl] = ['s.sock', 'p.sock', 's.ctl', 'p.ctl'].map((f) => join(dir, f)) as [string, string, string, string];
    const s = await serve([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sCtl, '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${rb}?listen=127.0.0.1:${lb}`, ...beat, '--auto-failover', '--fence-hook', hook]);
    const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pCtl, '--replicate-to', unixUri(sSock), '--protocol', 'sync', '--node-id', 'alpha', '--peer-id', 'beta', '--heartbeat', `udp://127.0.0.1:${ra}?listen=127.0.0.1:${la}`, ...beat, '--on-no-quorum', 'io-error']);
    const hb = async (ctl: string): Promise<Hb['heartbeat']> => (await request<Hb>(ctl, 'status')).heartbeat;
    try {
      await firstCheckpoint(pCtl);
      await waitFor(async () => (await hb(sCtl)).state === 'alive' && (await hb(pCtl)).state === 'alive' && (await hb(sCtl)).link?.state === 'alive' && (await hb(pCtl)).link?.state === 'alive', 'both to hear each other on the heartbeat and the link');
      const ws = await watch(sCtl, EVENTS);
      const wp = await watch(pCtl, EVENTS);
      try {
        const pUri = unixUri(pSock);
        expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', 'write -P 0x11 0 64k'])).code).toBe(0);

        // the heartbeat cut both ways; the pair link untouched
        for (const close of relays) await close();
        await waitFor(() => ws.events.find((e) => e.event === 'heartbeat-paths-down'), 'the secondary to say its heartbeat paths are down', { timeoutMs: 10_000 });
        await waitFor(() => wp.events.find((e) => e.event === 'heartbeat-paths-down'), 'the primary to say its heartbeat paths are down', { timeoutMs: 10_000 });
        // twenty more pongs on the link (two seconds, four times the death bound): the peer stays alive on both sides
        const pongs = (await hb(sCtl)).link!.pongs;
        await waitFor(async () => (await hb(sCtl)).link!.pongs >= pongs + 20, '20 more pongs on the pair link', { timeoutMs: 20_000 });
        const sh = await hb(sCtl);
        expect(sh.state).toBe('alive');
        expect(sh.paths.map((x) => x.state)).toEqual(['dead']);
        expect(sh.link!.state).toBe('alive');
        expect(ws.events.map((e) => e.event)).toEqual(['heartbeat-paths-down']);
        expect(ws.events[0]).toMatchObject({ peer: 'alpha', link: { state: 'alive' }, paths: [{ state: 'dead' }] });
        expect(wp.events.map((e) => e.event)).toEqual(['heartbeat-paths-down']);
        expect(await pairOf<{ role: string; link: string }>(sCtl)).toMatchObject({ role: 'secondary', link: 'connected' });
        await expect(access(fenced)).rejects.toThrow();

        // the primary still has quorum (over the link) and replicates: both disks get the write
        expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', 'write -P 0x22 64k 64k'])).code).toBe(0);
        expect((await request<{ epoch: number }>(pCtl, 'checkpoint')).epoch).toBe(2);
        const pDisk = await readFile(join(dir, 'p.img'));
        expect(pDisk.subarray(64 << 10, 128 << 10).equals(Buffer.alloc(64 << 10, 0x22))).toBe(true);
        expect(sha(await readFile(join(dir, 's.img')))).toBe(sha(pDisk));

        // the heartbeat back: said once on each side, nothing else happened
        relays = [await relay(ra, lb), await relay(rb, la)];
        await waitFor(() => ws.events.find((e) => e.event === 'heartbeat-paths-up') && wp.events.find((e) => e.event === 'heartbeat-paths-up'), 'both to say the heartbeat paths are back', { timeoutMs: 10_000 });
        expect(ws.events.map((e) => e.event)).toEqual(['heartbeat-paths-down', 'heartbeat-paths-up']);
        expect(wp.events.map((e) => e.event)).toEqual(['heartbeat-paths-down', 'heartbeat-paths-up']);
      } finally {
        await ws.client.close();
        await wp.client.close();
      }
    } finally {
      await p.stop('SIGKILL').catch(() => {});
      await s.stop('SIGKILL').catch(() => {});
      for (const close of relays) await close().catch(() => {});
    }
  });
});
