/**
 * BitmapStore — where the `blkrep bitmap` commands find bitmaps, so that each command works the
 * same on every kind of target:
 *
 *   kind     target                                   bitmaps
 *   file     a blkrep bitmap file (or checkpoint)     the one it holds (store-file.ts)
 *   image    a raw image file                         its files IMAGE.NAME.bitmap (store-file.ts)
 *   live     --control PATH [--export NAME]           the export's bitmaps in the daemon (store-live.ts)
 *   qcow2    a qcow2 image                            qcow2's own persistent bitmaps (store-qcow2.ts)
 *
 * openBitmapStore() decides which from the target itself (its first bytes), never from its name.
 * A new kind of target is a class implementing BitmapStore and a case in openBitmapStore().
 *
 * Every method that may change something reports `changed`, so that commands are idempotent for
 * scripts (adding a bitmap that exists as asked, clearing a clean one, … change nothing).
 */
import { open as openFile, stat } from 'node:fs/promises';
import { BlkrepError } from '../api/errors.js';
import { isNbdUri } from '../nbd/uri.js';
import { probeFormat, PROBE_BYTES } from '../block/open.js';
import type { DirtyBitmap, Run } from './dirty-bitmap.js';
import { HEADER_SLOT_BYTES, MAGIC } from './format.js';
import type { AddOptions, BitmapChange, BitmapInfo, CheckpointInfo, MergeSource } from './ops.js';

export type StoreKind = 'file' | 'image' | 'live' | 'qcow2';

export interface ReadOptions {
  /** only the bits of [start, start+length) are needed (a live store fetches only those) */
  start?: number;
  length?: number;
}

export interface BitmapStore {
  readonly kind: StoreKind;
  /** what the store is, for messages: `bitmap file X`, `image X`, `export "e" of the daemon at P` */
  readonly description: string;
  list(): Promise<BitmapInfo[]>;
  /** The bitmap a command means: `name`, or the only one there is when undefined. */
  resolve(name: string | undefined): Promise<string>;
  /** The bits of a bitmap, as a moment's copy. */
  read(name: string, options?: ReadOptions): Promise<{ info: BitmapInfo; bitmap: DirtyBitmap }>;
  add(name: string, options: AddOptions): Promise<BitmapChange>;
  remove(name: string, options: { ifExists?: boolean }): Promise<BitmapChange>;
  /** Clean the whole bitmap, or the granules wholly inside `ranges`. */
  clear(name: string, ranges?: Run[]): Promise<BitmapChange>;
  setEnabled(name: string, enabled: boolean): Promise<BitmapChange>;
  merge(name: string, source: MergeSource): Promise<BitmapChange>;
  /** Dirty the ranges (any number of them), or every granule. */
  fill(name: string, what: { ranges?: Run[]; all?: boolean }): Promise<BitmapChange>;
  checkpoint(name: string): Promise<CheckpointInfo>;
  checkpoints(name: string): Promise<CheckpointInfo[]>;
  /** The bits of checkpoint `n` of a bitmap. */
  readCheckpoint(name: string, n: number): Promise<{ info: CheckpointInfo; bitmap: DirtyBitmap }>;
  close(): Promise<void>;
}

export interface OpenStoreOptions {
  /** the daemon's control socket: the target is then a live export */
  control?: string;
  /** the export (with `control`); the daemon's only export when not given */
  export?: string;
  /** give up on the daemon after this many milliseconds (default 10 s) */
  timeoutMs?: number;
  /** change a bitmap file that is marked in use (its writer died, or a daemon has it open) */
  force?: boolean;
  /** read a qcow2 image's bitmaps although another process holds the image for writing (qemu-img -U); changes are refused */
  forceShare?: boolean;
}

/** What a target is, from its first bytes: a bitmap file, a qcow2 image, a raw image, or nothing yet. */
export type TargetKind = 'bitmap-file' | 'qcow2' | 'raw' | 'missing';

