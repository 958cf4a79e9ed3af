/**
 * The live commit: job type `commit` of the serve-nbd daemon (`job-start {type: "commit",
 * export, base?, …}`, `blkrep commit --control PATH --export NAME`).
 *
 * The export's image must be a qcow2 overlay (the active layer). Its backing node, opened
 * read-only with the chain, is reopened read-write and put in its place under the overlay
 * (Qcow2Node.replaceBacking, while no request is in flight), so the node the commit writes is
 * the very node the overlay reads through. Then an ActiveCommitJob (src/jobs/commit.ts): a
 * sync-top mirror of the overlay into that node, the export's writes routed through the job's
 * front end and, below it, the export's dirty-tracking filter (its bitmaps keep recording).
 * Ready once the base has caught up; `job complete` drains (writes wait), flushes the base,
 * makes the overlay empty, and the writes flow on to the (now empty) overlay. `job cancel`
 * before ready leaves the base with part of the data, shadowed by the overlay; after ready, the
 * base is a consistent copy as of the cancel and the overlay is kept.
 *
 * Not persisted: a daemon stop cancels the job (with force); the overlay still shadows whatever
 * reached the base, so starting it again is safe. The base stays open read-write under the
 * overlay afterwards (as it is after the commit).
 *
 * args: base? (the backing file's path or name, as a check: only the overlay's own backing can
 * be committed into live), speed?, bufSize?, maxOps?, granularity?, copyMode?, maxLagMs?,
 * onSourceError?, onTargetError?.
 */
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { openImage, type ImageFormat } from '../block/open.js';
import { Qcow2Node, resolveBackingSpec } from '../block/qcow2/node.js';
import { sameImage } from '../image/chain.js';
import { ActiveCommitJob } from './commit.js';
import { registerJobType, type JobContext } from './daemon-jobs.js';
import { ERROR_POLICIES, type ErrorPolicy } from './job.js';
import { COPY_MODES, type CopyMode } from './mirror.js';

export interface LiveCommitOptions {
  base?: string;
  speed?: number;
  bufSize?: number;
  maxOps?: number;
  granularity?: number;
  copyMode?: CopyMode;
  maxLagMs?: number;
  onSourceError?: ErrorPolicy;
  onTargetError?: ErrorPolicy;
}

function bad(message: string): BlkrepError {
  return new BlkrepError('ERR_BAD_REQUEST', message, { errno: 'EINVAL' });
}

/** job-start's args → options, every field checked. */
export function parseLiveCommitArgs(args: Record<string, unknown>): LiveCommitOptions {
  const known = new Set(['base', 'speed', 'bufSize', 'maxOps', 'granularity', 'copyMode', 'maxLagMs', 'onSourceError', 'onTargetError']);
  for (const k of Object.keys(args)) if (!known.has(k)) throw bad(`"${k}" is not an argument of a commit job (it takes ${[...known].join(', ')})`);
  const o: LiveCommitOptions = {};
  const str = (k: string): string | undefined => {
    const v = args[k];
    if (v === undefined) return undefined;
    if (typeof v !== 'string' || v === '') throw bad(`"${k}" must be a non-empty string`);
    return v;
  };
  const num = (k: 'speed' | 'bufSize' | 'maxOps' | 'granularity' | 'maxLagMs'): void => {
    const v = args[k];
    if (v === undefined) return;
    if (typeof v !== 'number' || !Number.isFinite(v)) throw bad(`"${k}" must be a number`);
    o[k] = v;
  };
  const oneOf = <T extends string>(k: string, allowed: readonly T[]): T | undefined => {
    const v = str(k);
    if (v !== undefined && !(allowed as readonly string[]).includes(v)) throw bad(`"${k}" must be one of ${allowed.join(', ')}, not "${v}"`);
    return v as T | undefined;
  };
  const base = str('base');
  if (base !== undefined) o.base = base;
  for (const k of ['speed', 'bufSize', 'maxOps', 'granularity', 'maxLagMs'] as const) num(k);
  const copyMode = oneOf('copyMode', COPY_MODES);
  if (copyMode) o.copyMode = copyMode;
  const se = oneOf('onSourceError', ERROR_POLICIES);
  if (se) o.onSourceError = se;
  const te = oneOf('onTargetError', ERROR_POLICIES);
  if (te) o.onTargetError = te;
  return o;
}

