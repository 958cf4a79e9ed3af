/**
 * Where `bitmap fill` and `bitmap clear` get their ranges: `--range OFFSET:LENGTH`, a JSON map
 * (`nbdinfo --map --json`, `qemu-img map --output=json`), or an image's allocation above a base.
 */
import { readFile } from 'node:fs/promises';
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { openImage } from '../block/open.js';
import { describeChain, sameImage } from '../image/chain.js';
import { parseSize } from '../util/size.js';
import type { Run } from './dirty-bitmap.js';

/** `OFFSET:LENGTH`, each a size with an optional suffix (`1G:64K`). A usage error otherwise. */
export function parseRange(text: string): Run {
  const m = /^([^:]+):([^:]+)$/.exec(text.trim());
  if (!m) throw new BlkrepError('ERR_USAGE', `--range "${text}" is not OFFSET:LENGTH (for example 1G:64K)`, { errno: 'EINVAL' });
  try {
    return { offset: parseSize(m[1]!, 'range offset'), length: parseSize(m[2]!, 'range length') };
  } catch (err) {
    throw new BlkrepError('ERR_USAGE', `--range "${text}": ${(err as Error).message}`, { errno: 'EINVAL' });
  }
}

/** Sort and join overlapping or adjacent runs. */
export function normalizeRuns(runs: Run[]): Run[] {
  const sorted = runs.filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: Run[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

/** Words in an nbdinfo description that mean "nothing to copy here". */
const SKIP_WORDS = new Set(['clean', 'hole', 'unallocated']);

function badJson(source: string, why: string): BlkrepError {
  return new BlkrepError('ERR_BAD_JSON', `${source}: ${why}`, { errno: 'EINVAL', details: { source } });
}

/**
 * The ranges to dirty from a JSON map:
 * - `nbdinfo --map[=CONTEXT] --json` entries `{offset, length, type, description}`: every entry
 *   except those whose description has the word "clean", "hole" or "unallocated" (so "data",
 *   "dirty", "zero" and entries without a description are dirtied: when in doubt, dirty);
 * - `qemu-img map --output=json` entries `{start, length, data, …}`: those with `"data": true`.
 */
export function rangesFromJson(text: string, source: string): Run[] {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw badJson(source, `not JSON (${(err as Error).message})`);
  }
  if (!Array.isArray(value)) throw badJson(source, 'expected an array of map entries, as nbdinfo --map --json or qemu-img map --output=json print');
  const out: Run[] = [];
  value.forEach((e: unknown, i) => {
    if (typeof e !== 'object' || e === null) throw badJson(source, `entry ${i} is not an object`);
    const o = e as Record<string, unknown>;
    const offset = 'offset' in o ? o.offset : o.start;
    const length = o.length;
    if (typeof offset !== 'number' || typeof length !== 'number' || !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw badJson(source, `entry ${i} has no offset (or start) and length of non-negative integers`);
    }
    let dirty: boolean;
    if ('offset' in o) {
      const words = typeof o.description === 'string' ? o.description.split(/[\s,]+/) : [];
      dirty = !words.some((w) => SKIP_WORDS.has(w));
    } else {
      dirty = o.data === true;
    }
    if (dirty && length > 0) out.push({ offset, length });
  });
  return normalizeRuns(out);
}

/** rangesFromJson of a file, or of stdin for "-". */
export async function rangesFromJsonFile(path: string): Promise<Run[]> {
  let text: string;
  try {
    text = path === '-' ? await readStdin() : await readFile(path, 'utf8');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new BlkrepError('ERR_OPEN', `cannot read ${path === '-' ? 'stdin' : `"${path}"`}: ${e.code === 'ENOENT' ? 'no such file' : e.message}`, {
      errno: 'EIO',
      cause: err,
      details: { path },
    });
  }
  return rangesFromJson(text, path === '-' ? 'stdin' : path);
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** How much one extents() call asks for. */
const STEP = 1 << 30;

/**
 * The ranges of `image` allocated above `base` in its backing chain (every allocated range when
 * no base is given: for a raw image, everything but its holes) — the 2012 proposal's
 * blockdev-dirty-fill. Zero clusters count as allocated: they hide what is below them.
 */
export async function allocationRuns(image: string, base: string | undefined, options: { signal?: AbortSignal } = {}): Promise<{ size: number; runs: Run[] }> {
  let baseIndex: number | undefined;
  if (base !== undefined) {
    if (await sameImage(base, image)) {
      throw new BlkrepError('ERR_USAGE', `--base "${base}" is the image itself: it must be an image below it in its backing chain`, { errno: 'EINVAL' });
    }
    const layers = await describeChain(image, { stop: (l) => sameImage(l.filename, base) });
    const found = await Promise.all(layers.map((l) => sameImage(l.filename, base)));
    baseIndex = found.indexOf(true);
    if (baseIndex < 0) {
      throw new BlkrepError('ERR_NOT_IN_CHAIN', `"${base}" is not in the backing chain of ${image} (${layers.map((l) => l.filename).join(' → ')})`, {
        errno: 'EINVAL',
        details: { image, base },
      });
    }
  }
  const node: BlockNode = await openImage(image, { readOnly: true });
  const runs: Run[] = [];
  try {
    let pos = 0;
    while (pos < node.size) {
      options.signal?.throwIfAborted();
      const want = Math.min(STEP, node.size - pos);
      const extents = node.extents && node.caps.canExtents ? await node.extents(pos, want) : [{ length: want, hole: false, zero: false }];
      if (extents.length === 0) throw new BlkrepError('ERR_INTERNAL', `${node.description}: extents at offset ${pos} returned nothing`);
      for (const e of extents) {
        const n = Math.min(e.length, node.size - pos);
        if (n <= 0) break;
        const allocated = e.depth === undefined ? !e.hole : e.depth > 0 && (baseIndex === undefined || e.depth - 1 < baseIndex);
        if (allocated) {
          const last = runs[runs.length - 1];
          if (last && last.offset + last.length === pos) last.length += n;
          else runs.push({ offset: pos, length: n });
        }
        pos += n;
      }
    }
    return { size: node.size, runs };
  } finally {
    await node.close();
  }
}
