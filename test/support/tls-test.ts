/**
 * TLS for tests of the server's STARTTLS: a throwaway x509 PKI made by openssl in a temp dir
 * (the layout qemu's tls-creds-x509 dir= and libnbd's tls-certificates= read), and a test-only
 * ConnectionUpgrader built on node:tls. The product's TLS plugin is plugins/transport-tls; this
 * one exists so the handshake can be tested without it.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import tls from 'node:tls';
import type { Duplex } from 'node:stream';
import type { ConnectionUpgrader, TransportConnection, UpgradeOptions } from '../../src/api/transport.js';

export interface TestPki {
  dir: string;
  ca: Buffer;
  serverCert: Buffer;
  serverKey: Buffer;
}

function openssl(dir: string, args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'], timeout: 20_000 });
}

/** ca-cert.pem, server-cert.pem, server-key.pem (CN=localhost, SAN localhost and 127.0.0.1), valid 2 days. */
export function makeTestPki(dir: string): TestPki {
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl(dir, ['req', '-x509', ...ec, '-days', '2', '-subj', '/CN=blkrep test CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
    '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem']);
  openssl(dir, ['req', ...ec, '-subj', '/O=blkrep/CN=localhost', '-keyout', 'server-key.pem', '-out', 'server.csr']);
  writeFileSync(join(dir, 'server.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  openssl(dir, ['x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial',
    '-days', '2', '-extfile', 'server.ext', '-out', 'server-cert.pem']);
  const read = (name: string) => readFileSync(join(dir, name));
  return { dir, ca: read('ca-cert.pem'), serverCert: read('server-cert.pem'), serverKey: read('server-key.pem') };
}

/**
 * The server side through a non-listening tls.Server that owns the handshake (it, not a bare
 * TLSSocket, rejects what it should: tls-heartbeat-ops.md §1.4). One server per upgrade, so no
 * two handshakes share its events. The client side is not needed by these tests.
 */
export function testUpgrader(pki: TestPki): ConnectionUpgrader & { upgrades: number } {
  const up = {
    name: 'tls',
    summary: 'test-only TLS (node:tls)',
    upgrades: 0,
    server(connection: TransportConnection, options: UpgradeOptions = {}): Promise<TransportConnection> {
      const server = tls.createServer({
        key: pki.serverKey, cert: pki.serverCert, ca: pki.ca, minVersion: 'TLSv1.2',
        handshakeTimeout: options.timeoutMs ?? 10_000,
      });
      return new Promise((resolve, reject) => {
        const onAbort = () => {
          connection.stream.destroy();
          reject(new Error('aborted'));
        };
        options.signal?.addEventListener('abort', onAbort, { once: true });
        server.once('secureConnection', (socket: tls.TLSSocket) => {
          options.signal?.removeEventListener('abort', onAbort);
          up.upgrades++;
          resolve({ stream: socket as Duplex, peer: connection.peer });
        });
        server.once('tlsClientError', (err: Error) => {
          options.signal?.removeEventListener('abort', onAbort);
          reject(err);
        });
        server.emit('connection', connection.stream);
      });
    },
    client(): Promise<TransportConnection> {
      return Promise.reject(new Error('the test upgrader has no client side'));
    },
  };
  return up;
}

/** The client side of STARTTLS on a raw socket whose ACK has been read: trust the test CA only. */
export function tlsClient(socket: Duplex, pki: TestPki, timeoutMs = 5000): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const t = tls.connect({ socket, ca: pki.ca, servername: 'localhost' });
    const timer = setTimeout(() => {
      t.destroy();
      reject(new Error(`TLS handshake not done within ${timeoutMs} ms`));
    }, timeoutMs);
    t.once('secureConnect', () => {
      clearTimeout(timer);
      resolve(t);
    });
    t.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}
