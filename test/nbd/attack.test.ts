/**
 * Hostile clients: huge lengths, oversize names, EOF at every byte, idle sockets, bad magic,
 * clients dying with requests in flight, connection limits, pipelining without reading.
 */
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { CMD, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, INFO, OPT, REP } from '../../src/nbd/constants.js';
import { encodeRequest } from '../../src/nbd/codec.js';
import { RawClient, infoPayload, metaPayload, optionFrame, replyError, u32 } from '../support/raw-client.js';
import { Gate, hookNode } from '../support/fault-node.js';
import { pattern, startServer, waitConnections, waitIdle, withTimeout, type TestServer } from './helpers.js';

vi.setConfig({ testTimeout: 60_000, hookTimeout: 30_000 });

const MiB = 1 << 20;
const SIZE = 16 * MiB;

let S: TestServer;
const gate = new Gate();
const clients: RawClient[] = [];

beforeAll(async () => {
  S = await startServer({
    handshakeTimeoutMs: 5000,
    exports: [
      { name: '', node: completeNode(new MemoryNode(SIZE)) },
      { name: 'gated', node: completeNode(hookNode(new MemoryNode(SIZE), { gate, gateOps: ['read', 'write'] })) },
      // the pair's writer export takes more at once (ExportOptions.maxInflight; data-token.ts)
      { name: 'gated-wide', maxInflight: 256, node: completeNode(hookNode(new MemoryNode(SIZE), { gate, gateOps: ['read', 'write'] })) },
    ],
  });
});

afterAll(async () => {
  for (const c of clients) c.destroy();
  gate.open();
  await S?.close();
});

async function connect(path = S.path): Promise<RawClient> {
  const c = await RawClient.connect(path);
  clients.push(c);
  return c;
}

async function optionsPhase(path = S.path): Promise<RawClient> {
  const c = await connect(path);
  await c.readGreeting();
  c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
  return c;
}

/** A fresh, well-formed client can still write and read back. */
async function serverStillWorks(path = S.path, exportName = ''): Promise<void> {
  const { client } = await RawClient.open(path, { exportName });
  try {
    const d = pattern(65536, Date.now() & 0xffff);
    await client.ok(CMD.WRITE, { offset: SIZE - 65536, data: d });
    expect((await client.read(SIZE - 65536, 65536)).equals(d)).toBe(true);
  } finally {
    client.destroy();
  }
}

function memory(): { rss: number; arrayBuffers: number } {
  const m = process.memoryUsage();
  return { rss: m.rss, arrayBuffers: m.arrayBuffers };
}

describe('oversize lengths and names', () => {
  it('option length 0xffffffff → connection closed promptly, server memory not grown', async () => {
    await serverStillWorks(); // warm up allocations first
    const before = memory();
    for (let i = 0; i < 50; i++) {
      const c = await optionsPhase();
      if (i % 2) expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
      c.write(optionFrame(i % 3 === 0 ? 0x7777 : OPT.INFO, Buffer.alloc(1024, 0x41), 0xffffffff));
      const t0 = Date.now();
      expect((await c.expectEof(2000)).length).toBe(0);
      expect(Date.now() - t0).toBeLessThan(2000);
    }
    const after = memory();
    expect(after.arrayBuffers - before.arrayBuffers).toBeLessThan(4 * MiB);
    expect(after.rss - before.rss).toBeLessThan(32 * MiB);
    await waitIdle(S.srv);
    await serverStillWorks();
  });

  it('options of huge but not absurd lengths (1 MiB, 64 KiB + 1) are refused by closing, without waiting for the data', async () => {
    for (const len of [MiB, 64 * 1024 + 1, 0x80000000]) {
      const c = await optionsPhase();
      c.write(optionFrame(OPT.LIST, Buffer.alloc(16), len));
      expect((await c.expectEof(2000)).length).toBe(0);
    }
  });

  it('a 64 KiB option of junk is read and answered (ERR_UNSUP), the connection stays usable', async () => {
    const c = await optionsPhase();
    const r = await c.option(0x7777, Buffer.alloc(64 * 1024, 0x5a));
    expect(r.length).toBe(1);
    expect(r[0]!.type).toBe(REP.ERR_UNSUP);
    expect((await c.option(OPT.LIST)).pop()!.type).toBe(REP.ACK);
    c.destroy();
  });

  it('names over 4096 bytes: INFO/GO/SET/LIST_META_CONTEXT get an error reply, EXPORT_NAME closes', async () => {
    const c = await optionsPhase();
    expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
    const errs = [REP.ERR_INVALID, REP.ERR_TOO_BIG, REP.ERR_UNKNOWN];
    for (const n of [4097, 5000, 60_000]) {
      const long = 'n'.repeat(n);
      for (const opt of [OPT.INFO, OPT.GO]) {
        const r = await c.option(opt, infoPayload(long, [INFO.NAME]));
        expect(r.length).toBe(1);
        expect(errs).toContain(r[0]!.type);
      }
      for (const opt of [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]) {
        const r1 = await c.option(opt, metaPayload(long, ['base:allocation']));
        expect(r1.length).toBe(1);
        expect(errs).toContain(r1[0]!.type);
        const r2 = await c.option(opt, metaPayload('', ['base:' + 'q'.repeat(Math.min(n, 60_000))]));
        expect(r2.length).toBe(1);
        expect([REP.ERR_INVALID, REP.ERR_TOO_BIG]).toContain(r2[0]!.type);
      }
    }
    // exactly 4096 is a legal (unknown) name
    const r = await c.option(OPT.INFO, infoPayload('n'.repeat(4096)));
    expect(r[0]!.type).toBe(REP.ERR_UNKNOWN);
    // still usable
    const go = await c.option(OPT.GO, infoPayload(''));
    expect(go.pop()!.type).toBe(REP.ACK);
    c.structured = true;
    expect((await c.read(0, 4096)).length).toBe(4096);
    c.destroy();

    const e = await optionsPhase();
    e.sendOption(OPT.EXPORT_NAME, Buffer.alloc(5000, 0x61));
    expect((await e.expectEof()).length).toBe(0);
  });
});

