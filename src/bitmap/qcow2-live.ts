/**
 * A served qcow2 image's own persistent bitmaps (reference part C), live, as QEMU keeps them
 * while a VM or qemu-nbd has the image open (C.4):
 *
 * - read-write open: every bitmap is loaded; each ENABLED consistent one is marked in_use in the
 *   image (a new directory, durable) before the export can take a write, records every write,
 *   write-zeroes and trim (a WriteTracker on the export's DirtyTrackingNode), and is stored back
 *   with in_use cleared when the image is closed cleanly (daemon stop: SIGTERM, control
 *   shutdown). Autoclear bit 0 stays set (Qcow2Image.adoptBitmaps), so QEMU keeps trusting them.
 * - a DISABLED bitmap is offered as it is (writes do not change it) and left untouched in the
 *   image, unless it is changed through the control socket (enable, clear, fill, merge): then it
 *   is marked in_use first and stored at close like the others.
 * - a bitmap found in_use (its writer died: kill -9, power loss) is INCONSISTENT: it is never
 *   trusted. It is offered all-dirty, loaded with state all-dirty / fault in-use and a reason that
 *   says so (the listening line, `bitmap list`), left in_use in the image, and can only be removed
 *   (`blkrep bitmap remove --control`, or offline `blkrep bitmap remove IMAGE --name NAME`), as
 *   with QEMU.
 * - read-only open: the bitmaps are offered as stored, nothing is marked.
 *
 * This is QEMU's model: a qcow2 bitmap is trustworthy only after a clean close. blkrep's bitmap
 * files (--bitmap NAME=FILE, IMAGE.NAME.bitmap) survive a crash (activity log): use those for
 * replication.
 */
import { resolve as resolvePath } from 'node:path';
import { BlkrepError } from '../api/errors.js';
import type { BlockNode } from '../api/block.js';
import { BME_AUTO, BME_IN_USE, parseHeader } from '../block/qcow2/format.js';
import {
  checkSupported, enabled, granularityOf, inconsistent, inUse, Qcow2BitmapDirectory, type DirEntry,
} from '../block/qcow2/bitmaps.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { DirtyBitmap, MAX_GRANULARITY, MIN_GRANULARITY } from './dirty-bitmap.js';
import { volatileTracker, type WriteTracker } from '../block/filters/tracking.js';
import type { LoadState } from './persistent.js';

export interface Qcow2LiveEntry {
  name: string;
  bitmap: DirtyBitmap;
  /** records the export's writes (none for an inconsistent bitmap: it is all-dirty anyway) */
  tracker: WriteTracker | undefined;
  loadState: LoadState;
  /** found in_use: all-dirty, only removable */
  inconsistent: boolean;
  /** marked in_use by this process: stored back at close */
  owned: boolean;
}

export const IN_USE_REASON =
  'flagged in use in the qcow2 image: the program that had it open for writing did not close it (killed, crashed), so writes may be missing from it; loaded all-dirty and never trusted — as with QEMU it can only be removed (blkrep bitmap remove)';

export class Qcow2LiveBitmaps {
  private stored: Promise<void> | undefined;
  private chain: Promise<unknown> = Promise.resolve();

  private constructor(
    readonly dir: Qcow2BitmapDirectory,
    readonly entries: Map<string, Qcow2LiveEntry>,
  ) {}

  /** The image's absolute path. */
  get path(): string {
    return resolvePath(this.dir.path);
  }

  get readOnly(): boolean {
    return this.dir.image.readOnly;
  }

  /**
   * Load the bitmaps of `node` when it is a qcow2 image that has some (else undefined). Must run
   * before the node serves any request. The node's close() stores them first.
   */
  static async open(node: BlockNode, options: { log?: (message: string) => void } = {}): Promise<Qcow2LiveBitmaps | undefined> {
    if (!(node instanceof Qcow2Node)) return undefined;
    const image = node.image;
    const log = options.log ?? (() => {});
    if (!image.header.bitmaps) return undefined;
    const dir = await Qcow2BitmapDirectory.forImage(image);
    if (dir.entries.length === 0) return undefined;
    const rw = !image.readOnly;
    // an enabled bitmap blkrep cannot hold (granularity over 64 MiB): it cannot be kept up to
    // date, so none is adopted and the image drops autoclear bit 0 at the first request, as
    // before (QEMU then trusts none of them)
    const unsupported = dir.entries.filter((e) => !inUse(e) && enabled(e) && !supported(e));
    if (rw && unsupported.length > 0) {
      log(`qcow2 image ${dir.path}: bitmap "${unsupported[0]!.name}" has a granularity of ${granularityOf(unsupported[0]!)} bytes, which blkrep cannot track; its bitmaps are not served and QEMU will no longer trust them after a write`);
      return undefined;
    }
    const entries = new Map<string, Qcow2LiveEntry>();
    for (const e of dir.entries) {
      if (inUse(e)) {
        const g = Math.min(MAX_GRANULARITY, Math.max(MIN_GRANULARITY, granularityOf(e)));
        const bitmap = new DirtyBitmap(dir.size, { granularity: g, enabled: enabled(e) });
        bitmap.setAll();
        entries.set(e.name, { name: e.name, bitmap, tracker: undefined, loadState: { state: 'all-dirty', fault: 'in-use', reason: IN_USE_REASON }, inconsistent: true, owned: false });
        continue;
      }
      if (!supported(e)) continue; // disabled and too coarse: left alone, not offered
      const bitmap = await dir.readBits(e);
      entries.set(e.name, { name: e.name, bitmap, tracker: volatileTracker(bitmap), loadState: { state: 'clean' }, inconsistent: false, owned: false });
    }
    const live = new Qcow2LiveBitmaps(dir, entries);
    if (rw) {
      const own = [...entries.values()].filter((t) => !t.inconsistent && t.bitmap.enabled);
      if (own.length > 0) {
        if (!image.adoptBitmaps()) {
          throw new BlkrepError('ERR_INTERNAL', `qcow2 image ${dir.path}: its bitmaps were loaded after the image served a request (autoclear bit 0 is already cleared)`, { errno: 'EIO' });
        }
        await live.markInUse(own);
      }
      const close = node.close.bind(node);
      let closing: Promise<void> | undefined;
      node.close = () =>
        (closing ??= live
          .store()
          .catch((err: unknown) => log(`qcow2 image ${dir.path}: storing its bitmaps failed (${(err as Error).message}); they stay in use, so they load all-dirty next time`))
          .then(close));
    }
    return live;
  }

