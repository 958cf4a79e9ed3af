/**
 * Bitmap names, and where an image's bitmap files live.
 *
 * An image that is a file keeps its bitmaps beside it, one file each: `IMAGE.NAME.bitmap`
 * (man/blkrep-bitmap.5). serve-nbd loads every such file it finds, `bitmap add IMAGE --name
 * NAME` creates one, and `bitmap … IMAGE --name NAME` works on it. Images that are not files
 * (memory:SIZE, NBD URIs) and block devices (their directory, /dev, does not survive a reboot)
 * have no default place: their bitmaps live in memory unless a FILE is named.
 */
import { readdir, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { BlkrepError } from '../api/errors.js';
import { filePath, isFileSpec } from '../image/chain.js';

/** the suffix of a bitmap file beside its image */
export const BITMAP_SUFFIX = '.bitmap';
/** longest name, in UTF-8 bytes (as qcow2's bitmap directory allows) */
export const MAX_NAME_BYTES = 1023;

/** Why `name` cannot be a bitmap name, or undefined when it can. */
export function nameProblem(name: string): string | undefined {
  if (name.length === 0) return 'a bitmap name cannot be empty';
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) return `bitmap name of ${Buffer.byteLength(name)} bytes is longer than ${MAX_NAME_BYTES}`;
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f/=]/.test(name)) return `bitmap name "${name}" contains "/", "=" or a control character`;
  if (name.startsWith('.')) return `bitmap name "${name}" starts with "."`;
  return undefined;
}

export function checkName(name: string): void {
  const problem = nameProblem(name);
  if (problem) throw new BlkrepError('ERR_BITMAP_NAME', problem, { errno: 'EINVAL', details: { name } });
}

/** The default bitmap file of `NAME` for an image that is a file: `IMAGE.NAME.bitmap`. */
export function sidecarPath(imagePath: string, name: string): string {
  return `${imagePath}.${name}${BITMAP_SUFFIX}`;
}

/**
 * Where an image's bitmaps go by default: its path when it is a regular file (or a file that
 * does not exist yet), undefined when it is memory, an NBD export or a block device.
 */
export async function sidecarBase(imageSpec: string): Promise<{ path: string } | { path: undefined; why: string }> {
  if (!isFileSpec(imageSpec)) {
    const what = imageSpec.startsWith('memory:') ? 'an in-memory image' : 'an NBD export';
    return { path: undefined, why: `${what} has no directory to keep bitmap files in` };
  }
  const path = filePath(imageSpec);
  try {
    const st = await stat(path);
    if (!st.isFile()) return { path: undefined, why: `"${path}" is not a regular file (a bitmap file beside a block device would not survive a reboot)` };
  } catch {
    // opening the image reports it
  }
  return { path };
}

export interface SidecarFile {
  name: string;
  path: string;
}

/** The bitmap files beside an image (`IMAGE.NAME.bitmap`, regular files), sorted by name. */
export async function findSidecars(imagePath: string): Promise<SidecarFile[]> {
  const dir = dirname(imagePath);
  const prefix = `${basename(imagePath)}.`;
  let entries: string[];
  try {
    entries = await readdir(dir);
  } catch {
    return [];
  }
  const out: SidecarFile[] = [];
  for (const entry of entries) {
    if (!entry.startsWith(prefix) || !entry.endsWith(BITMAP_SUFFIX)) continue;
    const name = entry.slice(prefix.length, entry.length - BITMAP_SUFFIX.length);
    if (nameProblem(name)) continue;
    const path = join(dir, entry);
    try {
      if (!(await stat(path)).isFile()) continue;
    } catch {
      continue;
    }
    out.push({ name, path });
  }
  return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/**
 * The name a bitmap file goes by: NAME of `IMAGE.NAME.bitmap` when a file IMAGE is beside it,
 * else the file name without `.bitmap`. A checkpoint file (`….bitmap.ckpt-N`) goes by the name
 * of its bitmap.
 */
export async function nameOfFile(path: string): Promise<string> {
  let file = basename(path).replace(/\.ckpt-\d+$/, '');
  if (file.endsWith(BITMAP_SUFFIX) && file.length > BITMAP_SUFFIX.length) file = file.slice(0, -BITMAP_SUFFIX.length);
  const dir = dirname(path);
  for (let dot = file.indexOf('.'); dot > 0 && dot < file.length - 1; dot = file.indexOf('.', dot + 1)) {
    try {
      if ((await stat(join(dir, file.slice(0, dot)))).isFile()) return file.slice(dot + 1);
    } catch {
      // not the image
    }
  }
  return file;
}
