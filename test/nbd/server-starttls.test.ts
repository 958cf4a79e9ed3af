/**
 * NBD_OPT_STARTTLS on the server (doc/proto.md "TLS support", tls-heartbeat-ops.md §1.1): the
 * FORCEDTLS rules with a raw socket, the reset of everything negotiated in clear, the
 * CVE-2021-3716 injection, STARTTLS twice, a failed upgrade, and nbdinfo/nbdcopy over TLS.
 * TLS comes from a test-only upgrader on node:tls and a throwaway PKI (test/support/tls-test.ts).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { CMD, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, INFO, OPT, REP, TF } from '../../src/nbd/constants.js';
import type { OptionExtension } from '../../src/nbd/server-session.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';
import { memoryStreamPair } from '../../src/engine/transport-memory.js';
import type { Duplex } from 'node:stream';
import { RawClient, infoPayload, metaPayload, optionFrame, replyError, u32, type OptionReplyFrame } from '../support/raw-client.js';
import { makeTempDir, run } from '../support/spawn.js';
import { makeTestPki, testUpgrader, tlsClient, type TestPki } from '../support/tls-test.js';
import { startServer, waitIdle, withTimeout, type TestServer } from './helpers.js';

vi.setConfig({ testTimeout: 30_000, hookTimeout: 30_000 });

const SIZE = 1 << 20;
const EINVAL = 22;
const LINK_OPTION = 0x4c0;

let pki: TestPki;
let S: TestServer | undefined;
const clients: RawClient[] = [];
let logs: string[] = [];

beforeAll(async () => {
  pki = makeTestPki(await makeTempDir('file'));
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  await S?.close();
  S = undefined;
  logs = [];
});

afterAll(async () => {
  await S?.close();
});

/** one export '' of 1 MiB whose first bytes are "secret", and an extension option (the pair link's kind) */
async function server(mode: 'off' | 'on' | 'require' | undefined, extra: Partial<NbdServerOptions> = {}) {
  const node = new MemoryNode(SIZE);
  await node.write(0, Buffer.from('secret'));
  const upgrader = testUpgrader(pki);
  const link: OptionExtension = { name: 'test link', accept: () => 'not now' };
  S = await startServer({
    exports: [{ name: '', description: 'the secret disk', node: completeNode(node) }],
    handshakeTimeoutMs: 5000,
    log: (level, message) => logs.push(`${level}: ${message}`),
    optionExtensions: new Map([[LINK_OPTION, link]]),
    ...(mode ? { tls: { mode, upgrader } } : {}),
    ...extra,
  });
  return { upgrader, node };
}

/** greeting read, fixed-newstyle + NO_ZEROES sent */
async function optionsPhase(): Promise<RawClient> {
  const c = await RawClient.connect(S!.path);
  clients.push(c);
  await c.readGreeting();
  c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
  return c;
}

/** STARTTLS → ACK, then the TLS handshake; returns a raw client over the TLS stream */
async function startTls(c: RawClient): Promise<RawClient> {
  const r = await c.option(OPT.STARTTLS);
  expect(r.map((x) => x.type)).toEqual([REP.ACK]);
  expect(r[0]!.length).toBe(0);
  const t = RawClient.over(await tlsClient(c.socket, pki));
  clients.push(t);
  return t;
}

function only(r: OptionReplyFrame[], option: number, type: number): void {
  expect(r.map((x) => [x.option, x.type])).toEqual([[option, type]]);
}

