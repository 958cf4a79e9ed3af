/**
 * Creating an image: raw (a sparse file of the size) or qcow2 v3 (optionally over a backing file).
 *
 * The new image is written to a temporary file next to IMAGE and renamed over it when complete,
 * so a crash or an error never leaves a half-written image under the name, and a process that
 * has the old file open keeps reading the old file.
 *
 * An existing IMAGE is not replaced unless `force`: when it already has exactly the parameters
 * asked for (format, size, cluster size, refcount width, backing file and format) creating it is
 * a success that changes nothing (`changed: false`, its contents kept), so a playbook can run
 * the command again; when it differs it is an error naming what differs.
 */
import { lstat, open as openFile, rename, rm } from 'node:fs/promises';
import { dirname } from 'node:path';
import { BlkrepError } from '../api/errors.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { CREATE_NEW_FLAGS, tempPathBeside } from '../util/safe-file.js';
import { parseSize } from '../util/size.js';
import { combineBackingName, isFileSpec, openLayer, sameImage } from './chain.js';
import { layerInfo, type ImageInfo } from './info.js';

export type CreateFormat = 'raw' | 'qcow2';

export interface CreateOptions {
  format: CreateFormat;
  /** bytes; rounded up to a multiple of 512 as qemu-img does. Default: the backing file's size */
  size?: number;
  backing?: string;
  backingFormat?: string;
  clusterSize?: number;
  refcountBits?: number;
  /** replace an existing file whatever it holds */
  force?: boolean;
}

export interface CreateResult extends ImageInfo {
  /** false when IMAGE already existed with these parameters and was left alone */
  changed: boolean;
}

export const DEFAULT_CLUSTER_SIZE = 65536;
export const DEFAULT_REFCOUNT_BITS = 16;

/** The -o options create understands, with their parsers. */
export const CREATE_OPTIONS = ['cluster_size', 'refcount_bits'] as const;

function usage(message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_USAGE', message, { errno: 'EINVAL', details });
}

/** What the new image will be, with the backing file opened to check it and learn its size and format. */
async function plan(path: string, o: CreateOptions): Promise<{ size: number; backingFormat?: string }> {
  if (o.format === 'raw') {
    if (o.backing !== undefined) throw usage('a raw image cannot have a backing file (use -f qcow2)');
    if (o.clusterSize !== undefined || o.refcountBits !== undefined) throw usage('cluster_size and refcount_bits are qcow2 options; a raw image has neither');
    if (o.size === undefined) throw usage('the size of the new image is required (e.g. blkrep create -f raw disk.img 10G)');
  }
  if (o.backing === undefined) {
    if (o.backingFormat !== undefined) throw usage('-F (the backing format) needs -b (the backing file)');
    if (o.size === undefined) throw usage('the size of the new image is required when it has no backing file (e.g. blkrep create disk.qcow2 10G)');
    return { size: roundSize(o.size) };
  }
  if (o.backing === '') throw usage('the backing file name is empty');
  if (o.backingFormat !== undefined && o.backingFormat !== 'raw' && o.backingFormat !== 'qcow2') {
    throw usage(`backing format "${o.backingFormat}" is not supported (raw and qcow2 are)`);
  }
  const spec = combineBackingName(path, o.backing);
  if (isFileSpec(spec) && (await sameImage(spec, path))) throw usage(`"${o.backing}" is the image itself: an image cannot be its own backing file`);
  let layer;
  try {
    // as qemu-img create: the backing file is only asked its size and format, sharing everything
    layer = await openLayer(spec, { readOnly: true, forceShare: true, ...(o.backingFormat === undefined ? {} : { format: o.backingFormat }) });
  } catch (err) {
    const why = err instanceof Error ? err.message : String(err);
    throw new BlkrepError('ERR_BACKING', `cannot open the backing file "${o.backing}" (as ${spec}): ${why}`, {
      errno: err instanceof BlkrepError ? err.errno : 'EIO',
      cause: err,
      details: { backing: o.backing, spec },
    });
  }
  try {
    return { size: roundSize(o.size ?? layer.node.size), backingFormat: o.backingFormat ?? (layer.format === 'qcow2' ? 'qcow2' : 'raw') };
  } finally {
    await layer.node.close().catch(() => {});
  }
}

/** the largest size: the largest multiple of 512 below 2^53 */
export const MAX_IMAGE_SIZE = 2 ** 53 - 512;

function roundSize(size: number): number {
  if (!Number.isSafeInteger(size) || size < 0) throw usage(`invalid size ${size}: a whole number of bytes from 0 to ${MAX_IMAGE_SIZE}`, { size });
  // rounded up to a multiple of 512: 2^53 - 1 would become 2^53, past what a size can be
  if (size > MAX_IMAGE_SIZE) throw usage(`size ${size} is more than ${MAX_IMAGE_SIZE} bytes (2^53 - 512), the largest a size rounded up to a multiple of 512 can be`, { size, max: MAX_IMAGE_SIZE });
  return Math.ceil(size / 512) * 512;
}

/** How an existing image differs from what was asked for (empty: it is the same). */
function differences(have: ImageInfo, want: { format: string; size: number; clusterSize?: number; refcountBits?: number; backing?: string; backingFormat?: string }): string[] {
  const out: string[] = [];
  const cmp = (what: string, a: unknown, b: unknown): void => {
    if (a !== b) out.push(`${what} is ${a === undefined ? 'none' : JSON.stringify(a)}, not ${b === undefined ? 'none' : JSON.stringify(b)}`);
  };
  cmp('format', have.format, want.format);
  if (out.length > 0) return out;
  cmp('virtual size', have['virtual-size'], want.size);
  if (want.format === 'qcow2') {
    cmp('cluster size', have['cluster-size'], want.clusterSize);
    cmp('refcount width', have['format-specific']?.data['refcount-bits'], want.refcountBits);
    cmp('backing file', have['backing-filename'], want.backing);
    if (want.backing !== undefined) cmp('backing format', have['backing-filename-format'], want.backingFormat);
  }
  return out;
}

