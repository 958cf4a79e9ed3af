/**
 * Make qcow2 images empty (B.8): afterwards every cluster is unallocated, so reads fall through to
 * the backing file; size, backing file name and format, and header extensions stay. Several images
 * are emptied in the order given (the secondary drops its buffers with
 * `make-empty active.qcow2 hidden.qcow2`).
 *
 * Every image is opened and checked before the first is touched, so a wrong argument changes
 * nothing. An image with nothing allocated is left alone (`changed: false`), so running the
 * command again changes nothing. Raw images are refused: a raw file has no allocation map and no
 * backing file, so there is nothing to fall through to — emptying one would mean destroying its data.
 */
import { stat } from 'node:fs/promises';
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { filePath, isFileSpec, openLayer, sameImage } from './chain.js';

export interface MadeEmpty {
  filename: string;
  format: 'qcow2';
  /** false when nothing was allocated (the image was left alone) */
  changed: boolean;
  /** the backing file reads now fall through to, or null (they read zeros) */
  backingFilename: string | null;
  /** disk space given back: actual size before minus after */
  freedBytes: number;
}

export interface MakeEmptyResult {
  changed: boolean;
  images: MadeEmpty[];
  seconds: number;
}

export interface MakeEmptyOptions {
  signal?: AbortSignal;
  /** after each image: how many are done */
  onProgress?(done: number, total: number): void;
  /**
   * Called once every image is open and checked, before any is changed, with the images that
   * hold data and have no backing file (emptying them destroys their data). Resolve false to
   * change nothing (the command then fails ERR_NOT_CONFIRMED).
   */
  confirmDestroy?(images: readonly string[]): Promise<boolean>;
}

async function diskUsage(spec: string): Promise<number> {
  if (!isFileSpec(spec)) return 0;
  const st = await stat(filePath(spec)).catch(() => undefined);
  return st ? st.blocks * 512 : 0;
}

/**
 * Whether this layer allocates anything (an extent at depth 1). Stops at the first one, looking in
 * growing windows: on a full image it answers at once; only an empty image is scanned whole.
 */
async function allocatesAnything(node: BlockNode): Promise<boolean> {
  let window = 64 * 1024 * 1024;
  for (let pos = 0; pos < node.size; ) {
    const end = Math.min(node.size, pos + window);
    while (pos < end) {
      const runs = await node.extents!(pos, end - pos);
      if (runs.length === 0) return false;
      for (const r of runs) {
        if (r.depth === 1) return true;
        pos += Math.min(r.length, end - pos);
        if (pos >= end) break;
      }
    }
    window *= 2;
  }
  return false;
}

async function openForEmpty(spec: string): Promise<Qcow2Node> {
  if (!isFileSpec(spec)) {
    throw new BlkrepError('ERR_UNSUPPORTED_FORMAT', `${spec} is ${spec.startsWith('memory:') ? 'a memory image' : 'an NBD export'}, not a qcow2 file: make-empty works on qcow2 files (run it where the image file is)`, {
      errno: 'ENOTSUP',
      details: { image: spec },
    });
  }
  const { node, format } = await openLayer(spec, { readOnly: false });
  if (node instanceof Qcow2Node) return node;
  await node.close().catch(() => {});
  if (format === 'raw' && isFileSpec(spec)) {
    throw new BlkrepError(
      'ERR_UNSUPPORTED_FORMAT',
      `${spec} is a raw image: make-empty drops the clusters a qcow2 overlay allocates so reads fall through to its backing file, and a raw image has no allocation map and no backing file to fall through to (emptying it would only destroy its data; blkrep create --force replaces it if that is what you want)`,
      { errno: 'ENOTSUP', details: { image: spec, format } },
    );
  }
  throw new BlkrepError('ERR_UNSUPPORTED_FORMAT', `${spec} is not a qcow2 image`, { errno: 'ENOTSUP', details: { image: spec, format } });
}

export async function makeEmpty(specs: readonly string[], o: MakeEmptyOptions = {}): Promise<MakeEmptyResult> {
  const started = Date.now();
  if (specs.length === 0) throw new BlkrepError('ERR_USAGE', 'no image given', { errno: 'EINVAL' });
  for (let i = 0; i < specs.length; i++) {
    for (let j = 0; j < i; j++) {
      if (await sameImage(specs[i]!, specs[j]!)) throw new BlkrepError('ERR_USAGE', `${specs[i]} is given twice`, { errno: 'EINVAL', details: { image: specs[i] } });
    }
  }
  const nodes: Qcow2Node[] = [];
  try {
    for (const spec of specs) nodes.push(await openForEmpty(spec));
    const destroyed: string[] = [];
    for (let i = 0; i < nodes.length; i++) {
      const info = await nodes[i]!.info();
      if (typeof info.backingFile !== 'string' && (await allocatesAnything(nodes[i]!))) destroyed.push(specs[i]!);
    }
    if (destroyed.length > 0 && o.confirmDestroy && !(await o.confirmDestroy(destroyed))) {
      throw new BlkrepError('ERR_NOT_CONFIRMED', `not emptied: ${destroyed.join(', ')} ${destroyed.length === 1 ? 'has' : 'have'} no backing file, so emptying would destroy the data (give --force to do it anyway)`, {
        errno: 'EPERM',
        details: { images: destroyed },
      });
    }
    const images: MadeEmpty[] = [];
    for (let i = 0; i < nodes.length; i++) {
      o.signal?.throwIfAborted();
      const node = nodes[i]!;
      const spec = specs[i]!;
      const info = await node.info();
      const allocated = await allocatesAnything(node);
      const before = await diskUsage(spec);
      if (allocated) await node.makeEmpty(o.signal ? { signal: o.signal } : undefined);
      await node.close();
      images.push({
        filename: spec,
        format: 'qcow2',
        changed: allocated,
        backingFilename: typeof info.backingFile === 'string' ? info.backingFile : null,
        freedBytes: Math.max(0, before - (await diskUsage(spec))),
      });
      o.onProgress?.(i + 1, nodes.length);
    }
    return { changed: images.some((m) => m.changed), images, seconds: (Date.now() - started) / 1000 };
  } finally {
    for (const n of nodes) await n.close().catch(() => {});
  }
}
