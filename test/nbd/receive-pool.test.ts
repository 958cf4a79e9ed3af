/**
 * Large write payloads on the direct receive path (src/nbd/direct-receive.ts) are read into
 * buffers from the process's pool (src/nbd/buffer-pool.ts). A payload's buffer goes back to the
 * pool whatever becomes of its request: written, or dropped because the client left (closed or
 * half-closed) in the middle of it. And many connections receiving 1 MiB payloads at once, over
 * a Unix socket and over TCP, each write exactly its own bytes.
 *
 * Its own file: the pool is per process (per test file under vitest), so its byte count here is
 * this file's alone.
 */
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { mkdtemp, rm } from 'node:fs/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { CMD } from '../../src/nbd/constants.js';
import { encodeRequest } from '../../src/nbd/codec.js';
import { NbdServer } from '../../src/nbd/server.js';
import { sharedPool } from '../../src/nbd/buffer-pool.js';
import { RawClient, replyError } from '../support/raw-client.js';
import { pattern, waitIdle, withTimeout } from './helpers.js';

vi.setConfig({ testTimeout: 60_000, hookTimeout: 30_000 });

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;

let dir: string;
let socketPath: string;
let tcpPort: number;
let srv: NbdServer;
const listeners: net.Server[] = [];
const clients: RawClient[] = [];

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'blkrep-recvpool-'));
  socketPath = path.join(dir, 'nbd.sock');
  srv = new NbdServer({ exports: [{ name: '', node: completeNode(new MemoryNode(SIZE)) }] });
  const make = () => net.createServer({ allowHalfOpen: true }, (sock) => srv.attach({ stream: sock, peer: 'test' }));
  const unix = make();
  const tcp = make();
  listeners.push(unix, tcp);
  await new Promise<void>((resolve) => unix.listen(socketPath, resolve));
  await new Promise<void>((resolve) => tcp.listen(0, '127.0.0.1', resolve));
  tcpPort = (tcp.address() as net.AddressInfo).port;
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  await waitIdle(srv);
});

afterAll(async () => {
  srv.destroyAll('test finished');
  await withTimeout(srv.shutdown(), 5000, 'server shutdown').catch(() => {});
  for (const l of listeners) await new Promise<void>((resolve) => l.close(() => resolve()));
  await rm(dir, { recursive: true, force: true });
});

async function open(transport: 'unix' | 'tcp' = 'unix'): Promise<RawClient> {
  let client: RawClient;
  if (transport === 'unix') {
    client = (await RawClient.open(socketPath)).client;
  } else {
    const sock = net.createConnection({ port: tcpPort, host: '127.0.0.1' });
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', () => resolve());
      sock.once('error', reject);
    });
    client = RawClient.over(sock);
    await client.handshake();
  }
  clients.push(client);
  // the move to direct receive happens on the tick after GO: a request answered means it is done
  await client.ok(CMD.FLUSH);
  return client;
}

/** Resolve once `cond` holds, checked after every turn of the event loop (fails after `ms`). */
async function until(cond: () => boolean, what: string, ms = 10_000): Promise<void> {
  await withTimeout(
    (async () => {
      while (!cond()) await new Promise((resolve) => setImmediate(resolve));
    })(),
    ms,
    what,
  );
}

/** A free 1 MiB buffer in the pool: the next 1 MiB payload takes it, and pooledBytes shows it. */
function primePool(): number {
  const b = sharedPool.acquire(MiB);
  sharedPool.release(b);
  return sharedPool.pooledBytes;
}

