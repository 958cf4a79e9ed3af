/**
 * TLS credentials as qemu, nbdkit and libnbd users keep them:
 *
 * - x509: a directory as qemu's `tls-creds-x509 dir=` expects: ca-cert.pem, server-cert.pem and
 *   server-key.pem for a server; ca-cert.pem (else the system's trust store) and, when present,
 *   client-cert.pem + client-key.pem for a client.
 * - PSK: psktool's file, one `username:hexkey` per line.
 * - authz: an allow-list of client DNs (as qemu writes them: the subject's fields in certificate
 *   order, "C=GB,O=blkrep,CN=replica-a") or PSK usernames, one per line; "#" starts a comment.
 *
 * Errors never carry key material: they name the file, the line and what is wrong with it.
 */
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { closeSync, constants, fstatSync, openSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { TlsError } from './errors.js';

/** the settings keys, as libnbd's URI query names them (plus the server-only tls-authz) */
export const SETTING_KEYS = ['tls-certificates', 'tls-psk-file', 'tls-username', 'tls-verify-peer', 'tls-hostname', 'tls-authz', 'tls-authz-list'] as const;

export interface TlsSettings {
  certificates?: string;
  pskFile?: string;
  username?: string;
  /** client: check the server's certificate and name (default true); server: ask for client certificates (default: when an allow-list is given) */
  verifyPeer?: boolean;
  hostname?: string;
  /** allow-list file */
  authzFile?: string;
  /** allow-list entries given directly */
  authzList?: string[];
}

function settingsError(message: string, details: Record<string, unknown> = {}): TlsError {
  return new TlsError('ERR_TLS_SETTINGS', message, { errno: 'EINVAL', details });
}

export function parseSettings(settings: Readonly<Record<string, string>> = {}): TlsSettings {
  const out: TlsSettings = {};
  for (const [key, value] of Object.entries(settings)) {
    switch (key) {
      case 'tls-certificates':
        out.certificates = value;
        break;
      case 'tls-psk-file':
        out.pskFile = value;
        break;
      case 'tls-username':
        out.username = value;
        break;
      case 'tls-hostname':
        out.hostname = value;
        break;
      case 'tls-authz':
        out.authzFile = value;
        break;
      case 'tls-authz-list':
        out.authzList = value.split('\n').map((l) => l.trim()).filter((l) => l !== '');
        break;
      case 'tls-verify-peer':
        if (!/^(true|false|on|off|yes|no|1|0)$/i.test(value)) throw settingsError(`tls-verify-peer "${value}" is not a boolean (true or false)`, { key, value });
        out.verifyPeer = /^(true|on|yes|1)$/i.test(value);
        break;
      default:
        throw settingsError(`unknown TLS setting "${key}" (known: ${SETTING_KEYS.join(', ')})`, { key });
    }
  }
  if (out.certificates !== undefined && out.pskFile !== undefined) {
    throw settingsError('give either x509 certificates (tls-certificates) or a PSK file (tls-psk-file), not both');
  }
  return out;
}

function fileError(path: string, why: string, cause?: unknown): TlsError {
  return new TlsError('ERR_TLS_CREDENTIALS', `TLS credentials: ${path}: ${why}`, { errno: 'EINVAL', cause, details: { path } });
}

/** a credential file is small: a PEM bundle of a long chain, a PSK file of many users, an allow-list */
export const MAX_CREDENTIAL_BYTES = 1024 * 1024;

/**
 * Read a credential file: a regular file of at most MAX_CREDENTIAL_BYTES. It is opened
 * O_NONBLOCK and checked with fstat before a byte is read, so a FIFO, a device (/dev/zero) or a
 * directory in its place is refused at once instead of blocking the daemon or filling its memory.
 */
function readCredential(path: string, what: string): Buffer {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as { code?: string }).code;
    const why = code === 'ENOENT' ? `no such file (the ${what})` : code === 'EACCES' ? `permission denied (the ${what})` : `cannot read the ${what}: ${(err as Error).message}`;
    throw fileError(path, why, err);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw fileError(path, `not a regular file (the ${what} is ${fileKind(st)})`);
    if (st.size > MAX_CREDENTIAL_BYTES) throw fileError(path, `${st.size} bytes, more than ${MAX_CREDENTIAL_BYTES}: not a credential file (the ${what})`);
    return readFileSync(fd);
  } catch (err) {
    if (err instanceof TlsError) throw err;
    throw fileError(path, `cannot read the ${what}: ${(err as Error).message}`, err);
  } finally {
    closeSync(fd);
  }
}

function fileKind(st: import('node:fs').Stats): string {
  return st.isFIFO() ? 'a FIFO' : st.isDirectory() ? 'a directory' : st.isCharacterDevice() || st.isBlockDevice() ? 'a device' : st.isSocket() ? 'a socket' : 'not a file';
}

