/**
 * The secondary's hidden and active disks (replication.md §1): qcow2 overlays, active → hidden →
 * disk, 64 KiB clusters, created if absent (default beside the disk: DISK.hidden.qcow2,
 * DISK.active.qcow2). The disk is opened once, by the daemon: the hidden disk is opened over
 * that node (never a second open of the file, which the image locks forbid read-write).
 * All three have the same length, or start fails with ERR_PAIR_SIZE naming the three.
 *
 * Hidden durability (--hidden-durability): `strict` syncs the hidden disk as any qcow2 image
 * (a copy written FUA is on stable storage before the disk write is issued); `volatile` writes
 * the same data and metadata in the same order but never fdatasyncs it (QEMU's advice: hidden
 * on tmpfs; `cache=unsafe`): a kill -9 loses nothing (the page cache holds every completed
 * write), a host crash loses the hidden disk, which the boot id in the pair state detects.
 *
 * Emptying hidden (each checkpoint) keeps its file's length (`keepSpaceOnEmpty`): the next
 * epoch's copies land in blocks the filesystem allocated and wrote before, so a strict hidden
 * disk's fdatasync flushes data without allocating blocks. The file is cut back only when an
 * epoch's copies reached less than a quarter of it.
 */
import { access, rm } from 'node:fs/promises';
import { dirname, relative, resolve } from 'node:path';
import type { BlockNode, CompleteBlockNode } from '../api/block.js';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import { Filter } from '../block/filter.js';
import { completeNode } from '../block/node.js';
import { createQcow2 } from '../block/qcow2/create.js';
import { HostFile, type Qcow2Container } from '../block/qcow2/file.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { sideFileBase } from '../util/state-dir.js';

export const OVERLAY_CLUSTER = 65536;

/** A node someone else owns: closing it here does nothing. */
export class Borrowed extends Filter {
  readonly driver = 'borrowed';
  override close(): Promise<void> {
    return Promise.resolve();
  }
}

export type HiddenDurability = 'strict' | 'volatile';

/**
 * The hidden disk's file: `volatile` makes sync() do nothing (the qcow2 driver still writes data,
 * then refcounts, L2 and L1 in its order, each completed before the next: the page cache keeps
 * that order for a kill -9); syncNow() is the real fdatasync (a clean stop, a switch to strict).
 */
export class HiddenFile implements Qcow2Container {
  /** fdatasyncs skipped (volatile) */
  skippedSyncs = 0;
  constructor(
    private readonly file: HostFile,
    readonly durability: HiddenDurability,
  ) {}
  get path(): string {
    return this.file.path;
  }
  get readOnly(): boolean {
    return this.file.readOnly;
  }
  get length(): number {
    return this.file.length;
  }
  get imageLock(): HostFile['imageLock'] {
    return this.file.imageLock;
  }
  read(offset: number, target: Buffer): Promise<void> {
    return this.file.read(offset, target);
  }
  write(offset: number, data: Buffer): Promise<void> {
    return this.file.write(offset, data);
  }
  sync(): Promise<void> {
    if (this.durability === 'strict') return this.file.sync();
    this.skippedSyncs++;
    return Promise.resolve();
  }
  syncNow(): Promise<void> {
    return this.file.sync();
  }
  truncate(length: number): Promise<void> {
    return this.file.truncate(length);
  }
  punch(offset: number, length: number): Promise<void> {
    return this.file.punch(offset, length);
  }
  close(): Promise<void> {
    return this.file.close();
  }
}

export interface SecondaryImages {
  hiddenPath: string;
  activePath: string;
  hidden: Qcow2Node;
  /** the hidden disk's file (its durability; syncNow) */
  hiddenFile: HiddenFile;
  active: Qcow2Node;
  /** the same nodes, complete (for filters and reads) */
  hiddenNode: CompleteBlockNode;
  activeNode: CompleteBlockNode;
  created: { hidden: boolean; active: boolean };
}

