/**
 * Whole bitmap files: load one (deciding how far it can be trusted) and write one atomically.
 *
 * Loading never trusts what it cannot prove:
 * - clean file (in-use flag clear): every page checksum and the dirty count must match, else the
 *   whole bitmap is all-dirty, with the reason;
 * - in-use file (its writer died): the stored bits OR every extent of the newest activity-log
 *   transaction of the file's session OR every page whose checksum fails (a page torn by the
 *   crash) — "recovered", with the numbers;
 * - no usable header, unknown version, impossible field, truncated file: all-dirty, with the
 *   reason (the caller must know the disk's size then), or an error when asked to be strict.
 */
import { BlkrepError } from '../api/errors.js';
import { DEFAULT_GRANULARITY, DirtyBitmap, PAGE_BYTES } from './dirty-bitmap.js';
import { readAt, truncateFd, writeAt } from './file-io.js';
import { replaceWith } from '../util/safe-file.js';

/** a bitmap file's mode, whatever the umask: writable by its owner only (bitmap/trust.ts) */
export const BITMAP_FILE_MODE = 0o644;
import {
  AL_OFFSET, FLAG_ENABLED, FLAG_IN_USE, HEADER_SLOT_BYTES, PageChecksum, computeLayout, decodeAlBlock, decodeHeader, encodeHeader,
  type Header, type Layout,
} from './format.js';

/** Why a file could not prove its bitmap consistent. Stable strings, for scripts. */
export type BitmapFault =
  | 'empty'
  | 'not-a-bitmap'
  | 'header-checksum'
  | 'unknown-version'
  | 'bad-header'
  | 'truncated'
  | 'data-checksum'
  | 'tail-bits'
  | 'dirty-count'
  | 'activity-log'
  /** a qcow2 bitmap flagged in_use: its writer did not close the image (store-qcow2.ts) */
  | 'in-use'
  /** the file is owned by another user (not root): trust.ts */
  | 'foreign-owner'
  /** the file is writable by its group or by others: trust.ts */
  | 'writable-by-others';

export type LoadState =
  | { state: 'clean' }
  | {
      state: 'recovered';
      /** hot extents of the activity log OR'ed into the bitmap */
      extentsReplayed: number;
      /** 4 KiB data pages whose checksum failed, loaded as all-dirty */
      pagesDistrusted: number;
      /** sequence number of the activity-log transaction replayed (0: none) */
      alSequence: number;
    }
  | { state: 'all-dirty'; fault: BitmapFault; reason: string };

export interface FileImage {
  /** the current header; undefined when no slot holds a valid one */
  header: Header | undefined;
  bitmap: DirtyBitmap;
  /** page checksums as stored (clean and recovered loads) */
  pageCrcs: Uint32Array | undefined;
  loadState: LoadState;
}

export interface ReadImageOptions {
  /** the disk's size; must equal the file's when the header is valid */
  size?: number;
  /** granularity for an all-dirty bitmap when the header is unusable (default 64 KiB) */
  granularity?: number;
  /** the file cannot be trusted whatever it holds (trust.ts): load it all-dirty for this reason */
  distrust?: { fault: BitmapFault; reason: string };
}

const ZERO_PAGE = Buffer.alloc(PAGE_BYTES);

