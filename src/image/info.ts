/**
 * What an image is, shaped like `qemu-img info --output=json` where the meaning matches:
 * virtual-size, filename, format, actual-size (bytes allocated in the file), cluster-size, the
 * backing file (as stored, and combined with the image's directory), dirty-flag, and for qcow2
 * format-specific.data {compat, compression-type, lazy-refcounts, refcount-bits, corrupt,
 * extended-l2}. NBD exports are "raw", as qemu-img reports them, with no actual-size.
 *
 * Each layer is opened alone (no backing), so info works when a backing file is missing.
 */
import { stat } from 'node:fs/promises';
import { BlkrepError } from '../api/errors.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { combineBackingName, filePath, isFileSpec, openLayer } from './chain.js';

export interface Qcow2FormatSpecific {
  type: 'qcow2';
  data: {
    compat: string;
    'compression-type': string;
    'lazy-refcounts': boolean;
    'refcount-bits': number;
    corrupt: boolean;
    'extended-l2': boolean;
    bitmaps?: Array<{ name: string; granularity: number; flags: string[] }>;
  };
}

export interface ImageInfo {
  'virtual-size': number;
  filename: string;
  format: string;
  /** bytes the file occupies on disk (st_blocks × 512); absent for NBD exports and memory */
  'actual-size'?: number;
  'cluster-size'?: number;
  /** the backing file name as stored in the image */
  'backing-filename'?: string;
  /** the same, relative to the image's directory (qemu's path_combine) */
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag'?: boolean;
  'format-specific'?: Qcow2FormatSpecific;
  snapshots?: Array<{ id: string; name: string; 'vm-state-size': number; 'date-sec': number }>;
  /** blkrep's addition: every layer below this one, top down (only without --backing-chain) */
  'backing-chain'?: Array<{ filename: string; format: string }>;
}

/** Bytes a file occupies on disk, or undefined when it is not a file (URIs, memory). */
async function actualSize(spec: string): Promise<number | undefined> {
  if (!isFileSpec(spec)) return undefined;
  try {
    const st = await stat(filePath(spec));
    return st.blocks * 512;
  } catch {
    return undefined;
  }
}

const BITMAP_FLAGS: Array<[number, string]> = [
  [1, 'in-use'],
  [2, 'auto'],
];

/** The info of one image, opened alone. */
export async function layerInfo(spec: string, options: { format?: string; forceShare?: boolean } = {}): Promise<ImageInfo> {
  const { node, format } = await openLayer(spec, {
    readOnly: true,
    ...(options.format === undefined ? {} : { format: options.format }),
    ...(options.forceShare ? { forceShare: true } : {}),
  });
  try {
    const out: ImageInfo = { 'virtual-size': node.size, filename: spec, format };
    const actual = await actualSize(spec);
    if (actual !== undefined) out['actual-size'] = actual;
    if (node instanceof Qcow2Node) {
      const i = await node.info();
      out['cluster-size'] = Number(i.clusterSize);
      if (typeof i.backingFile === 'string') {
        out['backing-filename'] = i.backingFile;
        out['full-backing-filename'] = combineBackingName(spec, i.backingFile);
        if (typeof i.backingFormat === 'string') out['backing-filename-format'] = i.backingFormat;
      }
      out['dirty-flag'] = i.dirty === true;
      out['format-specific'] = {
        type: 'qcow2',
        data: {
          compat: String(i.compat),
          'compression-type': String(i.compressionType ?? 'zlib'),
          'lazy-refcounts': i.lazyRefcounts === true,
          'refcount-bits': Number(i.refcountBits),
          corrupt: i.corrupt === true,
          'extended-l2': i.extendedL2 === true,
        },
      };
      if (Array.isArray(i.bitmaps) && i.bitmaps.length > 0) {
        out['format-specific'].data.bitmaps = (i.bitmaps as Array<{ name: string; granularity: number; flags: unknown }>).map((b) => ({
          name: b.name,
          granularity: b.granularity,
          flags: typeof b.flags === 'number' ? BITMAP_FLAGS.filter(([bit]) => ((b.flags as number) & bit) !== 0).map(([, n]) => n) : Array.isArray(b.flags) ? b.flags.map(String) : [],
        }));
      }
      if (Array.isArray(i.snapshots) && i.snapshots.length > 0) {
        out.snapshots = (i.snapshots as Array<{ id: string; name: string; vmStateSize: number; dateSeconds: number }>).map((s) => ({
          id: s.id,
          name: s.name,
          'vm-state-size': s.vmStateSize,
          'date-sec': s.dateSeconds,
        }));
      }
    } else if (format === 'raw' && isFileSpec(spec)) {
      out['dirty-flag'] = false;
    }
    return out;
  } finally {
    await node.close().catch(() => {});
  }
}

export interface InfoOptions {
  format?: string;
  /** every layer (an array, top first), as qemu-img info --backing-chain */
  backingChain?: boolean;
  maxDepth?: number;
  /** open every layer sharing every permission (qemu-img info -U): works on images others hold for writing */
  forceShare?: boolean;
  /** a backing file that cannot be opened, without --backing-chain */
  onWarning?(message: string): void;
}

/** The info of each layer, top first, as far as the walk gets; `error` says why it stopped early. */
async function walkChain(spec: string, options: InfoOptions): Promise<{ layers: ImageInfo[]; error?: BlkrepError }> {
  const maxDepth = options.maxDepth ?? 64;
  const share = options.forceShare ? { forceShare: true } : {};
  const layers: ImageInfo[] = [await layerInfo(spec, { ...share, ...(options.format === undefined ? {} : { format: options.format }) })];
  for (;;) {
    const last = layers[layers.length - 1]!;
    const next = last['full-backing-filename'];
    if (next === undefined) return { layers };
    if (layers.length >= maxDepth) {
      const error = new BlkrepError('ERR_BAD_IMAGE', `invalid image "${spec}": the backing chain is deeper than ${maxDepth} images (does it loop?)`, { errno: 'EINVAL', details: { spec } });
      return { layers, error };
    }
    try {
      const format = last['backing-filename-format'];
      layers.push(await layerInfo(next, { ...share, ...(format === undefined ? {} : { format }) }));
    } catch (err) {
      const why = err instanceof Error ? err.message : String(err);
      const error = new BlkrepError('ERR_BACKING', `cannot open the backing file "${last['backing-filename']}" of ${last.filename}: ${why}`, {
        errno: err instanceof BlkrepError ? err.errno : 'EIO',
        cause: err,
        details: { path: last.filename, backing: last['backing-filename'] },
      });
      return { layers, error };
    }
  }
}

/** The info of every layer, top first (qemu-img info --backing-chain); a layer that cannot be opened is an error. */
export async function chainInfo(spec: string, options: InfoOptions = {}): Promise<ImageInfo[]> {
  const { layers, error } = await walkChain(spec, options);
  if (error) throw error;
  return layers;
}

/**
 * `blkrep info`: one object (with blkrep's backing-chain summary) or, with backingChain, one per
 * layer. Without backingChain a backing file that cannot be opened is only a warning (qemu-img
 * info does not open backing files either); the summary then ends at the last layer that opened.
 */
export async function imageInfo(spec: string, options: InfoOptions = {}): Promise<ImageInfo | ImageInfo[]> {
  if (options.backingChain) return chainInfo(spec, options);
  const { layers, error } = await walkChain(spec, options);
  const top = layers[0]!;
  if (error) options.onWarning?.(error.message);
  if (layers.length === 1 && !error) return top;
  return { ...top, 'backing-chain': layers.slice(1).map((l) => ({ filename: l.filename, format: l.format })) };
}
