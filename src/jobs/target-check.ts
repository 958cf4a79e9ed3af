/**
 * Mirroring onto a target that already holds data overwrites it: as QEMU's drive-mirror
 * mode=existing, that needs saying so (`--existing`, job-start `existing: true`). A target is
 * empty when every extent of it is a hole or reads as zeros (SEEK_DATA for a file, the qcow2
 * allocation, NBD block status); its size alone says nothing. A target that cannot report its
 * extents (an NBD server without base:allocation) counts as not empty: nobody can tell.
 */
import { BlkrepError } from '../api/errors.js';
import type { BlockNode } from '../api/block.js';

/** extents asked at a time (bounded: a 1 TiB sparse target needs few calls) */
const STEP = 1 << 30;

/** Where the first byte of data of `node` is (offset and length of that extent), or undefined when it is empty; 'unknown' when it cannot tell. */
export async function firstData(node: BlockNode, signal?: AbortSignal): Promise<{ offset: number; length: number } | undefined | 'unknown'> {
  if (!node.caps.canExtents || !node.extents) return node.size === 0 ? undefined : 'unknown';
  let offset = 0;
  while (offset < node.size) {
    const extents = await node.extents(offset, Math.min(STEP, node.size - offset), signal ? { signal } : {});
    if (extents.length === 0) return 'unknown';
    for (const e of extents) {
      if (e.length <= 0) return 'unknown';
      if (!e.hole && !e.zero) return { offset, length: Math.min(e.length, node.size - offset) };
      offset += e.length;
      if (offset >= node.size) break;
    }
  }
  return undefined;
}

/**
 * Refuse (ERR_TARGET_NOT_EMPTY) to mirror onto `target` when it holds data and `existing` was
 * not given. `how` tells the user how to say it (a CLI flag or a job-start field).
 */
export async function checkTargetEmpty(target: BlockNode, spec: string, existing: boolean, how: string): Promise<void> {
  if (existing) return;
  const found = await firstData(target);
  if (found === undefined) return;
  const what =
    found === 'unknown'
      ? 'cannot tell whether it holds data (it reports no allocation)'
      : `holds data (the first at offset ${found.offset}, ${found.length} bytes)`;
  throw new BlkrepError('ERR_TARGET_NOT_EMPTY', `target ${spec} ${what}: mirroring would overwrite it. ${how} to mirror onto it anyway`, {
    errno: 'EINVAL',
    details: { target: spec, ...(found === 'unknown' ? {} : { offset: found.offset, length: found.length }) },
  });
}
