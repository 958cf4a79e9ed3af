/**
 * The live mirror: job type `mirror` of the serve-nbd daemon (`job-start {type: "mirror",
 * export, target, …}`, `blkrep mirror --control PATH --export NAME TARGET`).
 *
 * The source is the export's dirty-tracking filter, so its bitmaps go on recording every write;
 * the export is switched to the job's front end (job.node) for the job's life. The target is an
 * image path or NBD URI the daemon opens. complete with pivot puts the target under the export's
 * tracking filter (the export serves the target from then on; its bitmaps keep recording);
 * complete without pivot and cancel leave the export on its image.
 *
 * Persistence (an export whose image is a regular file): beside the image,
 *   IMAGE.job-ID.json    the job's state (type, export, target, options, status, generation),
 *                        written atomically at every status change;
 *   IMAGE.job-ID.dirty   a blkrep persistent bitmap (crash-safe through its activity log): every
 *                        write of the export sets its granules before it is issued, and the
 *                        mirror clears granules only once a target flush made them stable
 *                        (MirrorJob's onStable hook: model finding 1). At any moment it covers
 *                        every region where the target may differ from the source.
 * At the next start of the daemon the job is loaded paused; `job resume` copies what the bitmap
 * holds (sync bitmap). Both files are removed when the job concludes.
 */
import { BlkrepError } from '../api/errors.js';
import { PivotTarget } from '../block/filters/pivot.js';
import { openImage, type ImageFormat } from '../block/open.js';
import { DirtyBitmap, DEFAULT_GRANULARITY } from '../bitmap/dirty-bitmap.js';
import { PersistentBitmap } from '../bitmap/persistent.js';
import { ERROR_POLICIES, type ErrorPolicy } from './job.js';
import { checkTargetEmpty } from './target-check.js';
import { BITMAP_MODES, COPY_MODES, MirrorJob, type BitmapMode, type CopyMode } from './mirror.js';
import { arg, parseVerbArgs } from '../control/verb.js';
import { z } from 'zod';
import { badJobArg, definedFields, jobStatePath, registerJobType, removeJobFiles, saveJobState, type JobContext, type SavedJobState } from './daemon-jobs.js';

export const DIRTY_SUFFIX = '.dirty';
/** while copying, the target is flushed (and the dirty file cleared of what it made stable) this often */
const STABLE_INTERVAL_MS = 1000;

/** What job-start {type: "mirror"} takes (besides export and id), and what the state file keeps. */
export interface LiveMirrorOptions {
  target: string;
  targetFormat?: ImageFormat;
  /** full (default), top, none, or bitmap (with `bitmap`: a bitmap of the export) */
  sync: 'full' | 'top' | 'none' | 'bitmap';
  bitmap?: string;
  bitmapMode?: BitmapMode;
  granularity?: number;
  bufSize?: number;
  maxOps?: number;
  speed?: number;
  targetIsZero?: boolean;
  copyMode?: CopyMode;
  maxLagMs?: number;
  onSourceError?: ErrorPolicy;
  onTargetError?: ErrorPolicy;
  /** connections to an NBD target (multi-conn) */
  connections?: number;
  /** keep state and dirty bitmap beside the image (default true when it is a file) */
  persist?: boolean;
  /** the target may hold data: mirror onto it anyway (QEMU mode=existing); else such a target is refused */
  existing?: boolean;
}

const bad = badJobArg;