export function defaultOverlayPaths(disk: string): { hidden: string; active: string } {
  const base = sideFileBase(disk);
  return { hidden: `${base}.hidden.qcow2`, active: `${base}.active.qcow2` };
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/** The backing name to store: relative when beside, absolute otherwise (as the user would type it). */
function backingName(overlay: string, backing: string): string {
  const rel = relative(dirname(resolve(overlay)), resolve(backing));
  return rel.startsWith('..') ? resolve(backing) : rel;
}

async function create(what: 'hidden' | 'active', path: string, backing: string, backingFormat: string, size: number): Promise<void> {
  try {
    await createQcow2(path, { size, clusterSize: OVERLAY_CLUSTER, backing: backingName(path, backing), backingFormat });
  } catch (err) {
    const e = toBlkrepError(err);
    throw new BlkrepError('ERR_PAIR_OVERLAY', `cannot create the ${what} disk ${path}: ${e.message}`, { errno: e.errno, cause: err, details: { [what]: path } });
  }
}

async function open(what: 'hidden' | 'active', path: string, backing: BlockNode, wrap?: (f: HostFile) => Qcow2Container): Promise<Qcow2Node> {
  try {
    // hidden keeps its file's length when emptied (each checkpoint): the next epoch's copies reuse
    // blocks the filesystem has allocated already (Qcow2Image.keepSpaceOnEmpty)
    if (wrap) return await Qcow2Node.openContainer(wrap(await HostFile.open(path)), { backing, keepSpaceOnEmpty: true });
    return await Qcow2Node.open(path, { backing });
  } catch (err) {
    const e = toBlkrepError(err);
    throw new BlkrepError(e.code === 'ERR_IMAGE_LOCKED' ? e.code : 'ERR_PAIR_OVERLAY', `cannot open the ${what} disk ${path}: ${e.message}`, { errno: e.errno, cause: err, details: { [what]: path } });
  }
}

/**
 * Open (creating what is absent) the hidden and active disks over `disk`, the daemon's node of
 * the image at `diskPath`.
 */
export async function openSecondaryImages(
  diskPath: string,
  disk: BlockNode,
  o: { hidden?: string; active?: string; hiddenDurability?: HiddenDurability; discardHidden?: boolean } = {},
): Promise<SecondaryImages> {
  const defaults = defaultOverlayPaths(diskPath);
  const hiddenPath = o.hidden ?? defaults.hidden;
  const activePath = o.active ?? defaults.active;
  if (resolve(hiddenPath) === resolve(activePath) || resolve(hiddenPath) === resolve(diskPath) || resolve(activePath) === resolve(diskPath)) {
    throw new BlkrepError('ERR_USAGE', `the disk, hidden and active disks must be three files (disk ${diskPath}, hidden ${hiddenPath}, active ${activePath})`, { errno: 'EINVAL' });
  }
  const created = { hidden: false, active: false };
  const diskFormat = disk.driver === 'qcow2' ? 'qcow2' : 'raw';
  // a volatile hidden disk after a host crash: garbage (maybe not even a readable qcow2), made anew
  if (o.discardHidden) await rm(hiddenPath, { force: true });
  if (!(await exists(hiddenPath))) {
    await create('hidden', hiddenPath, diskPath, diskFormat, disk.size);
    created.hidden = true;
  }
  if (!(await exists(activePath))) {
    await create('active', activePath, hiddenPath, 'qcow2', disk.size);
    created.active = true;
  }
  let hiddenFile: HiddenFile | undefined;
  const hidden = await open('hidden', hiddenPath, new Borrowed(disk), (f) => (hiddenFile = new HiddenFile(f, o.hiddenDurability ?? 'strict')));
  let active: Qcow2Node;
  try {
    active = await open('active', activePath, new Borrowed(hidden));
  } catch (err) {
    await hidden.close().catch(() => {});
    throw err;
  }
  if (hidden.size !== disk.size || active.size !== disk.size) {
    await active.close().catch(() => {});
    await hidden.close().catch(() => {});
    throw new BlkrepError(
      'ERR_PAIR_SIZE',
      `the disk, hidden and active disks must have the same length: disk ${diskPath} is ${disk.size} bytes, hidden ${hiddenPath} ${hidden.size}, active ${activePath} ${active.size}`,
      { errno: 'EINVAL', details: { disk: disk.size, hidden: hidden.size, active: active.size } },
    );
  }
  return { hiddenPath, activePath, hidden, hiddenFile: hiddenFile!, active, hiddenNode: completeNode(hidden), activeNode: completeNode(active), created };
}

/** Allocated runs of one layer (depth 1 in its extents): what it holds itself. */
export async function allocatedRuns(node: CompleteBlockNode): Promise<Array<{ offset: number; length: number }>> {
  const out: Array<{ offset: number; length: number }> = [];
  let pos = 0;
  while (pos < node.size) {
    const ext = await node.extents(pos, node.size - pos);
    for (const e of ext) {
      const len = Math.min(e.length, node.size - pos);
      if (e.depth === 1) {
        const last = out[out.length - 1];
        if (last && last.offset + last.length === pos) last.length += len;
        else out.push({ offset: pos, length: len });
      }
      pos += len;
      if (pos >= node.size) break;
    }
  }
  return out;
}
