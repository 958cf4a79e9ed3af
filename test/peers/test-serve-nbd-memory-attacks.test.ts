/**
 * serve-nbd under the memory attacks of issue 14 (defect 6), scaled to run in bounded time on a
 * loaded machine: a real daemon, hostile raw sockets, and nbdinfo / a small read as the probe
 * that must keep being served. The daemon's peak RSS (VmHWM) is read from /proc.
 *
 * The full-size figures come from bench/memory-attacks.
 */
import { readFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import path from 'node:path';
import type { Socket } from 'node:net';
import { describe, expect, it, vi } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { CMD } from '../../src/nbd/constants.js';
import { encodeRequest } from '../../src/nbd/codec.js';
import type { ServerStatus } from '../../src/nbd/server.js';
import { RawClient, replyError } from '../support/raw-client.js';
import { makeTempDir, run, runCli, serve, unixUri, waitFor, withTimeout, type Served } from '../support/spawn.js';

vi.setConfig({ testTimeout: 120_000, hookTimeout: 30_000 });

const MiB = 1024 * 1024;

/** VmHWM (peak) and VmRSS of a process, in bytes. */
function memoryOf(pid: number): { peak: number; rss: number } {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text)![1]) * 1024;
  return { peak: kib('VmHWM'), rss: kib('VmRSS') };
}

interface Daemon {
  d: Served;
  sock: string;
  ctl: string;
  image: string;
}

async function startDaemon(extra: string[], imageSize = 512 * MiB): Promise<Daemon> {
  const dir = await makeTempDir();
  const image = path.join(dir, 'disk.raw');
  const f = await open(image, 'w');
  await f.truncate(imageSize);
  await f.close();
  const sock = path.join(dir, 'nbd.sock');
  const ctl = path.join(dir, 'ctl.sock');
  const d = await serve([image, '--socket', sock, '--control', ctl, ...extra]);
  return { d, sock, ctl, image };
}

async function status(ctl: string): Promise<ServerStatus> {
  const c = await ControlClient.connect(ctl, { timeoutMs: 5000 });
  try {
    return (await c.request('status', {}, { timeoutMs: 5000 })) as ServerStatus;
  } finally {
    await c.close();
  }
}

/** nbdinfo against the daemon: must succeed; returns how long it took. */
async function probeNbdinfo(sock: string): Promise<number> {
  const t0 = performance.now();
  const r = await run('nbdinfo', ['--size', unixUri(sock)], { timeoutMs: 20_000 });
  expect(r.code, r.stderr).toBe(0);
  expect(r.stdout.trim()).toBe(String(512 * MiB));
  return performance.now() - t0;
}

/** A fresh client writes 4 KiB and reads it back: must succeed; returns how long it took. */
async function probeIo(sock: string, offset: number, seed: number): Promise<number> {
  const t0 = performance.now();
  const { client } = await RawClient.open(sock, { timeoutMs: 10_000 });
  try {
    const data = Buffer.alloc(4096, seed);
    await client.ok(CMD.WRITE, { offset, data });
    expect((await client.read(offset, 4096)).equals(data)).toBe(true);
  } finally {
    client.destroy();
  }
  return performance.now() - t0;
}

/** Write `total` bytes of `fill` to a socket as fast as it takes them; resolves when all are handed over. */
function feed(socket: Socket, total: number, fill: number): Promise<void> {
  const chunk = Buffer.alloc(256 * 1024, fill);
  let left = total;
  return new Promise((resolve, reject) => {
    const more = (): void => {
      while (left > 0) {
        const n = Math.min(left, chunk.length);
        left -= n;
        if (!socket.write(n === chunk.length ? chunk : chunk.subarray(0, n))) {
          socket.once('drain', more);
          return;
        }
      }
      resolve();
    };
    socket.once('error', reject);
    more();
  });
}