describe('EOF anywhere', () => {
  it('EOF at every byte offset of a full handshake and first requests: the server closes, fresh connections work', async () => {
    const writeData = pattern(512, 4242);
    const stream = Buffer.concat([
      u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES),
      optionFrame(OPT.STRUCTURED_REPLY),
      optionFrame(OPT.LIST),
      optionFrame(OPT.LIST_META_CONTEXT, metaPayload('', ['base:'])),
      optionFrame(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation'])),
      optionFrame(OPT.INFO, infoPayload('', [INFO.NAME, INFO.BLOCK_SIZE])),
      optionFrame(OPT.GO, infoPayload('', [INFO.BLOCK_SIZE])),
      encodeRequest(0, CMD.READ, 1n, 0, 4096),
      encodeRequest(0, CMD.WRITE, 2n, 8192, 512),
      writeData,
      encodeRequest(0, CMD.BLOCK_STATUS, 3n, 0, 65536),
      encodeRequest(0, CMD.FLUSH, 4n, 0, 0),
      encodeRequest(0, CMD.DISC, 5n, 0, 0),
    ]);
    for (let k = 0; k <= stream.length; k++) {
      const c = await RawClient.connect(S.path);
      try {
        if (k > 0) await c.readGreeting();
        c.write(stream.subarray(0, k));
        // alternate a clean half-close and an abrupt reset
        if (k % 2) c.end();
        else c.destroy();
        if (k % 2) await c.expectEof();
      } finally {
        c.destroy();
      }
    }
    await waitIdle(S.srv);
    // the full stream worked and wrote its data
    const { client } = await RawClient.open(S.path);
    expect((await client.read(8192, 512)).equals(writeData)).toBe(true);
    client.destroy();
    await serverStillWorks();
  });

  it('a client that half-closes after pipelining requests still gets every reply, then EOF', async () => {
    for (const structured of [false, true]) {
      const { client } = await RawClient.open(S.path, { structured });
      const d = pattern(65536, 0x4c05e);
      const w = client.send(CMD.WRITE, { offset: 3 * MiB, data: d });
      const r = client.send(CMD.READ, { offset: 3 * MiB, length: 65536 });
      const f = client.send(CMD.FLUSH);
      client.end();
      expect(replyError(await client.readReply(w))).toBe(0);
      const rr = await client.readReply(r);
      expect(replyError(rr)).toBe(0);
      expect(replyError(await client.readReply(f))).toBe(0);
      expect((await client.expectEof()).length).toBe(0);
    }
  });

  it('EOF in the middle of a 1 MiB WRITE payload, with other requests in flight', async () => {
    for (const cut of [0, 1, 65536, MiB - 1]) {
      const { client } = await RawClient.open(S.path);
      client.send(CMD.READ, { offset: 0, length: MiB });
      client.write(encodeRequest(0, CMD.WRITE, 99n, 0, MiB), Buffer.alloc(cut, 0xee));
      client.end();
      await client.expectEof();
    }
    const { client } = await RawClient.open(S.path);
    // none of the incomplete writes landed
    expect((await client.read(0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    client.destroy();
  });
});

describe('timeouts, magic, dying clients, limits', () => {
  it('an idle socket in the handshake is closed after handshakeTimeoutMs; a finished handshake is not', async () => {
    const T = await startServer({ handshakeTimeoutMs: 300, exports: [{ name: '', node: completeNode(new MemoryNode(SIZE)) }] });
    try {
      const { client: served } = await RawClient.open(T.path);
      for (const stage of ['nothing', 'flags', 'flags + half an option', 'after an option']) {
        const c = await RawClient.connect(T.path);
        const t0 = Date.now();
        await c.readGreeting();
        if (stage !== 'nothing') c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        if (stage === 'flags + half an option') c.write(optionFrame(OPT.LIST).subarray(0, 9));
        if (stage === 'after an option') expect((await c.option(OPT.LIST)).pop()!.type).toBe(REP.ACK);
        await c.expectEof(3000);
        const elapsed = Date.now() - t0;
        expect(elapsed, stage).toBeGreaterThanOrEqual(250);
        expect(elapsed, stage).toBeLessThan(3000);
      }
      // the connection that finished its handshake long before is still served
      expect(served.closed).toBe(false);
      expect((await served.read(0, 512)).length).toBe(512);
      served.destroy();
      // a client dribbling one byte per round trip cannot extend its handshake either
      const slow = await RawClient.connect(T.path);
      await slow.readGreeting();
      slow.sendClientFlags(FLAG_C_FIXED_NEWSTYLE);
      const t0 = Date.now();
      let n = 0;
      while (!slow.closed && Date.now() - t0 < 3000) {
        const r = await slow.option(0x7777, Buffer.alloc(8)).catch(() => undefined);
        if (r) n++;
      }
      expect(slow.closed).toBe(true);
      expect(n).toBeGreaterThan(0);
      expect(Date.now() - t0).toBeLessThan(3000);
    } finally {
      await T.close();
    }
  });

  it.each([
    ['reserved 0x25609514', 0x25609514],
    ['reserved 0x12560953', 0x12560953],
    ['zero', 0],
    ['extended-header magic (not negotiated)', 0x21e41c71],
    ['simple reply magic', 0x67446698],
  ])('bad request magic (%s) → disconnect', async (_n, magic) => {
    const { client } = await RawClient.open(S.path);
    await client.ok(CMD.FLUSH);
    const req = encodeRequest(0, CMD.READ, 7n, 0, 512);
    req.writeUInt32BE(magic >>> 0, 0);
    client.write(req);
    expect((await client.expectEof()).length).toBe(0);
  });

  it('bad option magic → disconnect', async () => {
    const c = await optionsPhase();
    c.write(optionFrame(OPT.LIST, Buffer.alloc(0), 0, 0x49484156454f5055n));
    expect((await c.expectEof()).length).toBe(0);
  });

  it('clients dying with requests in flight: the server keeps serving others', async () => {
    const { client: other } = await RawClient.open(S.path, { structured: true });
    const keep = pattern(65536, 777);
    await other.ok(CMD.WRITE, { offset: 65536, data: keep });
    for (let round = 0; round < 5; round++) {
      const { client } = await RawClient.open(S.path, { structured: round % 2 === 1 });
      for (let i = 0; i < 50; i++) {
        if (i % 3 === 0) client.send(CMD.WRITE, { offset: 4 * MiB + i * 4096, data: pattern(4096, i) });
        else client.send(CMD.READ, { offset: (i * 65536) % (SIZE - MiB), length: MiB });
      }
      client.destroy();
      // meanwhile the other connection works
      expect((await other.read(65536, 65536)).equals(keep)).toBe(true);
    }
    // requests stuck in the node when their client dies are finished without harm
    const { client: g } = await RawClient.open(S.path, { exportName: 'gated' });
    gate.close();
    const entered = gate.entered;
    for (let i = 0; i < 50; i++) {
      if (i % 2) g.send(CMD.READ, { offset: i * 4096, length: 4096 });
      else g.send(CMD.WRITE, { offset: i * 4096, data: pattern(4096, i) });
    }
    await gate.waitEntered(entered + 50);
    g.destroy();
    // while they are stuck the others are served
    expect((await other.read(65536, 65536)).equals(keep)).toBe(true);
    // (the server only sees EOF, which may be a half-close: it finishes the stuck requests, then closes)
    gate.open();
    await waitConnections(S.srv, 1);
    expect((await other.read(65536, 65536)).equals(keep)).toBe(true);
    await serverStillWorks(S.path, 'gated');
    other.destroy();
    await waitIdle(S.srv);
  });

  it('a client that half-closes while parsing is stopped (64 requests running) still gets every reply, then EOF', async () => {
    const { client } = await RawClient.open(S.path, { exportName: 'gated' });
    gate.close();
    try {
      const entered = gate.entered;
      const cookies: bigint[] = [];
      for (let i = 0; i < 100; i++) cookies.push(client.send(CMD.READ, { offset: i * 4096, length: 4096 }));
      client.end();
      await gate.waitEntered(entered + 64);
      gate.open();
      const got = new Set<bigint>();
      for (let i = 0; i < 100; i++) {
        const r = await client.readReply();
        expect(replyError(r)).toBe(0);
        got.add(r.cookie);
      }
      expect(got.size).toBe(100);
      expect((await client.expectEof()).length).toBe(0);
    } finally {
      gate.open();
      client.destroy();
    }
  });

  it('pipelining many requests without reading replies: at most 64 run at once, all are answered later', async () => {
    const { client } = await RawClient.open(S.path, { exportName: 'gated' });
    gate.close();
    try {
      const entered = gate.entered;
      client.pause();
      const cookies: bigint[] = [];
      for (let i = 0; i < 200; i++) cookies.push(client.send(CMD.READ, { offset: (i % 64) * 65536, length: 65536 }));
      await gate.waitEntered(entered + 64);
      const st = S.srv.status().connections.filter((x) => x.export === 'gated').sort((a, b) => b.id - a.id)[0]!;
      expect(st.inFlight).toBe(64);
      expect(st.requests).toBe(64);
      gate.open();
      client.resume();
      const got = new Set<bigint>();
      for (let i = 0; i < 200; i++) {
        const r = await client.readReply();
        expect(replyError(r)).toBe(0);
        got.add(r.cookie);
      }
      expect(got.size).toBe(200);
    } finally {
      gate.open();
      client.destroy();
    }
  });

  it('pipelining many requests without reading replies: with maxInflight 256 on the export, 256 run at once (not 64), all are answered later', async () => {
    const { client } = await RawClient.open(S.path, { exportName: 'gated-wide' });
    gate.close();
    try {
      const entered = gate.entered;
      client.pause();
      const cookies: bigint[] = [];
      for (let i = 0; i < 300; i++) cookies.push(client.send(CMD.READ, { offset: (i % 256) * 4096, length: 4096 }));
      await gate.waitEntered(entered + 256);
      const st = S.srv.status().connections.filter((x) => x.export === 'gated-wide').sort((a, b) => b.id - a.id)[0]!;
      expect(st.inFlight).toBe(256);
      expect(st.requests).toBe(256);
      gate.open();
      client.resume();
      const got = new Set<bigint>();
      for (let i = 0; i < 300; i++) {
        const r = await client.readReply();
        expect(replyError(r)).toBe(0);
        got.add(r.cookie);
      }
      expect(got.size).toBe(300);
    } finally {
      gate.open();
      client.destroy();
    }
  });

  it('options sent without reading the replies: at most 256 KiB of replies are queued, the socket is not read meanwhile, all are answered later', async () => {
    const before = S.srv.status().buffers.used;
    const c = await optionsPhase();
    c.pause();
    const N = 20_000;
    c.write(Buffer.concat(Array.from({ length: N }, () => optionFrame(OPT.LIST))));
    // per LIST: SERVER "" (20 + 4 bytes), SERVER "gated" (20 + 9), ACK (20)
    const perList = 73;
    let last = -1;
    let same = 0;
    const deadline = Date.now() + 10_000;
    while (same < 5 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
      const used = S.srv.status().buffers.used - before;
      same = used === last ? same + 1 : 0;
      last = used;
    }
    expect(same).toBe(5);
    expect(last).toBeGreaterThanOrEqual(128 * 1024);
    expect(last).toBeLessThanOrEqual(256 * 1024 + perList);
    c.resume();
    expect((await c.readExact(N * perList, 20_000)).length).toBe(N * perList);
    c.destroy();
    await withTimeout(waitIdle(S.srv), 5000, 'the connection to close');
    expect(S.srv.status().buffers.used).toBe(before);
  });

  it('a connection waiting for buffer room when the server shuts down gets ESHUTDOWN for its request, then EOF', async () => {
    const g = new Gate();
    const T = await startServer({ maxBufferBytes: 32 * MiB, exports: [{ name: '', node: completeNode(hookNode(new MemoryNode(64 * MiB), { gate: g, gateOps: ['read'] })) }] });
    try {
      g.close();
      const { client: holder } = await RawClient.open(T.path);
      const held = holder.send(CMD.READ, { offset: 0, length: 32 * MiB });
      await g.waitEntered(1);
      const { client: waiter } = await RawClient.open(T.path);
      const w = waiter.send(CMD.READ, { offset: 0, length: MiB });
      const waiting = async (): Promise<void> => {
        while (T.srv.status().buffers.waiting !== 1) await new Promise((r) => setTimeout(r, 10));
      };
      await withTimeout(waiting(), 5000, 'the second connection to wait for room');
      const down = T.srv.shutdown();
      const r = await waiter.readReply(w);
      expect(replyError(r)).toBe(108); // ESHUTDOWN
      expect((await waiter.expectEof()).length).toBe(0);
      g.open();
      expect(replyError(await holder.readReply(held, 20_000))).toBe(0);
      await withTimeout(down, 10_000, 'shutdown');
      expect(T.srv.status().buffers).toMatchObject({ used: 0, waiting: 0 });
    } finally {
      g.open();
      await T.close();
    }
  });

  it('a full server does not evict a connection younger than handshakeEvictAgeMs: the new one is refused', async () => {
    const T = await startServer({ maxConnections: 1, handshakeTimeoutMs: 5000, handshakeEvictAgeMs: 60_000, exports: [{ name: '', node: completeNode(new MemoryNode(SIZE)) }] });
    const refused: string[] = [];
    T.srv.on('refused', (e: { reason: string }) => refused.push(e.reason));
    try {
      const a = await RawClient.connect(T.path);
      await a.readGreeting();
      const b = await RawClient.connect(T.path);
      expect((await b.expectEof()).length).toBe(0);
      expect(refused).toEqual(['already serving 1 connections (--shared 1)']);
      // the young one finishes its handshake and is served
      a.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
      expect((await a.option(OPT.LIST)).pop()!.type).toBe(REP.ACK);
      a.destroy();
    } finally {
      await T.close();
    }
  });

  it('--shared limit: with maxConnections 2 a third connection takes the place of one still in the handshake; with both served it is refused', async () => {
    const T = await startServer({ maxConnections: 2, handshakeTimeoutMs: 5000, handshakeEvictAgeMs: 0, exports: [{ name: '', node: completeNode(new MemoryNode(SIZE)) }] });
    const refused: string[] = [];
    const gone: string[] = [];
    T.srv.on('refused', (e: { reason: string }) => refused.push(e.reason));
    T.srv.on('disconnect', (e: { reason: string }) => gone.push(e.reason));
    try {
      const { client: a } = await RawClient.open(T.path); // in transmission
      const b = await RawClient.connect(T.path); // in the handshake
      await b.readGreeting();
      const { client: c } = await RawClient.open(T.path); // takes b's place
      expect((await b.expectEof()).length).toBe(0);
      expect(refused).toEqual([]);
      expect(gone).toHaveLength(1);
      expect(gone[0]).toMatch(/^handshake not finished after \d+ ms; its place was taken by a new connection \(--shared 2 reached\)$/);
      // the two served connections are unaffected; a third is refused
      expect((await a.read(0, 512)).length).toBe(512);
      expect((await c.read(0, 512)).length).toBe(512);
      const b2 = await RawClient.connect(T.path);
      expect((await b2.expectEof()).length).toBe(0);
      expect(refused).toEqual(['already serving 2 connections (--shared 2)']);
      c.destroy();
      await waitConnections(T.srv, 1);
      const { client: d } = await RawClient.open(T.path);
      expect((await d.read(0, 512)).length).toBe(512);
      const e = await RawClient.connect(T.path);
      expect((await e.expectEof()).length).toBe(0);
      expect(refused.length).toBe(2);
      d.destroy();
      a.destroy();
      await withTimeout(waitIdle(T.srv), 5000, 'idle');
    } finally {
      await T.close();
    }
  });
});
