/**
 * Automatic failover end to end, with the pair: two real daemons, the primary (--replicate-to)
 * and the secondary (--secondary --auto-failover --fence-hook), beating to each other over udp.
 * - kill -9 the primary: the secondary says peer-suspect, peer-dead, fences, fails over; its disk
 *   is the last checkpoint byte for byte; beats carried the primary's term and generation.
 * - a lossy path (30 % of datagrams dropped by a seeded userspace proxy) beside a clean one: no
 *   suspicion, no failover.
 * - a checkpoint in flight when the primary dies: the failover waits for it (failover-deferred)
 *   and lands on that checkpoint.
 * - kill -STOP the primary past the bound, the secondary takes over, -CONT: the old primary's
 *   writes fail (qemu-io sees EIO), it finds itself demoted, and its disk is unchanged.
 */
import dgram from 'node:dgram';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { seededRandom } from '../../src/block/filters/error.js';
import { makeTempDir, run, runCli, serve, start, unixUri, waitFor } from '../support/spawn.js';
import { controlRequest as request, firstCheckpoint } from '../support/control.js';
import { fenceHook, freeUdpPort, pairKey, sparseImages, watch as watchEvents, type HeartbeatPair, type Watched } from '../support/heartbeat.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const HALF = SIZE / 2;
const EVENTS = ['peer-alive', 'peer-suspect', 'peer-dead', 'fence', 'failover-deferred', 'failover-started', 'failover-done', 'failover-failed', 'auto-failover', 'demoted', 'io-suspended', 'io-resumed', 'checkpoint'];

interface Status {
  exports: Array<{ name: string; pair?: { role: string; epoch: number; gi: { current: string }; secondary?: { checkpointing: number | null } } }>;
  heartbeat: { state: string; term: string; io: { state: string } | null; beatVersion?: number; peerAnnounced: { epoch: string; generation: string; primary: boolean; version?: number; exports?: unknown } | null; paths: Array<{ uri: string; beats: number; state: string }> };
}

const status = (control: string): Promise<Status> => request<Status>(control, 'status');
const pairOf = async (control: string) => (await status(control)).exports.find((e) => e.pair)!.pair!;

const watch = (control: string): Promise<Watched> => watchEvents(control, EVENTS);

const names = (w: Watched, from = 0, except = ['peer-alive', 'checkpoint']): string[] => w.events.slice(from).map((e) => e.event).filter((n) => !except.includes(n));
/** the heartbeat's events and the fencing's, each in order (the two run side by side after a kill) */
const heartbeat = (w: Watched): string[] => names(w).filter((n) => n.startsWith('peer-'));
const fencing = (w: Watched): string[] => names(w).filter((n) => !n.startsWith('peer-'));

/** A udp relay that drops each datagram with probability `loss` (seeded), both ways. */
async function lossyRelay(listenPort: number, target: number, loss: number, seed: number): Promise<{ close: () => Promise<void>; dropped: () => number }> {
  const random = seededRandom(seed);
  const sock = dgram.createSocket('udp4');
  let dropped = 0;
  sock.on('message', (msg) => {
    if (random() < loss) {
      dropped++;
      return;
    }
    sock.send(msg, target, '127.0.0.1');
  });
  await new Promise<void>((resolve) => sock.bind(listenPort, '127.0.0.1', resolve));
  return { close: () => new Promise((resolve) => sock.close(() => resolve())), dropped: () => dropped };
}

interface Pair extends Omit<HeartbeatPair, 'pArgs' | 'sArgs'> {
  fenced: string;
  relays: Array<{ close: () => Promise<void>; dropped: () => number }>;
}

interface PairOptions {
  fenceExit?: number;
  /** extra flags */
  p?: string[];
  s?: string[];
  /** a second udp path through a relay dropping this share of datagrams */
  lossy?: number;
  interval?: string;
  /** the primary's --fencing, with its own hook exiting `exit` */
  pFencing?: { policy: string; exit: number };
}

