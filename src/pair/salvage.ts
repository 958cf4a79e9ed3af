/**
 * Salvage instead of discard (replication.md §8): before a split brain's victim has its diverged
 * clusters overwritten by the resync, they are copied into a qcow2 overlay beside its disk,
 * `DISK.salvage-YYYYMMDDTHHMMSSZ.qcow2`, whose backing file is the disk. DRBD's discard-* and
 * Ceph's resync simply overwrite the victim.
 *
 * Give it every range the resync will write (the union of both bitmaps, or the whole disk for a
 * full copy): then, after the resync, the overlay over the resynced disk reads exactly as the
 * victim's disk did before (`qemu-img convert DISK.salvage-….qcow2 victim.raw`), and
 * `qemu-img commit` would put the victim's data back. Ranges are rounded out to whole clusters
 * of the overlay, read from the victim's node, so no cluster is ever half filled from a backing
 * file that is about to change.
 *
 * Crash safety: the overlay is written under a hidden temporary name, flushed, then linked to its
 * final name (never replacing a file) and the directory synced; so a listed salvage overlay is
 * always complete. A leftover temporary (a crash mid-copy) is listed as incomplete.
 */
import { link, readdir, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { BlockNode } from '../api/block.js';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import { Qcow2Node } from '../block/qcow2/index.js';
import { syncDirectory, tempPathBeside } from '../util/safe-file.js';
import { sideFileBase } from '../util/state-dir.js';

export interface SalvageRange {
  offset: number;
  length: number;
}

export interface SalvageOptions {
  /** record the victim's disk as the overlay's backing file (relative names resolve beside the overlay) */
  backing?: { file: string; format: 'raw' | 'qcow2' };
  /** the overlay's cluster size; default 64 KiB */
  clusterSize?: number;
  /** bytes per read from the victim's node; default 1 MiB */
  chunkBytes?: number;
  signal?: AbortSignal;
}

export interface SalvageResult {
  path: string;
  /** the ranges copied, merged and rounded out to clusters */
  ranges: SalvageRange[];
  /** bytes copied */
  bytes: number;
}

export interface SalvageEntry {
  path: string;
  /** when it was taken (ISO 8601, from its name); null for an incomplete one */
  createdAt: string | null;
  /** its size on the host */
  fileBytes: number;
  /** false: a temporary left by a crash mid-copy (not a usable overlay; safe to delete) */
  complete: boolean;
}

const STAMP = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/;

function stamp(d: Date): string {
  return d.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
}

/** `DISK.salvage-YYYYMMDDTHHMMSSZ.qcow2` beside the disk, for the time `now` (UTC). */
export function salvagePath(diskPath: string, now: Date): string {
  return `${sideFileBase(diskPath)}.salvage-${stamp(now)}.qcow2`;
}

/** Validate, sort, merge, and round out the ranges to `cluster` bytes (the last one to `size`). */
export function planRanges(ranges: SalvageRange[], size: number, cluster: number): SalvageRange[] {
  for (const r of ranges) {
    if (!Number.isSafeInteger(r.offset) || !Number.isSafeInteger(r.length) || r.offset < 0 || r.length <= 0 || r.offset + r.length > size) {
      throw new BlkrepError('ERR_OUT_OF_RANGE', `salvage range of ${r.length} bytes at offset ${r.offset} is not inside the disk (size ${size})`, {
        errno: 'EINVAL',
        details: { offset: r.offset, length: r.length, size },
      });
    }
  }
  const sorted = ranges.map((r) => ({ start: Math.floor(r.offset / cluster) * cluster, end: Math.min(size, Math.ceil((r.offset + r.length) / cluster) * cluster) })).sort((a, b) => a.start - b.start);
  const out: SalvageRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.start <= last.offset + last.length) last.length = Math.max(last.length, r.end - last.offset);
    else out.push({ offset: r.start, length: r.end - r.start });
  }
  return out;
}

/**
 * Copy `ranges` of `source` (the victim's disk, before the resync overwrites them) into a new
 * qcow2 overlay at `path` (see salvagePath). Refuses an existing `path` (ERR_EXISTS): a salvage is
 * never replaced. Returns when the overlay is durable under its final name.
 */
