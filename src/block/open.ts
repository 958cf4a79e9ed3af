/**
 * Turn an image spec from the command line into a block node.
 *
 *   memory:SIZE     a sparse in-memory disk (SIZE as parseSize: 1G, 64M, 4096)
 *   raw:PATH        PATH as a raw file or block device, no format probe
 *   nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH
 *                   an NBD export (src/block/nbd.ts; nbds:// is refused: no TLS yet)
 *   PATH            a file or block device; its format is probed (qcow2 by its magic, else raw)
 *
 * A qcow2 image opens its backing chain through openImage (read-only, the format its header
 * names, at most MAX_CHAIN_DEPTH deep). Files are locked as QEMU locks them (src/block/image-lock.ts):
 * an image another process holds in a conflicting way fails ERR_IMAGE_LOCKED. Adding a format: a case in probeFormat() recognising its
 * header, and a case in openProbed() opening it over (or instead of) the raw node.
 */
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { parseSize } from '../util/size.js';
import { MemoryNode } from './memory.js';
import { isNbdUri } from '../nbd/uri.js';
// the NBD client and the qcow2 driver load only for the images that need them (a command opening
// raw files and an NBD export does not compile the qcow2 driver at its start)
import type { NbdNodeOptions } from './nbd.js';
import type { SparseOps } from './native.js';
import { lockPerms } from './image-lock.js';
import { RawNode } from './raw.js';

export interface OpenImageOptions {
  readOnly?: boolean;
  /** the native addon for raw images; undefined = loadNative(), null = the portable fallback */
  native?: SparseOps | null;
  /** the image's format; probed from its first bytes when not given */
  format?: ImageFormat;
  /** for nbd:// and nbd+unix:// images: transports, connections, holdMs … (default: node:net, 1 connection) */
  nbd?: Omit<NbdNodeOptions, 'readOnly'>;
  /** how deep in a backing chain this image is (set when opening backing files) */
  chainDepth?: number;
  /**
   * read-only opens only: share every permission with other users of the file (qemu-img -U), so
   * an image QEMU or blkrep holds for writing opens (and may read inconsistent data). Inherited
   * by the backing chain.
   */
  forceShare?: boolean;
  /**
   * open the backing chain sharing every permission (the image itself is locked as usual): for a
   * job's target whose backing file is an image this process serves and writes (a live backup
   * into a COLO hidden disk over the export's own image, where QEMU would reference the export's node)
   */
  backingForceShare?: boolean;
}

/** Backing chains deeper than this are refused (they loop, or are made to exhaust us). */
export const MAX_CHAIN_DEPTH = 64;

export type ImageFormat = 'raw' | 'qcow2';

/** bytes read from the start of an image for probing */
export const PROBE_BYTES = 512;

function badImage(spec: string, why: string, cause?: unknown): BlkrepError {
  return new BlkrepError('ERR_BAD_IMAGE', `invalid image "${spec}": ${why}`, {
    errno: 'EINVAL',
    ...(cause === undefined ? {} : { cause }),
    details: { spec },
  });
}

/** The format of an image from its first bytes (fewer when the image is smaller). */
export function probeFormat(header: Buffer): ImageFormat {
  // qcow2: "QFI\xfb" then a big-endian version ≥ 2 (as QEMU probes: the qcow2 driver then
  // refuses versions it does not know, rather than serving the header as raw data)
  if (header.length >= 8 && header.readUInt32BE(0) === 0x514649fb) {
    const version = header.readUInt32BE(4);
    if (version >= 2) return 'qcow2';
  }
  return 'raw';
}

export async function openImage(spec: string, options: OpenImageOptions = {}): Promise<BlockNode> {
  const readOnly = options.readOnly ?? false;
  if (spec.trim() === '') throw badImage(spec, 'empty image name: expected a path or memory:SIZE');
  if (options.forceShare && !readOnly) {
    throw new BlkrepError('ERR_USAGE', `cannot open "${spec}" read-write with --force-share: sharing every permission is for read-only inspection (as qemu-img -U)`, {
      errno: 'EINVAL',
      details: { spec },
    });
  }

  if (spec.startsWith('memory:')) {
    let size: number;
    try {
      size = parseSize(spec.slice('memory:'.length), 'memory image size');
    } catch (err) {
      throw badImage(spec, err instanceof Error ? err.message : String(err), err);
    }
    return new MemoryNode(size, { readOnly });
  }

  if (isNbdUri(spec)) {
    const { NbdNode } = await import('./nbd.js');
    return NbdNode.open(spec, { ...options.nbd, readOnly });
  }

  const native = options.native === undefined ? {} : { native: options.native };
  const rawOptions = { readOnly, ...native, lock: lockPerms({ format: 'raw', ...lockRole(options) }) };
  if (spec.startsWith('raw:') || options.format === 'raw') {
    const path = spec.startsWith('raw:') ? spec.slice('raw:'.length) : spec;
    if (path === '') throw badImage(spec, 'raw: needs a path');
    return RawNode.open(path, rawOptions);
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(spec)) {
    throw badImage(spec, 'URIs are not supported as images (expected a path, raw:PATH or memory:SIZE)');
  }

  if (options.format === 'qcow2') return openQcow2(spec, options);
  // probed without a lock: the lock depends on the format (a qcow2 image does not share writes)
  const probe = await RawNode.open(spec, { readOnly: true, ...native, lock: null });
  let format: ImageFormat;
  try {
    format = probeFormat(await probe.read(0, Math.min(PROBE_BYTES, probe.size)));
  } finally {
    await probe.close().catch(() => {});
  }
  switch (format) {
    case 'raw':
      return RawNode.open(spec, rawOptions);
    case 'qcow2':
      return openQcow2(spec, options);
  }
}

/** How the lock of an image is chosen (src/block/image-lock.ts lockPerms), less its format. */
function lockRole(options: OpenImageOptions): { readOnly: boolean; forceShare: boolean; backing: boolean } {
  return { readOnly: options.readOnly ?? false, forceShare: options.forceShare === true, backing: (options.chainDepth ?? 0) > 0 };
}

/** A qcow2 image with its backing chain, each backing opened read-only through openImage. */
async function openQcow2(path: string, options: OpenImageOptions): Promise<BlockNode> {
  const depth = options.chainDepth ?? 0;
  if (depth >= MAX_CHAIN_DEPTH) throw badImage(path, `the backing chain is deeper than ${MAX_CHAIN_DEPTH} images (does it loop?)`);
  const { Qcow2Node } = await import('./qcow2/node.js');
  return Qcow2Node.open(path, {
    readOnly: options.readOnly ?? false,
    lock: lockPerms({ format: 'qcow2', ...lockRole(options) }),
    ...(options.native === undefined ? {} : { native: options.native }),
    openBacking: async (spec, format) => {
      if (format !== undefined && format !== 'raw' && format !== 'qcow2') {
        throw badImage(spec, `backing format "${format}" is not supported (raw and qcow2 are)`);
      }
      return openImage(spec, {
        readOnly: true,
        chainDepth: depth + 1,
        ...(options.forceShare || options.backingForceShare ? { forceShare: true } : {}),
        ...(options.nbd === undefined ? {} : { nbd: options.nbd }),
        ...(format === undefined ? {} : { format }),
        ...(options.native === undefined ? {} : { native: options.native }),
      });
    },
  });
}
