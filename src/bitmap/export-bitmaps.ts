/**
 * The dirty bitmaps of one export of the serve-nbd daemon: opened (or created) at start, found
 * beside the image, added and removed at run time; each records the export's writes through the
 * export's DirtyTrackingNode and is offered as the `qemu:dirty-bitmap:NAME` meta context.
 * The control socket's bitmap verbs (control-verbs.ts) call the methods here.
 *
 * Rules kept here:
 * - one writer per bitmap file: a file is claimed once per daemon (`claimed`), by realpath;
 * - a bitmap file beside the image is always loaded (unless discovery is off), so a restart never
 *   silently stops tracking a bitmap that `bitmap add` or an earlier run created;
 * - a file that exists but is not loaded is never adopted at run time (it may have missed
 *   writes while nobody tracked it);
 * - every change made through the control socket is durable before it is answered.
 */
import { access, realpath } from 'node:fs/promises';
import { resolve as resolvePath } from 'node:path';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import type { Export } from '../nbd/export.js';
import { isNbdUri } from '../nbd/uri.js';
import { checkGranularity, DEFAULT_GRANULARITY, DirtyBitmap, type Run } from './dirty-bitmap.js';
import { volatileTracker, type DirtyTrackingNode, type WriteTracker } from '../block/filters/tracking.js';
import { dirtyBitmapContext, DIRTY_BITMAP_CONTEXT_PREFIX } from './meta-context.js';
import { checkName, findSidecars, sidecarBase, sidecarPath } from './names.js';
import {
  anyClearable, bitmapInfo, checkNoStaleCheckpoints, checkRanges, mergeInto, removeBitmapFiles, type AddOptions, type BitmapChange, type BitmapInfo,
  type CheckpointInfo, type LoadState,
} from './ops.js';
import { PersistentBitmap } from './persistent.js';
import { Qcow2LiveBitmaps, type Qcow2LiveEntry } from './qcow2-live.js';
import type { BlockNode } from '../api/block.js';

/** A bitmap asked for on the command line: `--bitmap NAME[=FILE]`. */
export interface BitmapSpec {
  name: string;
  file?: string;
}

export interface ExportBitmapsOptions {
  exportName: string;
  /** the image spec as given (a path, raw:PATH, memory:SIZE, an NBD URI) */
  image: string;
  node: DirtyTrackingNode;
  specs?: BitmapSpec[];
  /** load the bitmap files beside the image (default true) */
  discover?: boolean;
  /** granularity of bitmaps created here (default 64 KiB) */
  granularity?: number;
  /** bitmap files already open in this process (realpaths), shared by every export */
  claimed: Set<string>;
  /** publish an event on the control socket */
  publish?: (event: string, fields: object) => void;
  /**
   * the export's image node, below the tracking node: a qcow2 image's own bitmaps are served
   * (qcow2-live.ts); must not have served a request yet
   */
  imageNode?: BlockNode;
  /** where warnings go */
  log?: (message: string) => void;
}

interface Tracked {
  name: string;
  file: string | null;
  /** realpath of the file, as claimed */
  claim: string | null;
  persistent: PersistentBitmap | undefined;
  bitmap: DirtyBitmap;
  tracker: WriteTracker;
  loadState: LoadState;
  created: boolean;
  checkpointCompleted?: number;
  /** a bitmap of the qcow2 image itself (file is the image) */
  qcow2?: Qcow2LiveEntry;
}

/** What the listening line and the log say about each bitmap at start. */
export interface BitmapLoad {
  export: string;
  name: string;
  file: string | null;
  state: LoadState['state'];
  created: boolean;
  reason?: string;
  fault?: string;
  extentsReplayed?: number;
  pagesDistrusted?: number;
  checkpointCompleted?: number;
}

export interface DumpPage {
  name: string;
  size: number;
  granularity: number;
  enabled: boolean;
  dirtyGranules: number;
  dirtyBytes: number;
  /** the range this page covers: [start, end) */
  start: number;
  end: number;
  /** dirty runs in [start, end) as [offset, length] pairs, in order */
  runs: Array<[number, number]>;
  /** where the next page starts, or null when this page reached `start + length` */
  next: number | null;
}

