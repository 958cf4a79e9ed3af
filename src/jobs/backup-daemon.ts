/**
 * The live backup: job type `backup` of the serve-nbd daemon (`job-start {type: "backup", export,
 * target, …}`, `blkrep backup --control PATH --export NAME TARGET`).
 *
 * The source is the export's dirty-tracking filter (its bitmaps go on recording every write);
 * the export is switched to the job's front end — the copy-before-write filter — for the job's
 * life, so the target receives the export's content as it was when the job started, however
 * clients write meanwhile. The target is an image path or NBD URI the daemon opens.
 *
 * sync incremental copies the granules dirty in one of the export's bitmaps (`bitmap`: its
 * name) when the job starts; with bitmapMode on-success (default) they are cleared from that
 * bitmap when the job succeeds, except those written while it ran. sync full with `bitmap`
 * clears it likewise (the start of a chain).
 *
 * Fleecing: with `fleecingExport: NAME` the job's point-in-time view is served read-only as
 * export NAME of the daemon's own NBD server, on every listener of the daemon (TCP, Unix …),
 * for as long as the job runs (ctx.addExport; removed when the job concludes, its clients
 * disconnected). With `fleecingSocket: PATH` as well it is served instead on a Unix socket of
 * its own (src/jobs/fleecing.ts). The job's query gives the URIs (`fleecing`).
 *
 * Nothing persists: a backup interrupted by a daemon stop is cancelled (its target is not a
 * usable backup); start it again.
 */
