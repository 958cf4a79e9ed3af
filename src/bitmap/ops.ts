/**
 * What the bitmap commands do to a bitmap, wherever it lives (a bitmap file, a live export): the
 * shapes they report, and the operations written once — merge across granularities, ranges,
 * removing a bitmap's files. Used by the stores (store*.ts) and by the daemon (export-bitmaps.ts).
 */
import { readdir, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { BlkrepError } from '../api/errors.js';
import type { DirtyBitmap, Run } from './dirty-bitmap.js';
import type { CheckpointInfo, LoadState } from './persistent.js';

/** One bitmap as the commands and the control socket report it. */
export interface BitmapInfo {
  name: string;
  /** the export it tracks (live bitmaps only) */
  export?: string;
  /** kept in a bitmap file (else in the daemon's memory only) */
  persistent: boolean;
  /** the bitmap file, or null */
  file: string | null;
  /** bytes covered: the disk's size */
  size: number;
  granularity: number;
  /** recording writes */
  enabled: boolean;
  dirtyGranules: number;
  dirtyBytes: number;
  /** dirtyBytes / size × 100 (0 for an empty disk) */
  percent: number;
  /** the checkpoint number being recorded (persistent bitmaps; null otherwise) */
  epoch: number | null;
  /** a frozen checkpoint file (read-only) */
  frozen: boolean;
  /** how far the file could be trusted when it was loaded (for a live bitmap: at the daemon's start or its bitmap-add) */
  loadState: LoadState;
}

/** The result of a command that may change a bitmap: whether it did (scripts rely on this for idempotence). */
export interface BitmapChange {
  name: string;
  changed: boolean;
  /** the bitmap afterwards (null once removed) */
  bitmap: BitmapInfo | null;
}

export interface AddOptions {
  granularity?: number;
  enabled?: boolean;
  /** bitmap file (default: beside the image; a live export of memory: keeps it in memory) */
  file?: string;
  /** false: in memory only (live exports) */
  persistent?: boolean;
  /** size of a new bitmap file given on its own (not beside an image) */
  size?: number;
}

/** Where the bits to merge come from. */
export interface MergeSource {
  /** a bitmap of the same store */
  name?: string;
  /** a blkrep bitmap file (or checkpoint file), or an image whose bitmap `name` it is */
  file?: string;
  /** bits in memory (callers in this process) */
  bits?: DirtyBitmap;
}

export type { CheckpointInfo, LoadState };

export function percentOf(bytes: number, size: number): number {
  return size > 0 ? (100 * bytes) / size : 0;
}

export function bitmapInfo(name: string, bitmap: DirtyBitmap, extra: Partial<BitmapInfo> & Pick<BitmapInfo, 'persistent' | 'file' | 'loadState'>): BitmapInfo {
  const dirtyBytes = bitmap.dirtyBytes;
  return {
    name,
    ...(extra.export === undefined ? {} : { export: extra.export }),
    persistent: extra.persistent,
    file: extra.file,
    size: bitmap.size,
    granularity: bitmap.granularity,
    enabled: bitmap.enabled,
    dirtyGranules: bitmap.dirtyGranules,
    dirtyBytes,
    percent: percentOf(dirtyBytes, bitmap.size),
    epoch: extra.epoch ?? null,
    frozen: extra.frozen ?? false,
    loadState: extra.loadState,
  };
}

/** Something bits can be set in: a DirtyBitmap, a PersistentBitmap. */
export interface Fillable {
  fill(offset: number, length: number): void;
}

/**
 * OR `source` into `target`: word by word when the geometry is the same, else run by run (each
 * dirty run of the source dirties every granule of the target it touches, so nothing is lost
 * when the target is finer or coarser). The sizes must match.
 */
export function mergeInto(target: Fillable & { merge(other: DirtyBitmap): void }, targetBitmap: Pick<DirtyBitmap, 'size' | 'granularity'>, source: DirtyBitmap): void {
  if (source.size !== targetBitmap.size) {
    throw new BlkrepError('ERR_BITMAP_SIZE_MISMATCH', `cannot merge a bitmap of ${source.size} bytes into one of ${targetBitmap.size} bytes`, {
      errno: 'EINVAL',
      details: { size: targetBitmap.size, sourceSize: source.size },
    });
  }
  if (source.granularity === targetBitmap.granularity) {
    target.merge(source);
    return;
  }
  for (const r of source.dirtyRuns()) target.fill(r.offset, r.length);
}

/** Check that every range lies inside a disk of `size` bytes. */
export function checkRanges(ranges: readonly Run[], size: number): void {
  for (const r of ranges) {
    if (!Number.isSafeInteger(r.offset) || !Number.isSafeInteger(r.length) || r.offset < 0 || r.length < 0 || r.offset + r.length > size) {
      throw new BlkrepError('ERR_OUT_OF_RANGE', `range of ${r.length} bytes at offset ${r.offset} is beyond the end of the disk (size ${size})`, {
        errno: 'EINVAL',
        details: { offset: r.offset, length: r.length, size },
      });
    }
  }
}

/** Whether any granule wholly inside one of the ranges is dirty (what a clear of them would clean). */
export function anyClearable(bitmap: DirtyBitmap, ranges: readonly Run[] | undefined): boolean {
  if (bitmap.dirtyGranules === 0) return false;
  if (!ranges) return true;
  const probe = bitmap.clone();
  for (const r of ranges) probe.clear(r.offset, r.length);
  return probe.dirtyGranules !== bitmap.dirtyGranules;
}

/** The checkpoint files of a bitmap file (`FILE.ckpt-N`), as paths. */
export async function checkpointFiles(path: string): Promise<string[]> {
  const dir = dirname(path);
  const prefix = `${basename(path)}.ckpt-`;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return [];
  }
  return names.filter((n) => n.startsWith(prefix) && /^\d+$/.test(n.slice(prefix.length))).map((n) => join(dir, n));
}

