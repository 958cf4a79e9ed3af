/**
 * Creating a qcow2 v3 image the way `qemu-img create -f qcow2` does, byte for byte in the common
 * case: cluster 0 holds the header (with the backing format and feature name extensions and the
 * backing file name), cluster 1 the refcount table, cluster 2 its first block; then the image is
 * opened and grown to its size, which allocates the L1 table (cluster 3 onwards) through the
 * normal allocator and writes only its used bytes, as QEMU does.
 */
import { constants } from 'node:fs';
import { open as openFile } from 'node:fs/promises';
import type { BlockNode } from '../../api/block.js';
import { BlkrepError } from '../../api/errors.js';
import { openImage } from '../formats.js';
import type { SparseOps } from '../native.js';
import { resolveBackingSpec } from './backing-spec.js';
import { HostFile } from './file.js';
import { buildHeaderCluster, l1EntriesFor, MAX_L1_BYTES } from './format.js';
import { Qcow2Image } from './image.js';
import { setRefcount } from './refcounts.js';

export interface Qcow2CreateOptions {
  /** virtual size in bytes, rounded up to 512; default: the backing file's size */
  size?: number;
  /** 512 … 2 MiB, a power of two; default 64 KiB */
  clusterSize?: number;
  /** backing file name, stored as given (relative names resolve against the image's directory) */
  backing?: string;
  /** 'raw' or 'qcow2'; default: probed from the backing file */
  backingFormat?: string;
  /** 1, 2, 4 … 64; default 16 */
  refcountBits?: number;
  /** opens the backing file to learn its size or format; default openImage() */
  openBacking?: (spec: string, format: string | undefined) => Promise<BlockNode>;
  native?: SparseOps | null;
}

function usage(message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_USAGE', message, { errno: 'EINVAL', details });
}

export async function createQcow2(path: string, o: Qcow2CreateOptions = {}): Promise<void> {
  const clusterSize = o.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw usage(`cluster size ${clusterSize} is not a power of two from 512 to 2 MiB`, { clusterSize });
  }
  const refcountBits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw usage(`refcount width ${refcountBits} is not one of 1, 2, 4, 8, 16, 32, 64 bits`, { refcountBits });
  }
  let size = o.size;
  let backingFormat = o.backingFormat;
  if (o.backing !== undefined) {
    if (o.backing === '') throw usage('the backing file name is empty');
    if (backingFormat !== undefined && backingFormat !== 'raw' && backingFormat !== 'qcow2') {
      throw usage(`backing format "${backingFormat}" is not supported (raw and qcow2 are)`);
    }
    if (size === undefined || backingFormat === undefined) {
      const spec = resolveBackingSpec(path, o.backing);
      const opener = o.openBacking ?? defaultOpener;
      const node = await opener(spec, backingFormat);
      try {
        size ??= node.size;
        backingFormat ??= node.driver === 'qcow2' ? 'qcow2' : 'raw';
      } finally {
        await node.close().catch(() => {});
      }
    }
  } else if (o.backingFormat !== undefined) {
    throw usage('a backing format without a backing file');
  }
  if (size === undefined) throw usage('the size of a new image without a backing file is required');
  if (!Number.isSafeInteger(size) || size < 0) throw usage(`invalid size ${size}`, { size });
  size = Math.ceil(size / 512) * 512;
  const l1Bytes = l1EntriesFor(size, clusterBits) * 8;
  if (l1Bytes > MAX_L1_BYTES) {
    throw usage(`size ${size} is too large for ${clusterSize}-byte clusters (its L1 table would need ${l1Bytes} bytes, the limit is ${MAX_L1_BYTES})`, { size, clusterSize });
  }

  const header = buildHeaderCluster({
    clusterBits,
    refcountOrder,
    ...(o.backing === undefined ? {} : { backingFile: o.backing, backingFormat: backingFormat! }),
  });
  const tables = Buffer.alloc(2 * clusterSize);
  tables.writeBigUInt64BE(BigInt(2 * clusterSize), 0); // refcount table → block in cluster 2
  for (let c = 0; c < 3; c++) setRefcount(tables.subarray(clusterSize), c, refcountOrder, 1);
  // never through a symlink planted at the name
  const handle = await openFile(path, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o644).catch((err: unknown) => {
    throw new BlkrepError('ERR_OPEN', `cannot create "${path}": ${(err as Error).message}`, { errno: 'EPERM', cause: err, details: { path } });
  });
  try {
    await handle.write(header, 0, header.length, 0);
    await handle.write(tables, 0, tables.length, clusterSize);
    await handle.datasync();
  } finally {
    await handle.close();
  }

  const file = await HostFile.open(path, { ...(o.native === undefined ? {} : { native: o.native }) });
  try {
    const image = await Qcow2Image.open(file, { readOnly: false });
    await image.resize(size);
  } finally {
    await file.close();
  }
}

/** A backing image read-only, in the format its parent names (probed when none or unknown). */
function defaultOpener(spec: string, format: string | undefined): Promise<BlockNode> {
  const f = format === 'raw' || format === 'qcow2' ? format : undefined;
  // as qemu-img create: the backing file is only asked its size and format, sharing everything
  return openImage(spec, { readOnly: true, forceShare: true, ...(f ? { format: f } : {}) });
}