describe('STARTTLS with tls require (FORCEDTLS)', () => {
  it('end to end: after STARTTLS the handshake goes on over TLS and the export is served', async () => {
    const { upgrader } = await server('require');
    const c = await optionsPhase();
    const t = await startTls(c);
    const info = await t.handshake({ optionsOnly: true, structured: true, metaContexts: ['base:allocation'] });
    expect(info.size).toBe(SIZE);
    expect((await t.read(0, 6)).toString()).toBe('secret');
    expect(upgrader.upgrades).toBe(1);
    expect(S!.srv.status().connections.map((x) => x.state)).toEqual(['transmission']);
  });

  it('before TLS every option but STARTTLS and ABORT gets ERR_TLS_REQD, and nothing about the exports', async () => {
    await server('require');
    const c = await optionsPhase();
    const probes: Array<[number, Buffer]> = [
      [OPT.LIST, Buffer.alloc(0)],
      [OPT.INFO, infoPayload('', [INFO.NAME, INFO.DESCRIPTION])],
      [OPT.GO, infoPayload('', [INFO.NAME, INFO.DESCRIPTION])],
      [OPT.INFO, infoPayload('nope')],
      [OPT.STRUCTURED_REPLY, Buffer.alloc(0)],
      [OPT.LIST_META_CONTEXT, metaPayload('', [])],
      [OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation'])],
      [OPT.EXTENDED_HEADERS, Buffer.alloc(0)],
      [OPT.PEEK_EXPORT, Buffer.alloc(0)],
      [0x4242, Buffer.alloc(0)],
      [LINK_OPTION, Buffer.alloc(0)],
    ];
    for (const [o, d] of probes) {
      const r = await c.option(o, d);
      only(r, o, REP.ERR_TLS_REQD);
      const text = r[0]!.data.toString();
      expect(text).toBe('TLS is required: send NBD_OPT_STARTTLS first');
    }
    // still usable: TLS, then the same GO succeeds
    const t = await startTls(c);
    const go = await t.option(OPT.GO, infoPayload('', [INFO.DESCRIPTION]));
    expect(go.at(-1)!.type).toBe(REP.ACK);
    expect(go.some((x) => x.type === REP.INFO && x.data.toString('utf8', 2) === 'the secret disk')).toBe(true);
  });

  it('EXPORT_NAME before TLS: the server hangs up without a byte', async () => {
    await server('require');
    const c = await optionsPhase();
    c.sendOption(OPT.EXPORT_NAME, Buffer.alloc(0));
    expect((await c.expectEof()).length).toBe(0);
    await waitIdle(S!.srv);
    expect(logs.some((l) => l.includes('EXPORT_NAME before STARTTLS'))).toBe(true);
  });

  it('ABORT before TLS is acknowledged and ends the connection', async () => {
    await server('require');
    const c = await optionsPhase();
    only(await c.option(OPT.ABORT), OPT.ABORT, REP.ACK);
    await c.expectEof();
  });

  it('plaintext sent after STARTTLS (before its reply) is an injection: dropped, no ACK (CVE-2021-3716)', async () => {
    const { upgrader } = await server('on');
    const c = await optionsPhase();
    c.write(
      Buffer.concat([
        optionFrame(OPT.STARTTLS),
        optionFrame(OPT.STRUCTURED_REPLY),
      ]),
    );
    expect((await c.expectEof()).length).toBe(0);
    await waitIdle(S!.srv);
    expect(upgrader.upgrades).toBe(0);
    expect(logs.some((l) => l.startsWith('warn:') && l.includes('16 bytes arrived in clear after STARTTLS'))).toBe(true);
  });

  it('STARTTLS twice → ERR_INVALID over TLS, and the connection goes on', async () => {
    await server('require');
    const t = await startTls(await optionsPhase());
    only(await t.option(OPT.STARTTLS), OPT.STARTTLS, REP.ERR_INVALID);
    const info = await t.handshake({ optionsOnly: true });
    expect(info.size).toBe(SIZE);
  });

  it('STARTTLS with data → ERR_INVALID, TLS not started', async () => {
    const { upgrader } = await server('require');
    const c = await optionsPhase();
    only(await c.option(OPT.STARTTLS, Buffer.from('x')), OPT.STARTTLS, REP.ERR_INVALID);
    only(await c.option(OPT.LIST), OPT.LIST, REP.ERR_TLS_REQD);
    expect(upgrader.upgrades).toBe(0);
  });

  it('STARTTLS after GO is not an option any more: the request magic is wrong and the server hangs up', async () => {
    await server('require');
    const t = await startTls(await optionsPhase());
    await t.handshake({ optionsOnly: true });
    // 16 bytes of option and 12 more: a request header's worth, with IHAVEOPT where its magic goes
    t.write(optionFrame(OPT.STARTTLS), Buffer.alloc(12));
    expect((await t.expectEof()).length).toBe(0);
    await waitIdle(S!.srv);
    expect(logs.some((l) => l.includes('request magic is 0x49484156'))).toBe(true);
  });

  it('a failed TLS handshake closes the connection and is logged with the peer and the reason', async () => {
    await server('require');
    const c = await optionsPhase();
    only(await c.option(OPT.STARTTLS), OPT.STARTTLS, REP.ACK);
    c.write(Buffer.from('this is not a TLS ClientHello, it is plain text\r\n'));
    await c.expectEof();
    await waitIdle(S!.srv);
    const line = logs.find((l) => l.includes('TLS handshake failed'));
    expect(line).toMatch(/^warn: connection \d+ from test: TLS handshake failed: .+; disconnecting$/);
  });
});

describe('a stalled TLS handshake', () => {
  it('a client silent after the ACK is closed when the handshake time runs out', async () => {
    await server('require', { handshakeTimeoutMs: 300, handshakeEvictAgeMs: 150 });
    const c = await optionsPhase();
    only(await c.option(OPT.STARTTLS), OPT.STARTTLS, REP.ACK);
    expect(S!.srv.status().connections.map((x) => x.state)).toEqual(['starttls']);
    await c.expectEof(5000);
    await waitIdle(S!.srv);
    expect(logs.some((l) => l.includes('handshake not finished within 300 ms'))).toBe(true);
  });
});

describe('STARTTLS with tls on', () => {
  it('options work in clear; what was negotiated in clear is forgotten after STARTTLS', async () => {
    await server('on');
    const c = await optionsPhase();
    // in clear: structured replies and a meta context (what a man in the middle would inject)
    only(await c.option(OPT.STRUCTURED_REPLY), OPT.STRUCTURED_REPLY, REP.ACK);
    const set = await c.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation']));
    expect(set.map((x) => x.type)).toEqual([REP.META_CONTEXT, REP.ACK]);
    const t = await startTls(c);
    // structured replies are off again: a meta context needs them first
    only(await t.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation'])), OPT.SET_META_CONTEXT, REP.ERR_INVALID);
    const info = await t.handshake({ optionsOnly: true });
    expect(info.transmissionFlags & TF.SEND_DF).toBe(0);
    // simple replies, and no meta context for block status
    const r = await t.request(CMD.READ, { offset: 0, length: 6 });
    expect(r.kind).toBe('simple');
    expect(r.kind === 'simple' && r.data?.toString()).toBe('secret');
    t.structured = true; // so an error chunk would be parsed if one (wrongly) came
    expect(replyError(await t.request(CMD.BLOCK_STATUS, { offset: 0, length: 4096 }))).toBe(EINVAL);
  });

  it('a client that never sends STARTTLS is served in clear', async () => {
    await server('on');
    const { client, info } = await RawClient.open(S!.path, { structured: true });
    clients.push(client);
    expect(info.size).toBe(SIZE);
    expect((await client.read(0, 6)).toString()).toBe('secret');
  });
});

describe('without TLS', () => {
  for (const mode of [undefined, 'off'] as const) {
    it(`STARTTLS → ERR_POLICY, never ERR_TLS_REQD (tls ${mode ?? 'not configured'})`, async () => {
      const { upgrader } = await server(mode);
      const c = await optionsPhase();
      only(await c.option(OPT.STARTTLS), OPT.STARTTLS, REP.ERR_POLICY);
      only(await c.option(LINK_OPTION), LINK_OPTION, REP.ERR_POLICY);
      const go = await c.option(OPT.GO, infoPayload(''));
      expect(go.at(-1)!.type).toBe(REP.ACK);
      expect(upgrader.upgrades).toBe(0);
    });
  }
});

describe('over a stream that is not a socket', () => {
  it('STARTTLS works over the in-memory transport (node:tls over a plain Duplex)', async () => {
    const node = new MemoryNode(SIZE);
    await node.write(0, Buffer.from('secret'));
    const srv = new NbdServer({ exports: [{ name: '', node: completeNode(node) }], tls: { mode: 'require', upgrader: testUpgrader(pki) } });
    const [serverSide, clientSide] = memoryStreamPair();
    try {
      srv.attach({ stream: serverSide, peer: 'memory' });
      const read = bytesOf(clientSide);
      expect((await read(18)).readUInt16BE(16)).toBe(3); // FIXED_NEWSTYLE | NO_ZEROES
      clientSide.write(Buffer.concat([u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES), optionFrame(OPT.STARTTLS)]));
      const ack = await read(20);
      expect([ack.readUInt32BE(8), ack.readUInt32BE(12), ack.readUInt32BE(16)]).toEqual([OPT.STARTTLS, REP.ACK, 0]);
      read.stop();
      const t = RawClient.over(await tlsClient(clientSide, pki));
      clients.push(t);
      await t.handshake({ optionsOnly: true });
      expect((await t.read(0, 6)).toString()).toBe('secret');
    } finally {
      srv.destroyAll('test finished');
      await srv.shutdown();
    }
  });
});

/** exact reads from a stream, until stop() hands the stream on (nothing unread may be left) */
function bytesOf(stream: Duplex): ((n: number) => Promise<Buffer>) & { stop(): void } {
  let got = Buffer.alloc(0);
  let waiter: (() => void) | undefined;
  const onData = (b: Buffer) => {
    got = Buffer.concat([got, b]);
    waiter?.();
  };
  stream.on('data', onData);
  const read = async (n: number) => {
    await withTimeout(new Promise<void>((resolve) => {
      waiter = () => got.length >= n && resolve();
      waiter();
    }), 5000, `${n} bytes`);
    const out = got.subarray(0, n);
    got = got.subarray(n);
    return out;
  };
  return Object.assign(read, {
    stop() {
      stream.off('data', onData);
      stream.pause();
      expect(got.length).toBe(0);
    },
  });
}

describe('real peers over TLS', () => {
  it('nbdinfo and nbdcopy (libnbd, GnuTLS) read the export through nbds+unix://', async () => {
    await server('require');
    const uri = `nbds+unix:///?socket=${S!.path}&tls-certificates=${pki.dir}`;
    const info = await run('nbdinfo', ['--json', uri], { timeoutMs: 20_000 });
    expect(info.code, info.stderr).toBe(0);
    const json = JSON.parse(info.stdout) as { exports: Array<{ 'export-size': number; 'is_read_only': boolean }> };
    expect(json.exports[0]!['export-size']).toBe(SIZE);
    const tlsOnly = await run('nbdinfo', ['--is', 'tls', uri], { timeoutMs: 20_000 });
    expect(tlsOnly.code).toBe(0);
    const out = join(await makeTempDir(), 'copy.raw');
    const copy = await run('nbdcopy', ['--synchronous', uri, out], { timeoutMs: 20_000 });
    expect(copy.code, copy.stderr).toBe(0);
    const want = Buffer.alloc(SIZE);
    want.write('secret');
    expect((await readFile(out)).equals(want)).toBe(true);
  });

  it('qemu-io (GnuTLS, tls-creds-x509) writes and reads back over TLS; the bytes are in the export', async () => {
    const { node } = await server('require');
    const r = await run('qemu-io', [
      '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.dir}`,
      '--image-opts', `driver=nbd,path=${S!.path},tls-creds=tls0,tls-hostname=localhost`,
      '-c', 'write -P 0x5a 65536 65536', '-c', 'read -P 0x5a 65536 65536', '-c', 'read -P 0 131072 4096',
    ], { timeoutMs: 30_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toContain('Pattern verification failed');
    expect((await node.read(65536, 65536)).equals(Buffer.alloc(65536, 0x5a))).toBe(true);
  });

  it('nbdinfo without TLS is refused by a require server', async () => {
    await server('require');
    const r = await run('nbdinfo', [`nbd+unix:///?socket=${S!.path}`], { timeoutMs: 20_000 });
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain('secret');
  });
});
