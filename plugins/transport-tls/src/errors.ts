/**
 * Plugins import only types from the engine, so errors here are plain Errors carrying the same
 * fields as the engine's BlkrepError (`code`, `errno`, `details`); the engine adopts them as they are.
 *
 * Codes: ERR_TLS_SETTINGS (a setting is wrong), ERR_TLS_CREDENTIALS (a file is missing or bad),
 * ERR_TLS_HANDSHAKE (the handshake failed: certificate, name, PSK), ERR_TLS_AUTHZ (a verified
 * client is not in the allow-list), ERR_TLS_TIMEOUT (no handshake in time).
 */
type TlsErrno = 'EINVAL' | 'EIO' | 'EPERM';

export class TlsError extends Error {
  readonly code: string;
  readonly errno: TlsErrno;
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: { errno?: TlsErrno; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'TlsError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }
}