import type { BlockNode } from '../api/block.js';
import { openImage, type ImageFormat } from '../block/open.js';
import { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import { ERROR_POLICIES, type ErrorPolicy } from './job.js';
import { BACKUP_BITMAP_MODES, BACKUP_SYNC_MODES, BackupJob, CBW_ERROR_POLICIES, type BackupBitmapMode, type BackupSync, type CbwErrorPolicy } from './backup.js';
import { badJobArg, definedFields, registerJobType, type JobContext, type JobServedExport } from './daemon-jobs.js';
import { serveSnapshot, type FleecingServer } from './fleecing.js';
import { arg, parseVerbArgs } from '../control/verb.js';
import { z } from 'zod';

/** What job-start {type: "backup"} takes besides type, export and id. */
export interface LiveBackupOptions {
  target: string;
  targetFormat?: ImageFormat;
  sync: BackupSync;
  /** the name of a bitmap of the export (incremental: what to copy; full: what to clear) */
  bitmap?: string;
  bitmapMode?: BackupBitmapMode;
  granularity?: number;
  bufSize?: number;
  maxOps?: number;
  speed?: number;
  targetIsZero?: boolean;
  onSourceError?: ErrorPolicy;
  onTargetError?: ErrorPolicy;
  onCbwError?: CbwErrorPolicy;
  connections?: number;
  /** serve the point-in-time view read-only under this export name */
  fleecingExport?: string;
  /** serve the fleecing export on this Unix socket of its own, not on the daemon's listeners */
  fleecingSocket?: string;
}

const bad = badJobArg;

/** job-start's args of a backup (an unknown field is refused). */
export const LIVE_BACKUP_ARGS = z.strictObject({
  target: arg.name().describe('an image path or NBD URI to back up onto'),
  targetFormat: arg.oneOf(['raw', 'qcow2']).optional().describe('the format of a target path (default: probed)'),
  sync: arg.oneOf(BACKUP_SYNC_MODES).optional().describe('what to copy (default full); incremental: the dirty bits of "bitmap"'),
  bitmap: arg.name().optional().describe('a bitmap of the export, with sync incremental or full'),
  bitmapMode: arg.oneOf(BACKUP_BITMAP_MODES).optional().describe('when the export bitmap is cleared'),
  granularity: arg.number().optional().describe('bytes per bit of the copy bitmap'),
  bufSize: arg.number().optional().describe('bytes of copy buffers'),
  maxOps: arg.number().optional().describe('copy operations in flight'),
  speed: arg.number().optional().describe('bytes per second, 0 = unlimited'),
  targetIsZero: arg.bool().optional().describe('the target reads as zeros: skip zero ranges'),
  onSourceError: arg.oneOf(ERROR_POLICIES).optional().describe('what a read error of the source does'),
  onTargetError: arg.oneOf(ERROR_POLICIES).optional().describe('what a write error of the target does'),
  onCbwError: arg.oneOf(CBW_ERROR_POLICIES).optional().describe('what a failed copy-before-write does'),
  connections: arg.number().optional().describe('connections to an NBD target (multi-conn)'),
  fleecingExport: arg.name().optional().describe('also serve the point-in-time view read-only under this export name'),
  fleecingSocket: arg.name().optional().describe('serve the fleecing export on this Unix socket of its own'),
});

/** job-start's args → options: the schema, then what the fields mean together. */
export function parseLiveBackupArgs(args: Record<string, unknown>): LiveBackupOptions {
  const a = parseVerbArgs('job-start', LIVE_BACKUP_ARGS, args, 'job type backup');
  const sync = a.sync ?? 'full';
  const { bitmap } = a;
  if (sync === 'incremental' && !bitmap) throw bad('sync incremental needs "bitmap": the name of a bitmap of the export');
  if (bitmap && sync !== 'incremental' && sync !== 'full') throw bad(`"bitmap" is used with sync incremental or full, not ${sync}`);
  const o: LiveBackupOptions = { ...definedFields(a), sync };
  if (o.fleecingSocket && !o.fleecingExport) throw bad('"fleecingSocket" needs "fleecingExport": the name to serve the snapshot under');
  return o;
}

/** The dirty bits of an export bitmap, read page by page. */
function exportBitmapBits(ctx: JobContext, name: string): DirtyBitmap {
  const info = ctx.export.bitmaps.get(name);
  const bits = new DirtyBitmap(info.size, { granularity: info.granularity });
  let start: number | null = 0;
  while (start !== null) {
    const page = ctx.export.bitmaps.dump(name, { start });
    for (const [offset, length] of page.runs) bits.fill(offset, length);
    start = page.next;
  }
  return bits;
}

async function createLiveBackup(ctx: JobContext, o: LiveBackupOptions): Promise<BackupJob> {
  const exp = ctx.export;
  const bits = o.bitmap ? exportBitmapBits(ctx, o.bitmap) : undefined; // throws ERR_BITMAP_NOT_FOUND first
  // the target's backing chain may be the export's own image (a COLO hidden disk), which this
  // daemon holds for writing: it is read sharing every permission (the target itself is locked)
  const target: BlockNode = await openImage(o.target, {
    backingForceShare: true,
    ...(o.targetFormat ? { format: o.targetFormat } : {}),
    nbd: { connections: o.connections ?? 4 },
  });
  let job: BackupJob;
  let fleece: FleecingServer | undefined;
  let served: JobServedExport | undefined;
  try {
    const name = o.bitmap;
    job = new BackupJob({
      id: ctx.id,
      source: exp.tracking,
      target,
      sync: o.sync,
      ...(bits && name
        ? {
            bitmap: bits,
            bitmapSink: {
              clear: async (runs) => void (await exp.bitmaps.clear(name, runs)),
              fill: async (runs) => void (await exp.bitmaps.fill(name, { ranges: runs })),
            },
          }
        : {}),
      ...(o.bitmapMode ? { bitmapMode: o.bitmapMode } : {}),
      ...(o.granularity !== undefined ? { granularity: o.granularity } : {}),
      ...(o.bufSize !== undefined ? { bufSize: o.bufSize } : {}),
      ...(o.maxOps !== undefined ? { maxOps: o.maxOps } : {}),
      ...(o.speed !== undefined ? { speed: o.speed } : {}),
      targetIsZero: o.targetIsZero ?? false,
      ...(o.onSourceError ? { onSourceError: o.onSourceError } : {}),
      ...(o.onTargetError ? { onTargetError: o.onTargetError } : {}),
      ...(o.onCbwError ? { onCbwError: o.onCbwError } : {}),
    });
    if (o.fleecingExport && o.fleecingSocket) {
      fleece = await serveSnapshot(job.snapshotNode, { name: o.fleecingExport, socket: o.fleecingSocket, log: ctx.log });
      job.fleecing = { export: fleece.name, socket: fleece.socket, uri: fleece.uri };
    } else if (o.fleecingExport) {
      // an export of the daemon's own server, on its listeners (ERR_EXPORT_EXISTS for a name in use)
      served = ctx.addExport(o.fleecingExport, job.snapshotNode, `point-in-time view of export "${exp.name}" (backup job ${ctx.id})`);
      job.fleecing = { export: served.name, uri: served.uris[0] ?? null, uris: served.uris };
    }
  } catch (err) {
    served?.remove(`backup job ${ctx.id} did not start`);
    await fleece?.close().catch(() => {});
    await target.close().catch(() => {});
    throw err;
  }
  const socketServer = fleece;
  const daemonExport = served;
  void job.whenConcluded().then(async () => {
    daemonExport?.remove(`backup job ${ctx.id} concluded`);
    await exp.switchFront(exp.tracking);
    if (socketServer) await socketServer.close().catch(() => {});
    await target.close().catch(() => {});
  });
  // the export's writes go through the copy-before-write filter from now on; the point in time
  // is the job's start, when the registry starts it
  await exp.switchFront(job.node);
  return job;
}

registerJobType('backup', {
  summary: "Copy a point-in-time view of the export onto a target (copy-before-write), while it is written to.",
  args: LIVE_BACKUP_ARGS,
  start: async (ctx) => createLiveBackup(ctx, parseLiveBackupArgs(ctx.args)),
});
