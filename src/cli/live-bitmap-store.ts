/**
 * The bitmaps of an export of a running serve-nbd, through its control socket (the bitmap-*
 * verbs of src/control/README.md). A client of the control socket, so not part of the engine:
 * the bitmap commands register it in the table of bitmap stores (registerLiveBitmapStore). Paths sent to the daemon are made absolute (its working
 * directory is not ours); long lists of ranges go in several requests, and a dump comes in pages.
 */
import { resolve as resolvePath } from 'node:path';
import { BlkrepError } from '../api/errors.js';
import { ControlClient } from '../control/client.js';
import { controlPathFor } from './control-path.js';
import { MAX_RANGES_PER_REQUEST } from '../bitmap/control-verbs.js';
import { DirtyBitmap, type Run } from '../bitmap/dirty-bitmap.js';
import type { DumpPage } from '../bitmap/export-bitmaps.js';
import type { AddOptions, BitmapChange, BitmapInfo, CheckpointInfo, MergeSource } from '../bitmap/ops.js';
import { PersistentBitmap } from '../bitmap/persistent.js';
import { sourceBitmapFile, type BitmapStore, type OpenBitmapStore, type OpenStoreOptions, type ReadOptions } from '../bitmap/store-base.js';

export class LiveStore implements BitmapStore {
  readonly kind = 'live' as const;
  readonly description: string;

  private constructor(
    private readonly client: ControlClient,
    readonly controlPath: string,
    readonly exportName: string | undefined,
    private readonly timeoutMs: number,
    private readonly open: OpenBitmapStore,
  ) {
    this.description = exportName === undefined ? `the export of the daemon at ${controlPath}` : `export "${exportName}" of the daemon at ${controlPath}`;
  }

  static async connect(path: string, exportName: string | undefined, options: { timeoutMs: number; open: OpenBitmapStore }): Promise<LiveStore> {
    const client = await ControlClient.connect(controlPathFor(path), { timeoutMs: options.timeoutMs });
    return new LiveStore(client, path, exportName, options.timeoutMs, options.open);
  }

  private request<T>(cmd: string, args: Record<string, unknown> = {}): Promise<T> {
    const withExport = this.exportName === undefined ? args : { export: this.exportName, ...args };
    return this.client.request(cmd, withExport, { timeoutMs: this.timeoutMs }) as Promise<T>;
  }

  list(): Promise<BitmapInfo[]> {
    return this.request<BitmapInfo[]>('bitmap-list');
  }

