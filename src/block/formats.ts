/**
 * The table of image formats, and the slot through which a format driver opens the images it
 * depends on (a qcow2 image's backing file) without importing openImage.
 *
 * open.ts owns openImage and fills the table with the built-in formats (drivers loaded lazily, so
 * a command that opens only raw files and NBD exports never compiles the qcow2 driver); a driver
 * imports only this module. So the graph has no cycle: open.ts → formats.ts ← qcow2/*, and
 * open.ts → qcow2/* (lazily), never back.
 */
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import type { SparseOps } from './native.js';

/** bytes read from the start of an image for probing */
export const PROBE_BYTES = 512;

/** The formats openImage knows. */
export type ImageFormat = 'raw' | 'qcow2';

/** What a format driver gets to open one image of its format. */
export interface FormatOpenOptions {
  readOnly: boolean;
  /** the native addon for host files; undefined = loadNative(), null = the portable fallback */
  native?: SparseOps | null;
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

export type ImageOpener = (spec: string, options: { readOnly: boolean; format?: ImageFormat }) => Promise<BlockNode>;

let opener: ImageOpener | undefined;

/** Set by open.ts when it loads: the opener drivers use for backing files nobody else opens for them. */
export function provideImageOpener(fn: ImageOpener): void {
  opener = fn;
}

/** A backing image, read-only, in the format its parent names (probed when none or unknown). */
export async function openBackingImage(spec: string, format: string | undefined): Promise<BlockNode> {
  if (opener === undefined) {
    throw new BlkrepError('ERR_INTERNAL', `cannot open the backing image "${spec}": no image opener is loaded (import src/block/open.js or the library's index first)`, {
      errno: 'EIO',
      details: { spec },
    });
  }
  const f = format === 'raw' || format === 'qcow2' ? format : undefined;
  return opener(spec, { readOnly: true, ...(f ? { format: f } : {}) });
}
