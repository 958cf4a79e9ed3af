/**
 * qcow2's own persistent bitmaps (the bitmaps header extension, reference part C) as a
 * BitmapStore: what `qemu-img bitmap` and `qemu-img info` see, read and changed as QEMU does
 * (C.5). The format work is in src/block/qcow2/bitmaps.ts; this file maps the store's verbs
 * onto it.
 *
 * Every operation opens the image (read-only to read, else read-write without touching
 * autoclear bit 0), works, and closes it. A change that changes nothing writes nothing, so the
 * commands are idempotent. A bitmap flagged in_use (its writer died) is inconsistent: listed
 * (as all-dirty) and removable, nothing else — QEMU's rule. Checkpoints have no qcow2
 * counterpart and are refused, naming the way to freeze a qcow2 bitmap instead.
 *
 * Like `qemu-img bitmap` this does not run while another program (qemu-nbd, QEMU, blkrep
 * serve-nbd) has the image open for writing: the image lock (src/block/image-lock.ts) refuses it
 * (ERR_IMAGE_LOCKED). With forceShare, reading (list, dump) works anyway, as qemu-img info -U.
 */
import { BlkrepError } from '../api/errors.js';
import { BME_AUTO, BME_IN_USE } from '../block/qcow2/format.js';
import {
  checkSupported, enabled, granularityOf, inconsistent, inUse, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS, nameProblem, Qcow2BitmapDirectory,
  type DirEntry, type NextEntry,
} from '../block/qcow2/bitmaps.js';
import { checkGranularity, DirtyBitmap, type Run } from './dirty-bitmap.js';
import {
  anyClearable, bitmapInfo, checkRanges, mergeInto, percentOf, type AddOptions, type BitmapChange, type BitmapInfo, type CheckpointInfo, type MergeSource,
} from './ops.js';
import { readSource, type BitmapStore, type OpenBitmapStore, type OpenStoreOptions, type ReadOptions } from './store-base.js';

export async function openQcow2BitmapStore(path: string, options: OpenStoreOptions, open: OpenBitmapStore): Promise<BitmapStore> {
  const forceShare = options.forceShare === true;
  // open once now, so that an image that cannot be read (or whose directory is corrupt) fails here
  const dir = await Qcow2BitmapDirectory.open(path, { readOnly: true, forceShare });
  await dir.close();
  return new Qcow2Store(path, open, forceShare);
}

export class Qcow2Store implements BitmapStore {
  readonly kind = 'qcow2' as const;
  readonly description: string;

  constructor(
    readonly path: string,
    /** opens another target (a merge source) */
    private readonly open: OpenBitmapStore,
    /** read-only opens share every permission (qemu-img -U) */
    private readonly forceShare = false,
  ) {
    this.description = `qcow2 image ${path}`;
  }

  async list(): Promise<BitmapInfo[]> {
    return this.withDir(true, async (dir) => {
      const out: BitmapInfo[] = [];
      for (const e of dir.entries) out.push(await this.infoOf(dir, e));
      return out;
    });
  }

