/**
 * What every bitmap store is (the BitmapStore interface), and the helpers stores share to reach
 * another target (a merge source) through the opener they were given: a store never imports
 * the table (store.ts) that loads it, so the graph has no cycle.
 */
import { BlkrepError } from '../api/errors.js';
import type { DirtyBitmap, Run } from './dirty-bitmap.js';
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

/** openBitmapStore, as handed to the stores it opens */
export type OpenBitmapStore = (target: string | undefined, options?: OpenStoreOptions) => Promise<BitmapStore>;

/** The bits of bitmap `name` (or the only one) of another target: a bitmap file or an image. */
export async function readSource(open: OpenBitmapStore, file: string, name: string | undefined): Promise<DirtyBitmap> {
  const store = await open(file);
  try {
    return (await store.read(await store.resolve(name))).bitmap;
  } finally {
    await store.close();
  }
}

/**
 * A merge source given on the command line (`--source NAME`, `--source-file FILE`) as the path
 * of the bitmap file that holds it: FILE itself when it is a bitmap file, FILE.NAME.bitmap when
 * it is an image. Used by stores that hand the file to someone else (the daemon).
 */
export async function sourceBitmapFile(open: OpenBitmapStore, file: string, name: string | undefined): Promise<string> {
  const store = await open(file);
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