  async resolve(name: string | undefined): Promise<string> {
    if (name !== undefined) return name;
    const names = (await this.list()).map((b) => b.name);
    if (names.length === 1) return names[0]!;
    if (names.length === 0) {
      throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `${this.description} has no bitmaps (add one with: blkrep bitmap add --control ${this.controlPath} --name NAME)`, {
        errno: 'EINVAL',
      });
    }
    throw new BlkrepError('ERR_USAGE', `${this.description} has ${names.length} bitmaps: say which with --name (${names.map((n) => `"${n}"`).join(', ')})`, { errno: 'EINVAL' });
  }

  private async info(name: string): Promise<BitmapInfo> {
    const found = (await this.list()).find((b) => b.name === name);
    if (!found) throw new BlkrepError('ERR_BITMAP_NOT_FOUND', `${this.description} has no bitmap "${name}"`, { errno: 'EINVAL', details: { name } });
    return found;
  }

  async read(name: string, options: ReadOptions = {}): Promise<{ info: BitmapInfo; bitmap: DirtyBitmap }> {
    const info = await this.info(name);
    const bitmap = new DirtyBitmap(info.size, { granularity: info.granularity, enabled: info.enabled });
    // The range clipped to the disk, as a bitmap file's would be.
    let start = Math.min(options.start ?? 0, info.size);
    const end = Math.min(info.size, options.length === undefined ? info.size : start + options.length);
    for (;;) {
      const page = await this.request<DumpPage>('bitmap-dump', { name, start, length: Math.max(0, end - start) });
      for (const [offset, length] of page.runs) bitmap.fill(offset, length);
      if (page.next === null) break;
      start = page.next;
    }
    return { info, bitmap };
  }

  add(name: string, options: AddOptions): Promise<BitmapChange> {
    return this.request<BitmapChange>('bitmap-add', {
      name,
      ...(options.granularity === undefined ? {} : { granularity: options.granularity }),
      ...(options.enabled === undefined ? {} : { disabled: !options.enabled }),
      ...(options.file === undefined ? {} : { file: resolvePath(options.file) }),
      ...(options.persistent === undefined ? {} : { persistent: options.persistent }),
    });
  }

  remove(name: string, options: { ifExists?: boolean }): Promise<BitmapChange> {
    return this.request<BitmapChange>('bitmap-remove', { name, ifExists: options.ifExists ?? false });
  }

  async clear(name: string, ranges?: Run[]): Promise<BitmapChange> {
    if (!ranges) return this.request<BitmapChange>('bitmap-clear', { name });
    return this.batched('bitmap-clear', name, ranges);
  }

  setEnabled(name: string, enabled: boolean): Promise<BitmapChange> {
    return this.request<BitmapChange>(enabled ? 'bitmap-enable' : 'bitmap-disable', { name });
  }

  async merge(name: string, source: MergeSource): Promise<BitmapChange> {
    if (source.bits) return this.batched('bitmap-fill', name, [...source.bits.dirtyRuns()]);
    if (source.file !== undefined) {
      const file = await sourceBitmapFile(this.open, source.file, source.name);
      return this.request<BitmapChange>('bitmap-merge', { name, sourceFile: resolvePath(file) });
    }
    return this.request<BitmapChange>('bitmap-merge', { name, source: source.name ?? name });
  }

  async fill(name: string, what: { ranges?: Run[]; all?: boolean }): Promise<BitmapChange> {
    if (what.all) return this.request<BitmapChange>('bitmap-fill', { name, all: true });
    return this.batched('bitmap-fill', name, what.ranges ?? []);
  }

  checkpoint(name: string): Promise<CheckpointInfo> {
    return this.request<CheckpointInfo>('bitmap-checkpoint', { name });
  }

  checkpoints(name: string): Promise<CheckpointInfo[]> {
    return this.request<CheckpointInfo[]>('bitmap-checkpoints', { name });
  }

  async readCheckpoint(name: string, n: number): Promise<{ info: CheckpointInfo; bitmap: DirtyBitmap }> {
    const list = await this.checkpoints(name);
    const info = list.find((c) => c.number === n);
    if (!info) {
      throw new BlkrepError(
        'ERR_CHECKPOINT_NOT_FOUND',
        `bitmap "${name}" of ${this.description} has no checkpoint ${n} (${list.length ? `it has ${list.map((c) => c.number).join(', ')}` : 'it has none'})`,
        { errno: 'EINVAL', details: { name, checkpoint: n } },
      );
    }
    // A checkpoint is a frozen file the daemon never changes again: read it here.
    const { bitmap: pb } = await PersistentBitmap.open(info.path, { readOnly: true, strict: true });
    await pb.close();
    return { info, bitmap: pb.bitmap };
  }

  close(): Promise<void> {
    return this.client.close();
  }

  /** `cmd` with `ranges` in requests of at most MAX_RANGES_PER_REQUEST; changed if any changed. */
  private async batched(cmd: 'bitmap-fill' | 'bitmap-clear', name: string, ranges: Run[]): Promise<BitmapChange> {
    let result: BitmapChange | undefined;
    let changed = false;
    for (let i = 0; i === 0 || i < ranges.length; i += MAX_RANGES_PER_REQUEST) {
      const batch = ranges.slice(i, i + MAX_RANGES_PER_REQUEST).map((r) => [r.offset, r.length]);
      result = await this.request<BitmapChange>(cmd, { name, ranges: batch });
      changed ||= result.changed;
    }
    return { ...result!, changed };
  }
}

/** The live store as an opener of the table of bitmap stores (target: the control socket). */
export function openLiveStore(control: string, options: OpenStoreOptions, open: OpenBitmapStore): Promise<BitmapStore> {
  return LiveStore.connect(control, options.export, { timeoutMs: options.timeoutMs ?? 10_000, open });
}
