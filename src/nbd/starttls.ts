/**
 * The client side of NBD_OPT_STARTTLS (doc/proto.md "TLS support"): sent first, before any other
 * option, so nothing of the negotiation travels in clear; any answer but ACK ends the connection
 * (downgrade protection: an nbds:// URI means TLS or nothing). After the ACK both sides switch to
 * TLS at once, so bytes the server sent in clear after its ACK can only come from a man in the
 * middle (CVE-2021-3716's class): the connection is dropped.
 *
 * The upgrade itself belongs to the "tls" connection upgrader (plugins/transport-tls).
 */
import { BlkrepError } from '../api/errors.js';
import type { ConnectionUpgrader, TransportConnection } from '../api/transport.js';
import { FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPT, OPTION_REPLY_MAGIC, REP } from './constants.js';
import { encodeOption, GREETING_LENGTH } from './codec.js';
import { ExactReader, type HandshakeIo } from './handshake-io.js';

export interface StartTlsOptions {
  /** for the TLS handshake (default: the upgrader's, 10 s) */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** What the greeting said, for the rest of the handshake (which runs inside TLS). */
export interface Greeting {
  fixedNewstyle: boolean;
  noZeroes: boolean;
}

const REPLY_HEADER = 20;

function tlsError(code: string, message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError(code, message, { errno: 'EPERM', details });
}

/**
 * Send STARTTLS on a connection past the greeting and the client flags, wait for the ACK, then
 * upgrade. Errors: ERR_NBD_TLS_UNSUPPORTED (the server does not offer TLS), ERR_NBD_TLS_REFUSED
 * (any other refusal), ERR_NBD_TLS_INJECTION (clear bytes after the ACK), ERR_NBD_HANDSHAKE
 * (malformed reply), and the upgrader's own (ERR_TLS_*).
 */
export async function startTls(
  connection: TransportConnection,
  io: HandshakeIo,
  upgrader: ConnectionUpgrader,
  settings: Readonly<Record<string, string>>,
  options: StartTlsOptions = {},
): Promise<TransportConnection> {
  const peer = connection.peer;
  io.write(encodeOption(OPT.STARTTLS));
  const header = await io.read(REPLY_HEADER);
  if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC || header.readUInt32BE(8) !== OPT.STARTTLS) {
    throw new BlkrepError('ERR_NBD_HANDSHAKE', `${peer} answered STARTTLS with a malformed reply`, { errno: 'EIO' });
  }
  const type = header.readUInt32BE(12);
  const length = header.readUInt32BE(16);
  if (length > 65536) throw new BlkrepError('ERR_NBD_HANDSHAKE', `${peer} sent a STARTTLS reply of ${length} bytes`, { errno: 'EIO' });
  const payload = await io.read(length);
  const message = payload.toString('utf8');
  if (type === REP.ACK) {
    if (length !== 0) throw new BlkrepError('ERR_NBD_HANDSHAKE', `${peer} acknowledged STARTTLS with ${length} bytes of data (expected none)`, { errno: 'EIO' });
    const rest = io.detach?.() ?? Buffer.alloc(0);
    if (rest.length > 0) {
      throw tlsError('ERR_NBD_TLS_INJECTION', `${peer} sent ${rest.length} bytes in clear after acknowledging STARTTLS: injected by a man in the middle? The connection is dropped`, {
        peer,
        bytes: rest.length,
      });
    }
    connection.stream.pause();
    return upgrader.client(connection, { settings, ...(options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs }), ...(options.signal ? { signal: options.signal } : {}) });
  }
  const said = message ? `: ${message}` : '';
  if (type === REP.ERR_UNSUP || type === REP.ERR_POLICY) {
    throw tlsError('ERR_NBD_TLS_UNSUPPORTED', `${peer} does not offer TLS (it answered STARTTLS with ${type === REP.ERR_UNSUP ? 'ERR_UNSUP' : 'ERR_POLICY'}${said}); an nbds:// URI never falls back to clear text`, { peer, reply: type });
  }
  throw tlsError('ERR_NBD_TLS_REFUSED', `${peer} refused STARTTLS with reply 0x${type.toString(16)}${said}`, { peer, reply: type });
}

/**
 * A fresh connection: read the greeting, send the client flags, STARTTLS, upgrade. The caller
 * runs the rest of the handshake (options, GO) on the returned connection with `greeting`.
 * On failure the connection is destroyed.
 */
export async function greetAndStartTls(
  connection: TransportConnection,
  upgrader: ConnectionUpgrader,
  settings: Readonly<Record<string, string>>,
  options: StartTlsOptions = {},
): Promise<{ connection: TransportConnection; greeting: Greeting }> {
  const stream = connection.stream;
  const reader = new ExactReader(stream);
  const onAbort = (): void => {
    stream.destroy(new BlkrepError('ERR_NBD_CONNECT', `${connection.peer}: handshake aborted`, { errno: 'EIO' }));
  };
  if (options.signal?.aborted) onAbort();
  options.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    const g = await reader.read(GREETING_LENGTH);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) {
      throw new BlkrepError('ERR_NBD_HANDSHAKE', `${connection.peer} is not a newstyle NBD server (its greeting is ${g.subarray(0, 16).toString('hex')})`, { errno: 'EIO' });
    }
    const flags = g.readUInt16BE(16);
    if ((flags & FLAG_FIXED_NEWSTYLE) === 0) {
      throw tlsError('ERR_NBD_TLS_UNSUPPORTED', `${connection.peer} does not speak fixed newstyle NBD, so it cannot do TLS (STARTTLS)`, { peer: connection.peer });
    }
    const noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
    const cf = Buffer.alloc(4);
    cf.writeUInt32BE(FLAG_C_FIXED_NEWSTYLE | (noZeroes ? FLAG_C_NO_ZEROES : 0));
    stream.write(cf);
    const upgraded = await startTls(connection, reader, upgrader, settings, options);
    return { connection: upgraded, greeting: { fixedNewstyle: true, noZeroes } };
  } catch (err) {
    reader.detach();
    stream.destroy();
    throw err;
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
  }
}
