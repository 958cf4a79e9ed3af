/**
 * Positional file I/O for bitmap files: thin promise wrappers over node:fs callbacks (one
 * allocation per call, as src/block/raw.ts does), full reads and writes, and the directory sync
 * that makes a rename durable.
 */
import { close, fdatasync, fstat, fsync, ftruncate, open, read, write, type Stats } from 'node:fs';

export function openFd(path: string, flags: string | number, mode = 0o644): Promise<number> {
  return new Promise((resolve, reject) => open(path, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd))));
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => close(fd, (err) => (err ? reject(err) : resolve())));
}

export function statFd(fd: number): Promise<Stats> {
  return new Promise((resolve, reject) => fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

export function datasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

export function truncateFd(fd: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => ftruncate(fd, length, (err) => (err ? reject(err) : resolve())));
}

export function syncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fsync(fd, (err) => (err ? reject(err) : resolve())));
}

/** Read up to buffer.length bytes at position; returns the bytes read (short only at end of file). */
export async function readAt(fd: number, buffer: Buffer, position: number): Promise<number> {
  let done = 0;
  while (done < buffer.length) {
    const n = await new Promise<number>((resolve, reject) =>
      read(fd, buffer, done, buffer.length - done, position + done, (err, got) => (err ? reject(err) : resolve(got))),
    );
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Write all of buffer at position. */
export async function writeAt(fd: number, buffer: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < buffer.length) {
    const n = await new Promise<number>((resolve, reject) =>
      write(fd, buffer, done, buffer.length - done, position + done, (err, put) => (err ? reject(err) : resolve(put))),
    );
    if (n <= 0) throw Object.assign(new Error(`write at offset ${position + done} made no progress`), { code: 'EIO' });
    done += n;
  }
}

/** fsync a directory so that a rename or a new name in it survives a crash. */
export async function syncDir(dir: string): Promise<void> {
  const fd = await openFd(dir, 'r');
  try {
    await syncFd(fd);
  } finally {
    await closeFd(fd);
  }
}
