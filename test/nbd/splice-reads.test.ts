/**
 * Splice read replies (ServerSession.spliceRead in src/nbd/server-session.ts, the addon's
 * spliceSend): plain read replies of 256 KiB to 1 MiB from a raw file go from the file to the
 * socket without a copy through a buffer. Checked on a Unix socket and on TCP, with real clients
 * (nbdcopy, qemu-io, nbdinfo) and a raw client: the bytes are exact, the path was taken (a counting
 * wrapper around the raw file's FileRange), a file shorter than the export falls back to the usual
 * read (zeros past EOF), a read error before anything is sent becomes the NBD error reply while
 * the replies around it arrive whole, many connections interleave, and a client that stops
 * reading is disconnected without leaving the raw file held. BLKREP_NO_SPLICE=1 turns it off;
 * TCP connections splice only with BLKREP_SPLICE_TCP=1.
 */
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { closeSync, openSync } from 'node:fs';
import { mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import type { CompleteBlockNode, FileRange } from '../../src/api/block.js';
import { NBD_ERRNO } from '../../src/api/errors.js';
import { loadNative } from '../../src/block/native.js';
import { completeNode } from '../../src/block/node.js';
import { RawNode } from '../../src/block/raw.js';
import { CMD } from '../../src/nbd/constants.js';
import { encodeRequest } from '../../src/nbd/codec.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';
import { RawClient, readReplyData, replyError } from '../support/raw-client.js';
import { hasTool, run } from '../support/spawn.js';
import { waitIdle, withTimeout } from './helpers.js';

vi.setConfig({ testTimeout: 60_000, hookTimeout: 30_000 });
// As bin/run.js sets it: splice replies in flight may then be 8 in the process (half the pool),
// more than a connection's 4, so replies wait for a place on their connection (read by the
// session on its first splice reply; libuv's pool, started already or not, only runs them).
process.env.UV_THREADPOOL_SIZE = '16';
// TCP connections splice only with BLKREP_SPLICE_TCP=1 (off by default); the tests run both
process.env.BLKREP_SPLICE_TCP = '1';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;
const native = loadNative();

interface Counts {
  /** sendTo() settled: */
  sent: number;
  fallback: number;
  failed: number;
}

/** reads of 256 KiB or more served the usual way (readInto) */
const usual = { n: 0 };

interface Fixture {
  dir: string;
  image: string;
  data: Buffer;
  raw: RawNode;
  counts: Counts;
  srv: NbdServer;
  unixPath: string;
  tcpPort: number;
  /** which offsets' ranges fail reading (spliced from a write-only fd: EBADF before anything is sent) */
  failAt: Set<number>;
  /** sendTo() calls made */
  readonly started: number;
  close(): Promise<void>;
}

let fx: Fixture | undefined;

afterEach(async () => {
  delete process.env.BLKREP_NO_SPLICE;
  await fx?.close();
  fx = undefined;
});

/** The raw file's node, its FileRange counted (and failing where `failAt` says). */
function countingNode(raw: RawNode, counts: Counts, failAt: Set<number>, badFd: number, started: { n: number }): CompleteBlockNode {
  const node = completeNode(raw);
  return {
    ...node,
    readInto(offset, target, o) {
      if (target.length >= 256 * KiB) usual.n++;
      return node.readInto(offset, target, o);
    },
    fileRange(offset: number, length: number): FileRange | undefined {
      const range = raw.fileRange(offset, length);
      if (!range) return undefined;
      return {
        sendTo: async (sockFd, header, lane) => {
          started.n++;
          try {
            const r = failAt.has(offset)
              ? ((await native!.spliceSend!(sockFd, badFd, offset, length, header, lane)) === 0 ? 'sent' : 'fallback')
              : await range.sendTo(sockFd, header, lane);
            counts[r]++;
            return r;
          } catch (err) {
            counts.failed++;
            throw err;
          }
        },
        release: () => range.release(),
      };
    },
  };
}

async function setup(data: Buffer = randomBytes(SIZE), options: Pick<NbdServerOptions, 'stallTimeoutMs' | 'log'> = {}): Promise<Fixture> {
  usual.n = 0;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'blkrep-splice-'));
  const image = path.join(dir, 'disk.raw');
  await writeFile(image, data);
  const raw = await RawNode.open(image);
  const counts: Counts = { sent: 0, fallback: 0, failed: 0 };
  const failAt = new Set<number>();
  const badFd = openSync(path.join(dir, 'write-only'), 'w');
  const started = { n: 0 };
  const srv = new NbdServer({ ...options, exports: [{ name: '', node: countingNode(raw, counts, failAt, badFd, started) }] });
  const unixPath = path.join(dir, 'nbd.sock');
  const unix = net.createServer({ allowHalfOpen: true }, (sock) => srv.attach({ stream: sock, peer: 'unix' }));
  await new Promise<void>((resolve) => unix.listen(unixPath, resolve));
  const tcp = net.createServer({ allowHalfOpen: true, noDelay: true }, (sock) => srv.attach({ stream: sock, peer: 'tcp' }));
  await new Promise<void>((resolve) => tcp.listen(0, '127.0.0.1', resolve));
  const tcpPort = (tcp.address() as net.AddressInfo).port;
  return {
    dir, image, data, raw, counts, srv, unixPath, tcpPort, failAt,
    get started() {
      return started.n;
    },
    async close() {
      srv.destroyAll('test finished');
      await withTimeout(srv.shutdown(), 5000, 'server shutdown').catch(() => {});
      for (const l of [unix, tcp]) await new Promise<void>((resolve) => l.close(() => resolve()));
      await withTimeout(raw.close(), 5000, 'raw close');
      closeSync(badFd);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function client(f: Fixture, transport: 'unix' | 'tcp', structured: boolean): Promise<RawClient> {
  const socket = transport === 'unix' ? net.createConnection(f.unixPath) : net.createConnection({ port: f.tcpPort, host: '127.0.0.1', noDelay: true });
  await withTimeout(new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject)), 5000, 'connect');
  const c = RawClient.over(socket);
  await c.handshake({ structured });
  // the first request answered: the session is past its move to direct receive
  await c.ok(CMD.FLUSH);
  return c;
}

