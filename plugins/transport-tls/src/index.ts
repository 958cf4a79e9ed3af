/**
 * The tls connection upgrader: TLS on a connection whose NBD handshake agreed to NBD_OPT_STARTTLS,
 * over any stream transport (tcp, unix), on both sides. Credentials: x509 (a directory as qemu's
 * tls-creds-x509 expects) or PSK (psktool's file); see credentials.ts.
 *
 * - TLS 1.2 at least (the NBD spec's MUST), 1.3 where the peer has it; AES-128-GCM first (the
 *   cheapest per record here), ChaCha20 and AES-256 after; with PSK over 1.2, the PSK suites GnuTLS
 *   peers (qemu, nbdkit, libnbd) offer. No renegotiation.
 * - Server: one non-listening tls.Server per credential set owns every handshake, so that a client
 *   certificate from an untrusted CA is refused (a bare TLSSocket accepts it and only leaves
 *   `authorized` false: node's lib/_tls_wrap.js checks verifyError only in tls.Server's path).
 *   Client certificates are asked for with tls-verify-peer, or when an allow-list is given with
 *   x509. A refusal rejects with the reason and the peer's address, never key material.
 * - Client: the server's certificate and name are checked unless tls-verify-peer=false; the name
 *   is tls-hostname, else the URI's host ("localhost" over a Unix socket, as libnbd does).
 */
import { constants as cryptoConstants } from 'node:crypto';
import { isIP } from 'node:net';
import os from 'node:os';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import type { ConnectionUpgrader, TransportConnection, UpgradeOptions, UpgraderCheck } from 'blkrep/api';
import { AllowList, distinguishedName, expiryWarnings, loadPsk, loadX509, parseSettings, type TlsSettings, type X509Credentials } from './credentials.js';
import { TlsError } from './errors.js';

export { TlsError } from './errors.js';
export { AllowList, distinguishedName, loadPsk, loadX509, parseSettings, type TlsSettings } from './credentials.js';

const DEFAULT_TIMEOUT_MS = 10_000;
/**
 * TLS 1.3 suites, cheapest first with AES-NI: AES-128-GCM costs about half of AES-256-GCM per
 * record (node's default order puts AES-256 first). Node takes them in `ciphers`, beside the 1.2
 * ones: it has no `ciphersuites` option and silently ignores one.
 */
const CIPHERSUITES_13 = 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384';
/** TLS 1.2 with certificates: node's defaults (ECDHE, AEAD first) */
const X509_CIPHERS_12 = tls.DEFAULT_CIPHERS.split(':').filter((c) => !c.startsWith('TLS_')).join(':');
const PSK_CIPHERS_12 = 'ECDHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384';
/** what each kind of credentials offers, 1.3 first */
export const CIPHERS = {
  x509: `${CIPHERSUITES_13}:${X509_CIPHERS_12}`,
  psk: `${CIPHERSUITES_13}:${PSK_CIPHERS_12}`,
} as const;
const COMMON = {
  minVersion: 'TLSv1.2',
  secureOptions: cryptoConstants.SSL_OP_NO_RENEGOTIATION,
} as const;

