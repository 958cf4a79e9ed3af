/**
 * Test servers on Unix sockets in temporary directories, and bounded waits on server events.
 */
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { mkdtemp, rm } from 'node:fs/promises';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/server.js';

export interface TestServer {
  srv: NbdServer;
  path: string;
  /** drop every connection, shut the server down, close the listener, remove the directory */
  close(): Promise<void>;
}

export async function startServer(options: NbdServerOptions): Promise<TestServer> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'blkrep-nbd-test-'));
  const socketPath = path.join(dir, 'nbd.sock');
  const srv = new NbdServer(options);
  // allowHalfOpen as the unix and tcp transports do: a client's EOF reaches the session as EOF.
  const listener = net.createServer({ allowHalfOpen: true }, (sock) => srv.attach({ stream: sock, peer: 'test' }));
  await new Promise<void>((resolve, reject) => {
    listener.once('error', reject);
    listener.listen(socketPath, () => {
      listener.removeListener('error', reject);
      resolve();
    });
  });
  let closed = false;
  return {
    srv,
    path: socketPath,
    async close() {
      if (closed) return;
      closed = true;
      srv.destroyAll('test finished');
      await withTimeout(srv.shutdown(), 5000, 'server shutdown').catch(() => {});
      await new Promise<void>((resolve) => listener.close(() => resolve()));
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