async function startPair(o: PairOptions = {}): Promise<Pair> {
  const dir = await makeTempDir();
  await sparseImages(dir, SIZE);
  const key = await pairKey(dir);
  const fenced = join(dir, 'fenced');
  const hook = await fenceHook(dir, o.fenceExit ?? 7, fenced);
  const pFence: string[] = [];
  if (o.pFencing) pFence.push('--fencing', o.pFencing.policy, '--fence-hook', await fenceHook(dir, o.pFencing.exit, fenced, 'p-fence.sh'));
  const [pa, pb] = [await freeUdpPort(), await freeUdpPort()];
  const pPaths = ['--heartbeat', `udp://127.0.0.1:${pb}?listen=127.0.0.1:${pa}`];
  const sPaths = ['--heartbeat', `udp://127.0.0.1:${pa}?listen=127.0.0.1:${pb}`];
  const relays: Pair['relays'] = [];
  if (o.lossy !== undefined) {
    // p listens on la and sends to ra; the relay at ra forwards to s's lb, the relay at rb to p's la
    const [la, lb, ra, rb] = [await freeUdpPort(), await freeUdpPort(), await freeUdpPort(), await freeUdpPort()];
    relays.push(await lossyRelay(ra, lb, o.lossy, 11), await lossyRelay(rb, la, o.lossy, 12));
    pPaths.push('--heartbeat', `udp://127.0.0.1:${ra}?listen=127.0.0.1:${la}`);
    sPaths.push('--heartbeat', `udp://127.0.0.1:${rb}?listen=127.0.0.1:${lb}`);
  }
  const beat = ['--heartbeat-key', key, '--heartbeat-interval', o.interval ?? '0.1', '--heartbeat-misses', '5'];
  const sSock = join(dir, 's.sock');
  const pSock = join(dir, 'p.sock');
  const sCtl = join(dir, 's.ctl');
  const pCtl = join(dir, 'p.ctl');
  const s = await serve([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sCtl, '--node-id', 'beta', '--peer-id', 'alpha', ...sPaths, ...beat, '--auto-failover', '--fence-hook', hook, ...(o.s ?? [])]);
  const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pCtl, '--replicate-to', unixUri(sSock), '--protocol', 'sync', '--node-id', 'alpha', '--peer-id', 'beta', ...pPaths, ...beat, ...pFence, ...(o.p ?? [])]);
  await firstCheckpoint(pCtl);
  await waitFor(async () => (await status(sCtl)).heartbeat.state === 'alive' && (await status(pCtl)).heartbeat.state === 'alive', 'both to hear each other');
  return { dir, p, s, pCtl, sCtl, pSock, sSock, fenced, relays };
}

async function client(socket: string): Promise<NbdClient> {
  return NbdClient.connect({ uri: unixUri(socket), reconnect: false, closeTimeoutMs: 2000 });
}

async function readAll(socket: string): Promise<Buffer> {
  const c = await client(socket);
  try {
    const b = Buffer.alloc(SIZE);
    await c.read(0, b);
    return b;
  } finally {
    await c.close();
  }
}

