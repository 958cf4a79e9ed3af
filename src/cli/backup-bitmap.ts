/** Which bitmap file `blkrep backup --bitmap FILE|NAME` means. */
import { stat } from 'node:fs/promises';
import { BlkrepError } from '../api/errors.js';
import { nameProblem, sidecarBase, sidecarPath } from '../bitmap/names.js';

async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/**
 * A bitmap file that exists, else the bitmap NAME beside the source image (`SOURCE.NAME.bitmap`).
 * Throws ERR_BITMAP_NOT_FOUND naming both places when neither exists.
 */
export async function resolveBackupBitmap(spec: string, sourceSpec: string): Promise<string> {
  if (await isFile(spec)) return spec;
  const base = await sidecarBase(sourceSpec);
  if (base.path !== undefined && !nameProblem(spec)) {
    const beside = sidecarPath(base.path, spec);
    if (await isFile(beside)) return beside;
    throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `no bitmap file "${spec}" and no bitmap "${spec}" beside the image (${beside})`, { errno: 'EINVAL', details: { bitmap: spec, tried: [spec, beside] } });
  }
  throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `no bitmap file "${spec}"${base.path === undefined ? ` (${base.why}: name a bitmap file)` : ''}`, { errno: 'EINVAL', details: { bitmap: spec } });
}
