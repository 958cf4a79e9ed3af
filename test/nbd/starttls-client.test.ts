/**
 * The client side of STARTTLS (src/nbd/starttls.ts) with the product's tls upgrader against our
 * server: an extension option (the pair link) opened inside TLS through startTlsPrepare; the same
 * option in clear is refused by a require server; a server that puts clear bytes behind its
 * STARTTLS ACK (a man in the middle) is dropped before any TLS.
 */
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import type tls from 'node:tls';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { completeNode } from '../../src/block/node.js';
import { MemoryNode } from '../../src/block/memory.js';
import { NbdClient } from '../../src/nbd/client.js';
import { encodeOptionReply } from '../../src/nbd/codec.js';
import { FLAG_FIXED_NEWSTYLE, IHAVEOPT, NBDMAGIC, OPT, REP } from '../../src/nbd/constants.js';
import { openExtension, OPT_BLKREP_PAIR_LINK, startTlsPrepare } from '../../src/nbd/option-takeover.js';
import type { OptionExtension } from '../../src/nbd/server-session.js';
import { createTlsUpgrader } from '../../plugins/transport-tls/src/index.js';
import { makeTempDir } from '../support/spawn.js';
import { makePki, type Pki } from '../support/tls-pki.js';
import { startServer, withTimeout, type TestServer } from './helpers.js';

let pki: Pki;
let S: TestServer | undefined;
const cleanups: Array<() => void> = [];
beforeAll(async () => {
  pki = makePki(await makeTempDir('file'));
});
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) c();
  await S?.close();
  S = undefined;
});

function connect(socketPath: string): Promise<{ stream: Duplex; peer: string }> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(socketPath, () => resolve({ stream: sock, peer: socketPath }));
    sock.once('error', reject);
    cleanups.push(() => sock.destroy());
  });
}

const echo: OptionExtension = {
  name: 'echo link',
  accept: () => (stream: Duplex, rest: Buffer) => {
    stream.write(Buffer.concat([Buffer.from('hello:'), rest]));
    stream.on('data', (b: Buffer) => stream.write(b));
    stream.on('end', () => stream.end());
    stream.resume();
  },
};

async function tlsServer(): Promise<TestServer> {
  return startServer({
    exports: [{ name: '', node: completeNode(new MemoryNode(65536)) }],
    optionExtensions: new Map([[OPT_BLKREP_PAIR_LINK, echo]]),
    tls: { mode: 'require', upgrader: createTlsUpgrader(), settings: { 'tls-certificates': pki.server } },
  });
}

describe('client STARTTLS', () => {
  it('startTlsPrepare: the pair link option travels inside TLS; in clear a require server refuses it', async () => {
    S = await tlsServer();
    const upgrader = createTlsUpgrader();
    const opened = await openExtension(await connect(S.path), OPT_BLKREP_PAIR_LINK, Buffer.from('p1'), {
      prepare: startTlsPrepare(upgrader, { 'tls-certificates': pki.noclient, 'tls-hostname': 'localhost' }),
    });
    cleanups.push(() => opened.connection.stream.destroy());
    expect((opened.connection.stream as tls.TLSSocket).encrypted).toBe(true);
    opened.connection.stream.write('ping');
    let got = opened.rest;
    await withTimeout(
      new Promise<void>((resolve) => {
        const onData = (b: Buffer) => {
          got = Buffer.concat([got, b]);
          if (got.length >= 'hello:ping'.length) resolve();
        };
        opened.connection.stream.on('data', onData);
        opened.connection.stream.resume();
        if (got.length >= 'hello:ping'.length) resolve();
      }),
      5000,
      'the echo',
    );
    expect(got.toString()).toBe('hello:ping');

    const plain = await openExtension(await connect(S.path), OPT_BLKREP_PAIR_LINK, Buffer.from('p1')).catch((e: unknown) => e);
    expect(plain).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', details: { replyType: REP.ERR_TLS_REQD } });
  });

  it('nbds+unix:// against our require server: bytes round-trip through the NBD client', async () => {
    S = await tlsServer();
    const c = await NbdClient.connect({ uri: `nbds+unix:///?socket=${S.path}&tls-certificates=${pki.noclient}`, reconnect: false });
    try {
      await c.write(0, Buffer.alloc(4096, 0x5a));
      const back = Buffer.alloc(4096);
      await c.read(0, back);
      expect(back.every((b) => b === 0x5a)).toBe(true);
      expect(c.info.structured).toBe(true); // negotiated again inside TLS
    } finally {
      await c.close();
    }
  });

  it('clear bytes behind the STARTTLS ACK: ERR_NBD_TLS_INJECTION, no TLS handshake', async () => {
    const dir = await makeTempDir();
    const sockPath = path.join(dir, 'mitm');
    let upgrades = 0;
    const server = net.createServer((s) => {
      cleanups.push(() => s.destroy());
      const greeting = Buffer.alloc(18);
      greeting.writeBigUInt64BE(NBDMAGIC, 0);
      greeting.writeBigUInt64BE(IHAVEOPT, 8);
      greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE, 16);
      s.write(greeting);
      let seen = Buffer.alloc(0);
      s.on('data', (b: Buffer) => {
        seen = Buffer.concat([seen, b]);
        if (seen.length >= 4 + 16) {
          // the ACK, and an injected plaintext option reply behind it
          s.write(Buffer.concat([encodeOptionReply(OPT.STARTTLS, REP.ACK), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ACK)]));
        }
      });
      s.on('error', () => {});
    });
    await new Promise<void>((resolve) => server.listen(sockPath, resolve));
    cleanups.push(() => server.close());
    const upgrader = { ...createTlsUpgrader(), name: 'tls', summary: '', server: () => Promise.reject(new Error('no')), client: () => (upgrades++, Promise.reject(new Error('must not be called'))) };
    const err = await openExtension(await connect(sockPath), OPT_BLKREP_PAIR_LINK, Buffer.alloc(0), { prepare: startTlsPrepare(upgrader, {}) }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_NBD_TLS_INJECTION', errno: 'EPERM', details: { bytes: 20 } });
    expect(upgrades).toBe(0);
  });
});
