/**
 * Credentials for a replication pair over TLS, made with openssl (its certificates work with the
 * GnuTLS peers: qemu, nbdkit, libnbd), for `blkrep setup` and for operators' scripts.
 *
 * x509: one CA, and for each node of the pair a directory in the layout `serve-nbd
 * --tls-certificates DIR` and an nbds:// URI's `tls-certificates=DIR` read (qemu's tls-creds-x509
 * dir=): ca-cert.pem, server-cert.pem + server-key.pem (CN and subjectAltName = the node's name,
 * for the secondary's listener) and client-cert.pem + client-key.pem (DN O=blkrep,CN=<name>, for
 * the primary's link; after a failover the roles swap, so each node has both). The CA's key stays
 * in DIR/ca/ (to issue or renew later); copy only the node's own directory to each node.
 *
 * PSK: DIR/keys.psk in psktool's format, one `name:hexkey` line (32 random bytes) per name.
 *
 * Modes: directories 0700, keys and keys.psk 0600, certificates 0644. DIR must not exist, or be
 * an empty directory: nothing is ever overwritten. Errors: ERR_EXISTS (DIR has files),
 * ERR_USAGE (a name openssl or a URI cannot carry), ERR_TLS_GENERATE (openssl failed: its
 * message).
 */
import { execFile } from 'node:child_process';
import { randomBytes, X509Certificate } from 'node:crypto';
import { chmod, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { BlkrepError } from '../api/errors.js';

export interface PairCredentialsOptions {
  kind: 'x509' | 'psk';
  /** x509: the nodes' host names or IP addresses (each gets a directory); psk: the PSK user names */
  names: string[];
  /** x509: validity in days (default 825, the longest most TLS clients accept) */
  days?: number;
}

export interface PairCredentials {
  kind: 'x509' | 'psk';
  dir: string;
  /** x509: name → the node's directory (for --tls-certificates / tls-certificates=) */
  nodes?: Record<string, string>;
  /** x509: name → the DN of its client certificate, as --tls-authz wants it */
  clientDns?: Record<string, string>;
  /** x509: the CA's directory (ca-cert.pem, ca-key.pem: keep it offline) */
  caDir?: string;
  /** x509: when the certificates expire (ISO 8601) */
  notAfter?: string;
  /** psk: the keys file (for --tls-psk and tls-psk-file=) */
  pskFile?: string;
  /** psk: the user names in it */
  usernames?: string[];
}

const NAME = /^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$/;
const PSK_USER = /^[A-Za-z0-9._-]{1,64}$/;
const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

function badArgument(message: string, details: Record<string, unknown>): BlkrepError {
  return new BlkrepError('ERR_USAGE', message, { errno: 'EINVAL', details });
}

function checkOptions(options: PairCredentialsOptions): number {
  if (options.kind !== 'x509' && options.kind !== 'psk') throw badArgument(`credentials kind "${String(options.kind)}": x509 or psk`, { kind: options.kind });
  if (options.names.length === 0) throw badArgument('credentials: give at least one name (the nodes of the pair, or the PSK users)', {});
  const seen = new Set<string>();
  for (const name of options.names) {
    const ok = options.kind === 'psk' ? PSK_USER.test(name) : NAME.test(name) || isIP(name) !== 0;
    if (!ok) {
      const want = options.kind === 'psk' ? 'letters, digits, ".", "_", "-" (at most 64)' : 'a host name (letters, digits, ".", "-") or an IP address';
      throw badArgument(`credentials: "${name}" is not a valid ${options.kind === 'psk' ? 'PSK user name' : 'node name'}: ${want}`, { name });
    }
    if (seen.has(name)) throw badArgument(`credentials: "${name}" is given twice`, { name });
    seen.add(name);
  }
  const days = options.days ?? 825;
  if (!Number.isInteger(days) || days < 1 || days > 36500) throw badArgument(`credentials: validity ${days} days: a whole number from 1 to 36500`, { days });
  return days;
}

/** DIR made (0700), or an empty directory made 0700; anything else: ERR_EXISTS. */
async function freshDirectory(dir: string): Promise<void> {
  let entries: string[] | undefined;
  try {
    const st = await stat(dir);
    if (!st.isDirectory()) throw new BlkrepError('ERR_EXISTS', `"${dir}" exists and is not a directory: credentials go into a new or empty directory`, { errno: 'EINVAL', details: { path: dir } });
    entries = await readdir(dir);
  } catch (err) {
    if (err instanceof BlkrepError) throw err;
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new BlkrepError('ERR_FILE_CREATE', `cannot use "${dir}": ${(err as Error).message}`, { errno: 'EIO', cause: err, details: { path: dir } });
  }
  if (entries && entries.length > 0) {
    throw new BlkrepError('ERR_EXISTS', `"${dir}" is not empty (${entries.slice(0, 3).join(', ')}${entries.length > 3 ? ', …' : ''}): credentials are never written over existing ones; give a new directory`, {
      errno: 'EINVAL',
      details: { path: dir },
    });
  }
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await chmod(dir, 0o700);
  } catch (err) {
    throw new BlkrepError('ERR_FILE_CREATE', `cannot create "${dir}": ${(err as Error).message}`, { errno: 'EIO', cause: err, details: { path: dir } });
  }
}