  async resolve(name: string | undefined): Promise<string> {
    if (name !== undefined) {
      const problem = nameProblem(name);
      if (problem) throw new BlkrepError('ERR_BITMAP_NAME', problem, { errno: 'EINVAL', details: { name } });
      return name;
    }
    const names = await this.withDir(true, async (dir) => dir.entries.map((e) => e.name));
    if (names.length === 1) return names[0]!;
    if (names.length === 0) {
      throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `${this.description} has no bitmaps (add one with: blkrep bitmap add ${this.path} --name NAME)`, {
        errno: 'EINVAL',
        details: { image: this.path },
      });
    }
    throw new BlkrepError('ERR_USAGE', `${this.description} has ${names.length} bitmaps: say which with --name (${names.map((n) => `"${n}"`).join(', ')})`, { errno: 'EINVAL' });
  }

  async read(name: string, _options?: ReadOptions): Promise<{ info: BitmapInfo; bitmap: DirtyBitmap }> {
    return this.withDir(true, async (dir) => {
      const e = this.existing(dir, name);
      const bitmap = await dir.readBits(e);
      return { info: this.info(e, bitmap), bitmap };
    });
  }

  async add(name: string, options: AddOptions): Promise<BitmapChange> {
    await this.resolve(name);
    if (options.file !== undefined) {
      throw new BlkrepError('ERR_USAGE', `--file names where a daemon keeps a new bitmap; a bitmap of ${this.description} is kept in the image`, { errno: 'EINVAL' });
    }
    if (options.persistent === false) {
      throw new BlkrepError('ERR_USAGE', `the bitmaps of ${this.description} are persistent (a bitmap in memory only needs a running serve-nbd: --control)`, { errno: 'EINVAL' });
    }
    return this.withDir(false, async (dir) => {
      if (options.size !== undefined && options.size !== dir.size) {
        throw new BlkrepError('ERR_USAGE', `--size ${options.size} differs from the image's size ${dir.size}`, { errno: 'EINVAL', details: { size: options.size, imageSize: dir.size } });
      }
      const granularity = options.granularity ?? dir.defaultGranularity;
      const on = options.enabled ?? true;
      const present = dir.find(name);
      if (present) {
        if (inUse(present)) throw inconsistent(this.path, name);
        const g = granularityOf(present);
        const differences: string[] = [];
        if (options.granularity !== undefined && options.granularity !== g) differences.push(`its granularity is ${g}, not ${options.granularity}`);
        if (options.enabled !== undefined && options.enabled !== enabled(present)) differences.push(`it is ${enabled(present) ? 'enabled' : 'disabled'}`);
        if (differences.length) {
          throw new BlkrepError('ERR_BITMAP_EXISTS', `bitmap "${name}" of ${this.description} already exists, and ${differences.join(', ')}`, {
            errno: 'EINVAL',
            details: { image: this.path, name },
          });
        }
        return { name, changed: false, bitmap: await this.infoOf(dir, present) };
      }
      checkGranularity(granularity);
      const bits = Math.log2(granularity);
      if (bits < MIN_GRANULARITY_BITS || bits > MAX_GRANULARITY_BITS) {
        throw new BlkrepError('ERR_BITMAP_INVALID', `qcow2 bitmaps have a granularity of 2^${MIN_GRANULARITY_BITS} … 2^${MAX_GRANULARITY_BITS} bytes, not ${granularity}`, { errno: 'EINVAL' });
      }
      if (dir.size === 0) throw new BlkrepError('ERR_USAGE', `${this.description} has a virtual size of 0: a bitmap would cover nothing`, { errno: 'EINVAL' });
      if (dir.image.header.version !== 3) {
        throw new BlkrepError('ERR_QCOW2_UNSUPPORTED', `${this.description} is a version 2 (compat=0.10) image, which cannot hold bitmaps; upgrade it with "qemu-img amend -o compat=1.1 ${this.path}"`, { errno: 'ENOTSUP' });
      }
      const bitmap = new DirtyBitmap(dir.size, { granularity, enabled: on });
      const entry = { name, flags: on ? BME_AUTO : 0, granularityBits: bits, extra: Buffer.alloc(0) };
      await dir.commit([...dir.entries.map((entry) => ({ entry })), { entry, bits: bitmap }]);
      return { name, changed: true, bitmap: this.info(dir.find(name)!, bitmap) };
    });
  }

  async remove(name: string, options: { ifExists?: boolean }): Promise<BitmapChange> {
    await this.resolve(name);
    return this.withDir(false, async (dir) => {
      if (!dir.find(name)) {
        if (options.ifExists) return { name, changed: false, bitmap: null };
        throw this.notFound(name);
      }
      await dir.commit(dir.entries.filter((e) => e.name !== name).map((entry) => ({ entry })));
      return { name, changed: true, bitmap: null };
    });
  }

  clear(name: string, ranges?: Run[]): Promise<BitmapChange> {
    return this.change(name, (b) => {
      if (ranges) checkRanges(ranges, b.size);
      if (!anyClearable(b, ranges)) return false;
      if (ranges) for (const r of ranges) b.clear(r.offset, r.length);
      else b.clearAll();
      return true;
    });
  }

  async setEnabled(name: string, on: boolean): Promise<BitmapChange> {
    await this.resolve(name);
    return this.withDir(false, async (dir) => {
      const e = this.usable(dir, name);
      if (enabled(e) !== on) {
        const flags = on ? e.flags | BME_AUTO : e.flags & ~BME_AUTO;
        await dir.commit(dir.entries.map((x) => ({ entry: x === e ? { ...x, flags } : x })));
      }
      const now = dir.find(name)!;
      return { name, changed: enabled(e) !== on, bitmap: await this.infoOf(dir, now) };
    });
  }

  async merge(name: string, source: MergeSource): Promise<BitmapChange> {
    let bits = source.bits;
    if (!bits && source.file !== undefined) {
      bits = await readSource(this.open, source.file, source.name);
    }
    return this.change(name, async (b, dir) => {
      let from = bits;
      if (!from) {
        const e = this.existing(dir, source.name ?? name);
        from = await dir.readBits(e);
      }
      const before = b.dirtyGranules;
      mergeInto(b, b, from);
      return b.dirtyGranules !== before;
    });
  }

  fill(name: string, what: { ranges?: Run[]; all?: boolean }): Promise<BitmapChange> {
    return this.change(name, (b) => {
      const before = b.dirtyGranules;
      if (what.all) b.setAll();
      else {
        checkRanges(what.ranges ?? [], b.size);
        for (const r of what.ranges ?? []) if (r.length > 0) b.fill(r.offset, r.length);
      }
      return b.dirtyGranules !== before;
    });
  }

  checkpoint(name: string): Promise<CheckpointInfo> {
    return Promise.reject(this.noCheckpoints(name));
  }

  checkpoints(name: string): Promise<CheckpointInfo[]> {
    return Promise.reject(this.noCheckpoints(name));
  }

  readCheckpoint(name: string, _n: number): Promise<{ info: CheckpointInfo; bitmap: DirtyBitmap }> {
    return Promise.reject(this.noCheckpoints(name));
  }

  async close(): Promise<void> {}

  // ------------------------------------------------------------------------ helpers

  private noCheckpoints(name: string): BlkrepError {
    return new BlkrepError(
      'ERR_NOT_SUPPORTED',
      `the bitmaps of a qcow2 image have no checkpoints (${this.description}, bitmap "${name}"); freeze a copy as QEMU does instead: blkrep bitmap add ${this.path} --name ${name}-1 --disabled, then blkrep bitmap merge ${this.path} --name ${name}-1 --source ${name}, then blkrep bitmap clear ${this.path} --name ${name}`,
      { errno: 'ENOTSUP', details: { image: this.path, name } },
    );
  }

  private notFound(name: string): BlkrepError {
    return new BlkrepError('ERR_BITMAP_NOT_FOUND', `${this.description} has no bitmap "${name}"`, { errno: 'EINVAL', details: { image: this.path, name } });
  }

  private existing(dir: Qcow2BitmapDirectory, name: string): DirEntry {
    const e = dir.find(name);
    if (!e) throw this.notFound(name);
    return e;
  }

  /** An entry that may be used: present, consistent, of a granularity blkrep handles. */
  private usable(dir: Qcow2BitmapDirectory, name: string): DirEntry {
    const e = this.existing(dir, name);
    if (inUse(e)) throw inconsistent(this.path, name);
    checkSupported(this.path, e);
    return e;
  }

  private async withDir<T>(readOnly: boolean, fn: (dir: Qcow2BitmapDirectory) => Promise<T>): Promise<T> {
    const dir = await Qcow2BitmapDirectory.open(this.path, { readOnly, forceShare: readOnly && this.forceShare });
    let result: T;
    try {
      result = await fn(dir);
    } catch (err) {
      await dir.close().catch(() => {});
      throw err;
    }
    await dir.close();
    return result;
  }

  /** Load the bits, apply `op`, store them when it changed something. */
  private async change(name: string, op: (bitmap: DirtyBitmap, dir: Qcow2BitmapDirectory) => boolean | Promise<boolean>): Promise<BitmapChange> {
    await this.resolve(name);
    return this.withDir(false, async (dir) => {
      const e = this.usable(dir, name);
      const bitmap = await dir.readBits(e);
      const changed = await op(bitmap, dir);
      if (changed) await dir.commit(dir.entries.map((x) => (x === e ? { entry: x, bits: bitmap } : { entry: x })) satisfies NextEntry[]);
      return { name, changed, bitmap: this.info(dir.find(name)!, bitmap) };
    });
  }

  private info(e: DirEntry, bitmap: DirtyBitmap): BitmapInfo {
    return bitmapInfo(e.name, bitmap, { persistent: true, file: this.path, loadState: { state: 'clean' } });
  }

  /** A bitmap as listed: in use ones as all-dirty, others counted (any granularity qcow2 allows). */
  private async infoOf(dir: Qcow2BitmapDirectory, e: DirEntry): Promise<BitmapInfo> {
    const g = granularityOf(e);
    const common = { name: e.name, persistent: true, file: this.path, size: dir.size, granularity: g, enabled: enabled(e), epoch: null, frozen: false };
    if (e.flags & BME_IN_USE) {
      return {
        ...common,
        dirtyGranules: Math.ceil(dir.size / g),
        dirtyBytes: dir.size,
        percent: percentOf(dir.size, dir.size),
        loadState: { state: 'all-dirty', fault: 'in-use', reason: 'flagged in use: the program that had the image open for writing did not close it; QEMU and blkrep only remove such a bitmap' },
      };
    }
    const { granules, bytes } = await dir.count(e);
    return { ...common, dirtyGranules: granules, dirtyBytes: bytes, percent: percentOf(bytes, dir.size), loadState: { state: 'clean' } };
  }
}