/** What node's certificate checks say, in words an operator acts on. */
const VERIFY_REASONS: Record<string, string> = {
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'its certificate is not signed by a trusted CA (wrong ca-cert.pem?)',
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'its certificate is not signed by a trusted CA (wrong ca-cert.pem?)',
  UNABLE_TO_GET_ISSUER_CERT: 'its certificate is not signed by a trusted CA (wrong ca-cert.pem?)',
  SELF_SIGNED_CERT_IN_CHAIN: 'its certificate chain ends in a CA that is not trusted (wrong ca-cert.pem?)',
  DEPTH_ZERO_SELF_SIGNED_CERT: 'its certificate is self-signed and not trusted',
  CERT_SIGNATURE_FAILURE: 'its certificate signature does not verify',
  CERT_HAS_EXPIRED: 'its certificate has expired',
  CERT_NOT_YET_VALID: 'its certificate is not valid yet',
  ERR_TLS_CERT_ALTNAME_INVALID: 'its certificate does not name the host connected to',
  ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED: 'the peer says our certificate has expired',
  ERR_SSL_TLSV1_ALERT_UNKNOWN_CA: 'the peer does not trust the CA of our certificate',
  ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE: 'the peer refused our certificate',
  ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED: 'the peer requires a client certificate and we have none (client-cert.pem in the certificates directory)',
  ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE: 'the client sent no certificate, and one is required',
  ERR_SSL_NO_SHARED_CIPHER: 'no cipher in common (x509 against PSK?)',
  ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE: 'the peer ended the handshake (no common credentials: x509 against PSK, or an unknown PSK user?)',
  ERR_SSL_TLSV1_ALERT_DECRYPT_ERROR: 'the keys do not match (a wrong PSK key?)',
  ERR_SSL_DECRYPTION_FAILED_OR_BAD_RECORD_MAC: 'the keys do not match (a wrong PSK key?)',
  ERR_SSL_BAD_RECORD_MAC: 'the keys do not match (a wrong PSK key?)',
  ERR_SSL_TLSV1_ALERT_UNKNOWN_PSK_IDENTITY: 'the peer does not know our PSK user name',
  ERR_SSL_WRONG_VERSION_NUMBER: 'the peer does not speak TLS',
  ERR_SSL_UNSUPPORTED_PROTOCOL: 'the peer offers only TLS versions below 1.2',
  ECONNRESET: 'the peer closed the connection during the handshake (it refused our credentials?)',
};

function reasonOf(err: Error & { code?: string; reason?: string }): string {
  const known = err.code ? VERIFY_REASONS[err.code] : undefined;
  const detail = err.reason ?? err.message;
  return known ? `${known} [${err.code}${detail && !known.includes(detail) ? `: ${detail}` : ''}]` : `${detail}${err.code ? ` [${err.code}]` : ''}`;
}

function handshakeFailed(side: 'server' | 'client', peer: string, err: Error & { code?: string }, extra: Record<string, unknown> = {}): TlsError {
  const code = err.code === 'ERR_TLS_HANDSHAKE_TIMEOUT' ? 'ERR_TLS_TIMEOUT' : 'ERR_TLS_HANDSHAKE';
  const who = side === 'server' ? `client ${peer}` : `server ${peer}`;
  return new TlsError(code, `TLS handshake with ${who} failed: ${reasonOf(err)}`, {
    errno: code === 'ERR_TLS_TIMEOUT' ? 'EIO' : 'EPERM',
    cause: err,
    details: { peer, reason: err.code ?? 'unknown', ...extra },
  });
}

// -------------------------------------------------------------------------------------------------
// credentials, once per settings object

interface Loaded {
  settings: TlsSettings;
  kind: 'x509' | 'psk';
  x509?: X509Credentials;
  psk?: Map<string, Buffer>;
  authz: AllowList;
  verifyPeer: boolean;
}

