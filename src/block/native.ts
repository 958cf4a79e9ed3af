/**
 * The native addon (native/blkrep_native.c): the sparse-file, block-device and OFD-lock system calls Node
 * does not expose. Optional — `loadNative()` returns null when the addon is not built (or when
 * BLKREP_NO_NATIVE=1), and the raw driver falls back to portable code.
 *
 * The addon is found by looking upward from this module for `native/build/Release/…`, so it loads
 * both from src/block/ (vitest) and from dist/src/block/ (the compiled CLI).
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { envFlag } from '../util/env.js';

/**
 * What the addon offers. Failures are Errors with `code` = errno name (EOPNOTSUPP is reported as
 * 'ENOTSUP'). Offsets and lengths are integers in [0, 2^53]; a zero length is a no-op. The fd must
 * stay open until a returned promise settles.
 */
export interface SparseOps {
  /** lseek(SEEK_DATA): the first data offset ≥ offset, or -1 when there is none (ENXIO). */
  seekData(fd: number, offset: number): number;
  /** lseek(SEEK_HOLE): the first hole offset ≥ offset (EOF counts as a hole), or -1 past EOF. */
  seekHole(fd: number, offset: number): number;
  /** fallocate(PUNCH_HOLE | KEEP_SIZE): deallocate; reads as zeros. On a block device: zero, no fallback. */
  punchHole(fd: number, offset: number, length: number): Promise<void>;
  /** fallocate(ZERO_RANGE | KEEP_SIZE): zero, keeping the range allocated. */
  zeroRange(fd: number, offset: number, length: number): Promise<void>;
  /** fallocate(KEEP_SIZE): allocate without changing contents or size. */
  allocate(fd: number, offset: number, length: number): Promise<void>;
  /** ioctl(BLKDISCARD) on a block device. */
  discard(fd: number, offset: number, length: number): Promise<void>;
  /** ioctl(BLKZEROOUT) on a block device. */
  zeroOut(fd: number, offset: number, length: number): Promise<void>;
  /** ioctl(BLKGETSIZE64), falling back to lseek(SEEK_END). */
  blockDeviceSize(fd: number): Promise<number>;
  /** posix_fadvise(WILLNEED): start reading ahead. */
  willNeed(fd: number, offset: number, length: number): Promise<void>;
  /**
   * fcntl(F_OFD_SETLK): set ('read', 'write') or remove ('unlock') an open-file-description lock
   * on [start, start+length), without waiting; EAGAIN when another description holds a conflicting one.
   */
  setLock(fd: number, start: number, length: number, type: 'read' | 'write' | 'unlock'): void;
  /** fcntl(F_OFD_GETLK): null when a `type` lock could be set, else the first conflicting lock (pid -1 for an OFD lock). */
  getLock(fd: number, start: number, length: number, type: 'read' | 'write'): HeldLock | null;
  /**
   * preadv2(RWF_NOWAIT) into buffer[bufOffset, bufOffset+length), synchronous and never blocking:
   * the bytes read (0 at EOF), -1 when the kernel would have to wait (not in the page cache),
   * -2 when it offers no RWF_NOWAIT for this file. Absent in an addon built before it.
   */
  preadNowait?(fd: number, buffer: Buffer, bufOffset: number, length: number, position: number): number;
  /** pwritev2(RWF_NOWAIT), as preadNowait (ext4's buffered writes answer -2). */
  pwriteNowait?(fd: number, buffer: Buffer, bufOffset: number, length: number, position: number): number;
  /**
   * pwrite of every buffer at its position (1 to 1024 of them), all on one thread-pool job: per
   * buffer the bytes written (short only when the kernel wrote nothing more) or its Error.
   * Absent in an addon built before it.
   */
  pwriteBatch?(fd: number, buffers: Buffer[], positions: number[]): Promise<Array<number | Error>>;
  /**
   * A read reply from `fileFd` to the socket `sockFd` without a copy through user space, on one
   * thread-pool job (see FileRange.sendTo in src/api/block.ts): splice the range into the
   * worker's pipe (a read error rejects with `.stage` 'read', nothing sent; EOF or a range over
   * the pipe's 1 MiB resolves 1, nothing sent), then send `header` and splice the pipe into the
   * socket in the lane's order (FileRange.sendTo), polling while it is full (`.stage` 'send' on
   * failure; lane[0] ≠ 0 stops the wait). 0: all sent. Absent in an addon built before it.
   */
  spliceSend?(sockFd: number, fileFd: number, position: number, length: number, header: Buffer, lane: Buffer): Promise<0 | 1>;
  /**
   * setsockopt(SO_SNDBUFFORCE, else SO_SNDBUF) on a socket, synchronous: what getsockopt(SO_SNDBUF)
   * says afterwards (the kernel doubles the value asked for). Absent in an addon built before it.
   */
  setSendBuffer?(fd: number, bytes: number): number;
  /** getsockopt(SO_SNDBUF). Absent in an addon built before it. */
  getSendBuffer?(fd: number): number;
}

