/**
 * Send batching (NbdClientOptions.batchSends, ClientSession.batch in src/nbd/client-session.ts):
 * the requests a client sends in one turn of the event loop leave in one socket write — the pair's
 * forwarding connection, where the primary forwards the writes its server read together. Checked
 * against nbdkit by counting the socket writes handed to libuv, and the bytes read back. A burst
 * larger than the socket's buffer (the stream says "full" while corked) must still all go out.
 */
import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NbdNode } from '../../src/block/nbd.js';
import { pattern, startNbdkit } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const nodes: NbdNode[] = [];

/** socket writes (calls of _write/_writev) while counting */
let writes = 0;
let counting = false;
const origWrite = net.Socket.prototype._write;
const origWritev = net.Socket.prototype._writev!;

beforeAll(() => {
  net.Socket.prototype._write = function (this: net.Socket, ...args: Parameters<typeof origWrite>) {
    if (counting) writes++;
    return origWrite.apply(this, args);
  };
  net.Socket.prototype._writev = function (this: net.Socket, ...args: Parameters<typeof origWritev>) {
    if (counting) writes++;
    return origWritev.apply(this, args);
  };
});

afterAll(() => {
  net.Socket.prototype._write = origWrite;
  net.Socket.prototype._writev = origWritev;
});

afterEach(async () => {
  counting = false;
  for (const n of nodes.splice(0)) await n.close();
});

async function open(uri: string, batchSends: boolean): Promise<NbdNode> {
  const n = await NbdNode.open(uri, { closeTimeoutMs: 5000, batchSends });
  nodes.push(n);
  return n;
}

/** `count` writes of `size` bytes at every other slot, issued in one turn; resolves with the socket writes they took */
async function burst(node: NbdNode, count: number, size: number, seed: number): Promise<number> {
  writes = 0;
  counting = true;
  const done = Array.from({ length: count }, (_, i) => node.write(i * 2 * size, pattern(size, seed + i)));
  await Promise.all(done);
  counting = false;
  return writes;
}

async function expectBurst(node: NbdNode, count: number, size: number, seed: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    expect((await node.read(i * 2 * size, size)).equals(pattern(size, seed + i)), `write ${i}`).toBe(true);
    expect((await node.read((i * 2 + 1) * size, size)).equals(Buffer.alloc(size)), `gap after write ${i}`).toBe(true);
  }
}

describe('NBD client send batching', () => {
  it('sends 16 writes of 4 KiB made in one turn in one socket write, and they land', async () => {
    const k = await startNbdkit(['memory', '16M']);
    const node = await open(k.uri, true);
    expect(await burst(node, 16, 4 * KiB, 1)).toBe(1);
    await node.flush();
    // read back through a client that does not batch (nothing else was written)
    await expectBurst(await open(k.uri, false), 16, 4 * KiB, 1);
  });

  it('without batchSends each request is a socket write of its own', async () => {
    const k = await startNbdkit(['memory', '16M']);
    const node = await open(k.uri, false);
    expect(await burst(node, 16, 4 * KiB, 2)).toBeGreaterThanOrEqual(16);
  });

  it('a burst over the socket buffer (64 × 256 KiB, corked) is all sent, in later writes as the socket drains', async () => {
    const k = await startNbdkit(['memory', '64M']);
    const node = await open(k.uri, true);
    const n = await burst(node, 64, 256 * KiB, 3);
    // the client puts at most 64 on the wire; the socket stays full while the server reads
    expect(n).toBeGreaterThanOrEqual(1);
    await expectBurst(node, 64, 256 * KiB, 3);
    expect(node.size).toBe(64 * MiB);
  });
});
