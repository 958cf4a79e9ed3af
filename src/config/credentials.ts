/**
 * The pair's secrets, made by blkrep setup on the first node and copied to the second:
 *   heartbeat.key       32 random bytes (mode 0600), for --heartbeat-key
 *   keys.psk            psktool's "user:hexkey" line (mode 0600), for --tls-psk / tls-psk-file=
 *   tls/, peer-tls/     x509 in qemu's tls-creds-x509 layout, one directory per node: the CA
 *                       certificate, the node's server certificate (CN and subjectAltName = the
 *                       node id, which the primary's URI names as tls-hostname=) and its client
 *                       certificate (DN O=blkrep,CN=<node id>, for --tls-authz); after a failover
 *                       the same files serve the other role
 *   ca/                 the CA's key, to issue further certificates; not needed by the daemon
 *
 * x509 is made by src/util/tls-credentials.ts generatePairCredentials (the one way blkrep makes
 * pair credentials) in a scratch directory, then moved into place; tls/ is moved last, so its
 * presence says the set is complete. A file that exists is never replaced (re-running setup
 * changes nothing; a key copied from the peer is kept), except the leftovers of a run that
 * stopped before tls/ was in place.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, mkdtemp, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BlkrepError } from '../api/errors.js';
import { generatePairCredentials } from '../util/tls-credentials.js';

/** validity of the pair's certificates (as before: a pair link must not stop on an expiry nobody watches; renew from ca/) */
const DAYS = 3650;


export interface NodeIdentity {
  /** node id: the certificates' CN and the server certificate's subjectAltName (a host name) */
  id: string;
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

/**
 * x509 for both nodes (own → dir, peer → peerDir), signed by a new CA whose key goes to caDir,
 * all made by generatePairCredentials. Nothing is made when dir already has ca-cert.pem
 * (credentials copied from the peer, or an earlier run). Returns the files written.
 * Errors: ERR_SETUP_TLS (openssl failed or a node id is not a host name: its message).
 */
export async function makeX509(caDir: string, self: NodeIdentity, dir: string, peer: NodeIdentity, peerDir: string): Promise<string[]> {
  if (await exists(join(dir, 'ca-cert.pem'))) return [];
  const parent = join(caDir, '..');
  await mkdir(parent, { recursive: true, mode: 0o700 });
  const work = await mkdtemp(join(parent, '.x509-'));
  try {
    let made;
    try {
      made = await generatePairCredentials(join(work, 'set'), { kind: 'x509', names: [self.id, peer.id], days: DAYS });
    } catch (err) {
      throw new BlkrepError('ERR_SETUP_TLS', `cannot make the x509 credentials: ${(err as Error).message}`, { errno: 'EIO', cause: err });
    }
    const written: string[] = [];
    for (const [from, to] of [
      [made.caDir!, caDir],
      [made.nodes![peer.id]!, peerDir],
      [made.nodes![self.id]!, dir],
    ] as const) {
      await rm(to, { recursive: true, force: true }); // only leftovers: dir (the marker) was checked above
      await rename(from, to);
      written.push(to);
    }
    return written;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