describe('serve-nbd memory budget (--max-buffer)', () => {
  it('8 clients each stopping after 31 MiB of a 32 MiB write: the daemon holds one payload, others wait; probes are served; all writes land', async () => {
    const { d, sock, ctl, image } = await startDaemon(['--max-buffer', '32M', '--stall-timeout', '0']);
    const before = memoryOf(d.pid);
    const N = 8;
    const attackers: RawClient[] = [];
    for (let i = 0; i < N; i++) attackers.push((await RawClient.open(sock)).client);
    const cookies = attackers.map((c, i) => {
      c.track(BigInt(i + 1), CMD.WRITE, 32 * MiB);
      c.sendRaw(encodeRequest(0, CMD.WRITE, BigInt(i + 1), i * 32 * MiB, 32 * MiB));
      return BigInt(i + 1);
    });
    // Each sends 31 MiB and stops; only what the budget admitted is read by the daemon.
    const fed = attackers.map((c, i) => feed(c.socket, 31 * MiB, 0x41 + i));
    const s = await waitFor(async () => {
      const st = await status(ctl);
      return st.buffers.waiting === N - 1 && st.buffers.used >= 32 * MiB ? st : undefined;
    }, `${N - 1} connections waiting for buffer room`, { timeoutMs: 60_000, intervalMs: 200 });
    expect(s.buffers.limit).toBe(32 * MiB);
    // one attacker was let in and has sent all of its 31 MiB
    await withTimeout(Promise.race(fed), 60_000, 'one attacker to send its 31 MiB');

    const nbdinfoMs = await probeNbdinfo(sock);
    const ioMs = await probeIo(sock, 500 * MiB, 0x11);
    const during = memoryOf(d.pid);
    // Without the budget the daemon would hold 8 × 31 MiB here.
    expect(during.peak - before.rss).toBeLessThan(120 * MiB);
    console.log(`partial writes: peak RSS ${(during.peak / MiB).toFixed(0)} MiB (start ${(before.rss / MiB).toFixed(0)}), nbdinfo ${nbdinfoMs.toFixed(0)} ms, 4K write+read ${ioMs.toFixed(0)} ms`);

    // The attackers finish: every write is done, first come first served, and lands whole.
    await Promise.all(attackers.map((c, i) => feed(c.socket, MiB, 0x41 + i)));
    for (const [i, c] of attackers.entries()) {
      const r = await c.readReply(cookies[i], 60_000);
      expect(replyError(r)).toBe(0);
    }
    const after = memoryOf(d.pid);
    expect(after.peak - before.rss).toBeLessThan(160 * MiB);
    const f = await open(image, 'r');
    try {
      for (let i = 0; i < N; i++) {
        for (const at of [i * 32 * MiB, i * 32 * MiB + 31 * MiB - 1, i * 32 * MiB + 31 * MiB, (i + 1) * 32 * MiB - 1]) {
          const b = Buffer.alloc(1);
          await f.read(b, 0, 1, at);
          expect(b[0], `byte at ${at}`).toBe(0x41 + i);
        }
      }
    } finally {
      await f.close();
    }
    for (const c of attackers) c.destroy();
    expect(await d.stop()).toBe(0);
  });

  it('6 clients pipelining 1 MiB reads and never reading the replies: held bytes stay bounded, probes are served, --stall-timeout disconnects them with the reason', async () => {
    const { d, sock, ctl } = await startDaemon(['--max-buffer', '32M', '--stall-timeout', '2']);
    const before = memoryOf(d.pid);
    const N = 6;
    const attackers: RawClient[] = [];
    for (let i = 0; i < N; i++) {
      const { client } = await RawClient.open(sock);
      client.pause();
      for (let k = 0; k < 48; k++) client.send(CMD.READ, { offset: k * MiB, length: MiB });
      attackers.push(client);
    }
    const nbdinfoMs = await probeNbdinfo(sock);
    const ioMs = await probeIo(sock, 500 * MiB, 0x22);
    const s = await status(ctl);
    // the budget, plus each connection's 256 KiB allowance and one read beyond it
    expect(s.buffers.used).toBeLessThanOrEqual(32 * MiB + N * 2 * MiB);
    // Each is disconnected once it has held replies without reading for 2 s.
    const stalls = (): string[] => d.stderr().split('\n').filter((l) => l.includes('stall timeout'));
    await waitFor(() => stalls().length === N, `${N} stall timeouts`, { timeoutMs: 60_000, intervalMs: 100 });
    // the client side sees the end once it reads again
    for (const c of attackers) {
      c.resume();
      await c.expectEof(10_000);
    }
    const reasons = stalls();
    for (const l of reasons) expect(l).toMatch(/^\S+ warn blkrep serve-nbd: connection \d+ from .*: stall timeout: the client read none of \d+ bytes of replies for 2 s; disconnecting$/);
    const peak = memoryOf(d.pid).peak;
    // Without the budget: 6 × (64 MiB in flight + 64 MiB unsent).
    expect(peak - before.rss).toBeLessThan(120 * MiB);
    console.log(`non-reading clients: peak RSS ${(peak / MiB).toFixed(0)} MiB (start ${(before.rss / MiB).toFixed(0)}), nbdinfo ${nbdinfoMs.toFixed(0)} ms, 4K write+read ${ioMs.toFixed(0)} ms`);
    await waitFor(async () => (await status(ctl)).buffers.used === 0, 'buffers given back', { timeoutMs: 10_000 });
    expect(await d.stop()).toBe(0);
  });

  it('a client that stops midway through a write payload is disconnected after --stall-timeout, and its reservation is given back', async () => {
    const { d, sock, ctl } = await startDaemon(['--max-buffer', '32M', '--stall-timeout', '1']);
    const { client } = await RawClient.open(sock);
    client.sendRaw(encodeRequest(0, CMD.WRITE, 1n, 0, 32 * MiB));
    await feed(client.socket, 4 * MiB, 0x33);
    await withTimeout(waitFor(() => client.closed, 'EOF', { timeoutMs: 20_000, intervalMs: 50 }), 20_000, 'EOF');
    expect(d.stderr()).toMatch(/stall timeout: the client sent none of the rest of a 33554432-byte write payload for 1 s \(\d+ bytes received\); disconnecting/);
    await waitFor(async () => (await status(ctl)).buffers.used === 0, 'buffers given back', { timeoutMs: 10_000 });
    await probeIo(sock, 0, 0x44);
    expect(await d.stop()).toBe(0);
  });

  it('--max-buffer below 32M and a bad --stall-timeout are usage errors', async () => {
    const r1 = await runCli(['serve-nbd', 'memory:1M', '--max-buffer', '16M', '--json'], { timeoutMs: 20_000 });
    expect(r1.code).toBe(2);
    expect(JSON.parse(r1.stdout).error).toMatchObject({ code: 'ERR_USAGE', message: '--max-buffer 16 MiB is below 32 MiB, the largest request a client may send' });
    const r2 = await runCli(['serve-nbd', 'memory:1M', '--stall-timeout', 'soon', '--json'], { timeoutMs: 20_000 });
    expect(r2.code).toBe(2);
    expect(JSON.parse(r2.stdout).error).toMatchObject({ code: 'ERR_USAGE', message: '--stall-timeout "soon" is not a number of seconds (0 or more)' });
  });
});

