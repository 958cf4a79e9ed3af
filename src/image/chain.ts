/**
 * Backing chains as the image commands see them: opening one layer on its own (no backing), the
 * names of the layers as qemu-img spells them, and the depth qemu-img gives a run that no layer
 * allocates.
 */
import { open as openFile, realpath } from 'node:fs/promises';
import { isAbsolute, resolve } from 'node:path';
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { lockPerms } from '../block/image-lock.js';
import { openImage, probeFormat, PROBE_BYTES, type ImageFormat } from '../block/open.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { isNbdUri } from '../nbd/uri.js';

/** The node an image reads through where it has nothing (a qcow2 image's backing), if any. */
export function backingOf(node: BlockNode): BlockNode | undefined {
  return node instanceof Qcow2Node ? node.backing : undefined;
}

/** The sizes of an open chain, top first. */
export function chainSizes(node: BlockNode): number[] {
  const sizes: number[] = [];
  for (let n: BlockNode | undefined = node; n; n = backingOf(n)) sizes.push(n.size);
  return sizes;
}

/**
 * The depth qemu-img map reports at `offset` for a run that no layer allocates: it walks down
 * while the offset lies inside the next layer, so the run sits at the deepest layer reached
 * (0 when the top has no backing or the backing ends before `offset`).
 */
export function unallocatedDepth(sizes: readonly number[], offset: number): number {
  let d = 0;
  while (d + 1 < sizes.length && offset < sizes[d + 1]!) d++;
  return d;
}

/** The first layer size strictly inside (from, to), where unallocatedDepth may change; else `to`. */
export function nextSizeBoundary(sizes: readonly number[], from: number, to: number): number {
  let next = to;
  for (const s of sizes) if (s > from && s < next) next = s;
  return next;
}

/** qemu's path_combine: a backing name relative to the directory of the image that names it. */
export function combineBackingName(imageName: string, backing: string): string {
  if (isAbsolute(backing) || /^[a-z][a-z0-9+.-]*:/i.test(backing)) return backing;
  const slash = imageName.lastIndexOf('/');
  return slash < 0 ? backing : `${imageName.slice(0, slash + 1)}${backing}`;
}

/** True for specs that are not files (NBD URIs, memory:SIZE). */
export function isFileSpec(spec: string): boolean {
  return !isNbdUri(spec) && !spec.startsWith('memory:') && !/^[a-z][a-z0-9+.-]*:\/\//i.test(spec);
}

/** The path of a file spec (raw:PATH → PATH). */
export function filePath(spec: string): string {
  return spec.startsWith('raw:') ? spec.slice('raw:'.length) : spec;
}

/** Whether two specs name the same image: the same file (after symlinks), or the same URI. */
export async function sameImage(a: string, b: string): Promise<boolean> {
  if (!isFileSpec(a) || !isFileSpec(b)) return a === b;
  const real = async (p: string): Promise<string> => realpath(filePath(p)).catch(() => resolve(filePath(p)));
  return (await real(a)) === (await real(b));
}

/** The format of a file from its first bytes; errors name the path. */
export async function probeFile(path: string): Promise<ImageFormat> {
  let handle;
  try {
    handle = await openFile(path, 'r');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new BlkrepError('ERR_OPEN', `cannot open "${path}": ${e.code === 'ENOENT' ? 'no such file' : e.message}`, {
      errno: e.code === 'EACCES' || e.code === 'EPERM' ? 'EPERM' : 'EIO',
      cause: err,
      details: { path },
    });
  }
  try {
    const buf = Buffer.alloc(PROBE_BYTES);
    const { bytesRead } = await handle.read(buf, 0, PROBE_BYTES, 0);
    return probeFormat(buf.subarray(0, bytesRead));
  } finally {
    await handle.close();
  }
}

export interface OpenedLayer {
  node: BlockNode;
  /** 'qcow2', 'raw' (files and NBD exports, as qemu-img names them), 'memory' */
  format: string;
}

/**
 * One image without its backing chain (a qcow2 image's unallocated clusters then read as zeros):
 * what info and make-empty need, and it works when the backing file is missing.
 */
export async function openLayer(spec: string, options: { readOnly: boolean; format?: string; forceShare?: boolean }): Promise<OpenedLayer> {
  const forceShare = options.forceShare === true;
  if (!isFileSpec(spec) || spec.startsWith('raw:')) {
    const node = await openImage(spec, { readOnly: options.readOnly, forceShare });
    return { node, format: node.driver === 'memory' ? 'memory' : 'raw' };
  }
  if (options.format !== undefined && options.format !== 'raw' && options.format !== 'qcow2') {
    throw new BlkrepError('ERR_BAD_IMAGE', `image "${spec}": format "${options.format}" is not supported (raw and qcow2 are)`, { errno: 'EINVAL', details: { spec } });
  }
  const format = (options.format as ImageFormat | undefined) ?? (await probeFile(spec));
  if (forceShare && !options.readOnly) {
    throw new BlkrepError('ERR_USAGE', `cannot open "${spec}" read-write with --force-share: sharing every permission is for read-only inspection (as qemu-img -U)`, { errno: 'EINVAL', details: { spec } });
  }
  if (format === 'qcow2') {
    return { node: await Qcow2Node.open(spec, { readOnly: options.readOnly, backing: null, lock: lockPerms({ format: 'qcow2', readOnly: options.readOnly, forceShare }) }), format };
  }
  return { node: await openImage(spec, { readOnly: options.readOnly, format: 'raw', forceShare }), format };
}

/** One layer of a chain, found by reading the headers from the top down. */
export interface ChainLayer {
  /** as qemu-img names it: the top as given, each backing combined with its parent's name */
  filename: string;
  format: string;
  size: number;
  /** the backing name as stored in the header, and its format, if any */
  backingFilename?: string;
  backingFormat?: string;
}

/**
 * The layers of a chain, top first, read header by header (each layer opened alone and closed).
 * `stop` ends the walk early (after the layer it is true for).
 */
export async function describeChain(spec: string, options: { format?: string; maxDepth?: number; stop?: (layer: ChainLayer, index: number) => Promise<boolean> | boolean } = {}): Promise<ChainLayer[]> {
  const maxDepth = options.maxDepth ?? 64;
  const layers: ChainLayer[] = [];
  let name: string | undefined = spec;
  let format = options.format;
  while (name !== undefined) {
    if (layers.length >= maxDepth) {
      throw new BlkrepError('ERR_BAD_IMAGE', `invalid image "${spec}": the backing chain is deeper than ${maxDepth} images (does it loop?)`, { errno: 'EINVAL', details: { spec } });
    }
    const { node, format: f } = await openLayer(name, { readOnly: true, ...(format === undefined ? {} : { format }) });
    let layer: ChainLayer;
    try {
      const info = node instanceof Qcow2Node ? await node.info() : {};
      layer = { filename: name, format: f, size: node.size };
      if (typeof info.backingFile === 'string') layer.backingFilename = info.backingFile;
      if (typeof info.backingFormat === 'string') layer.backingFormat = info.backingFormat;
    } finally {
      await node.close().catch(() => {});
    }
    layers.push(layer);
    if (options.stop && (await options.stop(layer, layers.length - 1))) break;
    name = layer.backingFilename === undefined ? undefined : combineBackingName(name, layer.backingFilename);
    format = layer.backingFormat;
  }
  return layers;
}
