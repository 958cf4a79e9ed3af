/**
 * mirror/backup --create: make the target before the copy, as qemu-img convert and QEMU's
 * drive-mirror mode=absolute-paths do: a new image of the source's size, in --target-format or
 * else the source's format (raw or qcow2; raw for anything else). It never replaces anything:
 * a TARGET that exists (whatever it holds) is refused with ERR_EXISTS, and a TARGET that is not
 * a file (an NBD URI, memory:) is a usage error. A new image reads as zeros, so the copy skips
 * the zero ranges (as --target-is-zero).
 */
import { lstat } from 'node:fs/promises';
import { BlkrepError } from '../api/errors.js';
import type { ImageFormat } from '../block/open.js';
import { filePath, isFileSpec } from '../image/chain.js';
import { createImage, type CreateResult } from '../image/create.js';
import { openImageWithFilters } from './image.js';

export async function createTarget(
  sourceSpec: string,
  targetSpec: string,
  o: { targetFormat?: string; sourceFormat?: string; forceShare?: boolean; filters?: string[] },
): Promise<CreateResult> {
  if (!isFileSpec(targetSpec)) throw new BlkrepError('ERR_USAGE', `--create makes a file: "${targetSpec}" is not one (create an NBD target on its server)`, { errno: 'EINVAL' });
  const path = filePath(targetSpec);
  const there = await lstat(path).then(
    (st) => st,
    (err: NodeJS.ErrnoException) => (err.code === 'ENOENT' ? undefined : Promise.reject(err)),
  );
  if (there) {
    throw new BlkrepError('ERR_EXISTS', `--create: "${path}" exists (${there.isFile() ? `${there.size} bytes` : 'not a regular file'}); it is never replaced: remove it, or drop --create to copy onto it (--existing if it holds data)`, { errno: 'EINVAL', details: { path } });
  }
  const source = await openImageWithFilters(sourceSpec, { readOnly: true, forceShare: o.forceShare ?? false, ...(o.sourceFormat ? { format: o.sourceFormat as ImageFormat } : {}) }, o.filters);
  let size: number;
  let sourceFormat: string;
  try {
    size = source.size;
    const format = (await source.info?.())?.format;
    sourceFormat = typeof format === 'string' ? format : source.driver;
  } finally {
    await source.close().catch(() => {});
  }
  const format = (o.targetFormat ?? (sourceFormat === 'qcow2' ? 'qcow2' : 'raw')) as 'raw' | 'qcow2';
  return createImage(path, { format, size });
}