/** A lock another open file description holds, as F_OFD_GETLK reports it. */
export interface HeldLock {
  type: 'read' | 'write';
  start: number;
  length: number;
  /** the holder of a classic POSIX lock; -1 for an OFD lock (see src/block/image-lock.ts) */
  pid: number;
}

export interface NativeStatus {
  loaded: boolean;
  /** the addon file, when found */
  path?: string;
  /** why it is not loaded */
  reason?: string;
}

const ADDON = join('native', 'build', 'Release', 'blkrep_native.node');
const FUNCTIONS: ReadonlyArray<keyof SparseOps> = [
  'seekData', 'seekHole', 'punchHole', 'zeroRange', 'allocate', 'discard', 'zeroOut', 'blockDeviceSize', 'willNeed',
  'setLock', 'getLock',
];

/** The addon file above `from` (default: this module's directory), or undefined. */
export function findNativeAddon(from: string = dirname(fileURLToPath(import.meta.url))): string | undefined {
  for (let dir = from; ; ) {
    const candidate = join(dir, ADDON);
    if (existsSync(candidate)) return candidate;
    const parent = dirname(dir);
    if (parent === dir) return undefined;
    dir = parent;
  }
}

/** True when BLKREP_NO_NATIVE asks for the portable fallback. */
export function nativeDisabled(): boolean {
  return envFlag('BLKREP_NO_NATIVE');
}

let loaded: SparseOps | null | undefined;
let status: NativeStatus = { loaded: false, reason: 'not loaded yet' };

function tryLoad(): SparseOps | null {
  const path = findNativeAddon();
  if (!path) {
    status = { loaded: false, reason: `${ADDON} not found (run "npm install" or "node scripts/build-native.mjs")` };
    return null;
  }
  let addon: Record<string, unknown>;
  try {
    addon = createRequire(import.meta.url)(path) as Record<string, unknown>;
  } catch (err) {
    status = { loaded: false, path, reason: `cannot load ${path}: ${err instanceof Error ? err.message.split('\n')[0] : String(err)}` };
    return null;
  }
  const missing = FUNCTIONS.filter((f) => typeof addon[f] !== 'function');
  if (missing.length > 0) {
    status = { loaded: false, path, reason: `${path} is out of date (no ${missing.join(', ')}); rebuild it` };
    return null;
  }
  status = { loaded: true, path };
  return addon as unknown as SparseOps;
}

/** The addon, or null for the portable fallback (not built, failed to load, or BLKREP_NO_NATIVE=1). */
export function loadNative(): SparseOps | null {
  if (nativeDisabled()) return null;
  if (loaded === undefined) loaded = tryLoad();
  return loaded;
}

/** Whether the addon is in use and, if not, why (for `status` output and diagnostics). */
export function nativeStatus(): NativeStatus {
  if (nativeDisabled()) return { loaded: false, reason: 'disabled by BLKREP_NO_NATIVE' };
  loadNative();
  return { ...status };
}
