/**
 * Test servers on Unix sockets in temporary directories, and bounded waits on server events.
 */
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { mkdtemp, rm } from 'node:fs/promises';
import { mkdtempSync, rmSync } from 'node:fs';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';
import { createTlsUpgrader } from '../../plugins/transport-tls/src/index.js';
import { startTlsProxy } from '../support/tls-proxy.js';
import { makePki, type Pki } from '../support/tls-pki.js';

/**
 * How a suite's raw clients reach the server: in clear, or through a proxy that does STARTTLS
 * first (test/support/tls-proxy.ts) with x509 client certificates the server checks, or a PSK.
 */
export type NbdTestTransport = 'plain' | 'x509' | 'psk';

interface TlsSides {
  server: Record<string, string>;
  client: Record<string, string>;
}

let pki: Pki | undefined;
const tlsSides = new Map<NbdTestTransport, TlsSides>();
const upgrader = createTlsUpgrader();

/** One PKI per test process (openssl takes a while), removed at exit. */
function sidesOf(transport: 'x509' | 'psk'): TlsSides {
  if (!pki) {
    const root = mkdtempSync(path.join(os.tmpdir(), 'blkrep-nbd-pki-'));
    process.once('exit', () => rmSync(root, { recursive: true, force: true }));
    pki = makePki(root);
  }
  let sides = tlsSides.get(transport);
  if (!sides) {
    // the same settings objects every time: the upgrader keeps one tls.Server per object
    sides =
      transport === 'x509'
        ? { server: { 'tls-certificates': pki.good, 'tls-verify-peer': 'true' }, client: { 'tls-certificates': pki.client } }
        : { server: { 'tls-psk-file': pki.psk }, client: { 'tls-psk-file': pki.psk, 'tls-username': 'alice' } };
    tlsSides.set(transport, sides);
  }
  return sides;
}

export interface TestServer {
  srv: NbdServer;
  path: string;
  /** connections whose TLS handshake the server completed (0 in clear) */
  readonly tlsUpgrades: number;
  /** drop every connection, shut the server down, close the listener, remove the directory */
  close(): Promise<void>;
}

/**
 * An NbdServer on a Unix socket; with transport x509 or psk the server requires TLS and `path`
 * is the STARTTLS proxy's socket (the raw clients speak clear NBD to it).
 */
export async function startServer(options: NbdServerOptions, transport: NbdTestTransport = 'plain'): Promise<TestServer> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'blkrep-nbd-test-'));
  const socketPath = path.join(dir, 'nbd.sock');
  const sides = transport === 'plain' ? undefined : sidesOf(transport);
  let tlsUpgrades = 0;
  const log: NbdServerOptions['log'] = (level, message) => {
    if (/: TLS is on$/.test(message)) tlsUpgrades++;
    options.log?.(level, message);
  };
  const srv = new NbdServer(sides ? { ...options, log, tls: { mode: 'require', upgrader, settings: sides.server } } : options);
  // allowHalfOpen as the unix and tcp transports do: a client's EOF reaches the session as EOF.
  const listener = net.createServer({ allowHalfOpen: true }, (sock) => srv.attach({ stream: sock, peer: 'test' }));
  await new Promise<void>((resolve, reject) => {
    listener.once('error', reject);
    listener.listen(socketPath, () => {
      listener.removeListener('error', reject);
      resolve();
    });
  });
  const proxy = sides ? await startTlsProxy(path.join(dir, 'tls-proxy.sock'), socketPath, upgrader, sides.client) : undefined;
  let closed = false;
  return {
    srv,
    path: proxy?.path ?? socketPath,
    get tlsUpgrades() {
      return tlsUpgrades;
    },
    async close() {
      if (closed) return;
      closed = true;
      srv.destroyAll('test finished');
      await withTimeout(srv.shutdown(), 5000, 'server shutdown').catch(() => {});
      await new Promise<void>((resolve) => listener.close(() => resolve()));
      await proxy?.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Reject if `p` has not settled within `ms`. */
export function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    p.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}

/** Resolve once the server has no connections left (driven by its 'disconnect' events). */
export function waitIdle(srv: NbdServer, ms = 5000): Promise<void> {
  const idle = () => srv.status().connections.length === 0;
  if (idle()) return Promise.resolve();
  return withTimeout(
    new Promise<void>((resolve) => {
      const on = () => {
        if (idle()) {
          srv.removeListener('disconnect', on);
          resolve();
        }
      };
      srv.on('disconnect', on);
    }),
    ms,
    `the server to have no connections (has ${srv.status().connections.length})`,
  );
}

/** Resolve once the server has exactly n connections ('connection'/'disconnect' driven). */
export function waitConnections(srv: NbdServer, n: number, ms = 5000): Promise<void> {
  const ok = () => srv.status().connections.length === n;
  if (ok()) return Promise.resolve();
  return withTimeout(
    new Promise<void>((resolve) => {
      const on = () => {
        if (ok()) {
          srv.removeListener('disconnect', on);
          srv.removeListener('connection', on);
          resolve();
        }
      };
      srv.on('disconnect', on);
      srv.on('connection', on);
    }),
    ms,
    `the server to have ${n} connections`,
  );
}

/** Deterministic pseudo-random bytes (xorshift32), for data patterns. */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    if (i + 4 <= length) b.writeUInt32LE(x, i);
    else for (let j = 0; i + j < length; j++) b[i + j] = (x >>> (8 * j)) & 0xff;
  }
  return b;
}
