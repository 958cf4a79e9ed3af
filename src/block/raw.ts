/**
 * raw — a regular file or a block device, byte for byte. Sparse-aware through the native addon
 * (src/block/native.ts): extents from SEEK_DATA/SEEK_HOLE, trim and zeroing by fallocate (files)
 * or BLKDISCARD/BLKZEROOUT (devices). Without the addon everything still works: trim is a no-op,
 * zeroing writes zeros, fast zeroing fails ENOTSUP, and extents detect zero blocks by reading
 * (bounded: the first ZERO_DETECT_MAX bytes of a request).
 *
 * One fd serves every connection (positional I/O), so a flush on any connection covers all writes:
 * canMultiConn. close() waits for the requests in flight before closing the fd.
 */
import { close, fdatasync, fstat, open, read, write, type Stats } from 'node:fs';
import type { BlockNode, Capabilities, Extent, FileRange, IoOptions, WriteOptions, ZeroOptions } from '../api/block.js';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import { MAX_PAYLOAD } from './memory.js';
import { WriteBatcher, WRITE_BATCH_MAX } from './write-batch.js';
import { ImageLock, lockPerms, PERM_WRITE, type LockPerms } from './image-lock.js';
import { loadNative, type SparseOps } from './native.js';
import { checkRange, coalesceExtents } from './node.js';
import { envFlag } from '../util/env.js';

/** zeroing without the addon writes at most this much per write */
const ZERO_CHUNK = 1 << 20;
/** zero detection (no addon) works in blocks of this size, aligned to the device */
const ZERO_BLOCK = 64 * 1024;
/** extents() without the addon reads at most this much of a request to find zero blocks */
export const ZERO_DETECT_MAX = 4 * 1024 * 1024;
/** trim on a block device is rounded inward to this alignment (BLKDISCARD needs logical blocks) */
const DISCARD_ALIGN = 4096;

/**
 * Reads and writes up to this size are first tried on the event loop with RWF_NOWAIT (the native
 * addon's preadNowait/pwriteNowait): a page-cache hit is one system call, without the trip through
 * libuv's thread pool (queue, wake a worker, wake the loop) that costs more CPU than the copy itself
 * for 4 KiB (bench/serve-nbd). The kernel answers EAGAIN instead of blocking, and that request goes
 * to the pool as before, so a cache miss or a slow device never stalls the loop. Larger requests
 * stay on the pool: their copy is the cost there, and the workers do it beside the loop (1 MiB
 * reads on the loop halved bench/serve-nbd's sequential read rate on 2 cores).
 */
const NOWAIT_MAX = 64 * 1024;

/**
 * A read asked with `bulk` (the copy engine's: src/jobs/copy/operations.ts) is tried on the loop
 * up to this size: a copy's event loop already does the socket write of every byte it reads, and
 * the pool's trip per read (queue, futex wake of a worker, eventfd wake of the loop) cost it more
 * than the 256 KiB copy from the page cache (bench/mirror, 1 GiB onto nbdkit, quiet: 1660 against
 * 1950 CPU ms per GiB, 1.73 against 1.93 s).
 */
const BULK_NOWAIT_MAX = 1024 * 1024;

/** how large a read may be tried on the loop: IoOptions.bulk's limit, else NOWAIT_MAX */
function nowaitLimit(o: IoOptions | undefined): number {
  return o?.bulk === true ? BULK_NOWAIT_MAX : NOWAIT_MAX;
}

/** BLKREP_NO_NOWAIT=1: every read and write through the thread pool (bench/serve-nbd compares the two). */
function nowaitDisabled(): boolean {
  return envFlag('BLKREP_NO_NOWAIT');
}

let zeroBuffer: Buffer | undefined;
/** A shared all-zero buffer, never written to. */
function zeros(length: number): Buffer {
  zeroBuffer ??= Buffer.alloc(Math.max(ZERO_CHUNK, ZERO_BLOCK));
  return zeroBuffer.subarray(0, length);
}