/**
 * The counts once every sendTo() started has settled: a spliced reply reaches the client from
 * the pool thread before its promise settles on the event loop.
 */
async function settled(f: Fixture): Promise<Counts> {
  await vi.waitFor(() => expect(f.counts.sent + f.counts.fallback + f.counts.failed).toBe(f.started), { timeout: 5000, interval: 5 });
  return { ...f.counts };
}

function uri(f: Fixture, transport: 'unix' | 'tcp'): string {
  return transport === 'unix' ? `nbd+unix:///?socket=${f.unixPath}` : `nbd://127.0.0.1:${f.tcpPort}/`;
}

beforeAll(() => {
  // the path needs the addon: a build without it serves every read the usual way (other tests)
  expect(native?.spliceSend, 'the native addon with spliceSend (npm install builds it)').toBeTypeOf('function');
});

describe.each(['unix', 'tcp'] as const)('splice read replies over %s', (transport) => {
  it.runIf(hasTool('nbdcopy'))('nbdcopy, 1 MiB requests, 8 in flight: byte-exact, spliced (a read arriving while another reply waits in the stream goes the usual way)', async () => {
    fx = await setup();
    const out = path.join(fx.dir, 'out.raw');
    const r = await run('nbdcopy', ['--request-size=1048576', '--requests=8', uri(fx, transport), out], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).toBe(0);
    expect((await readFile(out)).equals(fx.data)).toBe(true);
    const counts = await settled(fx);
    expect(counts).toMatchObject({ fallback: 0, failed: 0 });
    expect(counts.sent).toBeGreaterThan(0);
    expect(counts.sent + usual.n).toBe(SIZE / MiB);
  });

  it.runIf(hasTool('qemu-io') && hasTool('nbdinfo'))('qemu-io reads of 1 MiB and 256 KiB check their pattern; nbdinfo sees the export', async () => {
    const data = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE / MiB; i++) data.fill(0x10 + i, i * MiB, (i + 1) * MiB);
    fx = await setup(data);
    const info = await run('nbdinfo', ['--json', uri(fx, transport)], { timeoutMs: 30_000 });
    expect(info.code, info.stderr).toBe(0);
    expect((JSON.parse(info.stdout) as { exports: Array<{ 'export-size': number }> }).exports[0]!['export-size']).toBe(SIZE);
    const cmds = ['read -P 0x10 0 1M', 'read -P 0x13 3M 1M', 'read -P 0x1f 15M 1M', 'read -P 0x15 5632K 256K'];
    const r = await run('qemu-io', ['-r', '-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri(fx, transport)], { timeoutMs: 30_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/Pattern verification failed|error/i);
    expect(r.stdout.match(/^read \d+\/\d+ bytes/gm)).toHaveLength(4);
    // one request at a time: nothing waits in the stream, so every one is spliced
    expect(await settled(fx)).toEqual({ sent: 4, fallback: 0, failed: 0 });
    expect(usual.n).toBe(0);
  });

  // structured: the extents show the hole past EOF, so the reply is a data chunk and a hole chunk (no splice)
  it.each([
    [false, { sent: 0, fallback: 1, failed: 0 }],
    [true, { sent: 0, fallback: 0, failed: 0 }],
  ])('a read crossing the end of a file shorter than the export: data then zeros, not spliced (structured %s)', async (structured, counts) => {
    fx = await setup(randomBytes(4 * MiB));
    const c = await client(fx, transport, structured);
    // the file shrinks under the open export: 300 KiB of the last MiB are gone
    await truncate(fx.image, 4 * MiB - 300 * KiB);
    const got = await c.read(3 * MiB, MiB);
    const want = Buffer.concat([fx.data.subarray(3 * MiB, 4 * MiB - 300 * KiB), Buffer.alloc(300 * KiB)]);
    expect(got.equals(want)).toBe(true);
    expect(await settled(fx)).toEqual(counts);
    // the ranges still whole are spliced
    expect((await c.read(MiB, MiB)).equals(fx.data.subarray(MiB, 2 * MiB))).toBe(true);
    expect((await settled(fx)).sent).toBe(1);
    c.destroy();
  });

  it.each([false, true])('a read error among 8 reads in flight: that one gets EIO, the 7 around it arrive whole, the connection goes on (structured %s)', async (structured) => {
    fx = await setup();
    fx.failAt.add(3 * MiB);
    const c = await client(fx, transport, structured);
    const frames: Buffer[] = [];
    for (let i = 0; i < 8; i++) {
      c.track(BigInt(10 + i), CMD.READ, MiB);
      frames.push(encodeRequest(0, CMD.READ, BigInt(10 + i), i * MiB, MiB));
    }
    c.sendRaw(Buffer.concat(frames));
    for (let i = 0; i < 8; i++) {
      const r = await c.readReply(BigInt(10 + i));
      if (i === 3) expect(replyError(r)).toBe(NBD_ERRNO.EIO);
      else expect(readReplyData(r, i * MiB, MiB).equals(fx.data.subarray(i * MiB, (i + 1) * MiB))).toBe(true);
    }
    expect((await settled(fx)).failed).toBe(1);
    expect((await c.read(8 * MiB, MiB)).equals(fx.data.subarray(8 * MiB, 9 * MiB))).toBe(true);
    // a reply waiting in the stream (the error) sends the next large reads the usual way: at least the last is spliced
    const after = await settled(fx);
    expect(after.failed).toBe(1);
    expect(after.sent).toBeGreaterThanOrEqual(1);
    expect(after.fallback).toBe(0);
    c.destroy();
  });

  it('an unaligned read of 1 MiB (one page more than the pipe holds) goes the usual way; an unaligned 512 KiB is spliced; both byte-exact', async () => {
    fx = await setup();
    const c = await client(fx, transport, true);
    expect((await c.read(MiB + 512, MiB)).equals(fx.data.subarray(MiB + 512, 2 * MiB + 512))).toBe(true);
    expect(await settled(fx)).toEqual({ sent: 0, fallback: 0, failed: 0 });
    expect(usual.n).toBe(1);
    expect((await c.read(5 * MiB + 1000, 512 * KiB)).equals(fx.data.subarray(5 * MiB + 1000, 5 * MiB + 1000 + 512 * KiB))).toBe(true);
    expect(await settled(fx)).toEqual({ sent: 1, fallback: 0, failed: 0 });
    c.destroy();
  });

  it('4 connections, each with 1 MiB, 256 KiB and 4 KiB reads in flight at once (over a write of its own): every reply byte-exact', async () => {
    fx = await setup();
    const f = fx;
    const model = Buffer.from(f.data);
    const clients = await Promise.all([0, 1, 2, 3].map((i) => client(f, transport, i % 2 === 1)));
    // each connection writes its own 4 KiB blocks first (in the last MiB), then everything reads
    for (const [i, c] of clients.entries()) {
      const d = randomBytes(4 * KiB);
      d.copy(model, 15 * MiB + i * 64 * KiB);
      await c.ok(CMD.WRITE, { offset: 15 * MiB + i * 64 * KiB, data: d });
    }
    await Promise.all(clients.map(async (c, ci) => {
      const frames: Buffer[] = [];
      const want: Array<{ cookie: bigint; offset: number; length: number }> = [];
      for (let k = 0; k < 24; k++) {
        const length = [MiB, 256 * KiB, 4 * KiB][k % 3]!;
        const offset = ((ci * 7 + k * 5) % 15) * MiB + (k % 3 === 1 ? 256 * KiB : 0);
        const cookie = BigInt(1000 + k);
        c.track(cookie, CMD.READ, length);
        frames.push(encodeRequest(0, CMD.READ, cookie, offset, length));
        want.push({ cookie, offset, length });
      }
      frames.push(encodeRequest(0, CMD.READ, 2000n, 15 * MiB, MiB));
      c.track(2000n, CMD.READ, MiB);
      want.push({ cookie: 2000n, offset: 15 * MiB, length: MiB });
      c.sendRaw(Buffer.concat(frames));
      for (const w of want) {
        const r = await c.readReply(w.cookie, 30_000);
        expect(readReplyData(r, w.offset, w.length).equals(model.subarray(w.offset, w.offset + w.length))).toBe(true);
      }
    }));
    const counts = await settled(fx);
    expect(counts.failed).toBe(0);
    expect(counts.sent).toBeGreaterThan(0);
    for (const c of clients) c.destroy();
  });

  /** The client stops reading, then asks for 16 × 1 MiB: the socket's buffers fill and a spliced reply waits for space. */
  function stopReadingWith16MiBOwed(c: Awaited<ReturnType<typeof client>>): void {
    c.socket.pause();
    const frames: Buffer[] = [];
    for (let i = 0; i < 16; i++) {
      c.track(BigInt(i + 1), CMD.READ, MiB);
      frames.push(encodeRequest(0, CMD.READ, BigInt(i + 1), i * MiB, MiB));
    }
    c.sendRaw(Buffer.concat(frames));
  }

  it('a client that stops reading with 16 MiB of replies owed is disconnected at shutdown; the raw file is not left held', async () => {
    fx = await setup();
    const c = await client(fx, transport, false);
    stopReadingWith16MiBOwed(c);
    await vi.waitFor(() => expect(fx!.started).toBeGreaterThan(0), { timeout: 5000 });
    const f = fx;
    fx = undefined;
    await withTimeout(f.close(), 10_000, 'close with a stalled splice reply');
  });

  it('a client that stops reading is disconnected by the stall timeout, the spliced replies counted as held', async () => {
    const logs: string[] = [];
    fx = await setup(undefined, { stallTimeoutMs: 1000, log: (_level, message) => logs.push(message) });
    const c = await client(fx, transport, true);
    stopReadingWith16MiBOwed(c);
    await waitIdle(fx.srv, 15_000);
    expect(logs.some((m) => /stall timeout: the client read none of \d+ bytes of replies for 1 s/.test(m))).toBe(true);
    expect(fx.started).toBeGreaterThan(0);
    await settled(fx);
  });

  it('a client that hangs up halfway through a spliced reply: the connection closes, the others go on', async () => {
    fx = await setup();
    const other = await client(fx, transport, false);
    const c = await client(fx, transport, false);
    const frames: Buffer[] = [];
    for (let i = 0; i < 8; i++) {
      c.track(BigInt(i + 1), CMD.READ, MiB);
      frames.push(encodeRequest(0, CMD.READ, BigInt(i + 1), i * MiB, MiB));
    }
    c.sendRaw(Buffer.concat(frames));
    await c.readExact(512 * 1024);
    c.destroy();
    await vi.waitFor(() => expect(fx!.srv.status().connections.length).toBe(1), { timeout: 10_000 });
    await settled(fx);
    expect((await other.read(5 * MiB, MiB)).equals(fx.data.subarray(5 * MiB, 6 * MiB))).toBe(true);
    other.destroy();
  });

  it('BLKREP_NO_SPLICE=1: the replies are read and written the usual way, byte-exact', async () => {
    process.env.BLKREP_NO_SPLICE = '1';
    fx = await setup();
    const c = await client(fx, transport, true);
    for (let i = 0; i < 4; i++) expect((await c.read(i * MiB, MiB)).equals(fx.data.subarray(i * MiB, (i + 1) * MiB))).toBe(true);
    expect(await settled(fx)).toEqual({ sent: 0, fallback: 0, failed: 0 });
    expect(usual.n).toBe(4);
    c.destroy();
  });
});

it('without BLKREP_SPLICE_TCP=1 a TCP connection is not spliced (the default); a Unix one is', async () => {
  delete process.env.BLKREP_SPLICE_TCP;
  try {
    fx = await setup();
    const c = await client(fx, 'tcp', false);
    for (let i = 0; i < 2; i++) expect((await c.read(i * MiB, MiB)).equals(fx.data.subarray(i * MiB, (i + 1) * MiB))).toBe(true);
    expect(await settled(fx)).toEqual({ sent: 0, fallback: 0, failed: 0 });
    expect(usual.n).toBe(2);
    c.destroy();
    const u = await client(fx, 'unix', false);
    expect((await u.read(2 * MiB, MiB)).equals(fx.data.subarray(2 * MiB, 3 * MiB))).toBe(true);
    expect(await settled(fx)).toEqual({ sent: 1, fallback: 0, failed: 0 });
    u.destroy();
  } finally {
    process.env.BLKREP_SPLICE_TCP = '1';
  }
});
