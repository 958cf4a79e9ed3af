/**
 * The client and NbdNode against blkrep's own server, in-process on a Unix socket: data round
 * trips against a model, extents against the served node, many requests in flight, multi-conn,
 * block-size alignment, emulated FUA, close(), reconnect with held requests, hold expiry, and the
 * durability guard on flush after a lost connection.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { isAbortError } from '../../src/api/errors.js';
import { coalesceExtents } from '../../src/block/node.js';
import { NbdNode } from '../../src/block/nbd.js';
import { NbdClient } from '../../src/nbd/client.js';
import { TF } from '../../src/nbd/constants.js';
import { memoryExport, nextEvent, OwnServer, pattern, rejection } from './helpers.js';
import { waitFor } from '../support/spawn.js';

const MiB = 1024 * 1024;
const servers: OwnServer[] = [];
const nodes: Array<NbdNode | NbdClient> = [];

afterEach(async () => {
  for (const n of nodes.splice(0)) await n.close();
  for (const s of servers.splice(0)) await s.stop();
});

async function serve(...exports: ReturnType<typeof memoryExport>[]): Promise<OwnServer> {
  const s = await OwnServer.create(exports);
  servers.push(s);
  return s;
}

async function open(uri: string, options: Parameters<typeof NbdNode.open>[1] = {}): Promise<NbdNode> {
  const n = await NbdNode.open(uri, { closeTimeoutMs: 5000, ...options });
  nodes.push(n);
  return n;
}

/** xorshift, for seeded workloads */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** Random writes, zeroes, trims and flushes, checked against a Buffer model, then a full compare. */
async function randomWorkload(node: NbdNode, seed: number, ops: number, maxLen: number): Promise<void> {
  const model = Buffer.alloc(node.size);
  const r = rng(seed);
  for (let i = 0; i < ops; i++) {
    const len = 1 + Math.floor(r() * maxLen);
    const off = Math.floor(r() * (node.size - len));
    const kind = r();
    if (kind < 0.5) {
      const data = pattern(len, seed * 1000 + i);
      await node.write(off, data, { fua: r() < 0.2 });
      data.copy(model, off);
    } else if (kind < 0.7) {
      await node.writeZeroes(off, len, { noHole: r() < 0.5 });
      model.fill(0, off, off + len);
    } else if (kind < 0.8) {
      await node.trim(off, len);
      // trim leaves contents unspecified: make the model match whatever is there now
      (await node.read(off, len)).copy(model, off);
    } else if (kind < 0.9) {
      await node.flush();
    } else {
      const got = await node.read(off, len);
      expect(got.equals(model.subarray(off, off + len)), `read ${len} at ${off} after op ${i}`).toBe(true);
    }
  }
  expect((await node.read(0, node.size)).equals(model)).toBe(true);
}

