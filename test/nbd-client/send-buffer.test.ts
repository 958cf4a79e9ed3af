/**
 * The client's send buffer (NbdClientOptions.sendBufferBytes; the pair's data connection): on a
 * Unix socket the connection gets the SO_SNDBUF asked for (the kernel reports twice the value),
 * and large writes through it land; without the option, and on TCP, the socket keeps the system's.
 */
import { closeSync, openSync } from 'node:fs';
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdNode } from '../../src/block/nbd.js';
import { loadNative } from '../../src/block/native.js';
import { setUnixSendBuffer } from '../../src/nbd/client.js';
import { fdOf, recordWritevSockets } from '../support/writev-recorder.js';
import { pattern, startNbdkit } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const nodes: NbdNode[] = [];
const native = loadNative();

/** the sockets that wrote with writev while recording */
const sockets = recordWritevSockets();

afterEach(async () => {
  for (const n of nodes.splice(0)) await n.close();
});

/** SO_SNDBUF of the one socket that sent a 1 MiB write through `node` (checked: it lands) */
async function sendBufferOf(node: NbdNode, seed: number): Promise<number> {
  sockets.clear();
  const data = pattern(MiB, seed);
  await node.write(MiB, data);
  expect(sockets.size).toBe(1);
  const sock = [...sockets][0]!;
  const size = native!.getSendBuffer!(fdOf(sock));
  expect((await node.read(MiB, MiB)).equals(data)).toBe(true);
  return size;
}

describe.skipIf(!native?.setSendBuffer)('NBD client send buffer', () => {
  it('a Unix connection gets the send buffer asked for; writes of 1 MiB land', async () => {
    const k = await startNbdkit(['memory', '16M']);
    const plain = await NbdNode.open(k.uri, { closeTimeoutMs: 5000 });
    nodes.push(plain);
    const big = await NbdNode.open(k.uri, { closeTimeoutMs: 5000, sendBufferBytes: 4 * MiB });
    nodes.push(big);
    const before = await sendBufferOf(plain, 1);
    expect(before).toBeLessThan(8 * MiB);
    expect(await sendBufferOf(big, 2)).toBe(8 * MiB); // root here: SO_SNDBUFFORCE, doubled by the kernel
    // 8 writes of 1 MiB at once (the sync primary's QD8), each with its own bytes
    const writes = Array.from({ length: 8 }, (_, i) => big.write(i * MiB, pattern(MiB, 10 + i)));
    await Promise.all(writes);
    for (let i = 0; i < 8; i++) expect((await plain.read(i * MiB, MiB)).equals(pattern(MiB, 10 + i)), `write ${i}`).toBe(true);
  });

  it('leaves TCP and non-sockets alone', async () => {
    const server = net.createServer((s) => s.on('data', () => {}));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as net.AddressInfo).port;
    const sock = net.connect(port, '127.0.0.1');
    await new Promise<void>((resolve) => sock.once('connect', () => resolve()));
    const before = native!.getSendBuffer!(fdOf(sock));
    expect(setUnixSendBuffer(sock, 4 * MiB)).toBeUndefined();
    expect(native!.getSendBuffer!(fdOf(sock))).toBe(before);
    sock.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    const file = openSync('/dev/null', 'r');
    try {
      let caught: unknown;
      try { native!.setSendBuffer!(file, MiB); } catch (e) { caught = e; }
      expect(caught).toBeInstanceOf(Error);
      expect(caught).toMatchObject({ code: 'ENOTSOCK', errno: -88, syscall: 'setsockopt(SO_SNDBUF)', message: 'ENOTSOCK: Socket operation on non-socket, setsockopt(SO_SNDBUF)' });
    } finally {
      closeSync(file);
    }
  });
});