// Thin promise wrappers over the callback API: one allocation per call, no FileHandle.
function readAt(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buffer, offset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}
function writeAt(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => write(fd, buffer, offset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}
function datasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}
function openFd(path: string, flags: string): Promise<number> {
  return new Promise((resolve, reject) => open(path, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
}
function statFd(fd: number): Promise<Stats> {
  return new Promise((resolve, reject) => fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}
function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => close(fd, (err) => (err ? reject(err) : resolve())));
}

function sysCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** The operation is not available here (filesystem, device, alignment): use the slower way. */
function unsupported(err: unknown): boolean {
  const code = sysCode(err);
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'ENOSYS' || code === 'ENOTTY' || code === 'EINVAL';
}

const OPEN_REASONS: Record<string, string> = {
  ENOENT: 'no such file or directory',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EROFS: 'read-only file system',
  EISDIR: 'is a directory',
  ENOTDIR: 'a component of the path is not a directory',
  ELOOP: 'too many symbolic links',
  ENAMETOOLONG: 'name too long',
  EBUSY: 'device or resource busy',
  ENXIO: 'no such device',
  ENODEV: 'no such device',
  EMFILE: 'too many open files',
};

function openError(path: string, readOnly: boolean, err: unknown): BlkrepError {
  const code = sysCode(err);
  const reason = (code && OPEN_REASONS[code]) ?? (err instanceof Error ? err.message : String(err));
  const mode = readOnly ? 'reading' : 'reading and writing';
  return new BlkrepError('ERR_OPEN', `cannot open "${path}" for ${mode}: ${reason}`, {
    errno: toBlkrepError(err).errno,
    cause: err,
    details: { path, ...(code ? { syscode: code } : {}) },
  });
}

export interface RawOpenOptions {
  readOnly?: boolean;
  /** the addon; undefined = loadNative(), null = force the portable fallback */
  native?: SparseOps | null;
  /**
   * the image lock (src/block/image-lock.ts) to take; default: a raw image's, read-only or
   * read-write; null: none (a file blkrep locks by other means). Without the addon nothing is locked.
   */
  lock?: LockPerms | null;
}

export class RawNode implements BlockNode {
  readonly driver = 'raw';
  readonly description: string;
  readonly limits = { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD };
  readonly caps: Capabilities;

  private inflight = 0;
  private idle: (() => void) | undefined;
  private closing: Promise<void> | undefined;
  /** try reads / writes with RWF_NOWAIT first (NOWAIT_MAX); off when the kernel answers -2 for this file */
  private nowaitReads: boolean;
  private nowaitWrites: boolean;
  /**
   * Writes up to WRITE_BATCH_MAX that cannot be done on the loop (ext4 offers no RWF_NOWAIT for
   * buffered writes; a write that would wait) are gathered per turn of the event loop and handed
   * to the thread pool as one job (src/block/write-batch.ts): a job per write cost ~6 futex calls
   * and an eventfd wake-up each (4 KiB random writes QD32 on serve-nbd). null: one job per write.
   */
  private readonly batcher: WriteBatcher | null;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly size: number,
    readonly readOnly: boolean,
    readonly isBlockDevice: boolean,
    private readonly native: SparseOps | null,
    /** the image lock held on fd (undefined without the addon, or when asked for none) */
    readonly imageLock?: ImageLock,
  ) {
    this.description = path;
    const nowait = !nowaitDisabled();
    this.nowaitReads = nowait && typeof native?.preadNowait === 'function';
    this.nowaitWrites = nowait && !readOnly && typeof native?.pwriteNowait === 'function';
    this.batcher = readOnly ? null : WriteBatcher.for(fd, native);
    const rw = !readOnly;
    this.caps = {
      canWrite: rw, canFlush: true, canFua: true, canTrim: rw, canZero: rw, canFastZero: rw && native !== null,
      canMultiConn: true, canExtents: true, canCache: true,
      // SEEK_DATA/SEEK_HOLE are cheap; the fallback has to read to find zeros.
      cheapExtents: native !== null && !isBlockDevice,
    };
  }

  /** Open a regular file or a block device. Errors are BlkrepError ERR_OPEN naming the path. */
  static async open(path: string, options: RawOpenOptions = {}): Promise<RawNode> {
    const readOnly = options.readOnly ?? false;
    const native = options.native === undefined ? loadNative() : options.native;
    let fd: number;
    try {
      fd = await openFd(path, readOnly ? 'r' : 'r+');
    } catch (err) {
      throw openError(path, readOnly, err);
    }
    try {
      const st = await statFd(fd);
      let size: number;
      if (st.isFile()) {
        size = st.size;
      } else if (st.isBlockDevice()) {
        size = native ? await native.blockDeviceSize(fd) : await probeDeviceSize(fd);
      } else {
        const kind = st.isDirectory() ? 'is a directory' : 'is not a regular file or block device';
        throw new BlkrepError('ERR_OPEN', `cannot open "${path}": ${kind}`, { errno: 'EINVAL', details: { path } });
      }
      if (!Number.isSafeInteger(size)) {
        throw new BlkrepError('ERR_OPEN', `cannot open "${path}": size ${size} is not below 2^53`, { errno: 'EOVERFLOW', details: { path, size } });
      }
      const want = options.lock === undefined ? lockPerms({ format: 'raw', readOnly }) : options.lock;
      const lock = want === null ? undefined : await ImageLock.acquire(native, fd, path, want);
      return new RawNode(path, fd, size, readOnly, st.isBlockDevice(), native, lock);
    } catch (err) {
      await closeFd(fd).catch(() => {});
      throw err instanceof BlkrepError ? err : openError(path, readOnly, err);
    }
  }

  /** whether the native addon serves trim, zeroing and extents */
  get sparse(): boolean {
    return this.native !== null;
  }

  async read(offset: number, length: number, o?: IoOptions): Promise<Buffer> {
    checkRange(this, offset, length, 'read');
    o?.signal?.throwIfAborted();
    this.begin();
    try {
      return await this.readRaw(offset, length, nowaitLimit(o));
    } catch (err) {
      throw toBlkrepError(err, `read of ${length} bytes at offset ${offset} from ${this.path}`);
    } finally {
      this.end();
    }
  }

  async readInto(offset: number, target: Buffer, o?: IoOptions): Promise<void> {
    checkRange(this, offset, target.length, 'read');
    o?.signal?.throwIfAborted();
    this.begin();
    try {
      await this.readFull(offset, target, nowaitLimit(o));
    } catch (err) {
      throw toBlkrepError(err, `read of ${target.length} bytes at offset ${offset} from ${this.path}`);
    } finally {
      this.end();
    }
  }

  async write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    this.checkWritable('write');
    checkRange(this, offset, data.length, 'write');
    o?.signal?.throwIfAborted();
    this.begin();
    try {
      await this.writeRaw(offset, data);
      if (o?.fua) await datasync(this.fd);
    } catch (err) {
      throw toBlkrepError(err, `write of ${data.length} bytes at offset ${offset} to ${this.path}`);
    } finally {
      this.end();
    }
  }

  async writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    this.checkWritable('write-zeroes');
    checkRange(this, offset, length, 'write-zeroes');
    o?.signal?.throwIfAborted();
    this.begin();
    try {
      if (length > 0) await this.zero(offset, length, o ?? {});
      if (o?.fua) await datasync(this.fd);
    } catch (err) {
      throw toBlkrepError(err, `write-zeroes of ${length} bytes at offset ${offset} to ${this.path}`);
    } finally {
      this.end();
    }
  }

  async trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    this.checkWritable('trim');
    checkRange(this, offset, length, 'trim');
    o?.signal?.throwIfAborted();
    this.begin();
    try {
      const n = this.native;
      if (n && length > 0) {
        try {
          if (!this.isBlockDevice) {
            await n.punchHole(this.fd, offset, length);
          } else {
            const start = Math.ceil(offset / DISCARD_ALIGN) * DISCARD_ALIGN;
            const end = Math.floor((offset + length) / DISCARD_ALIGN) * DISCARD_ALIGN;
            if (end > start) await n.discard(this.fd, start, end - start);
          }
        } catch (err) {
          // trim is advisory: a filesystem or device that cannot do it keeps the data
          if (!unsupported(err)) throw err;
        }
      }
      if (o?.fua) await datasync(this.fd);
    } catch (err) {
      throw toBlkrepError(err, `trim of ${length} bytes at offset ${offset} of ${this.path}`);
    } finally {
      this.end();
    }
  }

  async flush(o?: IoOptions): Promise<void> {
    o?.signal?.throwIfAborted();
    this.begin();
    try {
      await datasync(this.fd);
    } catch (err) {
      throw toBlkrepError(err, `flush of ${this.path}`);
    } finally {
      this.end();
    }
  }

  async extents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    checkRange(this, offset, length, 'extents');
    o?.signal?.throwIfAborted();
    if (length === 0) return [];
    if (this.isBlockDevice) return [{ length, hole: false, zero: false }];
    this.begin();
    try {
      if (this.native) {
        try {
          return this.seekExtents(this.native, offset, offset + length);
        } catch (err) {
          if (!unsupported(err)) throw err;
        }
      }
      return await this.detectZeroes(offset, offset + length);
    } catch (err) {
      throw toBlkrepError(err, `extents of ${length} bytes at offset ${offset} of ${this.path}`);
    } finally {
      this.end();
    }
  }

  async cache(offset: number, length: number, o?: IoOptions): Promise<void> {
    checkRange(this, offset, length, 'cache');
    o?.signal?.throwIfAborted();
    if (!this.native || length === 0) return;
    this.begin();
    try {
      await this.native.willNeed(this.fd, offset, length);
    } catch (err) {
      if (!unsupported(err)) throw toBlkrepError(err, `cache of ${length} bytes at offset ${offset} of ${this.path}`);
    } finally {
      this.end();
    }
  }

  /** Waits for requests in flight, syncs (when writable) and closes. Later calls: ESHUTDOWN. */
  /**
   * From now on no other process may write this file: a replication pair's disk (the daemon calls
   * it when the export joins a pair, serve/daemon.ts). A raw image otherwise shares writes, as
   * QEMU's raw driver does; a pair member's disk must not, since a write that reaches it around the
   * pair (qemu-io, qemu-nbd, a second serve-nbd) never reaches the peer. Fails ERR_IMAGE_LOCKED,
   * naming the holder, while another process has the file open for writing; then nothing changes.
   * Nothing to do without a lock (no addon) or read-only.
   */
  async unshareWrites(): Promise<void> {
    if (this.imageLock === undefined || this.readOnly) return;
    const held = this.imageLock.perms;
    if ((held.shared & PERM_WRITE) === 0) return;
    await this.imageLock.update({ perm: held.perm, shared: held.shared & ~PERM_WRITE });
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      if (this.inflight > 0) await new Promise<void>((resolve) => (this.idle = resolve));
      try {
        if (!this.readOnly) await datasync(this.fd);
      } catch (err) {
        await closeFd(this.fd).catch(() => {});
        throw toBlkrepError(err, `flush of ${this.path} on close`);
      }
      try {
        await closeFd(this.fd);
      } catch (err) {
        throw toBlkrepError(err, `close of ${this.path}`);
      }
    })();
    return this.closing;
  }

  /**
   * The range as this file's, for serve-nbd to splice to a socket (BlockNode.fileRange): a read
   * error there is the read's error, a file shorter than the range now is 'fallback' (the usual
   * read fills the rest with zeros). Undefined without the addon's spliceSend, or once closing.
   */
  fileRange(offset: number, length: number): FileRange | undefined {
    const splice = this.native?.spliceSend;
    if (typeof splice !== 'function' || this.closing || length === 0) return undefined;
    checkRange(this, offset, length, 'read');
    this.begin();
    let released = false;
    return {
      sendTo: async (sockFd, header, lane) => {
        try {
          return (await splice.call(this.native, sockFd, this.fd, offset, length, header, lane)) === 0 ? 'sent' : 'fallback';
        } catch (err) {
          const e = toBlkrepError(err, `read of ${length} bytes at offset ${offset} from ${this.path}`);
          (e as { stage?: unknown }).stage = (err as { stage?: unknown }).stage;
          throw e;
        }
      },
      release: () => {
        if (released) return;
        released = true;
        this.end();
      },
    };
  }

  // ---------------------------------------------------------------------------------------------

  private begin(): void {
    if (this.closing) throw new BlkrepError('ERR_CLOSED', `${this.path} is closed`, { errno: 'ESHUTDOWN' });
    this.inflight++;
  }

  private end(): void {
    if (--this.inflight === 0 && this.idle) {
      const idle = this.idle;
      this.idle = undefined;
      idle();
    }
  }

  private checkWritable(op: string): void {
    if (this.readOnly) {
      throw new BlkrepError('ERR_READ_ONLY', `${op} refused: ${this.path} is open read-only`, { errno: 'EPERM', details: { path: this.path } });
    }
  }

  /** preadv2(RWF_NOWAIT) on the loop (up to `max` bytes): the bytes read, or -1 to go to the thread pool */
  private readNowait(buffer: Buffer, at: number, length: number, position: number, max = NOWAIT_MAX): number {
    if (!this.nowaitReads || length > max) return -1;
    const n = this.native!.preadNowait!(this.fd, buffer, at, length, position);
    if (n === -2) this.nowaitReads = false;
    return n;
  }

  /** pwritev2(RWF_NOWAIT) on the loop: the bytes written, or -1 to go to the thread pool */
  private writeNowait(data: Buffer, at: number, length: number, position: number): number {
    if (!this.nowaitWrites || length > NOWAIT_MAX) return -1;
    const n = this.native!.pwriteNowait!(this.fd, data, at, length, position);
    if (n === -2) this.nowaitWrites = false;
    return n;
  }

  /** pread until done; past the end of a file that shrank since open reads zeros */
  private async readRaw(offset: number, length: number, nowaitMax = NOWAIT_MAX): Promise<Buffer> {
    const buffer = Buffer.allocUnsafe(length);
    await this.readFull(offset, buffer, nowaitMax);
    return buffer;
  }

  private async readFull(offset: number, buffer: Buffer, nowaitMax = NOWAIT_MAX): Promise<void> {
    const length = buffer.length;
    let done = 0;
    while (done < length) {
      let n = this.readNowait(buffer, done, length - done, offset + done, nowaitMax);
      if (n < 0) n = await readAt(this.fd, buffer, done, length - done, offset + done);
      if (n === 0) {
        buffer.fill(0, done);
        break;
      }
      done += n;
    }
  }

  /** pwrite until done */
  private async writeRaw(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const length = data.length - done;
      let n = this.writeNowait(data, done, length, offset + done);
      if (n < 0) {
        n = this.batcher !== null && length <= WRITE_BATCH_MAX
          ? await this.batcher.write(done === 0 ? data : data.subarray(done), offset + done)
          : await writeAt(this.fd, data, done, length, offset + done);
      }
      if (n <= 0) throw new BlkrepError('ERR_SHORT_WRITE', `write to ${this.path} at offset ${offset + done} made no progress`, { errno: 'EIO' });
      done += n;
    }
  }

  private async writeZeroBytes(offset: number, length: number, signal?: AbortSignal): Promise<void> {
    for (let done = 0; done < length; ) {
      signal?.throwIfAborted();
      const n = Math.min(ZERO_CHUNK, length - done);
      await this.writeRaw(offset + done, zeros(n));
      done += n;
    }
  }

  private notFast(offset: number, length: number): BlkrepError {
    return new BlkrepError('ERR_NOT_FAST', `fast zeroing of ${length} bytes at offset ${offset} is not supported by ${this.path}`, {
      errno: 'ENOTSUP',
      details: { offset, length, path: this.path },
    });
  }

  /**
   * Zero [offset, offset+length) the fastest way available. With `fast`, fail ERR_NOT_FAST before
   * changing anything when only writing zeros would do. With `noHole`, keep the range allocated.
   */
  private async zero(offset: number, length: number, o: ZeroOptions): Promise<void> {
    const n = this.native;
    const fd = this.fd;
    /** try a native operation; false when it is not supported here */
    const attempt = async (op: () => Promise<void>): Promise<boolean> => {
      try {
        await op();
        return true;
      } catch (err) {
        if (unsupported(err)) return false;
        throw err;
      }
    };
    if (n && this.isBlockDevice) {
      // fallocate on a block device: PUNCH_HOLE = zero-out without a slow fallback (may unmap),
      // ZERO_RANGE = zero-out keeping the blocks mapped.
      if (o.fast) {
        if (await attempt(() => n.punchHole(fd, offset, length))) return;
        throw this.notFast(offset, length);
      }
      if (o.noHole && (await attempt(() => n.zeroRange(fd, offset, length)))) return;
      if (await attempt(() => n.zeroOut(fd, offset, length))) return;
    } else if (n) {
      if (!o.noHole) {
        if (await attempt(() => n.punchHole(fd, offset, length))) return;
      } else {
        if (await attempt(() => n.zeroRange(fd, offset, length))) return;
        // e.g. tmpfs: no ZERO_RANGE, but punching and reallocating zeroes as fast
        if (await attempt(() => n.punchHole(fd, offset, length))) {
          if (await attempt(() => n.allocate(fd, offset, length))) return;
          // the range reads as zeros already; only its allocation is missing
          if (o.fast) return;
        }
      }
    }
    if (o.fast) throw this.notFast(offset, length);
    await this.writeZeroBytes(offset, length, o.signal);
  }

  /** SEEK_DATA / SEEK_HOLE walk over [offset, end) */
  private seekExtents(n: SparseOps, offset: number, end: number): Extent[] {
    const out: Extent[] = [];
    let pos = offset;
    while (pos < end) {
      const data = n.seekData(this.fd, pos);
      if (data < 0 || data >= end) {
        out.push({ length: end - pos, hole: true, zero: true });
        break;
      }
      if (data > pos) {
        out.push({ length: data - pos, hole: true, zero: true });
        pos = data;
      }
      const hole = n.seekHole(this.fd, pos);
      const next = hole <= pos ? end : Math.min(hole, end);
      out.push({ length: next - pos, hole: false, zero: false });
      pos = next;
    }
    return coalesceExtents(out);
  }

  /** without the addon: all data, with the zero blocks of the first ZERO_DETECT_MAX bytes marked */
  private async detectZeroes(offset: number, end: number): Promise<Extent[]> {
    const scanEnd = Math.min(end, offset + ZERO_DETECT_MAX);
    const buffer = await this.readRaw(offset, scanEnd - offset);
    const out: Extent[] = [];
    for (let pos = offset; pos < scanEnd; ) {
      const next = Math.min(scanEnd, (Math.floor(pos / ZERO_BLOCK) + 1) * ZERO_BLOCK);
      const zero = buffer.subarray(pos - offset, next - offset).equals(zeros(next - pos));
      out.push({ length: next - pos, hole: false, zero });
      pos = next;
    }
    if (scanEnd < end) out.push({ length: end - scanEnd, hole: false, zero: false });
    return coalesceExtents(out);
  }
}

/** Size of a block device without the addon: the last offset at which a 1-byte read succeeds. */
async function probeDeviceSize(fd: number): Promise<number> {
  const byte = Buffer.alloc(1);
  const readable = async (size: number) => size === 0 || (await readAt(fd, byte, 0, 1, size - 1)) === 1;
  let low = 0;
  let high = 512;
  while (await readable(high)) {
    low = high;
    high *= 2;
    if (high > Number.MAX_SAFE_INTEGER) return low;
  }
  // readable(low), not readable(high)
  while (high - low > 1) {
    const mid = low + Math.floor((high - low) / 2);
    if (await readable(mid)) low = mid;
    else high = mid;
  }
  return low;
}