describe('NbdNode against blkrep serve (in-process)', () => {
  it('exposes size, limits, caps and the export description', async () => {
    const e = memoryExport('disk', 8 * MiB);
    const s = await serve({ ...e, description: 'test disk' });
    const node = await open(s.uri('disk'));
    expect(node.driver).toBe('nbd');
    expect(node.size).toBe(8 * MiB);
    expect(node.limits).toEqual({ minimum: 1, preferred: 4096, maximum: 32 * MiB });
    expect(node.caps).toMatchObject({ canWrite: true, canFlush: true, canFua: true, canTrim: true, canZero: true, canMultiConn: true, canExtents: true });
    expect(node.client.info).toMatchObject({ structured: true, name: 'disk', description: 'test disk', viaExportName: false });
    expect(node.description).toBe(s.uri('disk'));
  });

  it('random workload matches a model byte for byte', async () => {
    const s = await serve(memoryExport('disk', 2 * MiB));
    const node = await open(s.uri('disk'));
    await randomWorkload(node, 7, 300, 200_000);
  });

  it('reads and writes larger than the maximum payload are split (40 MiB)', async () => {
    const s = await serve(memoryExport('big', 48 * MiB));
    const node = await open(s.uri('big'));
    const data = pattern(40 * MiB, 11);
    await node.write(4 * MiB + 3, data);
    expect((await node.read(4 * MiB + 3, data.length)).equals(data)).toBe(true);
  });

  it('extents are those of the served node', async () => {
    const e = memoryExport('disk', 4 * MiB);
    await e.node.write(1 * MiB, Buffer.alloc(128 * 1024, 1));
    await e.node.write(3 * MiB, Buffer.alloc(64 * 1024, 2));
    const s = await serve(e);
    const node = await open(s.uri('disk'));
    const expected = coalesceExtents(await e.node.extents(0, e.node.size));
    const got: typeof expected = [];
    for (let at = 0; at < node.size; ) {
      const runs = await node.extents(at, node.size - at);
      expect(runs.length).toBeGreaterThan(0);
      got.push(...runs);
      at += runs.reduce((n, r) => n + r.length, 0);
    }
    expect(coalesceExtents(got)).toEqual(expected);
    // from the middle of a run: starts exactly at the offset
    const mid = await node.extents(1 * MiB + 5, 10);
    expect(mid[0]).toMatchObject({ hole: false, zero: false });
    expect(mid.reduce((n, r) => n + r.length, 0)).toBeGreaterThanOrEqual(10);
  });

  it('many requests in flight: bounded per connection, the rest queued, all answered', async () => {
    const s = await serve(memoryExport('disk', 8 * MiB));
    const client = await NbdClient.connect({ uri: s.uri('disk'), maxInFlight: 8 });
    nodes.push(client);
    const writes = Array.from({ length: 500 }, (_, i) => client.write(i * 4096, pattern(4096, i)));
    const st = client.status();
    expect(st.connections[0]!.inFlight).toBe(8);
    expect(st.queued).toBe(492);
    await Promise.all(writes);
    const bufs = Array.from({ length: 500 }, () => Buffer.alloc(4096));
    await Promise.all(bufs.map((b, i) => client.read(i * 4096, b)));
    bufs.forEach((b, i) => expect(b.equals(pattern(4096, i))).toBe(true));
  });

  it('multi-conn: four connections, round-robin, a flush on one covers all', async () => {
    const s = await serve(memoryExport('disk', 8 * MiB));
    const node = await open(s.uri('disk'), { connections: 4 });
    expect(node.client.connectedCount).toBe(4);
    expect(s.connections()).toBe(4);
    await Promise.all(Array.from({ length: 200 }, (_, i) => node.write(i * 4096, pattern(4096, i))));
    const perConnection = s.srv!.status().connections.map((c) => c.requests);
    expect(perConnection.every((n) => n >= 40)).toBe(true);
    await node.flush();
    const again = await open(s.uri('disk'));
    for (let i = 0; i < 200; i += 37) expect((await again.read(i * 4096, 4096)).equals(pattern(4096, i))).toBe(true);
  });

  it('multi-conn is not used when the server does not advertise it', async () => {
    const s = await serve(memoryExport('disk', MiB, (n) => ({ ...n, caps: { ...n.caps, canMultiConn: false } })));
    const node = await open(s.uri('disk'), { connections: 4 });
    expect(node.caps.canMultiConn).toBe(false);
    expect(node.client.connectedCount).toBe(1);
    expect(s.connections()).toBe(1);
  });

  it('minimum block size 4096: unaligned I/O becomes aligned requests (the server rejects misaligned ones)', async () => {
    const s = await serve({ ...memoryExport('disk', 2 * MiB), minimumBlockSize: 4096 });
    const node = await open(s.uri('disk'));
    expect(node.limits.minimum).toBe(4096);
    await randomWorkload(node, 3, 200, 20_000);
    expect(s.srv!.status().exports[0]!.errors).toBe(0);
  });

  it('partial-block writes to one block at once do not undo each other', async () => {
    const s = await serve({ ...memoryExport('disk', MiB), minimumBlockSize: 4096 });
    const node = await open(s.uri('disk'));
    await Promise.all(Array.from({ length: 32 }, (_, i) => node.write(i * 100, Buffer.alloc(100, i + 1))));
    const got = await node.read(0, 3200);
    for (let i = 0; i < 32; i++) expect(got.subarray(i * 100, i * 100 + 100).every((b) => b === i + 1)).toBe(true);
  });

  it('FUA without SEND_FUA is emulated by a flush; no FUA flag is ever sent', async () => {
    const s = await serve(memoryExport('disk', MiB, (n) => ({ ...n, caps: { ...n.caps, canFua: false } })));
    const node = await open(s.uri('disk'));
    expect(node.client.info.flags & TF.SEND_FUA).toBe(0);
    expect(node.caps.canFua).toBe(true);
    await node.write(0, Buffer.alloc(4096, 1), { fua: true });
    await node.writeZeroes(4096, 4096, { fua: true });
    const counts = s.srv!.status().exports[0]!.requests;
    expect(counts.flush).toBe(2);
    expect(s.srv!.status().exports[0]!.errors).toBe(0);
  });

  it('a read-only node refuses writes', async () => {
    const s = await serve(memoryExport('disk', MiB));
    const node = await open(s.uri('disk'), { readOnly: true });
    expect(node.caps.canWrite).toBe(false);
    expect((await rejection(node.write(0, Buffer.alloc(1)))).code).toBe('ERR_READ_ONLY');
  });

  it('close() waits for requests in flight, then sends DISC', async () => {
    const s = await serve(memoryExport('disk', 8 * MiB));
    const client = await NbdClient.connect({ uri: s.uri('disk'), maxInFlight: 4 });
    const writes = Array.from({ length: 100 }, (_, i) => client.write(i * 4096, Buffer.alloc(4096, 1)));
    await client.close();
    await Promise.all(writes);
    expect(client.state).toBe('CLOSED');
    await waitFor(() => s.connections() === 0, 'the server to see the disconnect');
    expect(s.srv!.status().exports[0]!.requests.disc).toBe(1);
    expect((await rejection(client.read(0, Buffer.alloc(1)))).code).toBe('ERR_NBD_CLOSED');
  });

  it('an aborted queued request is dropped; the others complete', async () => {
    const s = await serve(memoryExport('disk', MiB));
    const client = await NbdClient.connect({ uri: s.uri('disk'), maxInFlight: 1 });
    nodes.push(client);
    const ac = new AbortController();
    const first = client.write(0, Buffer.alloc(4096, 1));
    const second = client.write(4096, Buffer.alloc(4096, 2), { signal: ac.signal });
    const third = client.write(8192, Buffer.alloc(4096, 3));
    ac.abort();
    expect(isAbortError(await rejection(second))).toBe(true);
    await Promise.all([first, third]);
    const b = Buffer.alloc(4096);
    await client.read(4096, b);
    expect(b.every((x) => x === 0)).toBe(true);
    expect((await rejection(client.read(0, b, { signal: AbortSignal.abort() }))).code).toBe('ABORT_ERR');
  });
});