/** Runs per dump page unless asked otherwise (about 1.5 MiB of JSON at most). */
export const DUMP_PAGE_RUNS = 65536;

function notFound(exportName: string, name: string, known: string[]): BlkrepError {
  return new BlkrepError(
    'ERR_BITMAP_NOT_FOUND',
    `export "${exportName}" has no bitmap "${name}"${known.length ? ` (it has: ${known.map((n) => `"${n}"`).join(', ')})` : ' (it has none)'}`,
    { errno: 'EINVAL', details: { export: exportName, name } },
  );
}

async function claimKey(path: string): Promise<string> {
  return realpath(path).catch(() => resolvePath(path));
}

export class ExportBitmaps {
  readonly exportName: string;
  readonly image: string;
  readonly node: DirtyTrackingNode;
  private readonly bitmaps = new Map<string, Tracked>();
  private readonly claimed: Set<string>;
  private readonly granularity: number;
  private readonly publish: (event: string, fields: object) => void;
  private exp: Export | undefined;
  /** management operations run one at a time */
  private chain: Promise<unknown> = Promise.resolve();
  private closing: Promise<void> | undefined;
  /** the qcow2 image's own bitmaps, when it has some */
  private qcow2: Qcow2LiveBitmaps | undefined;

  private constructor(options: ExportBitmapsOptions) {
    this.exportName = options.exportName;
    this.image = options.image;
    this.node = options.node;
    this.claimed = options.claimed;
    this.granularity = options.granularity ?? DEFAULT_GRANULARITY;
    this.publish = options.publish ?? (() => {});
  }

  /**
   * Open the bitmaps of an export: those named by `specs` (created when missing) and, unless
   * discovery is off, every bitmap file beside the image. On failure, the bitmaps opened so far
   * are closed again.
   */
  static async open(options: ExportBitmapsOptions): Promise<ExportBitmaps> {
    const eb = new ExportBitmaps(options);
    if (options.granularity !== undefined) checkGranularity(options.granularity);
    try {
      const base = await sidecarBase(options.image);
      const wanted: Array<{ name: string; file: string | null; explicit: boolean }> = [];
      for (const spec of options.specs ?? []) {
        checkName(spec.name);
        if (wanted.some((w) => w.name === spec.name)) {
          throw new BlkrepError('ERR_USAGE', `bitmap "${spec.name}" of export "${eb.exportName}" is given twice`, { errno: 'EINVAL' });
        }
        let file: string | null;
        if (spec.file !== undefined) file = spec.file;
        else if (base.path !== undefined) file = sidecarPath(base.path, spec.name);
        else if (inMemoryByDefault(options.image)) file = null;
        else {
          throw new BlkrepError('ERR_USAGE', `bitmap "${spec.name}" of export "${eb.exportName}" needs a file: ${base.why}; give --bitmap ${spec.name}=FILE`, { errno: 'EINVAL' });
        }
        wanted.push({ name: spec.name, file, explicit: true });
      }
      if ((options.discover ?? true) && base.path !== undefined) {
        for (const found of await findSidecars(base.path)) {
          const given = wanted.find((w) => w.name === found.name);
          if (!given) {
            wanted.push({ name: found.name, file: found.path, explicit: false });
          } else if (given.file === null || (await claimKey(given.file)) !== (await claimKey(found.path))) {
            throw new BlkrepError(
              'ERR_BITMAP_EXISTS',
              `bitmap "${found.name}" of export "${eb.exportName}" is given as ${given.file ?? 'an in-memory bitmap'}, but ${found.path} beside the image holds a bitmap of that name too; remove one of them (or use another name)`,
              { errno: 'EINVAL', details: { name: found.name, file: given.file, found: found.path } },
            );
          }
        }
      }
      if (options.imageNode) {
        eb.qcow2 = await Qcow2LiveBitmaps.open(options.imageNode, options.log ? { log: options.log } : {});
        for (const q of eb.qcow2?.entries.values() ?? []) {
          const w = wanted.find((x) => x.name === q.name);
          if (w) {
            throw new BlkrepError(
              'ERR_BITMAP_EXISTS',
              `bitmap "${q.name}" of export "${eb.exportName}" is a bitmap of the qcow2 image ${eb.qcow2!.path} and ${w.file === null ? 'an in-memory bitmap' : `the bitmap file ${w.file}`} too; rename or remove one of them`,
              { errno: 'EINVAL', details: { name: q.name, file: w.file, image: eb.qcow2!.path } },
            );
          }
          const t: Tracked = { name: q.name, file: eb.qcow2!.path, claim: null, persistent: undefined, bitmap: q.bitmap, tracker: q.tracker ?? NO_TRACKER, loadState: q.loadState, created: false, qcow2: q };
          eb.bitmaps.set(q.name, t);
          if (q.tracker) eb.node.addTracker(q.tracker);
        }
      }
      for (const w of wanted) await eb.openOne(w.name, w.file, { granularity: eb.granularity, enabled: true, mayCreate: true });
    } catch (err) {
      await eb.close().catch(() => {});
      throw err;
    }
    return eb;
  }

