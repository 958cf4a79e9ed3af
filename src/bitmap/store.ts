/**
 * BitmapStore — where the `blkrep bitmap` commands find bitmaps, so that each command works the
 * same on every kind of target:
 *
 *   kind     target                                   bitmaps
 *   file     a blkrep bitmap file (or checkpoint)     the one it holds (store-file.ts)
 *   image    a raw image file                         its files IMAGE.NAME.bitmap (store-file.ts)
 *   live     --control PATH [--export NAME]           the export's bitmaps in the daemon (store-live.ts)
 *   qcow2    a qcow2 image                            qcow2's own persistent bitmaps (store-qcow2.ts)
 *
 * openBitmapStore() decides which from the target itself (its first bytes), never from its name,
 * and opens it through a table of lazy loaders: a new kind of target is a class implementing
 * BitmapStore (store-base.ts) and one registerBitmapStore() entry. The live store is a client of
 * the control socket, so the engine does not load it: the CLI registers it (src/cli/).
 *
 * Every method that may change something reports `changed`, so that commands are idempotent for
 * scripts (adding a bitmap that exists as asked, clearing a clean one, … change nothing).
 */
import { open as openFile } from 'node:fs/promises';
import { BlkrepError } from '../api/errors.js';
import { isNbdUri } from '../nbd/uri.js';
import { probeFormat, PROBE_BYTES } from '../block/open.js';
import { HEADER_SLOT_BYTES, MAGIC } from './format.js';
import { sourceBitmapFile as sourceFileVia, type BitmapStore, type OpenStoreOptions, type TargetKind } from './store-base.js';

export type { BitmapStore, OpenBitmapStore, OpenStoreOptions, ReadOptions, StoreKind, TargetKind } from './store-base.js';

/** Opens one kind of target; `open` is openBitmapStore, for a store that reads another (a merge source). */
export type StoreOpener = (target: string, options: OpenStoreOptions, open: typeof openBitmapStore) => Promise<BitmapStore>;

/** The slots of the table: a kind of target as probeTarget names it, and `live` (target: the control socket). */
export type StoreSlot = TargetKind | 'live';

const stores = new Map<StoreSlot, () => Promise<StoreOpener>>();

/** Fill (or replace) a slot with a loader of its opener, called on first use. */
export function registerBitmapStore(slot: StoreSlot, load: () => Promise<StoreOpener>): void {
  stores.set(slot, load);
}

registerBitmapStore('bitmap-file', async () => (await import('./store-file.js')).openFileStore);
registerBitmapStore('missing', async () => (await import('./store-file.js')).openNewFileStore);
registerBitmapStore('raw', async () => (await import('./store-file.js')).openImageStore);
registerBitmapStore('qcow2', async () => (await import('./store-qcow2.js')).openQcow2BitmapStore);

async function openSlot(slot: StoreSlot, target: string, options: OpenStoreOptions): Promise<BitmapStore> {
  const load = stores.get(slot);
  if (load === undefined) {
    throw new BlkrepError('ERR_NOT_SUPPORTED', slot === 'live'
      ? `bitmaps of a live export (--control ${target}) are reached through the control socket, and no live bitmap store is loaded here (the blkrep CLI loads one)`
      : `no bitmap store is loaded for a target of kind ${slot} ("${target}")`, { errno: 'ENOTSUP', details: { target, kind: slot } });
  }
  return (await load())(target, options, openBitmapStore);
}

export async function probeTarget(path: string): Promise<TargetKind> {
  let handle;
  try {
    handle = await openFile(path, 'r');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT') return 'missing';
    throw new BlkrepError('ERR_OPEN', `cannot open "${path}": ${e.message}`, {
      errno: e.code === 'EACCES' || e.code === 'EPERM' ? 'EPERM' : 'EIO',
      cause: err,
      details: { path },
    });
  }
  try {
    // A bitmap file's header may be in either slot (a new checkpoint file has only slot 1).
    const buf = Buffer.alloc(HEADER_SLOT_BYTES + MAGIC.length);
    const { bytesRead } = await handle.read(buf, 0, buf.length, 0);
    const at = (o: number) => bytesRead >= o + MAGIC.length && buf.subarray(o, o + MAGIC.length).equals(MAGIC);
    if (at(0) || at(HEADER_SLOT_BYTES)) return 'bitmap-file';
    return probeFormat(buf.subarray(0, Math.min(bytesRead, PROBE_BYTES)));
  } finally {
    await handle.close();
  }
}

/**
 * The store a command's target names: `--control` (a live export), else TARGET probed — a blkrep
 * bitmap file, a qcow2 image, or a raw image whose bitmaps are the files beside it. A TARGET
 * that does not exist is a bitmap file still to be created (only `add --size` does that).
 */
export async function openBitmapStore(target: string | undefined, options: OpenStoreOptions = {}): Promise<BitmapStore> {
  if (options.control !== undefined) {
    if (target !== undefined) {
      throw new BlkrepError('ERR_USAGE', `give either TARGET ("${target}") or --control, not both: with --control the bitmaps are those of the export the daemon serves`, { errno: 'EINVAL' });
    }
    return openSlot('live', options.control, options);
  }
  if (options.export !== undefined) throw new BlkrepError('ERR_USAGE', '--export needs --control (the daemon serving the export)', { errno: 'EINVAL' });
  if (target === undefined || target === '') {
    throw new BlkrepError('ERR_USAGE', 'say where the bitmap is: a bitmap file, an image, or --control PATH [--export NAME] for a running serve-nbd', { errno: 'EINVAL' });
  }
  if (target.startsWith('memory:') || isNbdUri(target)) {
    throw new BlkrepError(
      'ERR_USAGE',
      `"${target}" has no bitmap files; for the bitmaps of an export that serve-nbd serves, use --control PATH [--export NAME]`,
      { errno: 'EINVAL' },
    );
  }
  const path = target.startsWith('raw:') ? target.slice('raw:'.length) : target;
  const kind = target.startsWith('raw:') ? 'raw' : await probeTarget(path);
  return openSlot(kind, path, options);
}

/**
 * A merge source given on the command line (`--source NAME`, `--source-file FILE`) as the path
 * of the bitmap file that holds it: FILE itself when it is a bitmap file, FILE.NAME.bitmap when
 * it is an image.
 */
export function sourceBitmapFile(file: string, name: string | undefined): Promise<string> {
  return sourceFileVia(openBitmapStore, file, name);
}