export async function salvage(source: BlockNode, ranges: SalvageRange[], path: string, o: SalvageOptions = {}): Promise<SalvageResult> {
  const cluster = o.clusterSize ?? 65536;
  const chunk = o.chunkBytes ?? 1 << 20;
  const plan = planRanges(ranges, source.size, cluster);
  if (await exists(path)) throw new BlkrepError('ERR_EXISTS', `the salvage overlay ${path} exists already: a salvage is never replaced`, { errno: 'EINVAL', details: { path } });
  const temp = tempPathBeside(path);
  let node: Qcow2Node | undefined;
  try {
    await Qcow2Node.create(temp, { size: source.size, clusterSize: cluster, ...(o.backing ? { backing: o.backing.file, backingFormat: o.backing.format } : {}) });
    node = await Qcow2Node.open(temp, { backing: null });
    let bytes = 0;
    for (const r of plan) {
      for (let at = r.offset; at < r.offset + r.length; ) {
        o.signal?.throwIfAborted();
        const n = Math.min(chunk, r.offset + r.length - at);
        let data: Buffer;
        try {
          data = await source.read(at, n, o.signal ? { signal: o.signal } : undefined);
        } catch (err) {
          throw wrap(err, `salvage: reading ${n} bytes at offset ${at} of ${source.description}`, { offset: at, length: n });
        }
        await node.write(at, data);
        at += n;
        bytes += n;
      }
    }
    await node.flush();
    await node.close();
    node = undefined;
    await publish(temp, path);
    await syncDirectory(dirname(path));
    return { path, ranges: plan, bytes };
  } catch (err) {
    await node?.close().catch(() => {});
    await unlink(temp).catch(() => {});
    throw err instanceof BlkrepError ? err : toBlkrepError(err, `salvage into ${path}`);
  }
}

/** Give the finished overlay its name without ever replacing a file: link (atomic), or rename where links are not supported. */
async function publish(temp: string, path: string): Promise<void> {
  const appeared = () => new BlkrepError('ERR_EXISTS', `the salvage overlay ${path} appeared while it was being written: a salvage is never replaced`, { errno: 'EINVAL', details: { path } });
  try {
    await link(temp, path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw appeared();
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw err;
    if (await exists(path)) throw appeared();
    await rename(temp, path);
    return;
  }
  await unlink(temp);
}

function wrap(err: unknown, context: string, details: Record<string, unknown>): BlkrepError {
  const e = toBlkrepError(err);
  return new BlkrepError(e.code, `${context}: ${e.message}`, { errno: e.errno, cause: err, details: { ...e.details, ...details } });
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

/** The salvage overlays beside `diskPath` (for `status`), oldest first; incomplete temporaries last. */
export async function listSalvage(diskPath: string): Promise<SalvageEntry[]> {
  const base = sideFileBase(diskPath);
  const dir = dirname(base);
  const prefix = `${basename(base)}.salvage-`;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw toBlkrepError(err, `listing the salvage overlays of ${diskPath}`);
  }
  const done: SalvageEntry[] = [];
  const partial: SalvageEntry[] = [];
  for (const name of names.sort()) {
    const hidden = name.startsWith(`.${prefix}`) && /\.qcow2\.tmp-\d+-[0-9a-f]+$/.test(name);
    const m = name.startsWith(prefix) && name.endsWith('.qcow2') ? STAMP.exec(name.slice(prefix.length, -'.qcow2'.length)) : null;
    if (!m && !hidden) continue;
    const path = join(dir, name);
    let fileBytes: number;
    try {
      fileBytes = (await stat(path)).size;
    } catch {
      continue; // removed meanwhile
    }
    if (m) done.push({ path, createdAt: `${m[1]}-${m[2]}-${m[3]}T${m[4]}:${m[5]}:${m[6]}Z`, fileBytes, complete: true });
    else partial.push({ path, createdAt: null, fileBytes, complete: false });
  }
  return [...done, ...partial];
}