describe('serve-nbd idle connections', () => {
  it('--shared 20 filled with idle sockets that reconnect when closed: nbdinfo and a client still get in, each taking the place of the oldest idle one', async () => {
    const { d, sock, ctl } = await startDaemon(['--shared', '20', '--handshake-timeout', '60']);
    let live = true;
    let reconnects = 0;
    const holders: RawClient[] = [];
    const hold = async (): Promise<void> => {
      while (live) {
        const c = await RawClient.connect(sock);
        holders.push(c);
        await waitFor(() => c.closed || !live, 'close', { timeoutMs: 120_000, intervalMs: 20 });
        c.destroy();
        if (live) reconnects++;
      }
    };
    const running = Array.from({ length: 20 }, hold);
    await waitFor(async () => (await status(ctl)).connections.length === 20, '20 connections');
    // an idle socket makes room only once it is a second old (a young one is never evicted)
    const oldest = Date.now();
    await waitFor(() => Date.now() - oldest >= 1100, 'the idle sockets to be 1 s old', { timeoutMs: 5000 });
    const times: number[] = [];
    for (let i = 0; i < 3; i++) {
      times.push(await probeNbdinfo(sock));
      times.push(await probeIo(sock, i * 4096, 0x55 + i));
    }
    expect(reconnects).toBeGreaterThanOrEqual(1);
    expect(d.stderr()).toMatch(/handshake not finished after \d+ ms; its place was taken by a new connection \(--shared 20 reached\); closing/);
    console.log(`idle connections: probes ${times.map((t) => t.toFixed(0)).join(', ')} ms; idle sockets evicted ${reconnects}`);
    live = false;
    for (const c of holders) c.destroy();
    await Promise.all(running);
    expect(await d.stop()).toBe(0);
  });

  it('--handshake-timeout 1: an idle socket is closed within the bound, with the reason logged', async () => {
    const { d, sock } = await startDaemon(['--handshake-timeout', '1']);
    const c = await RawClient.connect(sock);
    const t0 = Date.now();
    await c.expectEof(10_000);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(900);
    expect(d.stderr()).toMatch(/handshake not finished within 1000 ms, closing/);
    expect(await d.stop()).toBe(0);
  });
});
