/**
 * Direct receive (src/nbd/direct-receive.ts): after the handshake a plain socket is moved to one
 * that reads write payloads straight into their buffers. The bytes written must be exactly the
 * bytes sent however the stream is cut, and anything that is not a plain socket stays as it is.
 */
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { mkdtemp, rm } from 'node:fs/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { CMD } from '../../src/nbd/constants.js';
import { encodeRequest } from '../../src/nbd/codec.js';
import { NbdServer } from '../../src/nbd/server.js';
import { moveToDirectReceive } from '../../src/nbd/direct-receive.js';
import { sharedPool } from '../../src/nbd/buffer-pool.js';
import { RawClient, replyError } from '../support/raw-client.js';
import { pattern, waitIdle, withTimeout } from './helpers.js';

vi.setConfig({ testTimeout: 60_000, hookTimeout: 30_000 });

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;

let dir: string;
let socketPath: string;
let srv: NbdServer;
let listener: net.Server;
/** the sockets the listener accepted, in order */
const accepted: net.Socket[] = [];
const clients: RawClient[] = [];

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'blkrep-direct-'));
  socketPath = path.join(dir, 'nbd.sock');
  srv = new NbdServer({ exports: [{ name: '', node: completeNode(new MemoryNode(SIZE)) }] });
  listener = net.createServer({ allowHalfOpen: true }, (sock) => {
    accepted.push(sock);
    srv.attach({ stream: sock, peer: 'test' });
  });
  await new Promise<void>((resolve) => listener.listen(socketPath, resolve));
});

afterEach(() => {
  vi.restoreAllMocks();
  delete process.env.BLKREP_NO_DIRECT_RECEIVE;
  for (const c of clients.splice(0)) c.destroy();
});

afterAll(async () => {
  srv.destroyAll('test finished');
  await withTimeout(srv.shutdown(), 5000, 'server shutdown').catch(() => {});
  await new Promise<void>((resolve) => listener.close(() => resolve()));
  await rm(dir, { recursive: true, force: true });
});

async function open(): Promise<RawClient> {
  const { client } = await RawClient.open(socketPath);
  clients.push(client);
  return client;
}

/** a write request, header and payload, as bytes */
function writeFrame(cookie: bigint, offset: number, data: Buffer): Buffer {
  return Buffer.concat([encodeRequest(0, CMD.WRITE, cookie, offset, data.length), data]);
}

/** Send `bytes` cut at `cuts` (offsets), each piece in its own write after the last one left. */
async function sendCut(c: RawClient, bytes: Buffer, cuts: number[]): Promise<void> {
  let at = 0;
  for (const cut of [...cuts, bytes.length]) {
    const piece = bytes.subarray(at, cut);
    at = cut;
    await new Promise<void>((resolve, reject) => c.socket.write(piece, (err) => (err ? reject(err) : resolve())));
  }
}

