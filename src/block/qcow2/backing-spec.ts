import { dirname, isAbsolute, resolve } from 'node:path';

/**
 * Where a backing file name points, as QEMU resolves it: absolute paths and URIs (anything with a
 * protocol prefix like nbd: or nbd+unix:) as they are, relative paths against the directory of
 * the image that names them.
 */
export function resolveBackingSpec(imagePath: string, backing: string): string {
  if (isAbsolute(backing) || /^[a-z][a-z0-9+.-]*:/i.test(backing)) return backing;
  return resolve(dirname(imagePath), backing);
}