  /** Offer every bitmap as a meta context of the export (once the NBD server has made it). */
  attach(exp: Export): void {
    this.exp = exp;
    for (const t of this.bitmaps.values()) exp.addMetaContext(dirtyBitmapContext(t.name, () => t.bitmap));
  }

  /** How each bitmap was loaded at start. */
  loads(): BitmapLoad[] {
    return [...this.bitmaps.values()].map((t) => {
      const s = t.loadState;
      return {
        export: this.exportName,
        name: t.name,
        file: t.file,
        state: s.state,
        created: t.created,
        ...(s.state === 'all-dirty' ? { reason: s.reason, fault: s.fault } : {}),
        ...(s.state === 'recovered' ? { extentsReplayed: s.extentsReplayed, pagesDistrusted: s.pagesDistrusted } : {}),
        ...(t.checkpointCompleted !== undefined ? { checkpointCompleted: t.checkpointCompleted } : {}),
      };
    });
  }

  get count(): number {
    return this.bitmaps.size;
  }

  list(): BitmapInfo[] {
    return [...this.bitmaps.values()].map((t) => this.info(t));
  }

  get(name: string): BitmapInfo {
    return this.info(this.find(name));
  }

  // ------------------------------------------------------------------------ management

  add(name: string, options: AddOptions = {}): Promise<BitmapChange> {
    return this.serial(async () => {
      checkName(name);
      const existing = this.bitmaps.get(name);
      if (existing) {
        const differences: string[] = [];
        if (options.granularity !== undefined && options.granularity !== existing.bitmap.granularity) {
          differences.push(`granularity ${existing.bitmap.granularity}, not ${options.granularity}`);
        }
        if (options.enabled !== undefined && options.enabled !== existing.bitmap.enabled) differences.push(existing.bitmap.enabled ? 'enabled' : 'disabled');
        if (options.persistent !== undefined && options.persistent !== (existing.persistent !== undefined)) {
          differences.push(existing.persistent ? `persistent (${existing.file})` : 'in memory only');
        }
        if (options.file !== undefined && (existing.file === null || (await claimKey(options.file)) !== existing.claim)) {
          differences.push(existing.file === null ? 'in memory only' : `in file ${existing.file}`);
        }
        if (differences.length) {
          throw new BlkrepError('ERR_BITMAP_EXISTS', `export "${this.exportName}" already has a bitmap "${name}", ${differences.join(', ')}`, {
            errno: 'EINVAL',
            details: { export: this.exportName, name },
          });
        }
        return { name, changed: false, bitmap: this.info(existing) };
      }
      let file: string | null;
      if (options.file !== undefined) file = options.file;
      else if (options.persistent === false) file = null;
      else {
        const base = await sidecarBase(this.image);
        if (base.path !== undefined) file = sidecarPath(base.path, name);
        else if (options.persistent === true || !inMemoryByDefault(this.image)) {
          throw new BlkrepError('ERR_USAGE', `a persistent bitmap of export "${this.exportName}" needs a file: ${base.why}`, { errno: 'EINVAL' });
        } else file = null;
      }
      if (file !== null) {
        await checkNoStaleCheckpoints(file);
        if (await exists(file)) {
          throw new BlkrepError(
            'ERR_BITMAP_EXISTS',
            `bitmap file ${file} exists but this daemon does not track it (it may have missed writes); restart serve-nbd with --bitmap ${name}=${file} to load it, or remove it`,
            { errno: 'EINVAL', details: { file } },
          );
        }
      }
      const granularity = options.granularity ?? DEFAULT_GRANULARITY;
      checkGranularity(granularity);
      const t = await this.openOne(name, file, { granularity, enabled: options.enabled ?? true, mayCreate: true });
      this.exp?.addMetaContext(dirtyBitmapContext(name, () => t.bitmap));
      const info = this.info(t);
      this.publish('bitmap-added', { export: this.exportName, name, file: t.file, persistent: info.persistent, granularity: info.granularity, enabled: info.enabled });
      return { name, changed: true, bitmap: info };
    });
  }