describe('direct receive', () => {
  it('a plain socket is moved after the handshake; pipelined writes of every size land byte-exact', async () => {
    const c = await open();
    const sock = accepted[accepted.length - 1]!;
    // the move happens on the tick after GO: a request answered means it is done
    await c.ok(CMD.FLUSH);
    expect(sock.destroyed).toBe(true);
    const writes: Array<[number, Buffer]> = [
      [0, pattern(1, 1)],
      [4 * KiB, pattern(4 * KiB, 2)],
      [64 * KiB, pattern(100 * KiB, 3)],
      [MiB, pattern(MiB + 1, 4)],
      [3 * MiB, pattern(3 * MiB, 5)],
      [7 * MiB, pattern(512, 6)],
      [8 * MiB, pattern(2 * MiB - 4, 7)],
    ];
    const burst = Buffer.concat(writes.map(([off, d], i) => writeFrame(BigInt(1000 + i), off, d)));
    writes.forEach(([, d], i) => c.track(BigInt(1000 + i), CMD.WRITE, d.length));
    c.sendRaw(burst);
    for (let i = 0; i < writes.length; i++) expect(replyError(await c.readReply(BigInt(1000 + i)))).toBe(0);
    for (const [off, d] of writes) expect((await c.read(off, d.length)).equals(d)).toBe(true);
  });

  it('a 1 MiB write cut inside the header, after one payload byte and one byte before its end, then a small write in the same piece', async () => {
    const c = await open();
    const big = pattern(MiB, 11);
    const small = pattern(4 * KiB, 12);
    const bytes = Buffer.concat([writeFrame(1n, 16 * MiB, big), writeFrame(2n, 20 * MiB, small)]);
    c.track(1n, CMD.WRITE, big.length);
    c.track(2n, CMD.WRITE, small.length);
    // 28-byte header: cut at 5, at 29 (one payload byte), at 28 + 1 MiB - 1, and inside the second header
    await sendCut(c, bytes, [5, 29, 28 + MiB - 1, 28 + MiB + 10]);
    expect(replyError(await c.readReply(1n))).toBe(0);
    expect(replyError(await c.readReply(2n))).toBe(0);
    expect((await c.read(16 * MiB, MiB)).equals(big)).toBe(true);
    expect((await c.read(20 * MiB, 4 * KiB)).equals(small)).toBe(true);
  });

  it('a client that closes in the middle of a direct payload leaves the server serving others', async () => {
    const c = await open();
    await c.ok(CMD.FLUSH);
    const before = pattern(MiB, 21);
    const { client: w } = await RawClient.open(socketPath);
    clients.push(w);
    await w.ok(CMD.WRITE, { offset: 24 * MiB, data: before });
    // half a payload, then gone
    await sendCut(c, writeFrame(5n, 24 * MiB, pattern(MiB, 22)).subarray(0, 28 + MiB / 2), []);
    c.destroy();
    expect((await w.read(24 * MiB, MiB)).equals(before)).toBe(true);
    const again = pattern(2 * MiB, 23);
    await w.ok(CMD.WRITE, { offset: 26 * MiB, data: again });
    expect((await w.read(26 * MiB, 2 * MiB)).equals(again)).toBe(true);
  });

  it('half-close after a large write: the write is answered, then the server closes', async () => {
    const c = await open();
    await c.ok(CMD.FLUSH);
    const d = pattern(MiB + 3, 31);
    c.track(9n, CMD.WRITE, d.length);
    c.sendRaw(writeFrame(9n, 28 * MiB, d));
    c.socket.end();
    expect(replyError(await c.readReply(9n))).toBe(0);
    await c.expectEof(5000);
    await waitIdle(srv);
    const check = await open();
    expect((await check.read(28 * MiB, d.length)).equals(d)).toBe(true);
  });

  it('after a large write, the read buffer that holds a large write\'s header becomes its payload: odd offsets and cuts, byte-exact', async () => {
    const acquire = vi.spyOn(sharedPool, 'acquire');
    const release = vi.spyOn(sharedPool, 'release');
    const c = await open();
    await c.ok(CMD.FLUSH);
    // the first large write gives the connection a read buffer of its own (2 MiB)
    const first = pattern(MiB, 51);
    await c.ok(CMD.WRITE, { offset: 0, data: first });
    const ownBuffers = () => acquire.mock.calls.filter(([n]) => n === 2 * MiB).length;
    expect(ownBuffers()).toBe(1);
    // Each piece: small requests, then a large write's header and the first part of its payload
    // (the header at a different offset in the read each time), then the rest of that payload
    // cut once more. The last large write does not fit after its header (2 MiB - 4 at offset
    // > 0): copied as before.
    const cases: Array<{ smalls: number; big: number; cut: number }> = [
      { smalls: 0, big: MiB, cut: 1 },
      { smalls: 1, big: MiB, cut: 100 * KiB },
      { smalls: 3, big: MiB + 7, cut: 200 * KiB },
      { smalls: 2, big: 256 * KiB, cut: 3 },
      { smalls: 1, big: 2 * MiB - 4, cut: 64 * KiB },
    ];
    let cookie = 100n;
    let at = 2 * MiB;
    const expected: Array<[number, Buffer]> = [];
    for (const [i, k] of cases.entries()) {
      const frames: Buffer[] = [];
      for (let j = 0; j < k.smalls; j++) {
        const d = pattern(4 * KiB + j, 60 + i * 10 + j);
        c.track(++cookie, CMD.WRITE, d.length);
        frames.push(writeFrame(cookie, at, d));
        expected.push([at, d]);
        at += d.length;
      }
      const big = pattern(k.big, 90 + i);
      c.track(++cookie, CMD.WRITE, big.length);
      const bigFrame = writeFrame(cookie, at, big);
      expected.push([at, big]);
      at += big.length;
      const head = Buffer.concat(frames).length;
      // header and `cut` payload bytes in one piece with the small requests; the rest in two
      await sendCut(c, Buffer.concat([...frames, bigFrame]), [head + 28 + k.cut, head + 28 + k.cut + Math.floor((k.big - k.cut) / 2)]);
      for (let j = 0; j <= k.smalls; j++) expect(replyError(await c.readReply(cookie - BigInt(k.smalls - j)))).toBe(0);
    }
    for (const [off, d] of expected) expect((await c.read(off, d.length)).equals(d)).toBe(true);
    expect((await c.read(0, MiB)).equals(first)).toBe(true);
    // the four writes that fit were received in the connection's read buffer (each took a new one)
    expect(ownBuffers()).toBe(5);
    // every one went back to the pool: the payloads once written, the last read buffer after a
    // read that ended on a request boundary (the connection holds none while it reads no large write)
    const taken = acquire.mock.calls.filter(([n]) => n > MiB && n <= 2 * MiB).length; // also the 2 MiB - 4 payload and read reply
    expect(release.mock.calls.filter(([b]) => b.length === 2 * MiB).length).toBe(taken);
  });

  it('a client that closes in the middle of a payload received in its read buffer leaves the server serving others', async () => {
    const c = await open();
    await c.ok(CMD.FLUSH);
    await c.ok(CMD.WRITE, { offset: 0, data: pattern(MiB, 71) });
    const before = pattern(MiB, 72);
    await c.ok(CMD.WRITE, { offset: 4 * MiB, data: before });
    await sendCut(c, writeFrame(5n, 4 * MiB, pattern(MiB, 73)).subarray(0, 28 + MiB / 2), [28 + 1000]);
    c.destroy();
    const w = await open();
    expect((await w.read(4 * MiB, MiB)).equals(before)).toBe(true);
    const again = pattern(MiB, 74);
    await w.ok(CMD.WRITE, { offset: 4 * MiB, data: again });
    expect((await w.read(4 * MiB, MiB)).equals(again)).toBe(true);
  });

  it('BLKREP_NO_DIRECT_RECEIVE=1 keeps the accepted socket, and writes still land', async () => {
    process.env.BLKREP_NO_DIRECT_RECEIVE = '1';
    const c = await open();
    const sock = accepted[accepted.length - 1]!;
    const d = pattern(MiB + 5, 41);
    await c.ok(CMD.WRITE, { offset: 30 * MiB, data: d });
    expect(sock.destroyed).toBe(false);
    expect((await c.read(30 * MiB, d.length)).equals(d)).toBe(true);
  });

  it('anything but a plain socket is left as it is', () => {
    const reader = { nextBuffer: () => Buffer.alloc(16), received: () => {} };
    const duplex = new PassThrough();
    expect(moveToDirectReceive(duplex, reader)).toBeUndefined();
    expect(duplex.destroyed).toBe(false);
    // not connected: no handle to move
    const unconnected = new net.Socket();
    expect(moveToDirectReceive(unconnected, reader)).toBeUndefined();
    expect(unconnected.destroyed).toBe(false);
  });
});
