/**
 * A throw-away PKI for TLS tests, made with openssl (preinstalled; its certificates work with the
 * GnuTLS peers): one directory per role as qemu's tls-creds-x509 dir= expects.
 *
 *   good/       ca-cert.pem server-cert.pem server-key.pem client-cert.pem client-key.pem (DN C=GB,O=blkrep,CN=replica-a)
 *   server/     ca-cert.pem server-cert.pem server-key.pem (no client certificate)
 *   client/     ca-cert.pem client-cert.pem client-key.pem
 *   noclient/   ca-cert.pem only (a client that checks the server and has no certificate)
 *   rogue/      the good ca-cert.pem, and a client certificate a rogue CA signed with the same DN
 *   wrongca/    the rogue CA's ca-cert.pem only (a client that trusts the wrong CA)
 *   expired/    ca-cert.pem and an expired server certificate
 *   keys.psk    alice's key (psktool's format); wrong.psk: alice with another key
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, copyFileSync, mkdirSync, writeFileSync } from 'node:fs';

export const CLIENT_DN = 'C=GB,O=blkrep,CN=replica-a';

export interface Pki {
  root: string;
  good: string;
  server: string;
  client: string;
  noclient: string;
  rogue: string;
  wrongca: string;
  expired: string;
  psk: string;
  wrongPsk: string;
  pskKeyHex: string;
}

function openssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

function makeCa(dir: string, name: string): void {
  openssl(dir, ['req', '-x509', ...EC, '-days', '2', '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem']);
}

function issue(dir: string, prefix: string, subject: string, ext: string, days: number): void {
  openssl(dir, ['req', ...EC, '-subj', subject, '-keyout', `${prefix}-key.pem`, '-out', `${prefix}.csr`]);
  writeFileSync(`${dir}/${prefix}.ext`, ext);
  openssl(dir, ['x509', '-req', '-in', `${prefix}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-days', String(days), '-extfile', `${prefix}.ext`, '-out', `${prefix}-cert.pem`]);
  chmodSync(`${dir}/${prefix}-key.pem`, 0o600);
}

const SERVER_EXT = 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n';
const CLIENT_EXT = 'extendedKeyUsage=clientAuth\n';

function copy(from: string, to: string, names: string[]): void {
  mkdirSync(to, { recursive: true });
  for (const n of names) copyFileSync(`${from}/${n}`, `${to}/${n}`);
}

export function makePki(root: string): Pki {
  const good = `${root}/good`;
  mkdirSync(good, { recursive: true });
  makeCa(good, 'blkrep test CA');
  issue(good, 'server', '/O=blkrep/CN=localhost', SERVER_EXT, 2);
  issue(good, 'client', '/C=GB/O=blkrep/CN=replica-a', CLIENT_EXT, 2);

  copy(good, `${root}/server`, ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']);
  copy(good, `${root}/client`, ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']);
  copy(good, `${root}/noclient`, ['ca-cert.pem']);

  // a rogue CA that issues a client certificate with the right DN; its dir trusts the good CA
  const rogue = `${root}/rogue`;
  mkdirSync(rogue, { recursive: true });
  makeCa(rogue, 'blkrep test CA');
  issue(rogue, 'client', '/C=GB/O=blkrep/CN=replica-a', CLIENT_EXT, 2);
  copy(rogue, `${root}/wrongca`, ['ca-cert.pem']);
  copyFileSync(`${good}/ca-cert.pem`, `${rogue}/ca-cert.pem`);

  // the good CA, an expired server certificate
  const expired = `${root}/expired`;
  copy(good, expired, ['ca-cert.pem', 'ca-key.pem']);
  issue(expired, 'server', '/O=blkrep/CN=localhost', SERVER_EXT, -1);

  const pskKeyHex = randomBytes(32).toString('hex');
  const psk = `${root}/keys.psk`;
  writeFileSync(psk, `alice:${pskKeyHex}\n`, { mode: 0o600 });
  const wrongPsk = `${root}/wrong.psk`;
  writeFileSync(wrongPsk, `alice:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
  return { root, good, server: `${root}/server`, client: `${root}/client`, noclient: `${root}/noclient`, rogue, wrongca: `${root}/wrongca`, expired, psk, wrongPsk, pskKeyHex };
}

/** A TCP port nobody listens on right now (for peers that cannot be told port 0). */
export async function freePort(): Promise<number> {
  const net = await import('node:net');
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}