function firstNot(b: Buffer, byte: number): number {
  for (let i = 0; i < b.length; i++) if (b[i] !== byte) return i;
  return -1;
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('automatic failover with the pair (two daemons, udp heartbeat)', () => {
  it('kill -9 the primary: suspect, dead, fenced, failed over within the bound; the disk is the last checkpoint byte for byte', async () => {
    const pair = await startPair();
    const w = await watch(pair.sCtl);
    try {
      // the beats carry the primary's term (1) and its generation, and say it is primary
      const pGi = (await pairOf(pair.pCtl)).gi.current;
      const sHb = (await status(pair.sCtl)).heartbeat;
      // (beat version 1 or 2: each node sends 2 once it heard the other say it decodes it)
      expect(sHb.peerAnnounced).toMatchObject({ incarnation: expect.any(String), epoch: '1', generation: pGi, primary: true });
      await waitFor(async () => (await status(pair.pCtl)).heartbeat.peerAnnounced !== null, "the primary to hear the secondary's first signed beat");
      expect((await status(pair.pCtl)).heartbeat).toMatchObject({ term: '1', peerAnnounced: { epoch: '0', primary: false } });
      // version 2 both ways: the pair's entry, named by the replica export ("", the default), at each side's generation
      // (polled: what a side announces reaches the other with its next beat; CI once read the primary's status a beat early)
      await expect.poll(async () => (await status(pair.sCtl)).heartbeat, { timeout: 10_000 }).toMatchObject({ beatVersion: 2, peerAnnounced: { epoch: '1', generation: pGi, primary: true, version: 2, exports: [{ name: '', generation: pGi, outdated: false, primary: true }] } });
      await expect.poll(async () => (await status(pair.pCtl)).heartbeat, { timeout: 10_000 }).toMatchObject({ beatVersion: 2, peerAnnounced: { version: 2, exports: [{ name: '', generation: pGi, outdated: false, primary: false }] } });

      const pc = await client(pair.pSock);
      await pc.write(0, Buffer.alloc(SIZE, 0x11));
      await pc.flush();
      expect((await request<{ epoch: number }>(pair.pCtl, 'checkpoint')).epoch).toBe(2);
      await pc.write(HALF, Buffer.alloc(HALF, 0x22));
      await pc.flush();
      await pc.close();
      const mark = w.events.length;
      const killedAt = performance.now();
      pair.p.child.kill('SIGKILL');
      const done = await waitFor(() => w.events.slice(mark).find((e) => e.event === 'auto-failover'), 'auto-failover on the secondary', { timeoutMs: 20_000 });
      expect(names(w, mark)).toEqual(['peer-suspect', 'peer-dead', 'fence', 'failover-started', 'failover-done', 'auto-failover']);
      const dead = w.events.slice(mark).find((e) => e.event === 'peer-dead')!;
      expect(dead.silentMs as number).toBeGreaterThanOrEqual(500);
      expect(done).toMatchObject({ peer: 'alpha', failedOver: true, fence: 'fenced', code: null });
      expect(w.events.slice(mark).find((e) => e.event === 'failover-done')).toMatchObject({ epoch: 2, to: 'checkpoint' });
      // the bound with these settings: 0.5 s of silence, the hook, the failover of an 8 MiB disk
      expect(done.at - killedAt).toBeLessThan(5_000);
      expect(await readFile(pair.fenced, 'utf8')).toBe('beta fenced alpha\n');
      // the checkpoint's data, not the primary's later writes
      const disk = await readAll(pair.sSock);
      expect(firstNot(disk, 0x11)).toBe(-1);
      // the new primary announces term 2
      await waitFor(async () => (await status(pair.sCtl)).heartbeat.term === '2', 'term 2 on the new primary');
      expect(await pairOf(pair.sCtl)).toMatchObject({ role: 'primary', epoch: 2 });
    } finally {
      await w.client.close();
    }
  });

  it('30 % loss on one of two paths (seeded relay): the lossy path loses beats, the peer is never suspect while the clean path is heard, no failover', async () => {
    const pair = await startPair({ lossy: 0.3, interval: '0.05' });
    const w = await watch(pair.sCtl);
    try {
      const mark = w.events.length;
      const before = (await status(pair.sCtl)).heartbeat.paths.map((p) => p.beats);
      // 8 s at 20 beats/s: 160 beats each way on each path
      await waitFor(async () => (await status(pair.sCtl)).heartbeat.paths[0]!.beats - before[0]! >= 160, '160 more beats on the clean path', { timeoutMs: 30_000, intervalMs: 250 });
      const paths = (await status(pair.sCtl)).heartbeat.paths;
      const clean = paths[0]!.beats - before[0]!;
      const lossy = paths[1]!.beats - before[1]!;
      expect(pair.relays[0]!.dropped()).toBeGreaterThan(0);
      // about 70 % of the beats came through the relay
      expect(lossy / clean).toBeGreaterThan(0.55);
      expect(lossy / clean).toBeLessThan(0.85);
      // no death, no fence, no failover
      expect(names(w, mark, ['peer-alive', 'checkpoint', 'peer-suspect'])).toEqual([]);
      // the lossy path alone is often silent for two intervals (two drops in a row: 9 % of beats);
      // the peer is suspect only when the clean path is silent too: a node that did not run for
      // 100 ms on a loaded host (the sender's stall, which no detector can tell from a death; the
      // receiver's own stall is not one since service.ts checks after reading), never the loss
      for (const e of w.events.slice(mark).filter((x) => x.event === 'peer-suspect')) {
        const clean = (e.paths as Array<{ state: string; lastBeatAgoMs: number }>)[0]!;
        expect({ clean, silentMs: e.silentMs }).toMatchObject({ clean: { state: 'suspect', lastBeatAgoMs: expect.toSatisfy((ms: number) => ms >= 100) }, silentMs: expect.toSatisfy((ms: number) => ms >= 100) });
      }
      expect(await pairOf(pair.sCtl)).toMatchObject({ role: 'secondary' });
    } finally {
      await w.client.close();
      for (const r of pair.relays) await r.close();
    }
  });

  it('a checkpoint in flight when the primary dies: the failover is deferred and lands on that checkpoint', async () => {
    // each flush of the secondary's export takes 1.5 s, so checkpoint 3 is caught in its step 4
    const pair = await startPair({ s: ['--filter', 'delay:flush=1500'] });
    const w = await watch(pair.sCtl);
    try {
      const pc = await client(pair.pSock);
      await pc.write(0, Buffer.alloc(SIZE, 0x11));
      await pc.flush();
      expect((await request<{ epoch: number }>(pair.pCtl, 'checkpoint')).epoch).toBe(2);
      await pc.write(HALF, Buffer.alloc(HALF, 0x22));
      await pc.flush();
      await pc.close();
      const cp = request<{ epoch: number }>(pair.pCtl, 'checkpoint').catch(() => null);
      await waitFor(async () => (await pairOf(pair.sCtl)).secondary?.checkpointing === 3, 'checkpoint 3 under way on the secondary', { intervalMs: 20 });
      const mark = w.events.length;
      pair.p.child.kill('SIGKILL');
      await cp;
      const done = await waitFor(() => w.events.slice(mark).find((e) => e.event === 'auto-failover'), 'auto-failover', { timeoutMs: 20_000 });
      expect(done).toMatchObject({ failedOver: true });
      const seen = names(w, mark);
      expect(seen).toEqual(['peer-suspect', 'peer-dead', 'fence', 'failover-deferred', 'failover-started', 'failover-done', 'auto-failover']);
      expect(w.events.find((e) => e.event === 'failover-deferred')).toMatchObject({ peer: 'alpha', checkpoint: 3 });
      expect(w.events.slice(mark).find((e) => e.event === 'failover-done')).toMatchObject({ epoch: 3 });
      const disk = await readAll(pair.sSock);
      expect(firstNot(disk.subarray(0, HALF), 0x11)).toBe(-1);
      expect(firstNot(disk.subarray(HALF), 0x22)).toBe(-1);
    } finally {
      await w.client.close();
    }
  });

  it('kill -STOP the primary past the bound: the secondary takes over; after -CONT the old primary is demoted, qemu-io gets EIO, its disk is unchanged', async () => {
    const pair = await startPair({ fenceExit: 4, p: ['--on-no-quorum', 'io-error'] });
    const w = await watch(pair.sCtl);
    const pw = await watch(pair.pCtl);
    try {
      const uri = unixUri(pair.pSock);
      const first = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x11 0 1M', '-c', 'flush']);
      expect(first.code, first.stderr).toBe(0);
      expect((await request<{ epoch: number }>(pair.pCtl, 'checkpoint')).epoch).toBe(2);
      const before = sha(await readFile(join(pair.dir, 'p.img')));
      const mark = w.events.length;
      pair.p.child.kill('SIGSTOP');
      await waitFor(() => w.events.slice(mark).find((e) => e.event === 'auto-failover'), 'auto-failover on the secondary', { timeoutMs: 20_000 });
      expect(names(w, mark)).toEqual(['peer-suspect', 'peer-dead', 'fence', 'failover-started', 'failover-done', 'auto-failover']);
      pair.p.child.kill('SIGCONT');
      // the first write after the pause: refused whether the silence or the new primary's beat is seen first
      const late = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x66 0 64k']);
      expect(late.stdout + late.stderr).toContain('Input/output error');
      await waitFor(() => pw.events.find((e) => e.event === 'demoted'), 'demoted on the old primary');
      expect((await status(pair.pCtl)).heartbeat).toMatchObject({ term: '1', io: { state: 'demoted' }, peerAnnounced: { epoch: '2', primary: true } });
      const again = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x77 0 64k']);
      expect(again.stdout + again.stderr).toContain('Input/output error');
      expect(await request(pair.pCtl, 'resume-io').catch((e: { code?: string }) => e.code)).toBe('ERR_DEMOTED');
      expect(sha(await readFile(join(pair.dir, 'p.img')))).toBe(before);
    } finally {
      await w.client.close();
      await pw.client.close();
    }
  });
});

describe('the stall guard: beats that queued up while the primary was stopped give no quorum back', () => {
  it('kill -STOP the primary past the bound, the secondary does not take over (hook exit 5): right after -CONT a write gets EIO; once a beat sent after the stall arrives, writes go again', async () => {
    // interval 0.25 s: quorum window 1 s, dead after 1.25 s, no quorum for 0.5 s after the stall
    const pair = await startPair({ fenceExit: 5, interval: '0.25', p: ['--on-no-quorum', 'io-error'] });
    const w = await watch(pair.sCtl);
    try {
      const uri = unixUri(pair.pSock);
      const mark = w.events.length;
      pair.p.child.kill('SIGSTOP');
      await waitFor(() => w.events.slice(mark).find((e) => e.event === 'fence'), 'the secondary\'s fence hook', { timeoutMs: 20_000 });
      pair.p.child.kill('SIGCONT');
      // the secondary's beats sent during the stop are read at once: without the guard they gave quorum back
      const late = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x66 0 64k']);
      expect(late.stdout + late.stderr).toContain('Input/output error');
      await waitFor(async () => {
        const r = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x67 0 64k']);
        return (r.stdout + r.stderr).includes('wrote 65536/65536 bytes') ? true : undefined;
      }, 'a write once quorum is back', { timeoutMs: 10_000, intervalMs: 100 });
      expect(names(w, mark).filter((n) => n !== 'peer-suspect')).toEqual(['peer-dead', 'fence', 'auto-failover']);
      expect((await status(pair.pCtl)).heartbeat.io).toMatchObject({ state: 'open' });
    } finally {
      await w.client.close();
    }
  });
});

describe('fencing on the primary (--fencing, --on-no-quorum, resume-io) seen by qemu-io', () => {
  /** the secondary killed -9; resolves once the primary says its peer is dead (and, with `w`, once w has the peer-dead event: it may come after the status) */
  async function peerKilled(pair: Pair, w?: { events: Array<{ event: string }> }): Promise<void> {
    pair.s.child.kill('SIGKILL');
    await pair.s.waitExit();
    await waitFor(async () => (await status(pair.pCtl)).heartbeat.state === 'dead', 'the primary to declare its peer dead', { timeoutMs: 10_000 });
    if (w) await waitFor(() => w.events.find((e) => e.event === 'peer-dead'), 'the peer-dead event', { timeoutMs: 10_000 });
  }

  it('resource-and-stonith, hook exit 5 (unreachable): writes freeze; qemu-io waits until blkrep resume-io, then its write lands', async () => {
    const pair = await startPair({ pFencing: { policy: 'resource-and-stonith', exit: 5 } });
    const pw = await watch(pair.pCtl);
    try {
      await peerKilled(pair, pw);
      await waitFor(() => pw.events.find((e) => e.event === 'fence'), 'the primary\'s fence hook');
      // the secondary killed -9 drops the data link first: the primary freezes and fences then
      // (session 16); its peer declared dead later is the same outage, not fenced again
      expect(fencing(pw)).toEqual(['io-suspended', 'fence']);
      expect(heartbeat(pw)).toEqual(['peer-suspect', 'peer-dead']);
      expect(pw.events.find((e) => e.event === 'io-suspended')).toMatchObject({ cause: 'link-lost' });
      expect(pw.events.find((e) => e.event === 'fence')).toMatchObject({ verdict: 'unreachable', exitCode: 5, proceed: false, policy: 'resource-and-stonith', cause: 'link-lost' });
      expect(await readFile(pair.fenced, 'utf8')).toBe('alpha fenced beta\n');
      const q = start('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x5a 1M 64k']);
      await waitFor(async () => (await status(pair.pCtl)).heartbeat.io?.state === 'suspended' && ((await status(pair.pCtl)).heartbeat.io as unknown as { waiting: number }).waiting === 1, 'qemu-io\'s write to wait');
      expect(q.child.exitCode).toBeNull();
      const r = await runCli(['resume-io', '--control', pair.pCtl, '--json']);
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toEqual({ resumed: true, waiting: 1 });
      expect((await q.waitExit()).code).toBe(0);
      expect(q.stdout()).toContain('wrote 65536/65536 bytes at offset 1048576');
      const disk = await readFile(join(pair.dir, 'p.img'));
      expect(firstNot(disk.subarray(MiB, MiB + 65536), 0x5a)).toBe(-1);
      expect(pw.events.find((e) => e.event === 'io-resumed')).toMatchObject({ by: 'resume-io', waiting: 1 });
      // nothing left to resume
      const again = await runCli(['resume-io', '--control', pair.pCtl]);
      expect(again.stdout).toContain('Writes were not suspended: nothing to resume.');
    } finally {
      await pw.client.close();
    }
  });

  it('resource-and-stonith, hook exit 7 (fenced): writes freeze while the hook runs and go again by themselves', async () => {
    const pair = await startPair({ pFencing: { policy: 'resource-and-stonith', exit: 7 } });
    const pw = await watch(pair.pCtl);
    try {
      await peerKilled(pair, pw);
      await waitFor(() => pw.events.find((e) => e.event === 'io-resumed'), 'writes resumed after the hook');
      expect(fencing(pw)).toEqual(['io-suspended', 'fence', 'io-resumed']);
      expect(heartbeat(pw)).toEqual(['peer-suspect', 'peer-dead']);
      expect(pw.events.find((e) => e.event === 'io-resumed')).toMatchObject({ by: 'fence' });
      const q = await run('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x5b 0 64k']);
      expect(q.code, q.stderr).toBe(0);
      expect(await readFile(pair.fenced, 'utf8')).toBe('alpha fenced beta\n');
    } finally {
      await pw.client.close();
    }
  });

  it('resource-only: the hook runs, writes never freeze', async () => {
    const pair = await startPair({ pFencing: { policy: 'resource-only', exit: 5 } });
    const pw = await watch(pair.pCtl);
    try {
      await peerKilled(pair, pw);
      await waitFor(() => pw.events.find((e) => e.event === 'fence'), 'the fence hook');
      expect(fencing(pw)).toEqual(['fence']);
      expect(heartbeat(pw)).toEqual(['peer-suspect', 'peer-dead']);
      expect(pw.events.find((e) => e.event === 'fence')).toMatchObject({ policy: 'resource-only', cause: 'link-lost' });
      expect(await readFile(pair.fenced, 'utf8')).toBe('alpha fenced beta\n');
      const q = await run('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x5c 0 64k']);
      expect(q.code, q.stderr).toBe(0);
    } finally {
      await pw.client.close();
    }
  });

  it('--on-no-quorum suspend-io: with the peer silent, qemu-io waits; resume-io lets it go', async () => {
    const pair = await startPair({ p: ['--on-no-quorum', 'suspend-io'] });
    const pw = await watch(pair.pCtl);
    try {
      await peerKilled(pair);
      const q = start('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x5d 2M 64k']);
      await waitFor(() => pw.events.find((e) => e.event === 'io-suspended'), 'io-suspended');
      expect(pw.events.find((e) => e.event === 'io-suspended')!.reason).toMatch(/^no-quorum/);
      await waitFor(async () => ((await status(pair.pCtl)).heartbeat.io as unknown as { waiting: number }).waiting === 1, 'the write to wait');
      expect(q.child.exitCode).toBeNull();
      expect(await request(pair.pCtl, 'resume-io')).toEqual({ resumed: true, waiting: 1 });
      expect((await q.waitExit()).code).toBe(0);
      // quorum is waived until the peer is heard again: the next write goes at once
      const next = await run('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x5e 0 64k']);
      expect(next.code, next.stderr).toBe(0);
    } finally {
      await pw.client.close();
    }
  });

  it('--on-no-quorum io-error: with the peer silent, qemu-io gets EIO and nothing is written', async () => {
    const pair = await startPair({ p: ['--on-no-quorum', 'io-error'] });
    await peerKilled(pair);
    const before = sha(await readFile(join(pair.dir, 'p.img')));
    const q = await run('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x5f 0 64k']);
    expect(q.stdout + q.stderr).toContain('write failed: Input/output error');
    expect(sha(await readFile(join(pair.dir, 'p.img')))).toBe(before);
  });
});