function exists(path: string): boolean {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

/** All certificates of a PEM bundle. */
function parseCertificates(path: string, pem: Buffer, what: string): X509Certificate[] {
  const blocks = pem.toString('latin1').match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw fileError(path, `no PEM certificate in it (the ${what})`);
  return blocks.map((b) => {
    try {
      return new X509Certificate(b);
    } catch (err) {
      throw fileError(path, `not a valid certificate (the ${what}): ${(err as Error).message}`, err);
    }
  });
}

export interface CertFile {
  path: string;
  pem: Buffer;
  first: X509Certificate;
}

export interface X509Credentials {
  dir: string;
  ca?: CertFile;
  cert?: CertFile;
  key?: Buffer;
}

function loadPair(dir: string, certName: string, keyName: string, role: string): { cert: CertFile; key: Buffer } {
  const certPath = join(dir, certName);
  const keyPath = join(dir, keyName);
  const pem = readCredential(certPath, `${role} certificate`);
  const [first] = parseCertificates(certPath, pem, `${role} certificate`);
  const key = readCredential(keyPath, `${role} private key`);
  let privateKey;
  try {
    privateKey = createPrivateKey(key);
  } catch (err) {
    throw fileError(keyPath, `not a valid unencrypted PEM private key (the ${role} private key)`, err);
  }
  if (!first!.checkPrivateKey(privateKey)) throw fileError(keyPath, `this key does not belong to the certificate ${certPath}`);
  return { cert: { path: certPath, pem, first: first! }, key };
}

/** The x509 directory for `role`; `needCa`: ca-cert.pem must be there. */
export function loadX509(dir: string, role: 'server' | 'client', needCa: boolean): X509Credentials {
  try {
    if (!statSync(dir).isDirectory()) throw fileError(dir, 'not a directory (tls-certificates names a directory holding ca-cert.pem …)');
  } catch (err) {
    if (err instanceof TlsError) throw err;
    throw fileError(dir, 'no such directory (tls-certificates names a directory holding ca-cert.pem …)', err);
  }
  const out: X509Credentials = { dir };
  const caPath = join(dir, 'ca-cert.pem');
  if (needCa || exists(caPath)) {
    const pem = readCredential(caPath, 'CA certificate');
    out.ca = { path: caPath, pem, first: parseCertificates(caPath, pem, 'CA certificate')[0]! };
  }
  if (role === 'server') {
    Object.assign(out, loadPair(dir, 'server-cert.pem', 'server-key.pem', 'server'));
  } else if (exists(join(dir, 'client-cert.pem')) || exists(join(dir, 'client-key.pem'))) {
    Object.assign(out, loadPair(dir, 'client-cert.pem', 'client-key.pem', 'client'));
  }
  return out;
}

/** Certificates that expire within `days` (or have), as warnings; and the earliest expiry. */
export function expiryWarnings(creds: X509Credentials, now: number, days = 30): { warnings: string[]; notAfter?: string } {
  const warnings: string[] = [];
  let earliest: number | undefined;
  for (const file of [creds.ca, creds.cert]) {
    if (!file) continue;
    const end = Date.parse(file.first.validTo);
    earliest = earliest === undefined ? end : Math.min(earliest, end);
    const left = (end - now) / 86_400_000;
    if (left < 0) warnings.push(`certificate ${file.path} expired on ${new Date(end).toISOString()}: peers will refuse it`);
    else if (left < days) warnings.push(`certificate ${file.path} expires in ${Math.floor(left)} days (${new Date(end).toISOString()}): renew it`);
    const start = Date.parse(file.first.validFrom);
    if (start > now) warnings.push(`certificate ${file.path} is not valid before ${new Date(start).toISOString()}`);
  }
  return { warnings, ...(earliest === undefined ? {} : { notAfter: new Date(earliest).toISOString() }) };
}

/** psktool's file: username → key. */
export function loadPsk(path: string): Map<string, Buffer> {
  const text = readCredential(path, 'PSK file').toString('utf8');
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '' || line.startsWith('#')) return;
    const colon = line.lastIndexOf(':');
    const user = colon > 0 ? line.slice(0, colon) : '';
    const hex = colon > 0 ? line.slice(colon + 1).trim() : '';
    if (user === '' || !/^(?:[0-9a-fA-F]{2})+$/.test(hex)) {
      throw new TlsError('ERR_TLS_CREDENTIALS', `TLS credentials: ${path} line ${i + 1}: expected "username:hexkey" (as psktool writes)`, {
        errno: 'EINVAL',
        details: { path, line: i + 1 },
      });
    }
    if (keys.has(user)) throw new TlsError('ERR_TLS_CREDENTIALS', `TLS credentials: ${path} line ${i + 1}: user "${user}" is given twice`, { errno: 'EINVAL', details: { path, line: i + 1 } });
    keys.set(user, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw fileError(path, 'no "username:hexkey" line in it (the PSK file)');
  return keys;
}

/**
 * An allow-list: entries given directly plus the lines of a file, re-read whenever the file
 * changes (checked, with one stat, at each new connection; so a SIGHUP is never needed).
 */
export class AllowList {
  private fromFile: Set<string> = new Set();
  private stamp = '';

  constructor(
    private readonly file: string | undefined,
    private readonly direct: readonly string[],
  ) {
    this.refresh();
  }

  get configured(): boolean {
    return this.file !== undefined || this.direct.length > 0;
  }

  /** re-read the file if it changed; a file that vanished or became unreadable is an error (deny all) */
  refresh(): void {
    if (this.file === undefined) return;
    let st;
    try {
      st = statSync(this.file);
    } catch (err) {
      throw fileError(this.file, 'cannot read the authz allow-list', err);
    }
    const stamp = `${st.ino}:${st.size}:${st.mtimeMs}`;
    if (stamp === this.stamp) return;
    const text = readCredential(this.file, 'authz allow-list').toString('utf8');
    this.fromFile = new Set(
      text
        .split('\n')
        .map((l) => l.trim())
        .filter((l) => l !== '' && !l.startsWith('#')),
    );
    this.stamp = stamp;
  }

  allows(identity: string): boolean {
    return this.direct.includes(identity) || this.fromFile.has(identity);
  }

  get size(): number {
    return this.direct.length + this.fromFile.size;
  }
}

/** The DN as qemu's authz sees it: the subject's fields in certificate order, comma-joined. */
export function distinguishedName(cert: X509Certificate): string {
  return cert.subject.split('\n').join(',');
}