  remove(name: string, options: { ifExists?: boolean } = {}): Promise<BitmapChange> {
    return this.serial(async () => {
      const t = this.bitmaps.get(name);
      if (!t) {
        if (options.ifExists) return { name, changed: false, bitmap: null };
        throw notFound(this.exportName, name, [...this.bitmaps.keys()]);
      }
      if (t.qcow2) await this.qcow2!.remove(name);
      this.bitmaps.delete(name);
      this.node.removeTracker(t.tracker);
      this.exp?.removeMetaContext(DIRTY_BITMAP_CONTEXT_PREFIX + name);
      try {
        await t.persistent?.close();
      } finally {
        if (t.claim) this.claimed.delete(t.claim);
      }
      if (t.file && !t.qcow2) await removeBitmapFiles(t.file);
      this.publish('bitmap-removed', { export: this.exportName, name, file: t.file });
      return { name, changed: true, bitmap: null };
    });
  }

  clear(name: string, ranges?: Run[]): Promise<BitmapChange> {
    return this.serial(async () => {
      const t = this.find(name);
      if (ranges) checkRanges(ranges, t.bitmap.size);
      const changed = anyClearable(t.bitmap, ranges);
      if (changed) {
        await this.prepareQcow2(t);
        const target = t.persistent ?? t.bitmap;
        if (ranges) for (const r of ranges) target.clear(r.offset, r.length);
        else target.clearAll();
        await t.persistent?.flush();
        this.publish('bitmap-cleared', { export: this.exportName, name, ranges: ranges?.length ?? null, dirtyBytes: t.bitmap.dirtyBytes });
      }
      return { name, changed, bitmap: this.info(t) };
    });
  }

  setEnabled(name: string, enabled: boolean): Promise<BitmapChange> {
    return this.serial(async () => {
      const t = this.find(name);
      const changed = t.bitmap.enabled !== enabled;
      if (changed) {
        await this.prepareQcow2(t);
        if (t.persistent) await t.persistent.setEnabled(enabled);
        else t.bitmap.enabled = enabled;
        this.publish(enabled ? 'bitmap-enabled' : 'bitmap-disabled', { export: this.exportName, name });
      }
      return { name, changed, bitmap: this.info(t) };
    });
  }

  /** OR another bitmap of this export, or a bitmap file, into `name`. */
  merge(name: string, source: { name?: string; file?: string }): Promise<BitmapChange> {
    return this.serial(async () => {
      const t = this.find(name);
      let bits: DirtyBitmap;
      let what: string;
      if (source.name !== undefined) {
        bits = this.find(source.name).bitmap;
        what = `bitmap "${source.name}"`;
      } else if (source.file !== undefined) {
        const opened = await PersistentBitmap.open(source.file, { readOnly: true, strict: true });
        bits = opened.bitmap.bitmap;
        await opened.bitmap.close();
        what = `bitmap file ${source.file}`;
      } else {
        throw new BlkrepError('ERR_BAD_REQUEST', 'bitmap-merge needs "source" (a bitmap of the export) or "sourceFile" (a bitmap file)', { errno: 'EINVAL' });
      }
      const before = t.bitmap.dirtyGranules;
      await this.prepareQcow2(t);
      mergeInto(t.persistent ?? t.bitmap, t.bitmap, bits);
      const changed = t.bitmap.dirtyGranules !== before;
      if (changed) {
        await t.persistent?.flush();
        this.publish('bitmap-merged', { export: this.exportName, name, source: what, dirtyBytes: t.bitmap.dirtyBytes });
      }
      return { name, changed, bitmap: this.info(t) };
    });
  }