describe('fencing flags', () => {
  const usage = async (args: string[]) => {
    const r = await runCli(['serve-nbd', 'memory:1M', '--json', ...args]);
    return { code: r.code, error: JSON.parse(r.stdout.trim().split('\n')[0]!).error as { code: string; message: string } };
  };
  const hb = ['--heartbeat', 'udp://127.0.0.1:9', '--peer-id', 'b', '--node-id', 'a'];

  it('--fencing resource-only|resource-and-stonith needs --fence-hook', async () => {
    for (const policy of ['resource-only', 'resource-and-stonith']) {
      const r = await usage([...hb, '--fencing', policy]);
      expect(r.code).toBe(2);
      expect(r.error).toMatchObject({ code: 'ERR_USAGE', message: `--fencing ${policy} needs --fence-hook: the command that fences the peer` });
    }
  });

  it('--fence-hook alone (no --auto-failover, --fencing dont-care) is a usage error saying who runs it', async () => {
    const r = await usage([...hb, '--fence-hook', 'true']);
    expect(r.code).toBe(2);
    expect(r.error.message).toContain('--fence-hook is run by --auto-failover (on a secondary) or --fencing resource-only|resource-and-stonith (on a primary)');
  });

  it('bad values of --fencing and --on-no-quorum are refused with the allowed ones', async () => {
    const f = await runCli(['serve-nbd', 'memory:1M', ...hb, '--fencing', 'stonith']);
    expect(f.code).toBe(2);
    const flat = (t: string): string => t.replace(/\s*›\s*/g, ' ');
    expect(flat(f.stderr)).toContain('Expected --fencing=stonith to be one of: dont-care, resource-only, resource-and-stonith');
    const q = await runCli(['serve-nbd', 'memory:1M', ...hb, '--on-no-quorum', 'freeze']);
    expect(q.code).toBe(2);
    expect(flat(q.stderr)).toContain('Expected --on-no-quorum=freeze to be one of: suspend-io, io-error');
  });

  it('resume-io on a daemon without --heartbeat: ERR_NO_HEARTBEAT, exit 1', async () => {
    const dir = await makeTempDir();
    const ctl = join(dir, 'c.ctl');
    await serve(['memory:1M', '--socket', join(dir, 's.sock'), '--control', ctl]);
    const r = await runCli(['resume-io', '--control', ctl, '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout).error).toMatchObject({ code: 'ERR_NO_HEARTBEAT' });
  });
});