export async function createImage(path: string, o: CreateOptions): Promise<CreateResult> {
  if (!isFileSpec(path) || path.startsWith('raw:')) throw usage(`"${path}" is not a file name: create makes files (NBD exports and memory images are made by their servers)`);
  const { size, backingFormat } = await plan(path, o);
  const want = {
    format: o.format,
    size,
    ...(o.format === 'qcow2' ? { clusterSize: o.clusterSize ?? DEFAULT_CLUSTER_SIZE, refcountBits: o.refcountBits ?? DEFAULT_REFCOUNT_BITS } : {}),
    ...(o.backing === undefined ? {} : { backing: o.backing, backingFormat }),
  };

  const existing = await lstat(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw new BlkrepError('ERR_OPEN', `cannot create "${path}": ${err.message}`, { errno: 'EIO', cause: err, details: { path } });
  });
  if (existing && !existing.isFile()) {
    throw new BlkrepError('ERR_EXISTS', `"${path}" exists and is not a regular file: create only makes image files, and does not replace ${existing.isDirectory() ? 'a directory' : existing.isSymbolicLink() ? 'a symbolic link' : 'a device or special file'}`, {
      errno: 'EINVAL',
      details: { path },
    });
  }
  if (existing && !o.force) {
    let have: ImageInfo;
    try {
      have = await layerInfo(path);
    } catch (err) {
      const why = err instanceof Error ? err.message : String(err);
      throw new BlkrepError('ERR_EXISTS', `"${path}" exists and cannot be read as an image (${why}); --force replaces it`, { errno: 'EINVAL', cause: err, details: { path } });
    }
    const diff = differences(have, want);
    if (diff.length === 0) return { changed: false, ...have };
    throw new BlkrepError('ERR_EXISTS', `"${path}" exists and differs from the image asked for: ${diff.join('; ')}. --force replaces it (its contents are lost)`, {
      errno: 'EINVAL',
      details: { path, differences: diff },
    });
  }

  // Write the image under a temporary name in the same directory, then rename it into place.
  const tmp = tempPathBeside(path);
  try {
    if (o.format === 'raw') {
      const handle = await openFile(tmp, CREATE_NEW_FLAGS, 0o644);
      try {
        await handle.truncate(size);
        await handle.datasync();
      } finally {
        await handle.close();
      }
    } else {
      await Qcow2Node.create(tmp, {
        size,
        clusterSize: want.clusterSize,
        refcountBits: want.refcountBits,
        ...(o.backing === undefined ? {} : { backing: o.backing, backingFormat }),
      });
    }
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => {});
    if (err instanceof BlkrepError) throw err;
    const e = err as NodeJS.ErrnoException;
    throw new BlkrepError('ERR_CREATE', `cannot create "${path}": ${e.message}`, { errno: e.code === 'ENOSPC' ? 'ENOSPC' : e.code === 'EACCES' ? 'EPERM' : 'EIO', cause: err, details: { path } });
  }
  await syncDirectory(dirname(path));
  return { changed: true, ...(await layerInfo(path, { format: o.format })) };
}

/** Make the rename durable. */
async function syncDirectory(dir: string): Promise<void> {
  const handle = await openFile(dir, 'r').catch(() => undefined);
  if (!handle) return;
  try {
    await handle.sync();
  } catch {
    // some filesystems refuse fsync on directories; the rename is still done
  } finally {
    await handle.close();
  }
}

/** Parse -o KEY=VALUE[,KEY=VALUE…] (several -o add up), as qemu-img does. */
export function parseCreateOptions(specs: readonly string[]): { clusterSize?: number; refcountBits?: number } {
  const out: { clusterSize?: number; refcountBits?: number } = {};
  for (const spec of specs) {
    for (const item of spec.split(',')) {
      if (item.trim() === '') continue;
      const eq = item.indexOf('=');
      const key = (eq < 0 ? item : item.slice(0, eq)).trim();
      const value = eq < 0 ? '' : item.slice(eq + 1).trim();
      if (!(CREATE_OPTIONS as readonly string[]).includes(key)) {
        throw usage(`unknown -o option "${key}" (supported: ${CREATE_OPTIONS.join(', ')})`, { option: key });
      }
      if (value === '') throw usage(`-o ${key} needs a value (${key}=…)`, { option: key });
      if (key === 'cluster_size') {
        let v: number;
        try {
          v = parseSize(value, 'cluster_size');
        } catch (err) {
          throw usage(err instanceof Error ? err.message : String(err), { option: key });
        }
        if (!Number.isInteger(Math.log2(v)) || v < 512 || v > 2 * 1024 * 1024) throw usage(`cluster_size ${value} is not a power of two from 512 to 2M`, { option: key });
        out.clusterSize = v;
      } else {
        const v = Number(value);
        if (![1, 2, 4, 8, 16, 32, 64].includes(v)) throw usage(`refcount_bits ${value} is not one of 1, 2, 4, 8, 16, 32, 64`, { option: key });
        out.refcountBits = v;
      }
    }
  }
  return out;
}