/** Read and judge a bitmap file open on `fd`. Throws only for size mismatch or an unusable header with no size given. */
export async function readImage(fd: number, fileLength: number, path: string, options: ReadImageOptions): Promise<FileImage> {
  const slots = Buffer.alloc(2 * HEADER_SLOT_BYTES);
  const got = await readAt(fd, slots, 0);
  const results = [decodeHeader(slots.subarray(0, Math.min(got, HEADER_SLOT_BYTES)), 0), decodeHeader(slots.subarray(HEADER_SLOT_BYTES, Math.max(HEADER_SLOT_BYTES, got)), 1)];

  const noHeader = (fault: BitmapFault, reason: string): FileImage => {
    if (options.size === undefined) {
      throw new BlkrepError('ERR_BITMAP_CORRUPT', `bitmap file "${path}" cannot be trusted: ${reason}; give the disk's size to load it as all-dirty`, {
        errno: 'EINVAL',
        details: { path, fault },
      });
    }
    const bitmap = new DirtyBitmap(options.size, { granularity: options.granularity ?? DEFAULT_GRANULARITY });
    bitmap.setAll();
    return { header: undefined, bitmap, pageCrcs: undefined, loadState: { state: 'all-dirty', fault, reason } };
  };

  if (fileLength === 0) return noHeader('empty', 'the file is empty');
  // A slot of a version we do not know may be the newest: the other slot cannot be trusted then.
  const unknown = results.find((r) => !r.ok && r.code === 'version');
  if (unknown && !unknown.ok) return noHeader('unknown-version', unknown.reason);
  let header: Header | undefined;
  for (const r of results) if (r.ok && (!header || r.header.generation > header.generation)) header = r.header;
  if (!header) {
    const reasons = results.map((r) => (r.ok ? '' : r.reason)).join('; ');
    const codes = results.map((r) => (r.ok ? 'ok' : r.code));
    const fault: BitmapFault = codes.every((c) => c === 'magic' || c === 'short')
      ? 'not-a-bitmap'
      : codes.includes('field') ? 'bad-header' : 'header-checksum';
    return noHeader(fault, `no valid header (${reasons})`);
  }
  const h = header;
  if (options.size !== undefined && options.size !== h.size) {
    throw new BlkrepError('ERR_BITMAP_SIZE_MISMATCH', `bitmap file "${path}" covers ${h.size} bytes, the disk has ${options.size}`, {
      errno: 'EINVAL',
      details: { path, bitmapSize: h.size, size: options.size },
    });
  }
  const layout = computeLayout(h);
  const allDirty = (fault: BitmapFault, reason: string): FileImage => {
    const bitmap = new DirtyBitmap(h.size, { granularity: h.granularity, enabled: (h.flags & FLAG_ENABLED) !== 0 });
    bitmap.setAll();
    return { header: h, bitmap, pageCrcs: undefined, loadState: { state: 'all-dirty', fault, reason } };
  };
  if (options.distrust) return allDirty(options.distrust.fault, options.distrust.reason);
  if (fileLength < layout.fileLength) {
    return allDirty('truncated', `the file is truncated: ${fileLength} bytes, the header says ${layout.fileLength}`);
  }

  const body = Buffer.alloc(layout.crcTableLength + layout.dataLength);
  const n = await readAt(fd, body, layout.crcTableOffset);
  if (n < body.length) return allDirty('truncated', `the file is truncated: ${layout.crcTableOffset + n} bytes, the header says ${layout.fileLength}`);
  const pageCrcs = new Uint32Array(layout.pages);
  for (let p = 0; p < layout.pages; p++) pageCrcs[p] = body.readUInt32BE(4 * p);
  for (let at = 4 * layout.pages; at < layout.crcTableLength; at++) {
    if (body[at] !== 0) return allDirty('data-checksum', `the page checksum table has non-zero padding at byte ${layout.crcTableOffset + at}`);
  }
  const data = body.subarray(layout.crcTableLength);
  const badPages: number[] = [];
  const checksum = new PageChecksum(h.size, h.granularity);
  for (let p = 0; p < layout.pages; p++) {
    if (checksum.of(data.subarray(p * PAGE_BYTES, (p + 1) * PAGE_BYTES), p) !== pageCrcs[p]) badPages.push(p);
  }
  // The activity log, also for a clean file: a transaction of another session means the header
  // is not the one the log was written under (the newest header lost), which nothing else shows.
  const al = Buffer.alloc(h.alSlots * layout.alBlockSize);
  await readAt(fd, al, AL_OFFSET);
  let newest: { sequence: number; extents: number[] } | undefined;
  for (let s = 0; s < h.alSlots; s++) {
    const r = decodeAlBlock(al.subarray(s * layout.alBlockSize, (s + 1) * layout.alBlockSize), h, layout.extents);
    if (r.ok) {
      if (!newest || r.transaction.sequence > newest.sequence) newest = r.transaction;
    } else if (r.invalid) {
      return allDirty('activity-log', `activity-log block ${s} (file offset ${AL_OFFSET + s * layout.alBlockSize}) ${r.invalid}`);
    }
  }

  const inUse = (h.flags & FLAG_IN_USE) !== 0;
  const bitmap = new DirtyBitmap(h.size, { granularity: h.granularity, enabled: (h.flags & FLAG_ENABLED) !== 0 });

  if (!inUse) {
    if (badPages.length > 0) {
      return allDirty('data-checksum', `data checksum mismatch in ${badPages.length} page(s), first at file offset ${layout.dataOffset + badPages[0]! * PAGE_BYTES}`);
    }
    try {
      bitmap.loadBytes(data);
    } catch (err) {
      return allDirty('tail-bits', err instanceof Error ? err.message : String(err));
    }
    if (bitmap.dirtyGranules !== h.dirtyGranules) {
      return allDirty('dirty-count', `the data has ${bitmap.dirtyGranules} dirty granules, the header says ${h.dirtyGranules}`);
    }
    return { header: h, bitmap, pageCrcs, loadState: { state: 'clean' } };
  }

  // The writer died: the bits on disk, plus whatever the activity log says may have been written.
  for (const p of badPages) data.fill(0, p * PAGE_BYTES, (p + 1) * PAGE_BYTES);
  try {
    bitmap.loadBytes(data);
  } catch (err) {
    return allDirty('tail-bits', err instanceof Error ? err.message : String(err));
  }
  const bitsPerPage = PAGE_BYTES * 8;
  for (const p of badPages) bitmap.setBits(p * bitsPerPage, Math.min((p + 1) * bitsPerPage, bitmap.bits));

  for (const e of newest?.extents ?? []) {
    const offset = e * h.extentSize;
    bitmap.fill(offset, Math.min(h.extentSize, h.size - offset));
  }
  return {
    header: h,
    bitmap,
    pageCrcs,
    loadState: { state: 'recovered', extentsReplayed: newest?.extents.length ?? 0, pagesDistrusted: badPages.length, alSequence: newest?.sequence ?? 0 },
  };
}

