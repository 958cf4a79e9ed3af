/**
 * The tls upgrader on its own: both sides over real sockets (a TCP listener on 127.0.0.1:0), with
 * credentials made by openssl per file. Node clients are used where the GnuTLS peers cannot make
 * the case: a client certificate from a rogue CA with the right DN (GnuTLS clients do not send a
 * certificate the server's CA did not sign), TLS 1.2 PSK.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { TransportConnection } from '../../../src/api/index.js';
import { Upgraders } from '../../../src/engine/registry.js';
import { makeTempDir, withTimeout } from '../../../test/support/spawn.js';
import { CLIENT_DN, makePki, type Pki } from '../../../test/support/tls-pki.js';
import hook from '../src/hook.js';
import { createTlsUpgrader } from '../src/index.js';

let pki: Pki;
beforeAll(async () => {
  pki = makePki(await makeTempDir('file'));
});

const closers: Array<() => void> = [];
afterEach(() => {
  // the newest first: a TLS socket before the raw socket under it
  for (const c of closers.splice(0).reverse()) c();
});

interface Served {
  port: number;
  /** one result per accepted connection, in order */
  results: Array<Promise<TransportConnection>>;
}

/** A TCP listener whose connections go through upgrader.server(settings) at once. */
async function listen(settings: Record<string, string>): Promise<Served> {
  const upgrader = createTlsUpgrader();
  const results: Array<Promise<TransportConnection>> = [];
  const server = net.createServer((socket) => {
    const p = upgrader.server({ stream: socket, peer: `${socket.remoteAddress}:${socket.remotePort}` }, { settings, timeoutMs: 5000 });
    p.catch(() => {});
    results.push(p);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  closers.push(() => server.close());
  return { port: (server.address() as net.AddressInfo).port, results };
}

function rawConnect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
    closers.push(() => s.destroy());
  });
}

async function client(port: number, settings: Record<string, string>): Promise<TransportConnection> {
  const socket = await rawConnect(port);
  return createTlsUpgrader().client({ stream: socket, peer: `127.0.0.1:${port}` }, { settings, timeoutMs: 5000 });
}

async function echoOnce(server: TransportConnection, c: TransportConnection): Promise<void> {
  const msg = randomBytes(1000);
  const got = new Promise<Buffer>((resolve) => server.stream.once('data', (d: Buffer) => resolve(d)));
  c.stream.write(msg);
  expect((await withTimeout(got, 5000, 'data through TLS')).equals(msg)).toBe(true);
}

async function rejected(p: Promise<unknown>): Promise<Error & { code: string; details: Record<string, unknown> }> {
  try {
    await withTimeout(p, 8000, 'a refusal');
  } catch (err) {
    return err as Error & { code: string; details: Record<string, unknown> };
  }
  throw new Error('it succeeded');
}

