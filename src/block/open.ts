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
 * names, at most MAX_CHAIN_DEPTH deep). Formats are a table (formats.ts): adding one is one
 * registerImageFormat() entry with its probe and a lazy loader of its driver; the driver
 * imports formats.ts, never this file.
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
import { RawNode } from './raw.js';
import { imageFormat, PROBE_BYTES, probeFormat, provideImageOpener, registerImageFormat, type ImageFormat } from './formats.js';

export { PROBE_BYTES, probeFormat, registerImageFormat, type ImageFormat, type ImageFormatDriver } from './formats.js';

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

// qcow2: "QFI\xfb" then a big-endian version ≥ 2 (as QEMU probes: the qcow2 driver then refuses
// versions it does not know, rather than serving the header as raw data)
const isQcow2Header = (header: Buffer) => header.length >= 8 && header.readUInt32BE(0) === 0x514649fb && header.readUInt32BE(4) >= 2;

registerImageFormat({ name: 'raw', probe: () => true, open: (path, o) => RawNode.open(path, o) });
registerImageFormat({
  name: 'qcow2',
  probe: isQcow2Header,
  open: async (path, o) => (await import('./qcow2/node.js')).Qcow2Node.open(path, o),
});
provideImageOpener((spec, o) => openImage(spec, o));

export async function openImage(spec: string, options: OpenImageOptions = {}): Promise<BlockNode> {
  const readOnly = options.readOnly ?? false;
  if (spec.trim() === '') throw badImage(spec, 'empty image name: expected a path or memory:SIZE');

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

  const rawOptions = { readOnly, ...(options.native === undefined ? {} : { native: options.native }) };
  if (spec.startsWith('raw:') || options.format === 'raw') {
    const path = spec.startsWith('raw:') ? spec.slice('raw:'.length) : spec;
    if (path === '') throw badImage(spec, 'raw: needs a path');
    return RawNode.open(path, rawOptions);
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(spec)) {
    throw badImage(spec, 'URIs are not supported as images (expected a path, raw:PATH or memory:SIZE)');
  }

  if (options.format !== undefined) return openFormat(options.format, spec, options);
  const raw = await RawNode.open(spec, rawOptions);
  return openProbed(spec, raw, options);
}

/** An image of a format from the table, its backing chain opened read-only through openImage. */
async function openFormat(format: ImageFormat, path: string, options: OpenImageOptions): Promise<BlockNode> {
  const depth = options.chainDepth ?? 0;
  if (depth >= MAX_CHAIN_DEPTH) throw badImage(path, `the backing chain is deeper than ${MAX_CHAIN_DEPTH} images (does it loop?)`);
  const driver = imageFormat(format);
  if (driver === undefined) throw badImage(path, `format "${format}" is not supported`);
  return driver.open(path, {
    readOnly: options.readOnly ?? false,
    ...(options.native === undefined ? {} : { native: options.native }),
    openBacking: async (spec, backingFormat) => {
      if (backingFormat !== undefined && imageFormat(backingFormat as ImageFormat) === undefined) {
        throw badImage(spec, `backing format "${backingFormat}" is not supported (raw and qcow2 are)`);
      }
      return openImage(spec, {
        readOnly: true,
        chainDepth: depth + 1,
        ...(options.nbd === undefined ? {} : { nbd: options.nbd }),
        ...(backingFormat === undefined ? {} : { format: backingFormat as ImageFormat }),
        ...(options.native === undefined ? {} : { native: options.native }),
      });
    },
  });
}

async function openProbed(spec: string, raw: RawNode, options: OpenImageOptions): Promise<BlockNode> {
  let format: ImageFormat;
  try {
    format = probeFormat(await raw.read(0, Math.min(PROBE_BYTES, raw.size)));
  } catch (err) {
    await raw.close().catch(() => {});
    throw err;
  }
  if (format === 'raw') return raw;
  await raw.close().catch(() => {});
  return openFormat(format, spec, options);
}