/**
 * Write a complete, clean bitmap file at `path` atomically: a temporary file beside it, synced,
 * renamed over `path`, and the directory synced. A crash leaves the old file or the new one.
 */
export async function writeImage(path: string, header: Header, bitmap: DirtyBitmap): Promise<Layout> {
  const layout = computeLayout(header);
  // a random temporary name, O_EXCL|O_NOFOLLOW, mode 0644 whatever the umask (a file writable by
  // others would load all-dirty: bitmap/trust.ts)
  await replaceWith(path, BITMAP_FILE_MODE, async (fd) => {
    await truncateFd(fd, layout.fileLength);
    const h: Header = { ...header, alBlockSize: layout.alBlockSize, crcTableOffset: layout.crcTableOffset, dataOffset: layout.dataOffset, dataLength: layout.dataLength };
    await writeAt(fd, encodeHeader(h), (h.generation % 2) * HEADER_SLOT_BYTES);
    const table = Buffer.alloc(layout.crcTableLength);
    const checksum = new PageChecksum(header.size, header.granularity);
    const CHUNK_PAGES = 256;
    const chunk = Buffer.alloc(CHUNK_PAGES * PAGE_BYTES);
    for (let p = 0; p < layout.pages; p += CHUNK_PAGES) {
      const count = Math.min(CHUNK_PAGES, layout.pages - p);
      const view = chunk.subarray(0, count * PAGE_BYTES);
      bitmap.copyBytes(p * PAGE_BYTES, view, 0, view.length);
      let allZero = true;
      for (let i = 0; i < count; i++) {
        const page = view.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES);
        table.writeUInt32BE(checksum.of(page, p + i), 4 * (p + i));
        if (allZero && !page.equals(ZERO_PAGE)) allZero = false;
      }
      // zeros need no write: the file was extended with a hole
      if (!allZero) await writeAt(fd, view, layout.dataOffset + p * PAGE_BYTES);
    }
    await writeAt(fd, table, layout.crcTableOffset);
  });
  return layout;
}