/** job-start's args of a mirror (an unknown field is refused: a misspelt option never passes unseen). */
export const LIVE_MIRROR_ARGS = z.strictObject({
  target: arg.name().describe('an image path or NBD URI to mirror onto'),
  targetFormat: arg.oneOf(['raw', 'qcow2']).optional().describe('the format of a target path (default: probed)'),
  sync: arg.oneOf(['full', 'top', 'none', 'bitmap']).optional().describe('what to copy (default full); bitmap: the dirty bits of "bitmap"'),
  bitmap: arg.name().optional().describe('a bitmap of the export, with sync bitmap'),
  bitmapMode: arg.oneOf(BITMAP_MODES).optional().describe('with sync bitmap: on-success (default) or never clears the export bitmap'),
  granularity: arg.number().optional().describe('bytes per dirty bit of the mirror'),
  bufSize: arg.number().optional().describe('bytes of copy buffers'),
  maxOps: arg.number().optional().describe('copy operations in flight'),
  speed: arg.number().optional().describe('bytes per second, 0 = unlimited'),
  targetIsZero: arg.bool().optional().describe('the target reads as zeros: skip zero ranges'),
  copyMode: arg.oneOf(COPY_MODES).optional().describe('background, write-blocking or auto'),
  maxLagMs: arg.number().optional().describe('with copyMode auto: the lag at which writes block'),
  onSourceError: arg.oneOf(ERROR_POLICIES).optional().describe('what a read error of the source does'),
  onTargetError: arg.oneOf(ERROR_POLICIES).optional().describe('what a write error of the target does'),
  connections: arg.number().optional().describe('connections to an NBD target (multi-conn)'),
  persist: arg.bool().optional().describe('keep the job state and dirty bitmap beside the image (default true for a file)'),
  existing: arg.bool().optional().describe('the target may hold data already and is overwritten (as QEMU mode=existing); without it a target with data is refused (ERR_TARGET_NOT_EMPTY)'),
});

/** job-start's args → options: the schema, then what the fields mean together. */
export function parseLiveMirrorArgs(args: Record<string, unknown>): LiveMirrorOptions {
  const a = parseVerbArgs('job-start', LIVE_MIRROR_ARGS, args, 'job type mirror');
  const sync = a.sync ?? 'full';
  const { bitmap } = a;
  if (sync === 'bitmap' && !bitmap) throw bad('sync bitmap needs "bitmap": the name of a bitmap of the export');
  if (sync !== 'bitmap' && bitmap) throw bad(`"bitmap" is only used with sync bitmap, not ${sync}`);
  const o: LiveMirrorOptions = { ...definedFields(a), sync };
  if (o.bitmapMode !== undefined && sync !== 'bitmap') throw bad(`"bitmapMode" is only used with sync bitmap, not ${sync}`);
  if (o.bitmapMode === 'always') throw bad('bitmapMode "always" is for an offline mirror: live, the export bitmap is cleared when the target is a consistent copy (on-success) or never');
  return o;
}

/** The dirty bits of an export bitmap (sync bitmap), read page by page. */
function exportBitmapBits(ctx: JobContext, name: string): DirtyBitmap {
  const info = ctx.export.bitmaps.get(name);
  const bits = new DirtyBitmap(info.size, { granularity: info.granularity });
  let start: number | null = 0;
  while (start !== null) {
    const page = ctx.export.bitmaps.dump(name, { start });
    for (const [offset, length] of page.runs) bits.set(offset, length);
    start = page.next;
  }
  return bits;
}

function clearStable(pb: PersistentBitmap, granules: DirtyBitmap): void {
  const g = granules.granularity;
  let b = 0;
  const bits = granules.bits;
  while (b < bits) {
    const s = granules.nextDirtyBit(b);
    if (s < 0) break;
    let e = granules.nextCleanBit(s);
    if (e < 0) e = bits;
    const offset = s * g;
    pb.clear(offset, Math.min(e * g, granules.size) - offset);
    b = e;
  }
}

