/**
 * Bitmaps in blkrep bitmap files (man/blkrep-bitmap.5), changed offline:
 *
 * - FileStore: one bitmap file given as the target (a checkpoint file too, read-only). Its
 *   bitmap goes by the name in the file's name (`IMAGE.NAME.bitmap` → NAME).
 * - ImageStore: a raw image, whose bitmaps are the files `IMAGE.NAME.bitmap` beside it — the
 *   ones serve-nbd loads when it serves the image.
 *
 * Each operation opens the file, works, and closes it (storing the bits, marking it clean). A
 * file marked in use — a daemon has it open, or its writer died — is read as it would be
 * recovered, and changed only with `force` (two writers would lose each other's bits).
 */
import { access, stat } from 'node:fs/promises';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import { DEFAULT_GRANULARITY, type DirtyBitmap, type Run } from './dirty-bitmap.js';
import { checkName, findSidecars, nameOfFile, sidecarPath } from './names.js';
import {
  anyClearable, bitmapInfo, checkNoStaleCheckpoints, checkRanges, mergeInto, removeBitmapFiles, type AddOptions, type BitmapChange,
  type BitmapInfo, type CheckpointInfo, type LoadState, type MergeSource,
} from './ops.js';
import { PersistentBitmap } from './persistent.js';
import { readSource, type BitmapStore, type OpenBitmapStore, type OpenStoreOptions, type ReadOptions } from './store-base.js';

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

interface FileStoreOptions {
  exists: boolean;
  force: boolean;
  /** opens another target (a merge source) */
  open: OpenBitmapStore;
  /** the bitmap's name (default: from the file's name) */
  name?: string;
  /** the disk's size, when the file must cover it (a bitmap beside an image) */
  size?: number;
  /** how a missing bitmap is reported */
  notFound?: (name: string) => BlkrepError;
  description?: string;
}

export class FileStore implements BitmapStore {
  readonly kind = 'file' as const;
  readonly description: string;

  private constructor(
    readonly path: string,
    readonly name: string,
    private present: boolean,
    private readonly options: FileStoreOptions,
  ) {
    this.description = options.description ?? `bitmap file ${path}`;
  }

  static async open(path: string, options: FileStoreOptions): Promise<FileStore> {
    return new FileStore(path, options.name ?? (await nameOfFile(path)), options.exists, options);
  }

  async list(): Promise<BitmapInfo[]> {
    if (!this.present) return [];
    const { pb, loadState } = await this.load(true);
    await pb.close();
    return [this.info(pb, loadState)];
  }