/** The overlay's backing node, reopened read-write and put under it (unless it is writable already). */
async function writableBacking(overlay: Qcow2Node): Promise<BlockNode> {
  const current = overlay.backing!;
  if (current.caps.canWrite) return current;
  const header = overlay.image.header;
  const spec = resolveBackingSpec(overlay.description, header.backingFile!);
  const format = header.backingFormat === 'raw' || header.backingFormat === 'qcow2' ? (header.backingFormat as ImageFormat) : undefined;
  const rw = await openImage(spec, { readOnly: false, ...(format ? { format } : {}) });
  if (rw.size !== current.size) {
    await rw.close().catch(() => {});
    throw new BlkrepError('ERR_BACKING', `the backing file ${spec} reopened read-write is ${rw.size} bytes, not ${current.size}`, { errno: 'EIO', details: { spec } });
  }
  const old = await overlay.replaceBacking(rw);
  await old?.close().catch(() => {});
  return rw;
}

async function createLiveCommit(ctx: JobContext, o: LiveCommitOptions): Promise<ActiveCommitJob> {
  const exp = ctx.export;
  if (exp.readOnly) throw new BlkrepError('ERR_READ_ONLY', `export "${exp.name}" is read-only: commit its image offline with blkrep commit IMAGE`, { errno: 'EPERM', details: { export: exp.name } });
  const overlay = exp.imageNode;
  if (!(overlay instanceof Qcow2Node)) {
    throw new BlkrepError('ERR_NO_BACKING', `export "${exp.name}" serves ${exp.image}, a ${overlay.driver} image: only a qcow2 overlay has a backing file to commit into`, { errno: 'EINVAL', details: { export: exp.name, driver: overlay.driver } });
  }
  const backingName = overlay.image.header.backingFile;
  if (backingName === undefined || !overlay.backing) {
    throw new BlkrepError('ERR_NO_BACKING', `${overlay.description} (export "${exp.name}") has no backing file: there is nothing to commit it into`, { errno: 'EINVAL', details: { export: exp.name } });
  }
  const backingSpec = resolveBackingSpec(overlay.description, backingName);
  if (o.base !== undefined && o.base !== backingName && o.base !== backingSpec && !(await sameImage(o.base, backingSpec).catch(() => false))) {
    throw new BlkrepError('ERR_NOT_IN_CHAIN', `"${o.base}" is not the backing file of ${overlay.description} (${backingSpec}): a live commit writes into the overlay's own backing file (commit deeper layers offline, or one level at a time)`, {
      errno: 'EINVAL',
      details: { export: exp.name, base: o.base, backing: backingSpec },
    });
  }
  if (overlay.backing.size !== overlay.size) {
    throw new BlkrepError('ERR_SIZE_MISMATCH', `the backing file ${backingSpec} is ${overlay.backing.size} bytes and ${overlay.description} is ${overlay.size}: a live commit needs the same size (grow the backing file offline)`, {
      errno: 'EINVAL',
      details: { backingSize: overlay.backing.size, size: overlay.size },
    });
  }
  const base = await writableBacking(overlay);
  const job = new ActiveCommitJob({
    id: ctx.id,
    overlay,
    base,
    via: exp.tracking,
    ...(o.speed !== undefined ? { speed: o.speed } : {}),
    ...(o.bufSize !== undefined ? { bufSize: o.bufSize } : {}),
    ...(o.maxOps !== undefined ? { maxOps: o.maxOps } : {}),
    ...(o.granularity !== undefined ? { granularity: o.granularity } : {}),
    ...(o.copyMode ? { copyMode: o.copyMode } : {}),
    ...(o.maxLagMs !== undefined ? { maxLagMs: o.maxLagMs } : {}),
    ...(o.onSourceError ? { onSourceError: o.onSourceError } : {}),
    ...(o.onTargetError ? { onTargetError: o.onTargetError } : {}),
  });
  void job.whenConcluded().then(async () => {
    await exp.switchFront(exp.tracking);
    if (job.emptied) ctx.log('info', `job ${ctx.id}: ${overlay.description} committed into ${base.description} and made empty`);
  });
  // the export's writes go through the job from now on
  await exp.switchFront(job.node);
  return job;
}

registerJobType('commit', {
  start: async (ctx) => createLiveCommit(ctx, parseLiveCommitArgs(ctx.args)),
});