describe('reconnect', () => {
  const fast = { backoff: { initialMs: 20, maxMs: 200 }, closeTimeoutMs: 2000 };

  it('requests made while the server is down are held and succeed when it comes back', async () => {
    const e = memoryExport('disk', MiB);
    const s = await serve(e);
    const node = await open(s.uri('disk'), { ...fast, holdMs: 10_000 });
    const events: string[] = [];
    for (const ev of ['disconnected', 'retrying', 'reconnected'] as const) node.client.on(ev, () => events.push(ev));
    await node.write(0, Buffer.alloc(4096, 1));
    const disconnected = nextEvent(node.client, 'disconnected');
    await s.stop();
    await disconnected;
    expect(node.client.state).toBe('DISCONNECTED');
    const held = node.write(4096, Buffer.alloc(4096, 2));
    const read = node.read(0, 8192);
    await nextEvent(node.client, 'retrying');
    const back = nextEvent<{ connection: number; attempts: number; downtimeMs: number }>(node.client, 'reconnected');
    await s.start();
    const reconnected = await back;
    await held;
    const got = await read;
    expect(got.subarray(0, 4096).every((b) => b === 1)).toBe(true);
    expect((await e.node.read(4096, 4096)).every((b) => b === 2)).toBe(true);
    expect(reconnected.connection).toBe(0);
    expect(reconnected.downtimeMs).toBeGreaterThan(0);
    expect(events[0]).toBe('disconnected');
    expect(events).toContain('retrying');
    expect(node.client.state).toBe('READY');
  });

  it('held requests fail with ERR_NBD_DISCONNECTED after holdMs; later ones at once; service resumes on reconnect', async () => {
    const s = await serve(memoryExport('disk', MiB));
    const node = await open(s.uri('disk'), { ...fast, holdMs: 300 });
    const disconnected = nextEvent(node.client, 'disconnected');
    await s.stop();
    await disconnected;
    const t0 = Date.now();
    const err = await rejection(node.read(0, 512));
    const waited = Date.now() - t0;
    expect(err).toMatchObject({ code: 'ERR_NBD_DISCONNECTED', errno: 'EIO' });
    expect(err.message).toMatch(/^NBD read of 512 bytes at offset 0: no connection to nbd\+unix:.* came back within 300 ms \(/);
    expect(waited).toBeGreaterThanOrEqual(200);
    expect(waited).toBeLessThan(3000);
    const t1 = Date.now();
    expect((await rejection(node.read(0, 512))).code).toBe('ERR_NBD_DISCONNECTED');
    expect(Date.now() - t1).toBeLessThan(100);
    const back = nextEvent(node.client, 'reconnected');
    await s.start();
    await back;
    await node.read(0, 512);
  });

  it('backoff grows exponentially with jitter, capped', async () => {
    const s = await serve(memoryExport('disk', MiB));
    const node = await open(s.uri('disk'), { backoff: { initialMs: 10, maxMs: 80 }, random: () => 1, holdMs: 0 });
    const delays: number[] = [];
    const attempts: number[] = [];
    node.client.on('retrying', (e: { attempt: number; delayMs: number }) => {
      delays.push(e.delayMs);
      attempts.push(e.attempt);
    });
    await s.stop();
    await waitFor(() => delays.length >= 6, 'six retries');
    expect(delays.slice(0, 6)).toEqual([10, 20, 40, 80, 80, 80]);
    expect(attempts.slice(0, 6)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(node.client.backoffDelay(0)).toBe(10);
    expect(node.client.backoffDelay(1000)).toBe(80);
  });

  it('a flush after a lost connection with unflushed writes fails once with ERR_NBD_WRITES_LOST', async () => {
    const s = await serve(memoryExport('disk', MiB));
    const node = await open(s.uri('disk'), { ...fast, holdMs: 10_000 });
    await node.write(0, Buffer.alloc(4096, 1));
    await s.stop();
    const back = nextEvent(node.client, 'reconnected');
    await s.start();
    await back;
    const err = await rejection(node.flush());
    expect(err).toMatchObject({ code: 'ERR_NBD_WRITES_LOST', errno: 'EIO' });
    await node.flush();
    // flushed writes are not "lost" by a later drop
    await node.write(0, Buffer.alloc(4096, 2));
    await node.flush();
    await s.stop();
    const again = nextEvent(node.client, 'reconnected');
    await s.start();
    await again;
    await node.flush();
  });

  it('multi-conn: a lost connection is replaced while the others keep working', async () => {
    const s = await serve(memoryExport('disk', MiB));
    const node = await open(s.uri('disk'), { ...fast, connections: 3 });
    expect(s.connections()).toBe(3);
    const victim = s.srv!.status().connections[1]!.id;
    // drop one connection from the server side
    const sessions = (s.srv as unknown as { sessions: Set<{ id: number; close(reason: string): void }> }).sessions;
    const disconnected = nextEvent<{ connection: number }>(node.client, 'disconnected');
    [...sessions].find((x) => x.id === victim)!.close('test');
    await disconnected;
    expect(node.client.state).toBe('READY');
    await Promise.all(Array.from({ length: 50 }, (_, i) => node.write(i * 512, Buffer.alloc(512, 9))));
    await nextEvent(node.client, 'reconnected');
    expect(node.client.connectedCount).toBe(3);
  });

  it('the export changing size on reconnect is fatal', async () => {
    const e = memoryExport('disk', MiB);
    const s = await serve(e);
    const node = await open(s.uri('disk'), { ...fast, holdMs: 10_000 });
    await s.stop();
    const other = await OwnServer.create([memoryExport('disk', 2 * MiB)], s.socket);
    servers.push(other);
    const failed = await nextEvent<{ error: { code: string } }>(node.client, 'failed');
    expect(failed.error.code).toBe('ERR_NBD_EXPORT_CHANGED');
    expect((await rejection(node.read(0, 1))).code).toBe('ERR_NBD_EXPORT_CHANGED');
    expect(node.client.state).toBe('FAILED');
  });

  it('closing while disconnected fails held requests with ERR_NBD_CLOSED', async () => {
    const s = await serve(memoryExport('disk', MiB));
    const node = await open(s.uri('disk'), { ...fast, holdMs: 10_000 });
    await s.stop();
    await nextEvent(node.client, 'retrying');
    const held = node.read(0, 512);
    await node.close();
    expect((await rejection(held)).code).toBe('ERR_NBD_CLOSED');
  });
});

describe('opening', () => {
  it('an unknown export is a clear error (GO answers ERR_UNKNOWN)', async () => {
    const s = await serve(memoryExport('disk', MiB));
    const err = await rejection(NbdNode.open(s.uri('nope')));
    expect(err).toMatchObject({ code: 'ERR_NBD_NO_EXPORT', errno: 'EINVAL' });
    expect(err.message).toMatch(/no export named "nope"/);
  });

  it('openImage opens nbd+unix:// URIs (read-only passed on); nbds:// to a server without TLS fails, never in clear', async () => {
    const { openImage } = await import('../../src/block/open.js');
    const s = await serve(memoryExport('disk', MiB));
    const node = await openImage(s.uri('disk'), { readOnly: true, nbd: { holdMs: 0 } });
    try {
      expect(node.driver).toBe('nbd');
      expect(node.caps.canWrite).toBe(false);
      expect(node.size).toBe(MiB);
    } finally {
      await node.close();
    }
    const err = await rejection(openImage(s.uri('disk').replace(/^nbd\+unix:/, 'nbds+unix:'), { readOnly: true, nbd: { holdMs: 0, reconnect: false } }));
    expect(err).toMatchObject({ code: 'ERR_NBD_TLS_UNSUPPORTED', errno: 'EPERM' });
    expect(err.message).toMatch(/does not offer TLS .*ERR_UNSUP|does not offer TLS .*ERR_POLICY/);
  });

  it('nothing listening: ERR_NBD_CONNECT', async () => {
    const err = await rejection(NbdNode.open('nbd+unix:///x?socket=/nonexistent/blkrep.sock'));
    expect(err.code).toBe('ERR_NBD_CONNECT');
    expect(err.message).toMatch(/cannot connect to unix socket \/nonexistent\/blkrep.sock/);
  });

  it('nbd:// over TCP through node:net, and through a transport registry', async () => {
    const { createServer } = await import('node:net');
    const { NbdServer } = await import('../../src/nbd/server.js');
    const { Transports } = await import('../../src/engine/registry.js');
    const e = memoryExport('tcp disk', MiB);
    const srv = new NbdServer({ exports: [e] });
    const listener = createServer((sock) => srv.attach({ stream: sock, peer: 'tcp' }));
    await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
    try {
      const port = (listener.address() as { port: number }).port;
      const uri = `nbd://127.0.0.1:${port}/tcp%20disk`;
      const direct = await open(uri);
      await direct.write(0, Buffer.from('hello'));
      const used: string[] = [];
      const registry = new Transports();
      registry.register('tcp', () => ({
        name: 'tcp',
        summary: 'test',
        listen: () => Promise.reject(new Error('unused')),
        connect: async (address: string) => {
          used.push(address);
          const [host, p] = address.split(':');
          const sock = (await import('node:net')).connect({ host: host!, port: Number(p) });
          await new Promise((resolve) => sock.once('connect', resolve));
          return { stream: sock, peer: address };
        },
      }));
      const viaRegistry = await open(uri, { transports: registry });
      expect((await viaRegistry.read(0, 5)).toString()).toBe('hello');
      expect(used).toEqual([`127.0.0.1:${port}`]);
    } finally {
      for (const n of nodes.splice(0)) await n.close();
      srv.destroyAll();
      await new Promise<void>((resolve) => listener.close(() => resolve()));
    }
  });

  it('through the real transport plugins (tcp and unix), listener URIs included', async () => {
    const { Transports } = await import('../../src/engine/registry.js');
    const { NbdServer } = await import('../../src/nbd/server.js');
    const { createTcpTransport } = await import('../../plugins/transport-tcp/src/index.js');
    const { createUnixTransport } = await import('../../plugins/transport-unix/src/index.js');
    const { makeTempDir } = await import('../support/spawn.js');
    const registry = new Transports();
    registry.register('tcp', createTcpTransport);
    registry.register('unix', createUnixTransport);
    const srv = new NbdServer({ exports: [memoryExport('plug in', MiB)] });
    const onConnection = (c: Parameters<typeof srv.attach>[0]) => srv.attach(c);
    const tcp = await registry.get('tcp').listen('127.0.0.1:0', { onConnection });
    const unix = await registry.get('unix').listen(`${await makeTempDir()}/p.sock`, { onConnection });
    try {
      const a = await open(tcp.uri('plug in'), { transports: registry });
      const b = await open(unix.uri('plug in'), { transports: registry });
      await a.write(0, Buffer.from('via tcp'), { fua: true });
      expect((await b.read(0, 7)).toString()).toBe('via tcp');
    } finally {
      for (const n of nodes.splice(0)) await n.close();
      srv.destroyAll();
      await tcp.close();
      await unix.close();
    }
  });

  it('an abstract Unix socket (socket=%00name)', async () => {
    if (process.platform !== 'linux') return;
    const { createServer } = await import('node:net');
    const { NbdServer } = await import('../../src/nbd/server.js');
    const srv = new NbdServer({ exports: [memoryExport('', MiB)] });
    const name = `\0blkrep-test-${process.pid}-${Date.now()}`;
    const listener = createServer((sock) => srv.attach({ stream: sock, peer: 'abstract' }));
    await new Promise<void>((resolve) => listener.listen(name, resolve));
    try {
      const node = await open(`nbd+unix:///?socket=${encodeURIComponent(name)}`);
      expect(node.size).toBe(MiB);
    } finally {
      for (const n of nodes.splice(0)) await n.close();
      srv.destroyAll();
      await new Promise<void>((resolve) => listener.close(() => resolve()));
    }
  });
});
