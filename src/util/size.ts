import { BlkrepError } from '../api/errors.js';

const UNITS: Record<string, number> = {
  '': 1, B: 1,
  K: 2 ** 10, KB: 2 ** 10, KIB: 2 ** 10,
  M: 2 ** 20, MB: 2 ** 20, MIB: 2 ** 20,
  G: 2 ** 30, GB: 2 ** 30, GIB: 2 ** 30,
  T: 2 ** 40, TB: 2 ** 40, TIB: 2 ** 40,
  P: 2 ** 50, PB: 2 ** 50, PIB: 2 ** 50,
};

/** Parse "64K", "1G", "4096", "1.5M" (binary units, as qemu-img). */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? UNITS[m[2]!.toUpperCase()] : undefined;
  if (!m || unit === undefined) {
    throw new BlkrepError('ERR_BAD_SIZE', `invalid ${what} "${text}": expected a number with an optional suffix K, M, G, T or P (e.g. 64K, 1G)`, { errno: 'EINVAL' });
  }
  const value = Number(m[1]) * unit;
  if (value > Number.MAX_SAFE_INTEGER) {
    // said without the number: a double this large is no longer the one written
    throw new BlkrepError('ERR_BAD_SIZE', `invalid ${what} "${text}": 2^53 bytes or more (at most ${Number.MAX_SAFE_INTEGER}, 8P - 1)`, { errno: 'EINVAL' });
  }
  if (!Number.isSafeInteger(value)) {
    throw new BlkrepError('ERR_BAD_SIZE', `invalid ${what} "${text}": ${value} bytes is not a whole number of bytes`, { errno: 'EINVAL' });
  }
  return value;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} B` : `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[i]}`;
}