/** Delete a bitmap file and its checkpoints. */
export async function removeBitmapFiles(path: string): Promise<void> {
  for (const f of await checkpointFiles(path)) await rm(f, { force: true });
  await rm(path, { force: true });
}

/**
 * A new bitmap file must not find checkpoint files of an older one with its name: the loader
 * would take `FILE.ckpt-1` for a checkpoint of the new bitmap.
 */
export async function checkNoStaleCheckpoints(path: string): Promise<void> {
  const stale = await checkpointFiles(path);
  if (stale.length > 0) {
    throw new BlkrepError(
      'ERR_BITMAP_EXISTS',
      `checkpoint files of an earlier bitmap are in the way of a new bitmap file "${path}": ${stale.map((f) => basename(f)).join(', ')}; remove them first`,
      { errno: 'EINVAL', details: { path, checkpoints: stale } },
    );
  }
}

/** Sum of lengths, count and percent of a list of runs. */
export function totals(runs: readonly Run[], size: number): { count: number; bytes: number; percent: number } {
  let bytes = 0;
  for (const r of runs) bytes += r.length;
  return { count: runs.length, bytes, percent: percentOf(bytes, size) };
}

/** Describe a load state in words, for stderr and the text output. */
export function describeLoadState(s: LoadState): string {
  switch (s.state) {
    case 'clean':
      return 'clean';
    case 'recovered':
      return `marked in use when loaded (its writer died, or still has it open), so recovered (${s.extentsReplayed} activity-log extent${s.extentsReplayed === 1 ? '' : 's'} replayed, ${s.pagesDistrusted} page${s.pagesDistrusted === 1 ? '' : 's'} distrusted): every region written since it was last cleared is dirty`;
    case 'all-dirty':
      return `NOT TRUSTED (${s.reason}): loaded as all-dirty, so the next copy is a full one`;
  }
}