  /**
   * Before a change through the control socket (enable, disable, clear, fill, merge): an
   * inconsistent bitmap refuses, a read-only image refuses, a bitmap not yet ours is marked in_use.
   */
  prepareChange(name: string): Promise<Qcow2LiveEntry> {
    return this.serial(async () => {
      const t = this.entries.get(name)!;
      if (t.inconsistent) throw inconsistent(this.path, name);
      if (this.readOnly) {
        throw new BlkrepError('ERR_READ_ONLY', `bitmap "${name}" of qcow2 image ${this.path} cannot be changed: the image is served read-only`, { errno: 'EPERM', details: { path: this.path, name } });
      }
      if (!t.owned) await this.markInUse([t]);
      return t;
    });
  }

  /** Drop a bitmap from the image (also an inconsistent one). */
  remove(name: string): Promise<void> {
    return this.serial(async () => {
      if (this.readOnly) {
        throw new BlkrepError('ERR_READ_ONLY', `bitmap "${name}" of qcow2 image ${this.path} cannot be removed: the image is served read-only`, { errno: 'EPERM', details: { path: this.path, name } });
      }
      await this.checkUnchanged();
      await this.dir.commit(this.dir.entries.filter((e) => e.name !== name).map((entry) => ({ entry })));
      this.entries.delete(name);
    });
  }

  /** Store every bitmap this process owns, in_use cleared (once; the node's close() calls it). */
  store(): Promise<void> {
    this.stored ??= this.serial(async () => {
      const owned = new Set([...this.entries.values()].filter((t) => t.owned).map((t) => t.name));
      if (owned.size === 0) return;
      await this.checkUnchanged();
      await this.dir.commit(
        this.dir.entries.map((e) => {
          if (!owned.has(e.name)) return { entry: e };
          const b = this.entries.get(e.name)!.bitmap;
          const flags = (e.flags & ~BME_IN_USE & ~BME_AUTO) | (b.enabled ? BME_AUTO : 0);
          return { entry: { ...e, flags }, bits: b };
        }),
      );
      for (const t of this.entries.values()) t.owned = false;
    });
    return this.stored;
  }

  /**
   * The bitmap directory on disk is still the one this process wrote or read: another program
   * (qemu-img bitmap, an offline blkrep bitmap command) did not change it meanwhile. Nothing
   * locks the image, so that is checked before each change: writing our directory over theirs
   * could point at clusters they freed. On a mismatch nothing is written (ours stay in use).
   */
  private async checkUnchanged(): Promise<void> {
    const image = this.dir.image;
    const cluster0 = Buffer.alloc(image.clusterSize);
    await image.file.read(0, cluster0);
    const now = parseHeader(image.path, cluster0);
    const a = now.bitmaps;
    const b = image.header.bitmaps;
    const same = now.autoclear === image.header.autoclear && a?.directoryOffset === b?.directoryOffset && a?.directorySize === b?.directorySize && a?.nbBitmaps === b?.nbBitmaps;
    if (!same) {
      throw new BlkrepError(
        'ERR_BITMAP_CONFLICT',
        `the bitmaps of qcow2 image ${this.path} were changed by another program while blkrep serves it (qemu-img bitmap or an offline blkrep bitmap command; use --control while it is served): blkrep leaves them as they are, its own stay in use`,
        { errno: 'EIO', details: { path: this.path } },
      );
    }
  }

  private async markInUse(list: Qcow2LiveEntry[]): Promise<void> {
    const names = new Set(list.map((t) => t.name));
    await this.checkUnchanged();
    await this.dir.commit(this.dir.entries.map((e) => ({ entry: names.has(e.name) ? { ...e, flags: e.flags | BME_IN_USE } : e })));
    for (const t of list) t.owned = true;
  }

  private serial<T>(op: () => Promise<T>): Promise<T> {
    const run = this.chain.catch(() => {}).then(op);
    this.chain = run;
    return run;
  }
}

function supported(e: DirEntry): boolean {
  try {
    checkSupported('', e);
    return true;
  } catch {
    return false;
  }
}
