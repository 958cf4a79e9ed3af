/**
 * The NBD client's typed errors. Stable codes:
 *
 *   ERR_NBD_CONNECT         the transport could not connect (EIO)
 *   ERR_NBD_HANDSHAKE       the server refused or broke the handshake (EIO)
 *   ERR_NBD_NO_EXPORT       the server has no such export (EINVAL)
 *   ERR_NBD_TLS_REQUIRED    the server requires TLS and the URI is not nbds:// (EPERM)
 *   ERR_NBD_TLS_UNSUPPORTED nbds://, and the server does not offer TLS (EPERM; never falls back to clear)
 *   ERR_NBD_TLS_REFUSED     nbds://, and the server refused STARTTLS otherwise (EPERM)
 *   ERR_NBD_TLS_INJECTION   clear bytes after the server's STARTTLS ACK: dropped (EPERM)
 *   ERR_TLS_REJECTED        the server closed the connection right after the TLS handshake: it
 *                           refused our client certificate or identity (EPERM)
 *   ERR_TLS_*               from the tls upgrader: ERR_TLS_HANDSHAKE (certificate, name, PSK key),
 *                           ERR_TLS_CREDENTIALS, ERR_TLS_SETTINGS, ERR_TLS_TIMEOUT
 *   ERR_NBD_SHUTDOWN        the server is shutting down (ESHUTDOWN)
 *   ERR_NBD_PROTOCOL        the server broke the protocol; the connection was dropped (EIO)
 *   ERR_NBD_SERVER_ERROR    the server failed the request; errno is the server's (unknown → EINVAL)
 *   ERR_NBD_DISCONNECTED    no connection came back within the hold time (EIO, or ESHUTDOWN when
 *                           the server said it was shutting down)
 *   ERR_NBD_CLOSED          the client was closed (EIO)
 *   ERR_NBD_UNSUPPORTED     the server does not offer this command or flag (EINVAL)
 *   ERR_NBD_READ_ONLY       a write to a read-only export (EPERM)
 *   ERR_NBD_WRITES_LOST     a connection dropped while writes were not yet flushed, so this flush
 *                           cannot promise they are durable (EIO)
 *   ERR_NBD_EXPORT_CHANGED  after a reconnect the export has another size (EIO)
 *   ABORT_ERR               the caller's AbortSignal fired (isAbortError() is true)
 */
import { BlkrepError, NBD_ERRNO, type Errno } from '../api/errors.js';

const BY_NUMBER = new Map<number, Errno>(Object.entries(NBD_ERRNO).map(([name, n]) => [n, name as Errno]));

/** An errno from the wire; values the protocol does not define count as EINVAL (proto.md). */
export function errnoFromWire(value: number): Errno {
  return BY_NUMBER.get(value) ?? 'EINVAL';
}

export function protocolError(message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_NBD_PROTOCOL', message, { errno: 'EIO', details });
}

export function abortError(what: string, reason?: unknown): BlkrepError {
  return new BlkrepError('ABORT_ERR', `${what} aborted`, reason === undefined ? {} : { cause: reason });
}

/** A request the server failed, with its errno and (structured replies only) its message. */
export function serverError(what: string, wireErrno: number, serverMessage?: string, details: Record<string, unknown> = {}): BlkrepError {
  const errno = errnoFromWire(wireErrno);
  const shown = BY_NUMBER.has(wireErrno) ? `${errno} (${wireErrno})` : `error ${wireErrno}, unknown to NBD, taken as EINVAL`;
  const said = serverMessage ? `: ${serverMessage}` : '';
  return new BlkrepError('ERR_NBD_SERVER_ERROR', `${what} failed on the server: ${shown}${said}`, {
    errno,
    details: { ...details, wireErrno, ...(serverMessage ? { serverMessage } : {}) },
  });
}