describe('tls upgrader: x509', () => {
  it('registers as "tls" through the hook', async () => {
    const upgraders = new Upgraders();
    await hook.call(undefined, { transports: undefined as never, upgraders });
    expect(upgraders.names()).toEqual(['tls']);
    expect(upgraders.get('tls').name).toBe('tls');
  });

  it('server and client: bytes flow, the server name is checked, TLS 1.3', async () => {
    const s = await listen({ 'tls-certificates': pki.server });
    const c = await client(s.port, { 'tls-certificates': pki.noclient, 'tls-hostname': 'localhost' });
    const sc = await s.results[0]!;
    await echoOnce(sc, c);
    expect((c.stream as tls.TLSSocket).getProtocol()).toBe('TLSv1.3');
    expect(sc.peer).toMatch(/^127\.0\.0\.1:\d+$/);
    expect((c.stream as tls.TLSSocket).getCipher().name).toBe('TLS_AES_128_GCM_SHA256');
  });

  it('the server picks AES-128-GCM over a client that prefers AES-256 (node\'s and GnuTLS\'s order), and serves TLS 1.2 clients', async () => {
    const s = await listen({ 'tls-certificates': pki.server });
    const ca = readFileSync(join(pki.server, 'ca-cert.pem'));
    const cases: Array<[tls.ConnectionOptions, string, string]> = [
      [{ ciphers: 'TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256' }, 'TLSv1.3', 'TLS_AES_128_GCM_SHA256'],
      [{ ciphers: 'TLS_AES_256_GCM_SHA384' }, 'TLSv1.3', 'TLS_AES_256_GCM_SHA384'],
      [{ maxVersion: 'TLSv1.2', ciphers: 'ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256' }, 'TLSv1.2', 'ECDHE-ECDSA-AES128-GCM-SHA256'],
    ];
    for (const [i, [options, protocol, cipher]] of cases.entries()) {
      const socket = await rawConnect(s.port);
      const t = tls.connect({ socket, ca, servername: 'localhost', ...options });
      closers.push(() => t.destroy());
      t.on('error', () => {});
      await withTimeout(new Promise((r) => t.once('secureConnect', r)), 5000, `handshake ${i}`);
      expect([t.getProtocol(), t.getCipher().name]).toEqual([protocol, cipher]);
      await echoOnce(await waitResult(s, i), { stream: t, peer: 'client' });
    }
  });

  it('five handshakes at once each get their own connection', async () => {
    const s = await listen({ 'tls-certificates': pki.server });
    const clients = await Promise.all([0, 1, 2, 3, 4].map(() => client(s.port, { 'tls-certificates': pki.noclient, 'tls-hostname': 'localhost' })));
    const servers = await Promise.all(s.results);
    for (let i = 0; i < 5; i++) {
      const c = clients[i]!;
      const local = (c.stream as tls.TLSSocket).localPort;
      const sc = servers.find((x) => x.peer === `127.0.0.1:${local}`)!;
      await echoOnce(sc, c);
    }
  });

  it('verify-peer: a client certificate signed by a rogue CA with the right DN is refused (the node trap)', async () => {
    const s = await listen({ 'tls-certificates': pki.good, 'tls-verify-peer': 'true' });
    // the rogue client trusts the server; only its own certificate is wrong
    const c = client(s.port, { 'tls-certificates': pki.rogue, 'tls-hostname': 'localhost' });
    c.catch(() => {});
    const err = await rejected(waitResult(s, 0));
    expect(err.code).toBe('ERR_TLS_HANDSHAKE');
    expect(err.message).toMatch(/TLS handshake with client 127\.0\.0\.1:\d+ failed/);
    expect(err.details.peer).toMatch(/^127\.0\.0\.1:\d+$/);
  });

  it('verify-peer: no client certificate is refused; the CA-signed one is let in with its DN as identity', async () => {
    const s = await listen({ 'tls-certificates': pki.good, 'tls-verify-peer': 'true' });
    client(s.port, { 'tls-certificates': pki.noclient, 'tls-hostname': 'localhost' }).catch(() => {});
    expect((await rejected(waitResult(s, 0))).code).toBe('ERR_TLS_HANDSHAKE');
    const c = await client(s.port, { 'tls-certificates': pki.client, 'tls-hostname': 'localhost' });
    const sc = await waitResult(s, 1);
    expect(sc.peer).toContain(`(${CLIENT_DN})`);
    await echoOnce(sc, c);
  });

  it('authz: a DN not in the allow-list is refused with the DN and the peer; the file is re-read when it changes', async () => {
    const dir = await makeTempDir();
    const list = join(dir, 'authz');
    writeFileSync(list, '# replicas\nC=GB,O=blkrep,CN=replica-b\n');
    const s = await listen({ 'tls-certificates': pki.good, 'tls-authz': list });
    client(s.port, { 'tls-certificates': pki.client, 'tls-hostname': 'localhost' }).catch(() => {});
    const err = await rejected(waitResult(s, 0));
    expect(err.code).toBe('ERR_TLS_AUTHZ');
    expect(err.message).toMatch(new RegExp(`refused client 127\\.0\\.0\\.1:\\d+: its certificate's DN "${CLIENT_DN}" is not in the authz allow-list`));
    writeFileSync(list, `C=GB,O=blkrep,CN=replica-b\n${CLIENT_DN}\n`);
    const c = await client(s.port, { 'tls-certificates': pki.client, 'tls-hostname': 'localhost' });
    await echoOnce(await waitResult(s, 1), c);
  });

  it('check(): kinds, and a warning for certificates that expire within 30 days (or have)', async () => {
    const u = createTlsUpgrader();
    const good = await u.check!('server', { 'tls-certificates': pki.server });
    expect(good.kind).toBe('x509');
    expect(good.warnings.join('\n')).toMatch(/server-cert\.pem expires in [01] days/);
    expect(Date.parse(good.notAfter!)).toBeGreaterThan(Date.now());
    const expired = await u.check!('server', { 'tls-certificates': pki.expired });
    expect(expired.warnings.join('\n')).toMatch(/server-cert\.pem expired on/);
    expect((await u.check!('server', { 'tls-certificates': pki.good, 'tls-verify-peer': 'true' })).kind).toBe('x509+verify-peer');
    expect((await u.check!('server', { 'tls-psk-file': pki.psk })).kind).toBe('psk');
  });
});

