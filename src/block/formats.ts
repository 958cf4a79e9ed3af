/**
 * The table of image formats and openImage, which opens an image spec through it.
 *
 * A format driver registers itself here when it loads (qcow2/node.ts) and opens the images it
 * depends on (a qcow2 image's backing file) with this module's openImage. open.ts, the module
 * everyone else imports, adds lazy loaders of the built-in drivers, so a command that opens only
 * raw files and NBD exports never compiles the qcow2 driver. The graph has no cycle:
 * open.ts → formats.ts ← qcow2/node.ts, and open.ts → qcow2/node.ts (lazily), never back.
 *
 *   memory:SIZE     a sparse in-memory disk (SIZE as parseSize: 1G, 64M, 4096)
 *   raw:PATH        PATH as a raw file or block device, no format probe
 *   nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH
 *                   an NBD export (src/block/nbd.ts; nbds:// over TLS through the tls upgrader)
 *   PATH            a file or block device; its format is probed (the table's probes, else raw)
 *
 * A qcow2 image opens its backing chain through openImage (read-only, the format its header
 * names, at most MAX_CHAIN_DEPTH deep). Files are locked as QEMU locks them
 * (src/block/image-lock.ts): an image another process holds in a conflicting way fails
 * ERR_IMAGE_LOCKED. The format is probed without a lock, then the image opened with the lock its
 * format needs.
 */
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { isNbdUri } from '../nbd/uri.js';
import { parseSize } from '../util/size.js';
import { MemoryNode } from './memory.js';
// the NBD client loads only for the images that need it
import type { NbdNodeOptions } from './nbd.js';
import type { SparseOps } from './native.js';
import { lockPerms, type LockPerms } from './image-lock.js';
import { RawNode } from './raw.js';

/** bytes read from the start of an image for probing */
export const PROBE_BYTES = 512;

/** The formats openImage knows. */
export type ImageFormat = 'raw' | 'qcow2';

/** What a format driver gets to open one image of its format. */
export interface FormatOpenOptions {
  readOnly: boolean;
  /** the native addon for host files; undefined = loadNative(), null = the portable fallback */
  native?: SparseOps | null;
  /** the image lock to take on the file (src/block/image-lock.ts) */
  lock: LockPerms;
  /** opens an image this one depends on (a backing file) read-only, one level deeper */
  openBacking(spec: string, format: string | undefined): Promise<BlockNode>;
}

export interface ImageFormatDriver {
  readonly name: ImageFormat;
  /** true when an image's first bytes (at most PROBE_BYTES, fewer for a small image) are this format */
  probe(header: Buffer): boolean;
  /** opens PATH as this format (loads the driver on first use) */
  open(path: string, options: FormatOpenOptions): Promise<BlockNode>;
}

const formats = new Map<ImageFormat, ImageFormatDriver>();

/** Add (or replace) a format. Probing asks the formats in the order they were first registered. */
export function registerImageFormat(driver: ImageFormatDriver): void {
  formats.set(driver.name, driver);
}

export function imageFormat(name: ImageFormat): ImageFormatDriver | undefined {
  return formats.get(name);
}

/** The format of an image from its first bytes: the first registered format that claims them, else raw. */
export function probeFormat(header: Buffer): ImageFormat {
  for (const f of formats.values()) if (f.name !== 'raw' && f.probe(header)) return f.name;
  return 'raw';
}

export interface OpenImageOptions {
  readOnly?: boolean;
  /** the native addon for raw images; undefined = loadNative(), null = the portable fallback */
  native?: SparseOps | null;
  /** the image's format; probed from its first bytes when not given */
  format?: ImageFormat;
  /** for nbd:// and nbd+unix:// images: transports, connections, holdMs … (default: the built-in tcp and unix transports, 1 connection) */
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

function badImage(spec: string, why: string, cause?: unknown): BlkrepError {
  return new BlkrepError('ERR_BAD_IMAGE', `invalid image "${spec}": ${why}`, {
    errno: 'EINVAL',
    ...(cause === undefined ? {} : { cause }),
    details: { spec },
  });
}

registerImageFormat({ name: 'raw', probe: () => true, open: (path, o) => RawNode.open(path, o) });

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

  if (options.format !== undefined) return openFormat(options.format, spec, options);
  // probed without a lock: the lock depends on the format (a qcow2 image does not share writes)
  const probe = await RawNode.open(spec, { readOnly: true, ...native, lock: null });
  let format: ImageFormat;
  try {
    format = probeFormat(await probe.read(0, Math.min(PROBE_BYTES, probe.size)));
  } finally {
    await probe.close().catch(() => {});
  }
  if (format === 'raw') return RawNode.open(spec, rawOptions);
  return openFormat(format, spec, options);
}

/** How the lock of an image is chosen (src/block/image-lock.ts lockPerms), less its format. */
function lockRole(options: OpenImageOptions): { readOnly: boolean; forceShare: boolean; backing: boolean } {
  return { readOnly: options.readOnly ?? false, forceShare: options.forceShare === true, backing: (options.chainDepth ?? 0) > 0 };
}

/** An image of a format from the table, its backing chain opened read-only through openImage. */
async function openFormat(format: ImageFormat, path: string, options: OpenImageOptions): Promise<BlockNode> {
  const depth = options.chainDepth ?? 0;
  if (depth >= MAX_CHAIN_DEPTH) throw badImage(path, `the backing chain is deeper than ${MAX_CHAIN_DEPTH} images (does it loop?)`);
  const driver = formats.get(format);
  if (driver === undefined) throw badImage(path, `format "${format}" is not supported`);
  return driver.open(path, {
    readOnly: options.readOnly ?? false,
    lock: lockPerms({ format: format === 'qcow2' ? 'qcow2' : 'raw', ...lockRole(options) }),
    ...(options.native === undefined ? {} : { native: options.native }),
    openBacking: async (spec, backingFormat) => {
      if (backingFormat !== undefined && formats.get(backingFormat as ImageFormat) === undefined) {
        throw badImage(spec, `backing format "${backingFormat}" is not supported (raw and qcow2 are)`);
      }
      return openImage(spec, {
        readOnly: true,
        chainDepth: depth + 1,
        ...(options.forceShare || options.backingForceShare ? { forceShare: true } : {}),
        ...(options.nbd === undefined ? {} : { nbd: options.nbd }),
        ...(backingFormat === undefined ? {} : { format: backingFormat as ImageFormat }),
        ...(options.native === undefined ? {} : { native: options.native }),
      });
    },
  });
}
