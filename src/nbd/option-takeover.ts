/**
 * The client side of an extension option (server-session.ts `OptionExtension`): the
 * fixed-newstyle greeting, the client flags, one option; on ACK the connection belongs to the
 * caller's protocol (the replication pair's link, src/pair). Nothing else of the handshake is
 * done here, so this stays apart from the NBD client's state machine.
 *
 * `prepare` runs after the greeting and the flags, before the option: the place for STARTTLS
 * and the TLS upgrade, which then carries the option too.
 */
import { BlkrepError } from '../api/errors.js';
import type { ConnectionUpgrader, TransportConnection } from '../api/transport.js';
import { FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, REP } from './constants.js';
import { encodeOption, GREETING_LENGTH } from './codec.js';
import { ExactReader, type HandshakeIo } from './handshake-io.js';
import { startTls } from './starttls.js';

export type { HandshakeIo } from './handshake-io.js';

/** The pair link's option number: ASCII "bkrp", far from the spec's numbers. */
export const OPT_BLKREP_PAIR_LINK = 0x626b7270;

export interface ExtensionOpenOptions {
  /** give up after this many milliseconds (default 10 s) */
  timeoutMs?: number;
  signal?: AbortSignal;
  /**
   * Runs after the greeting and the client flags, before the option is sent; may replace the
   * connection (a TLS upgrade after STARTTLS). Bytes it reads are its own.
   */
  prepare?: (connection: TransportConnection, io: HandshakeIo) => Promise<TransportConnection>;
}

export interface OpenedExtension {
  /** the connection, now speaking the extension's protocol; paused (call `resume()` after attaching) */
  readonly connection: TransportConnection;
  /** bytes that arrived after the server's ACK (the extension's first bytes, if any) */
  readonly rest: Buffer;
}

/**
 * Open `option` on a fresh connection. Throws ERR_NBD_UNSUPPORTED when the server does not know
 * the option (a plain NBD server: qemu-nbd, nbdkit), ERR_NBD_SERVER_ERROR with the server's message
 * when it refuses it, ERR_NBD_HANDSHAKE on anything malformed, ERR_NBD_CONNECT on a timeout,
 * ERR_TLS_REJECTED when `prepare` upgraded to TLS and the server then hung up at once.
 */
export async function openExtension(connection: TransportConnection, option: number, data: Buffer, options: ExtensionOpenOptions = {}): Promise<OpenedExtension> {
  const timeoutMs = options.timeoutMs ?? 10_000;
  let conn = connection;
  const timer = setTimeout(() => conn.stream.destroy(new BlkrepError('ERR_NBD_CONNECT', `${conn.peer}: no answer to the handshake within ${timeoutMs} ms`, { errno: 'EIO' })), timeoutMs);
  const onAbort = () => conn.stream.destroy(new BlkrepError('ERR_NBD_CONNECT', `${conn.peer}: handshake aborted`, { errno: 'EIO' }));
  options.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    let reader = new ExactReader(conn.stream);
    const greeting = await reader.read(GREETING_LENGTH);
    if (greeting.readBigUInt64BE(0) !== NBDMAGIC || greeting.readBigUInt64BE(8) !== IHAVEOPT) {
      throw new BlkrepError('ERR_NBD_HANDSHAKE', `${conn.peer} is not a newstyle NBD server (greeting ${greeting.subarray(0, 16).toString('hex')})`);
    }
    const serverFlags = greeting.readUInt16BE(16);
    if ((serverFlags & FLAG_FIXED_NEWSTYLE) === 0) throw new BlkrepError('ERR_NBD_HANDSHAKE', `${conn.peer} does not speak fixed newstyle NBD`);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(FLAG_C_FIXED_NEWSTYLE | (serverFlags & FLAG_C_NO_ZEROES));
    conn.stream.write(flags);
    let upgraded = false;
    if (options.prepare) {
      const before = conn;
      conn = await options.prepare(conn, reader);
      if (conn !== before) {
        upgraded = true;
        reader.detach();
        reader = new ExactReader(conn.stream);
      }
    }
    conn.stream.write(encodeOption(option, data));
    const header = await reader.read(20).catch((err: unknown) => {
      throw upgraded ? tlsRejected(conn.peer, err) : err;
    });
    if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC || header.readUInt32BE(8) !== option >>> 0) {
      throw new BlkrepError('ERR_NBD_HANDSHAKE', `${conn.peer} answered option 0x${option.toString(16)} with a malformed reply`);
    }
    const type = header.readUInt32BE(12);
    const length = header.readUInt32BE(16);
    if (length > 65536) throw new BlkrepError('ERR_NBD_HANDSHAKE', `${conn.peer} sent an option reply of ${length} bytes`);
    const payload = await reader.read(length);
    if (type === REP.ACK) {
      const rest = reader.detach();
      conn.stream.pause();
      return { connection: conn, rest };
    }
    const message = payload.length > 4 ? payload.toString('utf8') : '';
    if (type === REP.ERR_UNSUP) {
      throw new BlkrepError('ERR_NBD_UNSUPPORTED', `${conn.peer} is a plain NBD server: it does not know blkrep's option 0x${option.toString(16)}${message ? ` (${message})` : ''}`, { errno: 'ENOTSUP' });
    }
    throw new BlkrepError('ERR_NBD_SERVER_ERROR', `${conn.peer} refused option 0x${option.toString(16)}: ${message || `reply type 0x${type.toString(16)}`}`, {
      errno: 'EPERM',
      details: { replyType: type },
    });
  } catch (err) {
    conn.stream.destroy();
    throw err;
  } finally {
    clearTimeout(timer);
    options.signal?.removeEventListener('abort', onAbort);
  }
}

/**
 * In TLS 1.3 a server that refuses our client certificate (or our DN, or PSK user) says so after
 * the handshake completed on our side: the first read finds the connection closed (as client.ts).
 */
function tlsRejected(peer: string, err: unknown): unknown {
  const e = err instanceof BlkrepError ? err : undefined;
  if (!e || (e.code !== 'ERR_NBD_HANDSHAKE' && e.code !== 'ERR_NBD_CONNECT')) return err;
  return new BlkrepError(
    'ERR_TLS_REJECTED',
    `${peer}: the server closed the connection right after the TLS handshake: it refused our credentials (a client certificate it does not trust, a DN or PSK user not in its allow-list, or none where it needs one)`,
    { errno: 'EPERM', cause: err, details: { peer } },
  );
}

/**
 * A ready-made `prepare` for openExtension: NBD_OPT_STARTTLS, then the TLS upgrade through
 * `upgrader` (the registry's "tls") with `settings` (the tls-* keys of an nbds:// URI, see
 * uri.ts); the extension option then travels inside TLS. Any refusal ends the connection: the
 * option is never sent in clear.
 */
export function startTlsPrepare(
  upgrader: ConnectionUpgrader,
  settings: Readonly<Record<string, string>>,
  options: { timeoutMs?: number; signal?: AbortSignal } = {},
): (connection: TransportConnection, io: HandshakeIo) => Promise<TransportConnection> {
  return (connection, io) => startTls(connection, io, upgrader, settings, options);
}