function load(role: 'server' | 'client', raw: Readonly<Record<string, string>> | undefined): Loaded {
  const settings = parseSettings(raw);
  const authz = new AllowList(settings.authzFile, settings.authzList ?? []);
  if (role === 'client' && authz.configured) throw new TlsError('ERR_TLS_SETTINGS', 'tls-authz is a server setting', { errno: 'EINVAL' });
  if (settings.pskFile !== undefined) {
    const psk = loadPsk(settings.pskFile);
    if (role === 'client') {
      const user = pskUser(settings);
      if (!psk.has(user)) {
        throw new TlsError('ERR_TLS_CREDENTIALS', `TLS credentials: ${settings.pskFile} has no key for PSK user "${user}" (give tls-username, or the user in the URI: nbds://USER@host/)`, {
          errno: 'EINVAL',
          details: { path: settings.pskFile, username: user },
        });
      }
    }
    return { settings, kind: 'psk', psk, authz, verifyPeer: false };
  }
  if (role === 'server' && settings.certificates === undefined) {
    throw new TlsError('ERR_TLS_SETTINGS', 'a TLS server needs credentials: x509 certificates (tls-certificates DIR) or a PSK file (tls-psk-file FILE)', { errno: 'EINVAL' });
  }
  // server: client certificates are asked for with verify-peer, or when an allow-list is to be checked
  const verifyPeer = role === 'server' ? (settings.verifyPeer ?? authz.configured) : (settings.verifyPeer ?? true);
  if (role === 'server' && authz.configured && !verifyPeer) {
    throw new TlsError('ERR_TLS_SETTINGS', 'an x509 allow-list (tls-authz) needs client certificates: do not turn tls-verify-peer off', { errno: 'EINVAL' });
  }
  const x509 = settings.certificates === undefined ? undefined : loadX509(settings.certificates, role, role === 'server' && verifyPeer);
  return { settings, kind: 'x509', ...(x509 ? { x509 } : {}), authz, verifyPeer };
}

function pskUser(settings: TlsSettings): string {
  return settings.username ?? os.userInfo().username;
}

// -------------------------------------------------------------------------------------------------
// server side

interface Pending {
  resolve(t: tls.TLSSocket): void;
  reject(err: Error): void;
}

/** One tls.Server per credential set: it owns the handshakes (see the header). */
class ServerSide {
  private readonly server: tls.Server;
  private readonly pending = new Map<Duplex, Pending>();
  private readonly pskIdentity = new WeakMap<tls.TLSSocket, string>();
  private readonly pskRefusal = new WeakMap<tls.TLSSocket, string>();

  constructor(private readonly creds: Loaded) {
    const x509 = creds.x509;
    const options: tls.TlsOptions = {
      ...COMMON,
      honorCipherOrder: true,
      handshakeTimeout: DEFAULT_TIMEOUT_MS,
      ...(x509
        ? {
            cert: x509.cert!.pem,
            key: x509.key!,
            ...(x509.ca ? { ca: x509.ca.pem } : {}),
            ciphers: CIPHERS.x509,
            requestCert: creds.verifyPeer,
            rejectUnauthorized: creds.verifyPeer,
          }
        : {
            ciphers: CIPHERS.psk,
            pskCallback: (socket: tls.TLSSocket, identity: string) => this.pskKey(socket, identity),
          }),
    };
    this.server = tls.createServer(options);
    this.server.on('secureConnection', (t) => this.settle(t, undefined));
    this.server.on('tlsClientError', (err, t) => this.settle(t, err));
  }

  private pskKey(socket: tls.TLSSocket, identity: string): Buffer | null {
    const key = this.creds.psk!.get(identity);
    if (!key) {
      this.pskRefusal.set(socket, `unknown PSK user "${identity}"`);
      return null;
    }
    if (this.creds.authz.configured) {
      try {
        this.creds.authz.refresh();
      } catch (err) {
        this.pskRefusal.set(socket, (err as Error).message);
        return null;
      }
      if (!this.creds.authz.allows(identity)) {
        this.pskRefusal.set(socket, `PSK user "${identity}" is not in the authz allow-list`);
        return null;
      }
    }
    this.pskIdentity.set(socket, identity);
    return key;
  }

  private take(t: tls.TLSSocket): [Duplex, Pending] | undefined {
    const parent = (t as unknown as { _parent?: Duplex })._parent;
    if (parent && this.pending.has(parent)) return [parent, this.pending.get(parent)!];
    // a stream node wrapped (not a net.Socket): with one handshake at a time there is no doubt
    if (this.pending.size === 1) return [...this.pending.entries()][0];
    return undefined;
  }