function openssl(cwd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('openssl', args, { cwd, timeout: 30_000 }, (err, _stdout, stderr) => {
      if (!err) return resolve();
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      const why = missing ? 'openssl is not installed' : (stderr.trim().split('\n').pop() ?? err.message);
      reject(new BlkrepError('ERR_TLS_GENERATE', `openssl ${args[0]} failed: ${why}`, { errno: 'EIO', cause: err, details: { args: args.slice(0, 2) } }));
    });
  });
}

async function issue(work: string, prefix: string, subject: string, ext: string, days: number): Promise<void> {
  await openssl(work, ['req', ...EC, '-subj', subject, '-keyout', `${prefix}-key.pem`, '-out', `${prefix}.csr`]);
  await writeFile(join(work, `${prefix}.ext`), ext, { mode: 0o600 });
  await openssl(work, ['x509', '-req', '-in', `${prefix}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-days', String(days), '-extfile', `${prefix}.ext`, '-out', `${prefix}-cert.pem`]);
}

async function place(from: string, to: string, mode: number): Promise<void> {
  await rename(from, to);
  await chmod(to, mode);
}

async function makeX509(dir: string, names: string[], days: number): Promise<PairCredentials> {
  const work = join(dir, '.work');
  await mkdir(work, { mode: 0o700 });
  try {
    await openssl(work, ['req', '-x509', ...EC, '-days', String(days), '-subj', '/O=blkrep/CN=blkrep pair CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem']);
    const nodes: Record<string, string> = {};
    const clientDns: Record<string, string> = {};
    for (const [i, name] of names.entries()) {
      const san = isIP(name) ? `IP:${name}` : `DNS:${name}`;
      await issue(work, `s${i}`, `/O=blkrep/CN=${name}`, `subjectAltName=${san}\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n`, days);
      await issue(work, `c${i}`, `/O=blkrep/CN=${name}`, `extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n`, days);
      const node = join(dir, name);
      await mkdir(node, { mode: 0o700 });
      await writeFile(join(node, 'ca-cert.pem'), await readFile(join(work, 'ca-cert.pem')), { mode: 0o644 });
      await place(join(work, `s${i}-cert.pem`), join(node, 'server-cert.pem'), 0o644);
      await place(join(work, `s${i}-key.pem`), join(node, 'server-key.pem'), 0o600);
      await place(join(work, `c${i}-cert.pem`), join(node, 'client-cert.pem'), 0o644);
      await place(join(work, `c${i}-key.pem`), join(node, 'client-key.pem'), 0o600);
      nodes[name] = node;
      clientDns[name] = `O=blkrep,CN=${name}`;
    }
    const caDir = join(dir, 'ca');
    await mkdir(caDir, { mode: 0o700 });
    await place(join(work, 'ca-cert.pem'), join(caDir, 'ca-cert.pem'), 0o644);
    await place(join(work, 'ca-key.pem'), join(caDir, 'ca-key.pem'), 0o600);
    const ca = new X509Certificate(await readFile(join(caDir, 'ca-cert.pem')));
    return { kind: 'x509', dir, nodes, clientDns, caDir, notAfter: new Date(ca.validTo).toISOString() };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

async function makePsk(dir: string, names: string[]): Promise<PairCredentials> {
  const pskFile = join(dir, 'keys.psk');
  await writeFile(pskFile, names.map((n) => `${n}:${randomBytes(32).toString('hex')}\n`).join(''), { mode: 0o600, flag: 'wx' });
  await chmod(pskFile, 0o600);
  return { kind: 'psk', dir, pskFile, usernames: [...names] };
}

/**
 * Make a pair's TLS credentials in `dir` (new or empty): x509 (a CA, and per node a directory
 * with its server and client certificates) or PSK (keys.psk). See the header.
 */
export async function generatePairCredentials(dir: string, options: PairCredentialsOptions): Promise<PairCredentials> {
  const days = checkOptions(options);
  await freshDirectory(dir);
  try {
    return options.kind === 'x509' ? await makeX509(dir, options.names, days) : await makePsk(dir, options.names);
  } catch (err) {
    // nothing half-made is left behind (the directory was new or empty)
    for (const entry of await readdir(dir).catch(() => [] as string[])) await rm(join(dir, entry), { recursive: true, force: true });
    throw err;
  }
}