/** The `i`-th server result, once the connection arrived. */
async function waitResult(s: Served, i = 0): Promise<TransportConnection> {
  const deadline = Date.now() + 5000;
  while (s.results.length <= i) {
    if (Date.now() > deadline) throw new Error('no connection arrived');
    await new Promise((r) => setTimeout(r, 10));
  }
  return s.results[i]!;
}

describe('tls upgrader: PSK', () => {
  it('TLS 1.3 with our client; TLS 1.2 with the PSK suites the GnuTLS peers use', async () => {
    const s = await listen({ 'tls-psk-file': pki.psk });
    const c = await client(s.port, { 'tls-psk-file': pki.psk, 'tls-username': 'alice' });
    await echoOnce(await waitResult(s, 0), c);
    expect((c.stream as tls.TLSSocket).getProtocol()).toBe('TLSv1.3');
    expect((c.stream as tls.TLSSocket).getCipher().name).toBe('TLS_AES_128_GCM_SHA256');
    const socket = await rawConnect(s.port);
    const t12 = tls.connect({
      socket,
      maxVersion: 'TLSv1.2',
      ciphers: 'PSK-AES128-GCM-SHA256',
      pskCallback: () => ({ identity: 'alice', psk: Buffer.from(pki.pskKeyHex, 'hex') }),
      checkServerIdentity: () => undefined,
    });
    closers.push(() => t12.destroy());
    t12.on('error', () => {});
    await withTimeout(new Promise((r) => t12.once('secureConnect', r)), 5000, 'TLS 1.2 PSK');
    expect(t12.getProtocol()).toBe('TLSv1.2');
    expect((await waitResult(s, 1)).peer).toContain('(alice)');
  });

  it('an unknown user, a user not in the allow-list, and a wrong key are refused; the reason names the user, never a key', async () => {
    const dir = await makeTempDir();
    const keys = join(dir, 'keys.psk');
    const bobKey = randomBytes(32).toString('hex');
    writeFileSync(keys, `alice:${pki.pskKeyHex}\nbob:${bobKey}\n`);
    const s = await listen({ 'tls-psk-file': keys, 'tls-authz-list': 'alice' });
    const carol = join(dir, 'carol.psk');
    writeFileSync(carol, `carol:${randomBytes(32).toString('hex')}\n`);
    client(s.port, { 'tls-psk-file': carol, 'tls-username': 'carol' }).catch(() => {});
    const unknown = await rejected(waitResult(s, 0));
    expect(unknown).toMatchObject({ code: 'ERR_TLS_AUTHZ' });
    expect(unknown.message).toMatch(/refused client 127\.0\.0\.1:\d+: unknown PSK user "carol"/);
    client(s.port, { 'tls-psk-file': keys, 'tls-username': 'bob' }).catch(() => {});
    const bob = await rejected(waitResult(s, 1));
    expect(bob.message).toMatch(/PSK user "bob" is not in the authz allow-list/);
    expect(bob.message).not.toContain(bobKey);
    const wrong = await rejected(client(s.port, { 'tls-psk-file': pki.wrongPsk, 'tls-username': 'alice' }));
    expect(wrong.code).toBe('ERR_TLS_HANDSHAKE');
    expect((await rejected(waitResult(s, 2))).code).toBe('ERR_TLS_HANDSHAKE');
  });
});