async function createLiveMirror(ctx: JobContext, o: LiveMirrorOptions, resume?: { saved: SavedJobState }): Promise<MirrorJob> {
  const exp = ctx.export;
  if (exp.readOnly) throw new BlkrepError('ERR_READ_ONLY', `export "${exp.name}" is read-only: nothing writes it, mirror it offline with blkrep mirror SOURCE TARGET`, { errno: 'EPERM' });
  const raw = await openImage(o.target, { ...(o.targetFormat ? { format: o.targetFormat } : {}), nbd: { connections: o.connections ?? 4 } });
  const target = new PivotTarget(raw);
  const stateBase = o.persist === false ? undefined : ctx.stateBase;
  let pb: PersistentBitmap | undefined;
  let job: MirrorJob;
  let pivoted = false;
  let stopped = false;
  let gone = false;
  try {
    // a target with data is overwritten only when asked for (a job loaded at start wrote it itself)
    if (!resume) await checkTargetEmpty(raw, o.target, o.existing === true, 'Give --existing (job-start "existing": true)');
    let seed: DirtyBitmap | undefined;
    if (stateBase !== undefined) {
      const path = `${stateBase}${DIRTY_SUFFIX}`;
      if (resume) {
        try {
          const opened = await PersistentBitmap.open(path, { size: exp.size });
          pb = opened.bitmap;
          if (opened.loadState.state !== 'clean') ctx.log('warn', `job ${ctx.id}: dirty bitmap ${path} loaded ${opened.loadState.state}${opened.loadState.state === 'all-dirty' ? ` (${opened.loadState.reason}): everything is copied again` : ''}`);
        } catch (err) {
          ctx.log('warn', `job ${ctx.id}: dirty bitmap ${path} cannot be opened (${(err as Error).message}): everything is copied again`);
          pb = await PersistentBitmap.create(path, { size: exp.size, granularity: o.granularity ?? DEFAULT_GRANULARITY, overwrite: true });
          pb.setAll();
        }
      } else {
        pb = await PersistentBitmap.create(path, { size: exp.size, granularity: o.granularity ?? (o.sync === 'bitmap' ? exp.bitmaps.get(o.bitmap!).granularity : DEFAULT_GRANULARITY), overwrite: true });
        if (o.sync === 'full' || o.sync === 'top') pb.setAll();
        else if (o.sync === 'bitmap') pb.merge(exportBitmapBits(ctx, o.bitmap!));
      }
      await pb.flush();
      // from now on every write of the export is recorded in it before it is issued
      exp.tracking.addTracker(pb);
      if (resume) seed = pb.bitmap.clone();
    } else if (resume) {
      throw new BlkrepError('ERR_JOB_INVALID', `job ${ctx.id} has no state to resume from`, { errno: 'EINVAL' });
    }
    if (!resume && o.sync === 'bitmap') seed = exportBitmapBits(ctx, o.bitmap!);
    const persistent = pb;
    job = new MirrorJob({
      id: ctx.id,
      source: exp.tracking,
      target,
      sync: seed ? 'bitmap' : o.sync,
      ...(seed ? { bitmap: seed, bitmapMode: 'never' as const } : {}),
      ...(o.granularity !== undefined || persistent ? { granularity: persistent ? persistent.bitmap.granularity : o.granularity } : {}),
      ...(o.bufSize !== undefined ? { bufSize: o.bufSize } : {}),
      ...(o.maxOps !== undefined ? { maxOps: o.maxOps } : {}),
      ...(o.speed !== undefined ? { speed: o.speed } : {}),
      targetIsZero: resume ? false : (o.targetIsZero ?? false),
      ...(o.copyMode ? { copyMode: o.copyMode } : {}),
      ...(o.maxLagMs !== undefined ? { maxLagMs: o.maxLagMs } : {}),
      ...(o.onSourceError ? { onSourceError: o.onSourceError } : {}),
      ...(o.onTargetError ? { onTargetError: o.onTargetError } : {}),
      ...(persistent
        ? {
            // the copy's progress reaches the dirty file at least this often, not only at ready
            stableIntervalMs: STABLE_INTERVAL_MS,
            onStable: (granules: DirtyBitmap) => {
              clearStable(persistent, granules);
              // store the clears now (syncs in flight are grouped: at most one waits behind another)
              if (!stopped && !gone) persistent.flush().catch((err: unknown) => ctx.log('warn', `job ${ctx.id}: ${(err as Error).message}`));
            },
          }
        : {}),
      // sync bitmap, on-success: once the target equals the source (writes wait), every region
      // the export bitmap marks is in step: clear it
      ...(o.sync === 'bitmap' && o.bitmapMode !== 'never'
        ? {
            onConsistent: async () => {
              await exp.bitmaps.clear(o.bitmap!).catch((err: unknown) => ctx.log('warn', `job ${ctx.id}: bitmap "${o.bitmap}" not cleared: ${(err as Error).message}`));
            },
          }
        : {}),
      pivot: async () => {
        // writes wait at the front end; the target equals the source. New requests go through
        // the tracking filter onto the target; the held-back ones too (PivotTarget).
        void exp.switchImage(raw);
        target.redirect(exp.tracking);
        void exp.switchFront(exp.tracking);
        pivoted = true;
      },
    });
  } catch (err) {
    if (pb) {
      exp.tracking.removeTracker(pb);
      await pb.close().catch(() => {});
      if (!resume && stateBase) await removeJobFiles(stateBase, [DIRTY_SUFFIX]).catch(() => {});
    }
    await raw.close().catch(() => {});
    throw err;
  }

  // ---------------------------------------------------------------- state file
  const statePath = stateBase === undefined ? undefined : jobStatePath(stateBase);
  let generation = resume?.saved.generation ?? 0;
  let chain: Promise<void> = Promise.resolve();
  const save = (status: string): Promise<void> => {
    if (!statePath) return chain;
    chain = chain.then(async () => {
      if (gone) return;
      generation++;
      await saveJobState(statePath, { version: 1, id: ctx.id, type: 'mirror', export: exp.name, status, generation, savedAt: new Date().toISOString(), options: { ...o } }).catch((err: unknown) =>
        ctx.log('warn', `job ${ctx.id}: cannot save its state in ${statePath}: ${(err as Error).message}`),
      );
    });
    return chain;
  };
  job.on('status-change', (e: { status: string }) => {
    if (e.status !== 'concluded' && e.status !== 'created') void save(e.status);
  });
  await save(resume ? 'paused' : 'created');

  ctx.describe(() => ({ target: o.target, pivoted, stateFile: gone ? null : (statePath ?? null), dirtyFile: gone || !pb ? null : pb.path }));

  // ---------------------------------------------------------------- daemon stop: pause and keep
  ctx.onStop(async () => {
    stopped = true;
    if (!job.pauseRequested && ['created', 'running', 'ready'].includes(job.status)) {
      await Promise.race([job.pause().catch(() => {}), new Promise((r) => setTimeout(r, 10_000).unref())]);
    }
    await save('paused');
    if (pb) {
      exp.tracking.removeTracker(pb);
      await pb.close().catch((err: unknown) => ctx.log('warn', `job ${ctx.id}: ${(err as Error).message}`));
    }
    await raw.close().catch(() => {});
  });

  // ---------------------------------------------------------------- conclusion
  void job.whenConcluded().then(async () => {
    if (stopped) return;
    if (pb) exp.tracking.removeTracker(pb);
    if (!pivoted) await exp.switchFront(exp.tracking);
    gone = true;
    await chain;
    if (pb) await pb.close().catch(() => {});
    if (stateBase !== undefined) await removeJobFiles(stateBase, [DIRTY_SUFFIX]).catch(() => {});
    if (pivoted) exp.keepOpen(raw);
    else await raw.close().catch(() => {});
  });

  // the export's writes go through the job from now on
  await exp.switchFront(job.node);
  return job;
}

registerJobType('mirror', {
  summary: 'Copy the export onto a target while it is written to; complete pivots the export onto the target.',
  args: LIVE_MIRROR_ARGS,
  start: async (ctx) => createLiveMirror(ctx, parseLiveMirrorArgs(ctx.args)),
  load: async (ctx, saved) => {
    const o = parseLiveMirrorArgs(saved.options);
    const job = await createLiveMirror(ctx, o, { saved });
    // loaded paused: it starts copying on job resume
    void job.pause().catch(() => {});
    return job;
  },
});
