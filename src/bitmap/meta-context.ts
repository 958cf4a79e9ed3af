/**
 * The `qemu:dirty-bitmap:NAME` meta context (QEMU docs/interop/nbd.rst): block status of a
 * bitmap, flag 1 (NBD_STATE_DIRTY) for dirty extents and 0 for clean ones. Extents follow the
 * bitmap's granularity, except that the first starts at the requested offset and the last ends
 * at the request's end (or the disk's, when that is not a multiple of the granularity).
 */
import { BlkrepError } from '../api/errors.js';
import type { Descriptor, MetaContextSource } from '../nbd/export.js';
import type { DirtyBitmap } from './dirty-bitmap.js';

export const DIRTY_BITMAP_CONTEXT_PREFIX = 'qemu:dirty-bitmap:';
/** NBD_STATE_DIRTY */
export const STATE_DIRTY = 1;
/** NBD allows at most 2^20 descriptors in one block-status chunk */
export const MAX_DESCRIPTORS = 1 << 20;

export interface DirtyBitmapContextOptions {
  /** descriptors per reply (default and maximum 2^20); the reply then covers less than asked */
  maxDescriptors?: number;
}

/**
 * A meta context source for `qemu:dirty-bitmap:NAME`. `bitmap` may be a function, so that the
 * context follows whichever bitmap is current (e.g. after a reload).
 */
export function dirtyBitmapContext(name: string, bitmap: DirtyBitmap | (() => DirtyBitmap), options: DirtyBitmapContextOptions = {}): MetaContextSource {
  if (name.length === 0 || name.includes('\0') || Buffer.byteLength(DIRTY_BITMAP_CONTEXT_PREFIX + name) > 4096) {
    throw new BlkrepError('ERR_BITMAP_INVALID', `bitmap name "${name}" cannot be a meta context name (1 to ${4096 - DIRTY_BITMAP_CONTEXT_PREFIX.length} bytes, no NUL)`, {
      errno: 'EINVAL',
      details: { name },
    });
  }
  const current = typeof bitmap === 'function' ? bitmap : () => bitmap;
  const max = Math.max(1, Math.min(options.maxDescriptors ?? MAX_DESCRIPTORS, MAX_DESCRIPTORS));
  return {
    name: DIRTY_BITMAP_CONTEXT_PREFIX + name,
    async blockStatus(offset: number, length: number): Promise<Descriptor[]> {
      const b = current();
      // The server refuses such requests first; if one gets here, the bitmap cannot vouch for
      // bytes it does not cover, and dirty is the safe answer (clean could skip a copy).
      if (offset >= b.size) return [[Math.max(1, length), STATE_DIRTY]];
      const end = Math.min(b.size, offset + Math.max(1, length));
      return b.statusRuns(offset, end - offset, max).map(([n, dirty]) => [n, dirty ? STATE_DIRTY : 0]);
    },
  };
}