export async function probeTarget(path: string): Promise<TargetKind> {
  let handle;
  try {
    handle = await openFile(path, 'r');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT') return 'missing';
    throw new BlkrepError('ERR_OPEN', `cannot open "${path}": ${e.message}`, {
      errno: e.code === 'EACCES' || e.code === 'EPERM' ? 'EPERM' : 'EIO',
      cause: err,
      details: { path },
    });
  }
  try {
    // A bitmap file's header may be in either slot (a new checkpoint file has only slot 1).
    const buf = Buffer.alloc(HEADER_SLOT_BYTES + MAGIC.length);
    const { bytesRead } = await handle.read(buf, 0, buf.length, 0);
    const at = (o: number) => bytesRead >= o + MAGIC.length && buf.subarray(o, o + MAGIC.length).equals(MAGIC);
    if (at(0) || at(HEADER_SLOT_BYTES)) return 'bitmap-file';
    return probeFormat(buf.subarray(0, Math.min(bytesRead, PROBE_BYTES)));
  } finally {
    await handle.close();
  }
}

/**
 * The store a command's target names: `--control` (a live export), else TARGET probed — a blkrep
 * bitmap file, a qcow2 image, or a raw image whose bitmaps are the files beside it. A TARGET
 * that does not exist is a bitmap file still to be created (only `add --size` does that).
 */
export async function openBitmapStore(target: string | undefined, options: OpenStoreOptions = {}): Promise<BitmapStore> {
  if (options.control !== undefined) {
    if (target !== undefined) {
      throw new BlkrepError('ERR_USAGE', `give either TARGET ("${target}") or --control, not both: with --control the bitmaps are those of the export the daemon serves`, { errno: 'EINVAL' });
    }
    const { LiveStore } = await import('./store-live.js');
    return LiveStore.connect(options.control, options.export, { timeoutMs: options.timeoutMs ?? 10_000 });
  }
  if (options.export !== undefined) throw new BlkrepError('ERR_USAGE', '--export needs --control (the daemon serving the export)', { errno: 'EINVAL' });
  if (target === undefined || target === '') {
    throw new BlkrepError('ERR_USAGE', 'say where the bitmap is: a bitmap file, an image, or --control PATH [--export NAME] for a running serve-nbd', { errno: 'EINVAL' });
  }
  if (target.startsWith('memory:') || isNbdUri(target)) {
    throw new BlkrepError(
      'ERR_USAGE',
      `"${target}" has no bitmap files; for the bitmaps of an export that serve-nbd serves, use --control PATH [--export NAME]`,
      { errno: 'EINVAL' },
    );
  }
  const path = target.startsWith('raw:') ? target.slice('raw:'.length) : target;
  const kind = target.startsWith('raw:') ? 'raw' : await probeTarget(path);
  const { FileStore, ImageStore } = await import('./store-file.js');
  switch (kind) {
    case 'bitmap-file':
    case 'missing':
      return FileStore.open(path, { exists: kind === 'bitmap-file', force: options.force ?? false });
    case 'qcow2': {
      const { openQcow2BitmapStore } = await import('./store-qcow2.js');
      return openQcow2BitmapStore(path, options);
    }
    case 'raw': {
      const st = await stat(path);
      if (!st.isFile()) {
        throw new BlkrepError(
          'ERR_USAGE',
          `"${path}" is not a regular file: the bitmaps of a block device are kept in files named when serving it (serve-nbd --bitmap NAME=FILE); give such a FILE as TARGET`,
          { errno: 'EINVAL', details: { path } },
        );
      }
      return ImageStore.open(path, { force: options.force ?? false });
    }
  }
}

/**
 * A merge source given on the command line (`--source NAME`, `--source-file FILE`) as the path
 * of the bitmap file that holds it: FILE itself when it is a bitmap file, FILE.NAME.bitmap when
 * it is an image. Used by stores that hand the file to someone else (the daemon).
 */
export async function sourceBitmapFile(file: string, name: string | undefined): Promise<string> {
  const store = await openBitmapStore(file);
  try {
    const n = await store.resolve(name);
    if (store.kind === 'qcow2') {
      throw new BlkrepError(
        'ERR_NOT_SUPPORTED',
        `the daemon merges bitmap files, not the bitmaps of a qcow2 image (${file}); copy bitmap "${n}" into a bitmap file first (blkrep bitmap add FILE --size SIZE, blkrep bitmap merge FILE --source-file ${file} --source ${n}) and give that FILE`,
        { errno: 'ENOTSUP', details: { file, name: n } },
      );
    }
    const info = (await store.list()).find((b) => b.name === n);
    if (!info?.file) throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `${store.description} has no bitmap "${n}"`, { errno: 'EINVAL' });
    return info.file;
  } finally {
    await store.close();
  }
}