  /** Dirty ranges, or the whole disk. */
  fill(name: string, what: { ranges?: Run[]; all?: boolean }): Promise<BitmapChange> {
    return this.serial(async () => {
      const t = this.find(name);
      const target = t.persistent ?? t.bitmap;
      const before = t.bitmap.dirtyGranules;
      await this.prepareQcow2(t);
      if (what.all) target.setAll();
      else {
        const ranges = what.ranges ?? [];
        checkRanges(ranges, t.bitmap.size);
        for (const r of ranges) if (r.length > 0) target.fill(r.offset, r.length);
      }
      const changed = t.bitmap.dirtyGranules !== before;
      if (changed) {
        await t.persistent?.flush();
        this.publish('bitmap-filled', { export: this.exportName, name, dirtyBytes: t.bitmap.dirtyBytes });
      }
      return { name, changed, bitmap: this.info(t) };
    });
  }

  checkpoint(name: string): Promise<CheckpointInfo> {
    return this.serial(async () => {
      const t = this.find(name);
      if (t.qcow2) {
        throw new BlkrepError(
          'ERR_NOT_SUPPORTED',
          `bitmap "${name}" of export "${this.exportName}" is a bitmap of the qcow2 image ${t.file}, which has no checkpoints; freeze a copy as QEMU does: bitmap add --name ${name}-1 --disabled, bitmap merge --name ${name}-1 --source ${name}, bitmap clear --name ${name}`,
          { errno: 'ENOTSUP', details: { export: this.exportName, name } },
        );
      }
      if (!t.persistent) throw notPersistent(this.exportName, name);
      const info = await t.persistent.checkpoint();
      this.publish('bitmap-checkpoint', { export: this.exportName, name, number: info.number, path: info.path, dirtyBytes: info.dirtyBytes });
      return info;
    });
  }

  async checkpoints(name: string): Promise<CheckpointInfo[]> {
    const t = this.find(name);
    if (!t.persistent) return [];
    return t.persistent.checkpoints();
  }

  /** One page of the dirty runs of [start, start+length), at most `limit` runs. */
  dump(name: string, options: { start?: number; length?: number; limit?: number } = {}): DumpPage {
    const t = this.find(name);
    const b = t.bitmap;
    const start = options.start ?? 0;
    const length = options.length ?? b.size - start;
    checkRanges([{ offset: start, length }], b.size);
    const limit = Math.max(1, Math.min(options.limit ?? DUMP_PAGE_RUNS, DUMP_PAGE_RUNS));
    const runs: Array<[number, number]> = [];
    const end = start + length;
    let next: number | null = null;
    for (const r of b.dirtyRuns(start, length)) {
      if (runs.length === limit) {
        next = r.offset;
        break;
      }
      runs.push([r.offset, r.length]);
    }
    return {
      name,
      size: b.size,
      granularity: b.granularity,
      enabled: b.enabled,
      dirtyGranules: b.dirtyGranules,
      dirtyBytes: b.dirtyBytes,
      start,
      end: next ?? end,
      runs,
      next,
    };
  }

  /** Close every bitmap (storing it and marking its file clean). Call after the node is flushed. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.chain.catch(() => {});
      const errors: unknown[] = [];
      for (const t of this.bitmaps.values()) {
        this.node.removeTracker(t.tracker);
        try {
          await t.persistent?.close();
        } catch (err) {
          errors.push(err);
        } finally {
          if (t.claim) this.claimed.delete(t.claim);
        }
      }
      if (errors.length) throw toBlkrepError(errors[0], `closing the bitmaps of export "${this.exportName}"`);
    })();
    return this.closing;
  }

  // ------------------------------------------------------------------------ helpers

  /** A qcow2 bitmap about to change: refused when inconsistent or read-only, else marked in use. */
  private async prepareQcow2(t: Tracked): Promise<void> {
    if (t.qcow2) await this.qcow2!.prepareChange(t.name);
  }

  private find(name: string): Tracked {
    const t = this.bitmaps.get(name);
    if (!t) throw notFound(this.exportName, name, [...this.bitmaps.keys()]);
    return t;
  }

