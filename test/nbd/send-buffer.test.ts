/**
 * A Unix connection's send buffer is widened once the handshake is done (widenUnixSendBuffer in
 * src/nbd/server-session.ts), so a 1 MiB read reply leaves in about one writev instead of five
 * trips through epoll; TCP keeps its autotuning; BLKREP_NO_SEND_BUFFER=1 keeps the default.
 * Read with getsockopt(SO_SNDBUF) on the server's end of the connection.
 */
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { loadNative } from '../../src/block/native.js';
import { completeNode } from '../../src/block/node.js';
import { CMD } from '../../src/nbd/constants.js';
import { NbdServer } from '../../src/nbd/server.js';
import { RawClient } from '../support/raw-client.js';
import { pattern, withTimeout } from './helpers.js';

vi.setConfig({ testTimeout: 30_000, hookTimeout: 30_000 });

const MiB = 1024 * 1024;
const native = loadNative();

let dir: string;
let srv: NbdServer;
const listeners: net.Server[] = [];
const clients: RawClient[] = [];
let socketPath: string;
let tcpPort: number;
/** fd of the server's end of the last connection accepted, and its SO_SNDBUF then */
let accepted: { fd: number; initial: number } | undefined;

function onAccept(sock: net.Socket, peer: string): void {
  const fd = (sock as unknown as { _handle: { fd: number } })._handle.fd;
  accepted = { fd, initial: native!.getSendBuffer!(fd) };
  srv.attach({ stream: sock, peer });
}

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'blkrep-sndbuf-'));
  socketPath = path.join(dir, 'nbd.sock');
  srv = new NbdServer({ exports: [{ name: '', node: completeNode(new MemoryNode(4 * MiB)) }] });
  const unix = net.createServer({ allowHalfOpen: true }, (sock) => onAccept(sock, 'unix'));
  await new Promise<void>((resolve) => unix.listen(socketPath, resolve));
  const tcp = net.createServer({ allowHalfOpen: true, noDelay: true }, (sock) => onAccept(sock, 'tcp'));
  await new Promise<void>((resolve) => tcp.listen(0, '127.0.0.1', resolve));
  tcpPort = (tcp.address() as net.AddressInfo).port;
  listeners.push(unix, tcp);
});

afterEach(() => {
  delete process.env.BLKREP_NO_SEND_BUFFER;
  for (const c of clients.splice(0)) c.destroy();
});

afterAll(async () => {
  srv.destroyAll('test finished');
  await withTimeout(srv.shutdown(), 5000, 'server shutdown').catch(() => {});
  for (const l of listeners) await new Promise<void>((resolve) => l.close(() => resolve()));
  await rm(dir, { recursive: true, force: true });
});

/** a connection past its handshake and first request; the server end's fd and SO_SNDBUF at accept */
async function open(transport: 'unix' | 'tcp'): Promise<{ c: RawClient; fd: number; initial: number }> {
  accepted = undefined;
  const socket = transport === 'unix' ? net.createConnection(socketPath) : net.createConnection({ port: tcpPort, host: '127.0.0.1', noDelay: true });
  await withTimeout(new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject)), 5000, 'connect');
  const c = RawClient.over(socket);
  clients.push(c);
  await c.handshake();
  await c.ok(CMD.FLUSH);
  return { c, ...accepted! };
}

/** what the kernel sets for 2 MiB asked: double, capped at twice net.core.wmem_max */
function expectedWide(): number {
  const max = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8').trim());
  return Math.min(2 * 2 * MiB, 2 * max);
}

describe.runIf(native?.getSendBuffer !== undefined && process.platform === 'linux')('send buffer of served connections', () => {
  it('a Unix connection gets a 2 MiB send buffer (as the kernel grants it); a 1 MiB read reply is byte-exact', async () => {
    const { c, fd, initial } = await open('unix');
    expect(native!.getSendBuffer!(fd)).toBe(Math.max(initial, expectedWide()));
    const data = pattern(MiB, 3);
    await c.ok(CMD.WRITE, { offset: 0, data });
    expect((await c.read(0, MiB)).equals(data)).toBe(true);
  });

  it('a TCP connection keeps its send buffer (autotuned)', async () => {
    const { fd, initial } = await open('tcp');
    expect(native!.getSendBuffer!(fd)).toBe(initial);
  });

  it('BLKREP_NO_SEND_BUFFER=1: a Unix connection keeps the default', async () => {
    process.env.BLKREP_NO_SEND_BUFFER = '1';
    const { fd, initial } = await open('unix');
    expect(native!.getSendBuffer!(fd)).toBe(initial);
    expect(initial).toBeLessThan(expectedWide());
  });
});