  private settle(t: tls.TLSSocket, err: Error | undefined): void {
    // whatever happens to it later (a late alert, a reset), it must not become an uncaught error
    t.on('error', () => {});
    const found = this.take(t);
    if (!found) {
      t.destroy();
      return;
    }
    const [raw, p] = found;
    this.pending.delete(raw);
    if (err) {
      const refusal = this.pskRefusal.get(t);
      p.reject(refusal ? Object.assign(new Error(refusal), { code: 'PSK_IDENTITY' }) : err);
      t.destroy();
      return;
    }
    p.resolve(t);
  }

  async upgrade(connection: TransportConnection, options: UpgradeOptions): Promise<TransportConnection> {
    const raw = connection.stream;
    const peer = connection.peer;
    let t: tls.TLSSocket;
    try {
      t = await this.handshake(raw, options);
    } catch (err) {
      raw.destroy();
      if (err instanceof TlsError) throw err;
      const e = err as Error & { code?: string };
      if (e.code === 'PSK_IDENTITY') {
        throw new TlsError('ERR_TLS_AUTHZ', `TLS: refused client ${peer}: ${e.message}`, { errno: 'EPERM', details: { peer, reason: 'psk-identity' } });
      }
      throw handshakeFailed('server', peer, e);
    }
    const identity = this.identityOf(t);
    const refusal = this.authorize(identity);
    if (refusal) {
      t.destroy();
      throw new TlsError('ERR_TLS_AUTHZ', `TLS: refused client ${peer}: ${refusal}`, { errno: 'EPERM', details: { peer, identity: identity ?? null, reason: 'authz' } });
    }
    return { stream: t, peer: identity ? `${peer} (${identity})` : peer };
  }

  private handshake(raw: Duplex, options: UpgradeOptions): Promise<tls.TLSSocket> {
    return new Promise((resolve, reject) => {
      const { signal } = options;
      if (signal?.aborted) return reject(new TlsError('ERR_TLS_TIMEOUT', 'TLS handshake aborted'));
      const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
      const timer = setTimeout(() => done(new TlsError('ERR_TLS_TIMEOUT', `TLS: no handshake within ${timeoutMs} ms`, { details: { timeoutMs } })), timeoutMs);
      const onAbort = (): void => done(new TlsError('ERR_TLS_TIMEOUT', 'TLS handshake aborted'));
      signal?.addEventListener('abort', onAbort, { once: true });
      const done = (err: Error | undefined, t?: tls.TLSSocket): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.pending.delete(raw);
        if (err) reject(err);
        else resolve(t!);
      };
      this.pending.set(raw, { resolve: (t) => done(undefined, t), reject: (e) => done(e) });
      // the caller stopped reading the plaintext stream; TLS takes it over from here
      this.server.emit('connection', raw);
    });
  }

  private identityOf(t: tls.TLSSocket): string | undefined {
    if (this.creds.kind === 'psk') return this.pskIdentity.get(t);
    const cert = t.getPeerX509Certificate();
    return cert ? distinguishedName(cert) : undefined;
  }

  /** why the client may not in, or undefined */
  private authorize(identity: string | undefined): string | undefined {
    const authz = this.creds.authz;
    if (!authz.configured || this.creds.kind === 'psk') return undefined; // PSK: checked in the callback
    if (identity === undefined) return 'it sent no certificate, and the allow-list needs one';
    try {
      authz.refresh();
    } catch (err) {
      return (err as Error).message;
    }
    return authz.allows(identity) ? undefined : `its certificate's DN "${identity}" is not in the authz allow-list`;
  }
}

// -------------------------------------------------------------------------------------------------
// client side