  private info(t: Tracked): BitmapInfo {
    if (t.qcow2) {
      const info = bitmapInfo(t.name, t.bitmap, { export: this.exportName, persistent: true, file: t.file, loadState: t.loadState });
      // what keeps it: the bitmap NAME inside the qcow2 image `file`
      return Object.assign(info, { qcow2: { image: t.file, name: t.name } });
    }
    return bitmapInfo(t.name, t.bitmap, {
      export: this.exportName,
      persistent: t.persistent !== undefined,
      file: t.file,
      loadState: t.loadState,
      epoch: t.persistent?.epoch ?? null,
    });
  }

  private serial<T>(op: () => Promise<T>): Promise<T> {
    if (this.closing) {
      return Promise.reject(new BlkrepError('ERR_SHUTTING_DOWN', `the bitmaps of export "${this.exportName}" are closing: the daemon is stopping`, { errno: 'ESHUTDOWN' }));
    }
    const run = this.chain.catch(() => {}).then(op);
    this.chain = run;
    return run;
  }

  private async openOne(name: string, file: string | null, o: { granularity: number; enabled: boolean; mayCreate: boolean }): Promise<Tracked> {
    const size = this.node.size;
    // Absolute, so that what the control socket reports means the same to a client elsewhere.
    if (file !== null) file = resolvePath(file);
    let t: Tracked;
    if (file === null) {
      const bitmap = new DirtyBitmap(size, { granularity: o.granularity, enabled: o.enabled });
      t = { name, file: null, claim: null, persistent: undefined, bitmap, tracker: volatileTracker(bitmap), loadState: { state: 'clean' }, created: true };
    } else {
      const claim = await claimKey(file);
      if (this.claimed.has(claim)) {
        throw new BlkrepError('ERR_BITMAP_IN_USE', `bitmap file ${file} is used twice by this daemon (bitmap "${name}" of export "${this.exportName}" and another); each bitmap needs a file of its own`, {
          errno: 'EINVAL',
          details: { file },
        });
      }
      let pb: PersistentBitmap;
      let loadState: LoadState;
      let created = false;
      let checkpointCompleted: number | undefined;
      try {
        if (await exists(file)) {
          const r = await PersistentBitmap.open(file, { size });
          pb = r.bitmap;
          loadState = r.loadState;
          checkpointCompleted = r.checkpointCompleted;
        } else {
          if (!o.mayCreate) throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `bitmap file ${file} does not exist`, { errno: 'EINVAL' });
          await checkNoStaleCheckpoints(file);
          pb = await PersistentBitmap.create(file, { size, granularity: o.granularity, enabled: o.enabled });
          loadState = { state: 'clean' };
          created = true;
        }
      } catch (err) {
        const e = toBlkrepError(err);
        throw new BlkrepError(e.code, `bitmap "${name}" of export "${this.exportName}" (image ${this.image}, ${size} bytes): ${e.message}`, {
          errno: e.errno,
          cause: err,
          details: e.details,
        });
      }
      this.claimed.add(claim);
      t = { name, file, claim, persistent: pb, bitmap: pb.bitmap, tracker: pb, loadState, created, ...(checkpointCompleted !== undefined ? { checkpointCompleted } : {}) };
    }
    this.bitmaps.set(name, t);
    this.node.addTracker(t.tracker);
    return t;
  }
}

/** The tracker of an inconsistent qcow2 bitmap: all-dirty already, records nothing. */
const NO_TRACKER: WriteTracker<undefined> = {
  beforeWrite: () => Promise.resolve(undefined),
  afterWrite: () => {},
  flush: () => Promise.resolve(),
};

function notPersistent(exportName: string, name: string): BlkrepError {
  return new BlkrepError('ERR_BITMAP_NOT_PERSISTENT', `bitmap "${name}" of export "${exportName}" is kept in memory only; checkpoints need a bitmap file`, {
    errno: 'EINVAL',
    details: { export: exportName, name },
  });
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/** Images with no directory (memory:SIZE, NBD URIs) keep their bitmaps in memory unless given a file. */
export function inMemoryByDefault(image: string): boolean {
  return image.startsWith('memory:') || isNbdUri(image);
}
