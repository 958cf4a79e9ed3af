/**
 * Typed errors. Every error a block node, transport or the engine raises is a BlkrepError with a
 * stable `code` (for scripts and --json) and an `errno` (for the NBD wire). Messages are for
 * people and name every number involved (offset, length, size).
 */

/** The errno values the NBD protocol carries (doc/proto.md "Error values"). */
export const NBD_ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export type Errno = keyof typeof NBD_ERRNO;

export interface BlkrepErrorOptions {
  /** errno for the wire; defaults to EIO as nbdkit does. */
  errno?: Errno;
  cause?: unknown;
  /** extra machine-readable detail (offset, length, size, path …) */
  details?: Record<string, unknown>;
}

export class BlkrepError extends Error {
  /** Stable identifier, e.g. `ERR_OUT_OF_RANGE`. Never changes once released. */
  readonly code: string;
  readonly errno: Errno;
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: BlkrepErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'BlkrepError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }

  toJSON(): { code: string; message: string; errno: Errno } {
    return { code: this.code, message: this.message, errno: this.errno };
  }
}

const SYSTEM_ERRNO_MAP: Record<string, Errno> = {
  EPERM: 'EPERM',
  EACCES: 'EPERM',
  EROFS: 'EPERM',
  EIO: 'EIO',
  ENOMEM: 'ENOMEM',
  EINVAL: 'EINVAL',
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  EOVERFLOW: 'EOVERFLOW',
  ENOTSUP: 'ENOTSUP',
  EOPNOTSUPP: 'ENOTSUP',
  ESHUTDOWN: 'ESHUTDOWN',
};

/** Wrap any thrown value as a BlkrepError, keeping the errno of system errors. */
export function toBlkrepError(err: unknown, context?: string): BlkrepError {
  if (err instanceof BlkrepError) return err;
  const sys = err as NodeJS.ErrnoException | undefined;
  const sysCode = typeof sys?.code === 'string' ? sys.code : undefined;
  const errno: Errno = (sysCode && SYSTEM_ERRNO_MAP[sysCode]) || 'EIO';
  const base = err instanceof Error ? err.message : String(err);
  // Plugins throw plain Errors that already carry a stable ERR_ code (and maybe an errno name).
  const own = sysCode?.startsWith('ERR_') ? sysCode : undefined;
  const ownErrno = typeof sys?.errno === 'string' && (sys.errno as string) in NBD_ERRNO ? (sys.errno as unknown as Errno) : undefined;
  const details = (err as { details?: unknown } | undefined)?.details;
  return new BlkrepError(own ?? (sysCode ? `ERR_SYSTEM_${sysCode}` : 'ERR_INTERNAL'), context ? `${context}: ${base}` : base, {
    errno: ownErrno ?? errno,
    cause: err,
    // and their details (peer, reason …), as the engine's own errors carry them
    ...(own && details !== null && typeof details === 'object' ? { details: details as Record<string, unknown> } : {}),
  });
}

export function isAbortError(err: unknown): boolean {
  return err instanceof Error && (err.name === 'AbortError' || (err as { code?: string }).code === 'ABORT_ERR');
}
