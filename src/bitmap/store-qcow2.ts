/**
 * qcow2's own persistent bitmaps (the bitmaps header extension, reference part C) as a
 * BitmapStore — NOT YET WRITTEN: issue 4 leaves this part to the qcow2 work.
 *
 * The seam: openBitmapStore() (store.ts) already sends every qcow2 image here. To support them,
 * return a class implementing BitmapStore (store.ts) over the image's bitmap directory:
 * list/resolve/read from the directory entries and bitmap tables; add/remove/clear/enable/
 * disable/merge as `qemu-img bitmap` does them (C.5), honouring in_use (C.4: an inconsistent
 * bitmap may only be removed); fill and merge on the loaded bits, written back at close.
 * checkpoint/checkpoints have no qcow2 counterpart: refuse them, or keep checkpoints as
 * further bitmaps named NAME@N. The commands and tests (test/bitmap-cli) then work unchanged.
 */
import { BlkrepError } from '../api/errors.js';
import type { BitmapStore, OpenStoreOptions } from './store.js';

export async function openQcow2BitmapStore(path: string, _options: OpenStoreOptions): Promise<BitmapStore> {
  throw new BlkrepError(
    'ERR_NOT_SUPPORTED',
    `${path} is a qcow2 image: blkrep does not read or write qcow2's own persistent bitmaps yet (issue 4, the qcow2 bitmaps extension); use qemu-img bitmap for those, or give a blkrep bitmap file (such as ${path}.NAME.bitmap, as serve-nbd --bitmap NAME keeps) as the target`,
    { errno: 'ENOTSUP', details: { path } },
  );
}
