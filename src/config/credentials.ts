/**
 * The pair's secrets, made by blkrep setup on the first node and copied to the second:
 *   heartbeat.key       32 random bytes (mode 0600), for --heartbeat-key
 *   keys.psk            psktool's "user:hexkey" line (mode 0600), for --tls-psk / tls-psk-file=
 *   tls/, peer-tls/     x509 in qemu's tls-creds-x509 layout, one directory per node: the CA
 *                       certificate, and the node's certificate (serverAuth and clientAuth, so
 *                       after a failover the same files serve the other role) as
 *                       server-cert.pem/server-key.pem and client-cert.pem/client-key.pem
 *   ca/                 the CA's key, to issue further certificates; not needed by the daemon
 *
 * A file that exists is never replaced (re-running setup changes nothing; a key copied from the
 * peer is kept). x509 is made with openssl, behind makeX509 alone: the tls helper's
 * generatePairCredentials had not landed when this was written; swap it in there.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmod, copyFile, mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { BlkrepError } from '../api/errors.js';

const run = promisify(execFile);

export interface NodeIdentity {
  /** node id, the certificate's CN */
  id: string;
  /** addresses the certificate is valid for (IPs and DNS names) */
  addresses: string[];
}

/** The DN of a node's certificate, as qemu and --tls-authz write it. */
export function nodeDn(id: string): string {
  return `O=blkrep,CN=${id}`;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Write a secret file (0600) unless it is there. True when written. */
async function secretFile(path: string, content: string | Buffer): Promise<boolean> {
  if (await exists(path)) return false;
  await writeFile(path, content, { mode: 0o600, flag: 'wx' });
  await chmod(path, 0o600);
  return true;
}

export async function makeHeartbeatKey(path: string): Promise<boolean> {
  return secretFile(path, randomBytes(32));
}

/** psktool's format: one "user:hexkey" line. */
export async function makePsk(path: string, user: string): Promise<boolean> {
  return secretFile(path, `${user}:${randomBytes(32).toString('hex')}\n`);
}

async function openssl(cwd: string, args: string[]): Promise<void> {
  try {
    await run('openssl', args, { cwd });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    const why = e.code === 'ENOENT' ? 'openssl is not installed' : (e.stderr ?? e.message).trim().split('\n')[0];
    throw new BlkrepError('ERR_SETUP_TLS', `cannot make the x509 credentials: ${why}`, { errno: 'EIO', cause: err });
  }
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
const DAYS = '3650';

function san(addresses: string[]): string {
  const unique = [...new Set(addresses)];
  return unique.map((a) => (/^[\d.]+$/.test(a) || a.includes(':') ? `IP:${a}` : `DNS:${a}`)).join(',');
}

/**
 * x509 for both nodes (own → dir, peer → peerDir), signed by a new CA whose key goes to caDir.
 * Nothing is made when dir already has ca-cert.pem (credentials copied from the peer, or an
 * earlier run). Returns the files written.
 */
export async function makeX509(caDir: string, self: NodeIdentity, dir: string, peer: NodeIdentity, peerDir: string): Promise<string[]> {
  if (await exists(join(dir, 'ca-cert.pem'))) return [];
  await mkdir(caDir, { recursive: true, mode: 0o700 });
  const work = await mkdtemp(join(caDir, '.make-'));
  const written: string[] = [];
  try {
    if (!(await exists(join(caDir, 'ca-key.pem')))) {
      await openssl(work, ['req', '-x509', ...EC, '-days', DAYS, '-subj', '/O=blkrep/CN=blkrep pair CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem']);
      await copyFile(join(work, 'ca-key.pem'), join(caDir, 'ca-key.pem'));
      await chmod(join(caDir, 'ca-key.pem'), 0o600);
      await copyFile(join(work, 'ca-cert.pem'), join(caDir, 'ca-cert.pem'));
      written.push(join(caDir, 'ca-key.pem'), join(caDir, 'ca-cert.pem'));
    } else {
      await copyFile(join(caDir, 'ca-key.pem'), join(work, 'ca-key.pem'));
      await copyFile(join(caDir, 'ca-cert.pem'), join(work, 'ca-cert.pem'));
    }
    for (const [node, out] of [[self, dir], [peer, peerDir]] as const) {
      if (await exists(join(out, 'ca-cert.pem'))) continue;
      const ext = `subjectAltName=${san([...node.addresses, 'localhost', '127.0.0.1'])}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n`;
      await writeFile(join(work, 'node.ext'), ext);
      await openssl(work, ['req', ...EC, '-subj', `/O=blkrep/CN=${node.id}`, '-keyout', 'node-key.pem', '-out', 'node.csr']);
      await openssl(work, ['x509', '-req', '-in', 'node.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-days', DAYS, '-extfile', 'node.ext', '-out', 'node-cert.pem']);
      await mkdir(out, { recursive: true, mode: 0o700 });
      for (const [from, to, mode] of [
        ['ca-cert.pem', 'ca-cert.pem', 0o644],
        ['node-cert.pem', 'server-cert.pem', 0o644],
        ['node-key.pem', 'server-key.pem', 0o600],
        ['node-cert.pem', 'client-cert.pem', 0o644],
        ['node-key.pem', 'client-key.pem', 0o600],
      ] as const) {
        await copyFile(join(work, from), join(out, to));
        await chmod(join(out, to), mode);
        written.push(join(out, to));
      }
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  return written;
}