  async resolve(name: string | undefined): Promise<string> {
    if (name === undefined || name === this.name) return this.name;
    if (this.options.name !== undefined) throw this.notFound(name);
    throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `${this.description} holds bitmap "${this.name}", not "${name}"`, {
      errno: 'EINVAL',
      details: { file: this.path, name, holds: this.name },
    });
  }

  async read(name: string, _options?: ReadOptions): Promise<{ info: BitmapInfo; bitmap: DirtyBitmap }> {
    await this.resolve(name);
    const { pb, loadState } = await this.load(true);
    await pb.close();
    return { info: this.info(pb, loadState), bitmap: pb.bitmap };
  }

  async add(name: string, options: AddOptions): Promise<BitmapChange> {
    await this.resolve(name);
    checkName(this.name);
    if (options.file !== undefined) {
      throw new BlkrepError('ERR_USAGE', `--file names where a daemon keeps a new bitmap; ${this.description} is a file already`, { errno: 'EINVAL' });
    }
    const granularity = options.granularity ?? DEFAULT_GRANULARITY;
    const enabled = options.enabled ?? true;
    if (this.present) {
      const { pb, loadState } = await this.load(true);
      await pb.close();
      const b = pb.bitmap;
      const differences: string[] = [];
      const size = this.options.size ?? options.size;
      if (size !== undefined && size !== b.size) differences.push(`it covers ${b.size} bytes, not ${size}`);
      if (options.granularity !== undefined && options.granularity !== b.granularity) differences.push(`its granularity is ${b.granularity}, not ${options.granularity}`);
      if (options.enabled !== undefined && options.enabled !== b.enabled) differences.push(`it is ${b.enabled ? 'enabled' : 'disabled'}`);
      if (differences.length) {
        throw new BlkrepError('ERR_BITMAP_EXISTS', `${this.describeBitmap()} already exists, and ${differences.join(', ')}`, {
          errno: 'EINVAL',
          details: { file: this.path, name: this.name },
        });
      }
      return { name: this.name, changed: false, bitmap: this.info(pb, loadState) };
    }
    const size = this.options.size ?? options.size;
    if (size === undefined) {
      throw new BlkrepError('ERR_USAGE', `"${this.path}" does not exist: give --size to create a bitmap file there, or name an existing image or bitmap file`, { errno: 'EINVAL' });
    }
    if (this.options.size !== undefined && options.size !== undefined && options.size !== this.options.size) {
      throw new BlkrepError('ERR_USAGE', `--size ${options.size} differs from the image's size ${this.options.size}`, { errno: 'EINVAL' });
    }
    await checkNoStaleCheckpoints(this.path);
    let pb: PersistentBitmap;
    try {
      pb = await PersistentBitmap.create(this.path, { size, granularity, enabled });
    } catch (err) {
      throw toBlkrepError(err, `cannot add ${this.describeBitmap()}`);
    }
    await pb.close();
    this.present = true;
    return { name: this.name, changed: true, bitmap: this.info(pb, { state: 'clean' }) };
  }

  async remove(name: string, options: { ifExists?: boolean }): Promise<BitmapChange> {
    await this.resolve(name);
    if (!this.present) {
      if (options.ifExists) return { name: this.name, changed: false, bitmap: null };
      throw this.notFound(this.name);
    }
    if (!this.options.force) {
      const { pb, loadState } = await this.load(true);
      await pb.close();
      this.checkNotInUse(loadState);
    }
    await removeBitmapFiles(this.path);
    this.present = false;
    return { name: this.name, changed: true, bitmap: null };
  }

  clear(name: string, ranges?: Run[]): Promise<BitmapChange> {
    return this.change(name, (pb) => {
      if (ranges) checkRanges(ranges, pb.bitmap.size);
      if (!anyClearable(pb.bitmap, ranges)) return false;
      if (ranges) for (const r of ranges) pb.clear(r.offset, r.length);
      else pb.clearAll();
      return true;
    });
  }

  setEnabled(name: string, enabled: boolean): Promise<BitmapChange> {
    return this.change(name, async (pb) => {
      if (pb.enabled === enabled) return false;
      await pb.setEnabled(enabled);
      return true;
    });
  }

  async merge(name: string, source: MergeSource): Promise<BitmapChange> {
    const bits = await this.sourceBits(name, source);
    return this.change(name, (pb) => {
      const before = pb.bitmap.dirtyGranules;
      mergeInto(pb, pb.bitmap, bits);
      return pb.bitmap.dirtyGranules !== before;
    });
  }

  fill(name: string, what: { ranges?: Run[]; all?: boolean }): Promise<BitmapChange> {
    return this.change(name, (pb) => {
      const before = pb.bitmap.dirtyGranules;
      if (what.all) pb.setAll();
      else {
        checkRanges(what.ranges ?? [], pb.bitmap.size);
        for (const r of what.ranges ?? []) if (r.length > 0) pb.fill(r.offset, r.length);
      }
      return pb.bitmap.dirtyGranules !== before;
    });
  }

  async checkpoint(name: string): Promise<CheckpointInfo> {
    let info!: CheckpointInfo;
    await this.change(name, async (pb) => {
      info = await pb.checkpoint();
      return true;
    });
    return info;
  }

  async checkpoints(name: string): Promise<CheckpointInfo[]> {
    await this.resolve(name);
    if (!this.present) throw this.notFound(this.name);
    return PersistentBitmap.listCheckpoints(this.path);
  }

  async readCheckpoint(name: string, n: number): Promise<{ info: CheckpointInfo; bitmap: DirtyBitmap }> {
    const list = await this.checkpoints(name);
    const info = list.find((c) => c.number === n);
    if (!info) {
      throw new BlkrepError(
        'ERR_CHECKPOINT_NOT_FOUND',
        `${this.describeBitmap()} has no checkpoint ${n} (${list.length ? `it has ${list.map((c) => c.number).join(', ')}` : 'it has none'})`,
        { errno: 'EINVAL', details: { file: this.path, checkpoint: n } },
      );
    }
    const { bitmap: pb } = await PersistentBitmap.open(info.path, { readOnly: true, strict: true });
    await pb.close();
    return { info, bitmap: pb.bitmap };
  }

  async close(): Promise<void> {}

  // ------------------------------------------------------------------------ helpers

  private describeBitmap(): string {
    return this.options.description ? `bitmap "${this.name}" of ${this.options.description} (${this.path})` : `bitmap "${this.name}" (${this.path})`;
  }

  private notFound(name: string): BlkrepError {
    if (this.options.notFound) return this.options.notFound(name);
    return new BlkrepError('ERR_BITMAP_NOT_FOUND', `no bitmap file "${this.path}"`, { errno: 'EINVAL', details: { file: this.path, name } });
  }

  private checkNotInUse(loadState: LoadState): void {
    if (loadState.state !== 'recovered') return;
    throw new BlkrepError(
      'ERR_BITMAP_IN_USE',
      `${this.describeBitmap()} is marked in use: a running serve-nbd may have it open (then use --control PATH --export NAME), or its writer died; --force changes it anyway, recovering it first`,
      { errno: 'EPERM', details: { file: this.path } },
    );
  }

  /** Open the file: read-only, or for writing (refused while in use, unless forced). */
  private async load(readOnly: boolean): Promise<{ pb: PersistentBitmap; loadState: LoadState }> {
    if (!this.present) throw this.notFound(this.name);
    const size = this.options.size;
    if (!readOnly && !this.options.force) {
      const probe = await PersistentBitmap.open(this.path, { readOnly: true, ...(size === undefined ? {} : { size }) });
      await probe.bitmap.close();
      this.checkNotInUse(probe.loadState);
    }
    const r = await PersistentBitmap.open(this.path, { readOnly, ...(size === undefined ? {} : { size }) });
    return { pb: r.bitmap, loadState: r.loadState };
  }

  /** Open for writing, apply `op`, store and close; report whether it changed anything. */
  private async change(name: string, op: (pb: PersistentBitmap) => boolean | Promise<boolean>): Promise<BitmapChange> {
    await this.resolve(name);
    const { pb, loadState } = await this.load(false);
    let changed: boolean;
    try {
      changed = await op(pb);
    } catch (err) {
      await pb.close().catch(() => {});
      throw err;
    }
    await pb.close();
    return { name: this.name, changed, bitmap: this.info(pb, loadState) };
  }

  private async sourceBits(name: string, source: MergeSource): Promise<DirtyBitmap> {
    if (source.bits) return source.bits;
    if (source.file !== undefined) return readSource(this.options.open, source.file, source.name);
    // a bitmap of this store: only itself, which a merge leaves as it is
    await this.resolve(source.name ?? name);
    return (await this.read(this.name)).bitmap;
  }

  info(pb: PersistentBitmap, loadState: LoadState): BitmapInfo {
    const i = pb.info();
    return bitmapInfo(this.name, pb.bitmap, { persistent: true, file: this.path, loadState, epoch: i.frozen ? null : i.epoch, frozen: i.frozen });
  }
}

