/**
 * What the `blkrep bitmap …` commands share: the target (a bitmap file, an image, or
 * `--control PATH [--export NAME]`), the bitmap's name, and how a change is reported.
 * (Not in src/commands/bitmap/: every file there is a command.) It fills the `live` slot of the
 * table of bitmap stores: the live store is a client of the control socket.
 */
import { Args, Flags } from '@oclif/core';
import { BlkrepCommand } from './base.js';
import { formatSize } from '../util/size.js';
import { formatPercent } from '../bitmap/dump-format.js';
import type { BitmapChange, BitmapInfo } from '../bitmap/ops.js';
import { openBitmapStore, registerBitmapStore, type BitmapStore } from '../bitmap/store.js';

// the bitmaps of a live export are reached through the control socket, which the engine does not load
registerBitmapStore('live', async () => (await import('./live-bitmap-store.js')).openLiveStore);

export const targetArg = Args.string({
  description: "a blkrep bitmap file, a qcow2 image (its own persistent bitmaps, as qemu-img bitmap sees them), or a raw image (its bitmaps are the files IMAGE.NAME.bitmap beside it); left out with --control",
  required: false,
});

export const storeFlags = {
  control: Flags.string({ char: 'c', description: "a running serve-nbd's control socket (a path, or a NAME for /run/blkrep/NAME.ctl): the bitmaps of an export it serves", helpValue: 'PATH|NAME' }),
  export: Flags.string({ char: 'e', description: "the export, with --control (default: the daemon's only export)", helpValue: 'NAME' }),
  timeout: Flags.integer({ description: 'give up on the daemon after this many seconds', default: 10, min: 1, helpValue: 'SECONDS' }),
};

export const nameFlag = (description = 'the bitmap (default: the only one there is)') => Flags.string({ char: 'n', description, helpValue: 'NAME' });

export const forceFlag = Flags.boolean({
  description: 'change a bitmap file although it is marked in use (by a running daemon, or by one that died): recovers it first',
  default: false,
});

export interface StoreFlags {
  control?: string;
  export?: string;
  timeout: number;
  force?: boolean;
  'force-share'?: boolean;
}

export abstract class BitmapCommand extends BlkrepCommand {
  /** Open the store the target names, run `fn`, close it. */
  protected async withStore<T>(target: string | undefined, flags: StoreFlags, fn: (store: BitmapStore) => Promise<T>): Promise<T> {
    const store = await openBitmapStore(target, {
      ...(flags.control === undefined ? {} : { control: flags.control }),
      ...(flags.export === undefined ? {} : { export: flags.export }),
      timeoutMs: flags.timeout * 1000,
      force: flags.force ?? false,
      ...(flags['force-share'] ? { forceShare: true } : {}),
    });
    try {
      return await fn(store);
    } finally {
      await store.close().catch(() => {});
    }
  }

  /** The name a command that creates or removes a bitmap needs: given, or the file's own. */
  protected requireName(store: BitmapStore, name: string | undefined): Promise<string> {
    if (name === undefined && store.kind !== 'file') this.usageError(`--name is required: which bitmap of ${store.description}?`);
    return store.resolve(name);
  }

  /** Print a change for a person (nothing with --json: the result is printed as it is). */
  protected report(change: BitmapChange, store: BitmapStore, done: string, unchanged: string): void {
    if (this.jsonEnabled()) return;
    const b = change.bitmap;
    this.log(change.changed ? `${done}: bitmap "${change.name}" of ${store.description}${b ? `, ${summary(b)}` : ''}.` : `${unchanged}: bitmap "${change.name}" of ${store.description}; nothing changed.`);
  }
}

/** "granularity 64 KiB, enabled, 1 MiB dirty (0.10%)" */
export function summary(b: BitmapInfo): string {
  return `granularity ${formatSize(b.granularity)}, ${b.frozen ? 'frozen checkpoint' : b.enabled ? 'enabled' : 'disabled'}, ${formatSize(b.dirtyBytes)} dirty (${formatPercent(b.percent)})`;
}