describe('tls upgrader: bad settings and credentials fail with clear errors', () => {
  const u = createTlsUpgrader();
  const cases: Array<[string, () => Record<string, string>, 'server' | 'client', string, RegExp]> = [
    ['no credentials (server)', () => ({}), 'server', 'ERR_TLS_SETTINGS', /needs credentials/],
    ['both x509 and PSK', () => ({ 'tls-certificates': pki.good, 'tls-psk-file': pki.psk }), 'server', 'ERR_TLS_SETTINGS', /not both/],
    ['an unknown key', () => ({ 'tls-certificates': pki.good, 'tls-cert': 'x' }), 'server', 'ERR_TLS_SETTINGS', /unknown TLS setting "tls-cert"/],
    ['verify-peer not a boolean', () => ({ 'tls-certificates': pki.good, 'tls-verify-peer': 'maybe' }), 'server', 'ERR_TLS_SETTINGS', /not a boolean/],
    ['a missing directory', () => ({ 'tls-certificates': `${pki.root}/nope` }), 'server', 'ERR_TLS_CREDENTIALS', /nope: no such directory/],
    ['no server key', () => ({ 'tls-certificates': pki.noclient }), 'server', 'ERR_TLS_CREDENTIALS', /server-cert\.pem: no such file \(the server certificate\)/],
    ['verify-peer without ca-cert.pem', () => ({ 'tls-certificates': pki.expired.replace('expired', 'server-noca'), 'tls-verify-peer': 'true' }), 'server', 'ERR_TLS_CREDENTIALS', /ca-cert\.pem: no such file/],
    ['a key of another certificate', () => ({ 'tls-certificates': `${pki.root}/mismatch` }), 'server', 'ERR_TLS_CREDENTIALS', /server-key\.pem: this key does not belong to the certificate/],
    ['a bad PSK line', () => ({ 'tls-psk-file': `${pki.root}/bad.psk` }), 'server', 'ERR_TLS_CREDENTIALS', /bad\.psk line 2: expected "username:hexkey"/],
    ['an allow-list on a client', () => ({ 'tls-certificates': pki.client, 'tls-authz-list': 'x' }), 'client', 'ERR_TLS_SETTINGS', /tls-authz is a server setting/],
    ['an x509 allow-list with verify-peer off', () => ({ 'tls-certificates': pki.good, 'tls-authz-list': CLIENT_DN, 'tls-verify-peer': 'false' }), 'server', 'ERR_TLS_SETTINGS', /needs client certificates/],
  ];
  beforeAll(async () => {
    const { mkdirSync, copyFileSync } = await import('node:fs');
    mkdirSync(`${pki.root}/server-noca`);
    for (const f of ['server-cert.pem', 'server-key.pem']) copyFileSync(`${pki.server}/${f}`, `${pki.root}/server-noca/${f}`);
    mkdirSync(`${pki.root}/mismatch`);
    copyFileSync(`${pki.server}/server-cert.pem`, `${pki.root}/mismatch/server-cert.pem`);
    copyFileSync(`${pki.client}/client-key.pem`, `${pki.root}/mismatch/server-key.pem`);
    writeFileSync(`${pki.root}/bad.psk`, `alice:${pki.pskKeyHex}\nbob-without-key\n`);
  });
  it.each(cases)('%s', async (_name, settings, role, code, message) => {
    const err = await rejected(u.check!(role, settings()));
    expect(err.code).toBe(code);
    expect(err.message).toMatch(message);
    expect(err.message).not.toContain(pki.pskKeyHex);
  });
});