/** A blkrep bitmap file (a checkpoint file too). */
export function openFileStore(path: string, options: OpenStoreOptions, open: OpenBitmapStore): Promise<BitmapStore> {
  return FileStore.open(path, { exists: true, force: options.force ?? false, open });
}

/** A bitmap file still to be created (only `add --size` does that). */
export function openNewFileStore(path: string, options: OpenStoreOptions, open: OpenBitmapStore): Promise<BitmapStore> {
  return FileStore.open(path, { exists: false, force: options.force ?? false, open });
}

/** A raw image, whose bitmaps are the files beside it. */
export async function openImageStore(path: string, options: OpenStoreOptions, open: OpenBitmapStore): Promise<BitmapStore> {
  const st = await stat(path);
  if (!st.isFile()) {
    throw new BlkrepError(
      'ERR_USAGE',
      `"${path}" is not a regular file: the bitmaps of a block device are kept in files named when serving it (serve-nbd --bitmap NAME=FILE); give such a FILE as TARGET`,
      { errno: 'EINVAL', details: { path } },
    );
  }
  return ImageStore.open(path, { force: options.force ?? false, open });
}

/** A raw image's bitmaps: the files IMAGE.NAME.bitmap beside it. */
export class ImageStore implements BitmapStore {
  readonly kind = 'image' as const;
  readonly description: string;

  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly force: boolean,
    private readonly open: OpenBitmapStore,
  ) {
    this.description = `image ${path}`;
  }

  static async open(path: string, options: { force: boolean; open: OpenBitmapStore }): Promise<ImageStore> {
    const st = await stat(path);
    return new ImageStore(path, st.size, options.force, options.open);
  }

  async list(): Promise<BitmapInfo[]> {
    const out: BitmapInfo[] = [];
    for (const s of await findSidecars(this.path)) out.push(...(await (await this.store(s.name)).list()));
    return out;
  }

  async resolve(name: string | undefined): Promise<string> {
    if (name !== undefined) {
      checkName(name);
      return name;
    }
    const names = (await findSidecars(this.path)).map((s) => s.name);
    if (names.length === 1) return names[0]!;
    if (names.length === 0) {
      throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `image ${this.path} has no bitmaps (add one with: blkrep bitmap add ${this.path} --name NAME)`, {
        errno: 'EINVAL',
        details: { image: this.path },
      });
    }
    throw new BlkrepError('ERR_USAGE', `image ${this.path} has ${names.length} bitmaps: say which with --name (${names.map((n) => `"${n}"`).join(', ')})`, {
      errno: 'EINVAL',
    });
  }

  async read(name: string, options?: ReadOptions) {
    return (await this.store(name)).read(name, options);
  }
  async add(name: string, options: AddOptions) {
    return (await this.store(name)).add(name, options);
  }
  async remove(name: string, options: { ifExists?: boolean }) {
    return (await this.store(name)).remove(name, options);
  }
  async clear(name: string, ranges?: Run[]) {
    return (await this.store(name)).clear(name, ranges);
  }
  async setEnabled(name: string, enabled: boolean) {
    return (await this.store(name)).setEnabled(name, enabled);
  }
  async merge(name: string, source: MergeSource) {
    const target = await this.store(name);
    if (source.bits === undefined && source.file === undefined && source.name !== undefined && source.name !== name) {
      const other = await this.store(source.name);
      return target.merge(name, { bits: (await other.read(source.name)).bitmap });
    }
    return target.merge(name, source);
  }
  async fill(name: string, what: { ranges?: Run[]; all?: boolean }) {
    return (await this.store(name)).fill(name, what);
  }
  async checkpoint(name: string) {
    return (await this.store(name)).checkpoint(name);
  }
  async checkpoints(name: string) {
    return (await this.store(name)).checkpoints(name);
  }
  async readCheckpoint(name: string, n: number) {
    return (await this.store(name)).readCheckpoint(name, n);
  }
  async close(): Promise<void> {}

  private async store(name: string): Promise<FileStore> {
    checkName(name);
    const path = sidecarPath(this.path, name);
    return FileStore.open(path, {
      exists: await exists(path),
      force: this.force,
      open: this.open,
      name,
      size: this.size,
      description: `image ${this.path}`,
      notFound: (n) => this.notFound(n),
    });
  }

  private notFound(name: string): BlkrepError {
    return new BlkrepError('ERR_BITMAP_NOT_FOUND', `image ${this.path} has no bitmap "${name}" (no file ${sidecarPath(this.path, name)})`, {
      errno: 'EINVAL',
      details: { image: this.path, name },
    });
  }
}
