/**
 * Reply batching (NbdSession.batch in src/nbd/server-session.ts): the replies the server makes in
 * one turn of the event loop leave in one socket write. Requests that arrive together (a client
 * at queue depth 32 sends many in one segment) and are answered at once must not cost a write
 * each: on TCP each write is a trip through loopback's whole send and receive path. Checked on a
 * Unix socket and on TCP, by counting the writes the server's socket hands to libuv, and the
 * replies must still be byte-exact.
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
import { RawClient, readReplyData, replyError } from '../support/raw-client.js';
import { pattern, withTimeout } from './helpers.js';

vi.setConfig({ testTimeout: 30_000, hookTimeout: 30_000 });

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const BURST = 16;

let dir: string;
let srv: NbdServer;
const listeners: net.Server[] = [];
const clients: RawClient[] = [];
let socketPath: string;
let tcpPort: number;

/** the server's socket writes (calls of _write/_writev on sockets that are not a client's) */
let serverWrites = 0;
const origWrite = net.Socket.prototype._write;
const origWritev = net.Socket.prototype._writev!;
const clientSockets = new Set<net.Socket>();

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'blkrep-batch-'));
  socketPath = path.join(dir, 'nbd.sock');
  srv = new NbdServer({ exports: [{ name: '', node: completeNode(new MemoryNode(SIZE)) }] });
  const unix = net.createServer({ allowHalfOpen: true }, (sock) => srv.attach({ stream: sock, peer: 'unix' }));
  await new Promise<void>((resolve) => unix.listen(socketPath, resolve));
  // as plugins/transport-tcp listens
  const tcp = net.createServer({ allowHalfOpen: true, noDelay: true }, (sock) => srv.attach({ stream: sock, peer: 'tcp' }));
  await new Promise<void>((resolve) => tcp.listen(0, '127.0.0.1', resolve));
  tcpPort = (tcp.address() as net.AddressInfo).port;
  listeners.push(unix, tcp);
  net.Socket.prototype._write = function (this: net.Socket, ...args: Parameters<typeof origWrite>) {
    if (!clientSockets.has(this)) serverWrites++;
    return origWrite.apply(this, args);
  };
  net.Socket.prototype._writev = function (this: net.Socket, ...args: Parameters<typeof origWritev>) {
    if (!clientSockets.has(this)) serverWrites++;
    return origWritev.apply(this, args);
  };
});

afterEach(() => {
  delete process.env.BLKREP_NO_REPLY_BATCHING;
  for (const c of clients.splice(0)) c.destroy();
  clientSockets.clear();
});

afterAll(async () => {
  net.Socket.prototype._write = origWrite;
  net.Socket.prototype._writev = origWritev;
  srv.destroyAll('test finished');
  await withTimeout(srv.shutdown(), 5000, 'server shutdown').catch(() => {});
  for (const l of listeners) await new Promise<void>((resolve) => l.close(() => resolve()));
  await rm(dir, { recursive: true, force: true });
});

async function open(transport: 'unix' | 'tcp'): Promise<RawClient> {
  const socket = transport === 'unix' ? net.createConnection(socketPath) : net.createConnection({ port: tcpPort, host: '127.0.0.1', noDelay: true });
  clientSockets.add(socket);
  await withTimeout(new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject)), 5000, 'connect');
  const c = RawClient.over(socket);
  clients.push(c);
  await c.handshake();
  // the first request answered: the session is past its move to direct receive
  await c.ok(CMD.FLUSH);
  return c;
}

describe.each(['unix', 'tcp'] as const)('reply batching over %s', (transport) => {
  it(`${BURST} reads sent in one segment are answered in one socket write, byte-exact`, async () => {
    const c = await open(transport);
    const data = pattern(SIZE, 7);
    await c.ok(CMD.WRITE, { offset: 0, data: data.subarray(0, 2 * MiB) });
    const frames: Buffer[] = [];
    for (let i = 0; i < BURST; i++) {
      c.track(BigInt(100 + i), CMD.READ, 4 * KiB);
      frames.push(encodeRequest(0, CMD.READ, BigInt(100 + i), i * 64 * KiB, 4 * KiB));
    }
    serverWrites = 0;
    c.sendRaw(Buffer.concat(frames));
    for (let i = 0; i < BURST; i++) {
      const r = await c.readReply(BigInt(100 + i));
      expect(readReplyData(r, i * 64 * KiB, 4 * KiB).equals(data.subarray(i * 64 * KiB, i * 64 * KiB + 4 * KiB))).toBe(true);
    }
    expect(serverWrites).toBe(1);
  });

  it(`${BURST} writes sent in one segment are answered in one socket write, and the data lands`, async () => {
    const c = await open(transport);
    const frames: Buffer[] = [];
    const datas: Buffer[] = [];
    for (let i = 0; i < BURST; i++) {
      const d = pattern(512, 50 + i);
      datas.push(d);
      c.track(BigInt(200 + i), CMD.WRITE, d.length);
      frames.push(encodeRequest(0, CMD.WRITE, BigInt(200 + i), 4 * MiB + i * 8 * KiB, d.length), d);
    }
    serverWrites = 0;
    c.sendRaw(Buffer.concat(frames));
    for (let i = 0; i < BURST; i++) expect(replyError(await c.readReply(BigInt(200 + i)))).toBe(0);
    expect(serverWrites).toBe(1);
    for (let i = 0; i < BURST; i++) expect((await c.read(4 * MiB + i * 8 * KiB, 512)).equals(datas[i]!)).toBe(true);
  });

  it(`BLKREP_NO_REPLY_BATCHING=1: one socket write per reply (${BURST} for ${BURST} reads), byte-exact`, async () => {
    process.env.BLKREP_NO_REPLY_BATCHING = '1';
    const c = await open(transport);
    const data = pattern(64 * KiB, 9);
    await c.ok(CMD.WRITE, { offset: 0, data });
    const frames: Buffer[] = [];
    for (let i = 0; i < BURST; i++) {
      c.track(BigInt(300 + i), CMD.READ, 4 * KiB);
      frames.push(encodeRequest(0, CMD.READ, BigInt(300 + i), i * 4 * KiB, 4 * KiB));
    }
    serverWrites = 0;
    c.sendRaw(Buffer.concat(frames));
    for (let i = 0; i < BURST; i++) {
      const r = await c.readReply(BigInt(300 + i));
      expect(readReplyData(r, i * 4 * KiB, 4 * KiB).equals(data.subarray(i * 4 * KiB, (i + 1) * 4 * KiB))).toBe(true);
    }
    expect(serverWrites).toBe(BURST);
  });

  it('a lone request is answered without waiting for another', async () => {
    const c = await open(transport);
    serverWrites = 0;
    const d = await c.read(0, 512);
    expect(d.length).toBe(512);
    expect(serverWrites).toBe(1);
  });
});
