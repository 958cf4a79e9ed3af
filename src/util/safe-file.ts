/**
 * Safe file creation, for every file blkrep creates (pid file, job state files, bitmap files,
 * new images): directories such as /run, /tmp or an image directory may be shared with other
 * users, who can plant a symlink or a file at a predictable name.
 *
 * - A new name is opened O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file, never through a symlink.
 * - A temporary name has a random suffix (`.NAME.tmp-PID-RANDOM` beside NAME), so it cannot be guessed.
 * - The mode is set with fchmod after the open: the umask cannot widen or narrow it.
 * - replaceFile() writes the temporary file, fsyncs it, renames it over NAME (rename replaces a
 *   symlink at NAME itself, never its target) and fsyncs the directory: a crash leaves the old
 *   file or the new one.
 */
import { randomBytes } from 'node:crypto';
import { closeSync, constants, fstatSync, openSync, readFileSync, writeSync, type Stats } from 'node:fs';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { BlkrepError, type Errno } from '../api/errors.js';

/** O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW: a new file, never an existing one, never through a symlink. */
export const CREATE_NEW_FLAGS = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;

/** A temporary name beside `path` that nobody can guess: `.NAME.tmp-PID-RANDOM`. */
export function tempPathBeside(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${randomBytes(8).toString('hex')}`);
}

/** fsync a directory so that a new name in it survives a crash (some filesystems refuse: the rename is done anyway). */
export async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'EINVAL' && code !== 'ENOTSUP' && code !== 'EBADF') throw err;
  } finally {
    await handle.close();
  }
}

function errnoOf(err: unknown): Errno {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT' || code === 'EFBIG') return 'ENOSPC';
  if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') return 'EPERM';
  if (code === 'EEXIST' || code === 'ELOOP') return 'EINVAL';
  return 'EIO';
}

/** ERR_FILE_CREATE naming the file, what blkrep was doing and the system's reason. */
export function fileCreateError(path: string, what: string, err: unknown): BlkrepError {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const reason =
    code === 'EEXIST'
      ? 'a file, directory or symlink of that name exists already (someone else may have planted it); refusing to write through it'
      : code === 'ELOOP'
        ? 'it is a symlink; refusing to follow it'
        : err instanceof Error
          ? err.message
          : String(err);
  return new BlkrepError('ERR_FILE_CREATE', `cannot create ${what} "${path}": ${reason}`, {
    errno: errnoOf(err),
    cause: err,
    details: { path, ...(code === undefined ? {} : { syscode: code }) },
  });
}

/**
 * Create `path`, which must not exist (not even as a symlink), with exactly `mode`, and return
 * it open write-only. Errors are the system's (EEXIST, ELOOP …).
 */
export async function createNewFile(path: string, mode: number): Promise<FileHandle> {
  const handle = await open(path, CREATE_NEW_FLAGS, mode);
  try {
    await handle.chmod(mode);
  } catch (err) {
    await handle.close().catch(() => {});
    await unlink(path).catch(() => {});
    throw err;
  }
  return handle;
}

/**
 * Create a temporary file beside `path` (random name, O_EXCL|O_NOFOLLOW, exactly `mode`), let
 * `fill` write it, fsync it, rename it over `path` and fsync the directory. The temporary file
 * is removed when anything fails. Errors are the system's; replaceFile() wraps them.
 */
export async function replaceWith(path: string, mode: number, fill: (fd: number) => Promise<void>): Promise<void> {
  const tmp = tempPathBeside(path);
  const handle = await createNewFile(tmp, mode);
  try {
    await fill(handle.fd);
    await handle.sync();
  } catch (err) {
    await handle.close().catch(() => {});
    await unlink(tmp).catch(() => {});
    throw err;
  }
  await handle.close();
  try {
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
  await syncDirectory(dirname(path));
}

/**
 * Write `data` to `path` atomically and durably (replaceWith), mode `mode` whatever the umask.
 * A symlink at `path` is replaced, never followed. Throws ERR_FILE_CREATE naming the file.
 */
export async function replaceFile(path: string, data: string | Uint8Array, options: { mode: number; what: string }): Promise<void> {
  const bytes = typeof data === 'string' ? Buffer.from(data) : data;
  try {
    await replaceWith(path, options.mode, async (fd) => {
      let done = 0;
      while (done < bytes.length) done += writeSync(fd, bytes, done, bytes.length - done, done);
    });
  } catch (err) {
    throw fileCreateError(path, options.what, err);
  }
}

/**
 * A file found at a name where blkrep keeps a file of its own (a pair state, a job state, a term
 * file), and why it is not one blkrep could have written: `why` reads after the name ("is a
 * symlink", "is not a regular file", "is owned by uid 1000, not by this daemon's user (uid 0)",
 * "has mode 0666: other users may write it").
 */
export class UntrustedFileError extends Error {
  constructor(readonly why: string) {
    super(why);
  }
}

/** O_RDONLY|O_NOFOLLOW|O_NONBLOCK: never through a symlink, never waiting on a FIFO planted at the name. */
const OWN_FILE_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

function checkOwnFile(st: Stats): void {
  if (!st.isFile()) throw new UntrustedFileError('is not a regular file');
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid && st.uid !== 0) throw new UntrustedFileError(`is owned by uid ${st.uid}, not by this daemon's user (uid ${uid})`);
  if ((st.mode & 0o022) !== 0) throw new UntrustedFileError(`has mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}: other users may write it`);
}

function openError(err: unknown): unknown {
  return (err as NodeJS.ErrnoException).code === 'ELOOP' ? new UntrustedFileError('is a symlink') : err;
}

/**
 * The text of a file only this daemon's user could have written, as this module creates them: the
 * directory may be shared, so it is opened O_NOFOLLOW|O_NONBLOCK (a symlink or a FIFO planted at
 * the name is refused at once, never followed or waited on) and must be a regular file owned by
 * this user or root that no other user may write. Throws UntrustedFileError saying why not; an
 * error of the open itself (ENOENT, EACCES) as it is.
 */
export async function readOwnFile(path: string): Promise<string> {
  let handle: FileHandle;
  try {
    handle = await open(path, OWN_FILE_FLAGS);
  } catch (err) {
    throw openError(err);
  }
  try {
    checkOwnFile(await handle.stat());
    return await handle.readFile('utf8');
  } finally {
    await handle.close();
  }
}

/** readOwnFile, synchronously (a caller at start-up that reads before any I/O runs). */
export function readOwnFileSync(path: string): string {
  let fd: number;
  try {
    fd = openSync(path, OWN_FILE_FLAGS);
  } catch (err) {
    throw openError(err);
  }
  try {
    checkOwnFile(fstatSync(fd));
    return readFileSync(fd, 'utf8');
  } finally {
    closeSync(fd);
  }
}