function clientOptions(creds: Loaded, socket: Duplex): tls.ConnectionOptions {
  if (creds.kind === 'psk') {
    const identity = pskUser(creds.settings);
    const psk = creds.psk!.get(identity)!;
    return {
      ...COMMON,
      socket,
      ciphers: CIPHERS.psk,
      pskCallback: () => ({ identity, psk }),
      checkServerIdentity: () => undefined,
    };
  }
  const name = creds.settings.hostname ?? 'localhost';
  const x509 = creds.x509;
  return {
    ...COMMON,
    socket,
    // SNI must not be an IP address; the name checked is `host` then
    ...(isIP(name) ? { host: name } : { host: name, servername: name }),
    ciphers: CIPHERS.x509,
    rejectUnauthorized: creds.verifyPeer,
    ...(x509?.ca ? { ca: x509.ca.pem } : {}),
    ...(x509?.cert ? { cert: x509.cert.pem, key: x509.key! } : {}),
  };
}

function clientHandshake(creds: Loaded, connection: TransportConnection, options: UpgradeOptions): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const t = tls.connect(clientOptions(creds, connection.stream));
    const done = (err?: Error): void => {
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
      t.off('secureConnect', onSecure);
      t.off('error', onError);
      t.off('close', onClose);
      if (err) {
        t.on('error', () => {});
        t.destroy();
        connection.stream.destroy();
        reject(err);
      } else {
        t.on('error', () => {});
        resolve(t);
      }
    };
    const onSecure = (): void => done();
    const onError = (err: Error): void => done(handshakeFailed('client', connection.peer, err, { hostname: creds.settings.hostname }));
    const onClose = (): void => done(handshakeFailed('client', connection.peer, Object.assign(new Error('connection closed'), { code: 'ECONNRESET' })));
    const onAbort = (): void => done(new TlsError('ERR_TLS_TIMEOUT', `TLS handshake with ${connection.peer} aborted`));
    const timer = setTimeout(
      () => done(new TlsError('ERR_TLS_TIMEOUT', `TLS handshake with ${connection.peer}: no answer within ${timeoutMs} ms`, { details: { timeoutMs } })),
      timeoutMs,
    );
    options.signal?.addEventListener('abort', onAbort, { once: true });
    t.once('secureConnect', onSecure);
    t.once('error', onError);
    t.once('close', onClose);
  });
}

// -------------------------------------------------------------------------------------------------

class TlsUpgrader implements ConnectionUpgrader {
  readonly name = 'tls';
  readonly summary = 'TLS after NBD_OPT_STARTTLS: x509 (tls-certificates DIR) or PSK (tls-psk-file FILE)';
  /** per settings object: the daemon passes the same one for every connection */
  private readonly servers = new WeakMap<object, ServerSide>();
  private readonly clients = new WeakMap<object, Loaded>();

  async check(role: 'server' | 'client', settings: Readonly<Record<string, string>>): Promise<UpgraderCheck> {
    const creds = load(role, settings);
    const expiry = creds.x509 ? expiryWarnings(creds.x509, Date.now()) : { warnings: [] };
    const kind = creds.kind === 'psk' ? 'psk' : creds.verifyPeer && role === 'server' ? 'x509+verify-peer' : 'x509';
    return { kind, ...expiry };
  }

  async server(connection: TransportConnection, options: UpgradeOptions = {}): Promise<TransportConnection> {
    const key = options.settings ?? EMPTY;
    let side = this.servers.get(key);
    if (!side) {
      side = new ServerSide(load('server', options.settings));
      this.servers.set(key, side);
    }
    return side.upgrade(connection, options);
  }

  async client(connection: TransportConnection, options: UpgradeOptions = {}): Promise<TransportConnection> {
    const key = options.settings ?? EMPTY;
    let creds = this.clients.get(key);
    if (!creds) {
      creds = load('client', options.settings);
      this.clients.set(key, creds);
    }
    const t = await clientHandshake(creds, connection, options);
    return { stream: t, peer: connection.peer };
  }
}

const EMPTY: Readonly<Record<string, string>> = Object.freeze({});

export function createTlsUpgrader(): ConnectionUpgrader {
  return new TlsUpgrader();
}