describe('pooled payload buffers', () => {
  for (const how of ['destroys', 'half-closes'] as const) {
    it(`a client that ${how} its socket in the middle of a 1 MiB payload: the payload's buffer goes back to the pool, nothing is written`, async () => {
      const w = await open();
      const before = pattern(MiB, 1);
      await w.ok(CMD.WRITE, { offset: 4 * MiB, data: before });
      const pooled = primePool();
      expect(pooled).toBeGreaterThanOrEqual(MiB);

      const c = await open();
      const half = Buffer.concat([encodeRequest(0, CMD.WRITE, 7n, 4 * MiB, MiB), pattern(MiB, 2)]).subarray(0, 28 + MiB / 2);
      c.sendRaw(half);
      // the server took the pooled buffer for the payload and holds it while the rest is awaited
      await until(() => sharedPool.pooledBytes === pooled - MiB, 'the payload to take its pooled buffer');
      if (how === 'destroys') {
        c.destroy();
      } else {
        c.socket.end();
        await c.expectEof(5000);
      }
      await until(() => srv.status().connections.length === 1, 'the connection to close');
      expect(sharedPool.pooledBytes).toBe(pooled);
      expect((await w.read(4 * MiB, MiB)).equals(before)).toBe(true);
    });
  }

  it('pipelined 1 MiB writes: every payload buffer is back in the pool once they are answered', async () => {
    const c = await open();
    const pooled = primePool();
    const n = 8;
    for (let i = 0; i < n; i++) c.track(BigInt(100 + i), CMD.WRITE, MiB);
    c.sendRaw(...Array.from({ length: n }, (_, i) => Buffer.concat([encodeRequest(0, CMD.WRITE, BigInt(100 + i), 8 * MiB + i * MiB, MiB), pattern(MiB, 10 + i)])));
    for (let i = 0; i < n; i++) expect(replyError(await c.readReply(BigInt(100 + i)))).toBe(0);
    // released after the reply is queued: the next turn has them
    await until(() => sharedPool.pooledBytes >= pooled, 'the payload buffers to return');
    for (let i = 0; i < n; i++) expect((await c.read(8 * MiB + i * MiB, MiB)).equals(pattern(MiB, 10 + i))).toBe(true);
  });
});

describe('1 MiB payloads on many connections at once', () => {
  for (const transport of ['unix', 'tcp'] as const) {
    it(`${transport}: 4 connections, 6 pipelined 1 MiB writes each (cut at odd places), then 1 MiB reads: byte-exact`, async () => {
      const conns = await Promise.all([0, 1, 2, 3].map(() => open(transport)));
      const base = transport === 'unix' ? 16 * MiB : 40 * MiB;
      const at = (k: number, i: number) => base + (k * 6 + i) * MiB;
      const seed = (k: number, i: number) => 1000 + k * 10 + i + (transport === 'tcp' ? 500 : 0);
      await Promise.all(conns.map(async (c, k) => {
        const frames = Buffer.concat(Array.from({ length: 6 }, (_, i) => {
          c.track(BigInt(i + 1), CMD.WRITE, MiB);
          return Buffer.concat([encodeRequest(0, CMD.WRITE, BigInt(i + 1), at(k, i), MiB), pattern(MiB, seed(k, i))]);
        }));
        // pieces of odd sizes, so headers and payloads are cut everywhere
        const piece = 65_537 + k * 4099;
        for (let off = 0; off < frames.length; off += piece) c.sendRaw(frames.subarray(off, Math.min(frames.length, off + piece)));
        for (let i = 0; i < 6; i++) expect(replyError(await c.readReply(BigInt(i + 1)))).toBe(0);
      }));
      await Promise.all(conns.map(async (c, k) => {
        const cookies = Array.from({ length: 6 }, (_, i) => c.send(CMD.READ, { offset: at(k, i), length: MiB }));
        for (let i = 0; i < 6; i++) {
          const r = await c.readReply(cookies[i]);
          expect(replyError(r)).toBe(0);
        }
      }));
      for (const [k, c] of conns.entries()) {
        for (let i = 0; i < 6; i++) expect((await c.read(at(k, i), MiB)).equals(pattern(MiB, seed(k, i)))).toBe(true);
      }
    });
  }
});
