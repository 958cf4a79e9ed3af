/**
 * The container of a qcow2 image: the .qcow2 file itself. Unlike a raw export it grows (clusters
 * are allocated past its end), so the driver does not use RawNode, whose size is fixed when it is
 * opened; it uses the same native addon (src/block/native.ts) for hole punching.
 *
 * Writes up to 64 KiB (a cluster of data, an L2 table, a refcount block) go to the thread pool
 * gathered per turn of the event loop (src/block/write-batch.ts, the addon's pwriteBatch), as the
 * raw driver's do: a secondary's copy-before-write costs a data write and table writes per
 * cluster, and a libuv job each was most of its CPU. A write still resolves only once its pwrite
 * returned, so the driver's order (data before the L2 entry that points at it, fsync between the
 * writeback cycle's steps) is unchanged.
 *
 * Reads past the end of the file return zeros: QEMU leaves the last metadata cluster short (it
 * writes only the used part of a new L1 table), and a crash may leave allocated clusters that
 * were never written.
 */
import { close, fdatasync, fstat, ftruncate, open, read, write } from 'node:fs';
import { BlkrepError, toBlkrepError } from '../../api/errors.js';
import { ImageLock, lockPerms, type LockPerms } from '../image-lock.js';
import { loadNative, type SparseOps } from '../native.js';
import { WRITE_BATCH_MAX, WriteBatcher } from '../write-batch.js';

/** fdatasyncs of qcow2 files in this process (count, time from the call to its callback): for BLKREP_CBW_STATS */
export const syncStats = { syncs: 0, ms: 0 };

/** What the qcow2 driver needs from the file it lives in (a test can supply another one). */
export interface Qcow2Container {
  readonly path: string;
  readonly readOnly: boolean;
  /** current length in bytes */
  readonly length: number;
  /** fill target from offset; zeros past the end */
  read(offset: number, target: Buffer): Promise<void>;
  write(offset: number, data: Buffer): Promise<void>;
  /** make every completed write durable (fdatasync) */
  sync(): Promise<void>;
  truncate(length: number): Promise<void>;
  /** deallocate a range so it reads as zeros; best effort (may do nothing) */
  punch(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
  /** the image lock held on the file, if any (src/block/image-lock.ts) */
  readonly imageLock?: ImageLock;
}

function readAt(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buffer, offset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}
function writeAt(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => write(fd, buffer, offset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
}

export class HostFile implements Qcow2Container {
  private constructor(
    readonly path: string,
    private readonly fd: number,
    private size: number,
    readonly readOnly: boolean,
    private readonly native: SparseOps | null,
    /** the image lock held on the file (undefined without the addon, or when asked for none) */
    readonly imageLock?: ImageLock,
  ) {
    this.batcher = readOnly ? null : WriteBatcher.for(fd, native);
  }

  /** small writes, batched per turn of the loop (null without the addon: fs.write) */
  private readonly batcher: WriteBatcher | null;

  /**
   * Open the file, taking `lock` (src/block/image-lock.ts; default: a qcow2 image's, read-only or
   * read-write; null: none). Without the addon nothing is locked.
   */
  static async open(path: string, options: { readOnly?: boolean; native?: SparseOps | null; lock?: LockPerms | null } = {}): Promise<HostFile> {
    const readOnly = options.readOnly ?? false;
    const native = options.native === undefined ? loadNative() : options.native;
    const fd = await new Promise<number>((resolve, reject) =>
      open(path, readOnly ? 'r' : 'r+', (err, fd) => (err ? reject(err) : resolve(fd))),
    ).catch((err: unknown) => {
      const code = (err as { code?: string }).code;
      throw new BlkrepError('ERR_OPEN', `cannot open "${path}" for ${readOnly ? 'reading' : 'reading and writing'}: ${(err as Error).message}`, {
        errno: toBlkrepError(err).errno,
        cause: err,
        details: { path, ...(code ? { syscode: code } : {}) },
      });
    });
    try {
      const st = await new Promise<import('node:fs').Stats>((resolve, reject) => fstat(fd, (err, s) => (err ? reject(err) : resolve(s))));
      if (!st.isFile()) throw new BlkrepError('ERR_OPEN', `cannot open "${path}" as a qcow2 image: not a regular file`, { errno: 'EINVAL', details: { path } });
      const want = options.lock === undefined ? lockPerms({ format: 'qcow2', readOnly }) : options.lock;
      const lock = want === null ? undefined : await ImageLock.acquire(native, fd, path, want);
      return new HostFile(path, fd, st.size, readOnly, native, lock);
    } catch (err) {
      await new Promise<void>((resolve) => close(fd, () => resolve()));
      throw toBlkrepError(err, `open of ${path}`);
    }
  }

  get length(): number {
    return this.size;
  }

  async read(offset: number, target: Buffer): Promise<void> {
    let done = 0;
    const length = target.length;
    while (done < length) {
      if (offset + done >= this.size) {
        target.fill(0, done);
        return;
      }
      const n = await readAt(this.fd, target, done, length - done, offset + done);
      if (n === 0) {
        target.fill(0, done);
        return;
      }
      done += n;
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const length = data.length - done;
      const n =
        this.batcher && length <= WRITE_BATCH_MAX
          ? await this.batcher.write(done === 0 ? data : data.subarray(done), offset + done)
          : await writeAt(this.fd, data, done, length, offset + done);
      if (n <= 0) throw new BlkrepError('ERR_SHORT_WRITE', `write to ${this.path} at offset ${offset + done} made no progress`, { errno: 'EIO' });
      done += n;
    }
    if (offset + data.length > this.size) this.size = offset + data.length;
  }

  sync(): Promise<void> {
    const t0 = performance.now();
    return new Promise((resolve, reject) =>
      fdatasync(this.fd, (err) => {
        syncStats.syncs++;
        syncStats.ms += performance.now() - t0;
        if (err) reject(err);
        else resolve();
      }),
    );
  }

  async truncate(length: number): Promise<void> {
    await new Promise<void>((resolve, reject) => ftruncate(this.fd, length, (err) => (err ? reject(err) : resolve())));
    this.size = length;
  }

  async punch(offset: number, length: number): Promise<void> {
    if (!this.native || length <= 0 || offset >= this.size) return;
    try {
      await this.native.punchHole(this.fd, offset, Math.min(length, this.size - offset));
    } catch {
      // advisory: the clusters are free in the refcounts whether or not the space comes back
    }
  }

  async close(): Promise<void> {
    await this.batcher?.drain();
    return new Promise((resolve, reject) => close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}
