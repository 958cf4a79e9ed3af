/**
 * The live commit: job type `commit` of the serve-nbd daemon (`job-start {type: "commit",
 * export, top?, base?, …}`, `blkrep commit --control PATH --export NAME`).
 *
 * The export's image must be a qcow2 overlay. What the job writes into, and the layers it
 * empties, are reopened read-write (the base with its own chain, the layers between over it) and
 * the new chain is put under the export's image (Qcow2Node.replaceBacking, while no request is
 * in flight), so the nodes the job writes are the very nodes the export reads through.
 *
 * - Active commit (no `top`): an ActiveCommitJob (src/jobs/commit.ts), a sync-top mirror of the
 *   export's image into the base, the export's writes routed through the job's front end and,
 *   below it, the export's dirty-tracking filter (its bitmaps keep recording). Ready once the
 *   base has caught up; `job complete` drains (writes wait), flushes the base, makes the image
 *   empty, and the writes flow on to it. `job cancel` before ready leaves the base with part of
 *   the data, shadowed by the image; after ready the base is a consistent copy as of the cancel
 *   and the image is kept. A base further down needs the layers between to be empty
 *   (ERR_NOT_EMPTY otherwise): commit them first with `top`.
 * - Intermediate commit (`top`: a layer below the export's image): a CommitJob of `top` and the
 *   layers down to above the base into the base, while the export goes on writing its image;
 *   it ends by itself and makes the committed layers empty (unless `keep`). A secondary's
 *   failover (active → hidden → disk, DESIGN.md §7): `top: hidden` (into disk), then an active
 *   commit with `base: disk`.
 *
 * Not persisted: a daemon stop cancels the job (with force); the upper layers still shadow
 * whatever reached the base, so starting it again is safe. The reopened nodes stay read-write
 * under the image afterwards.
 *
 * args: top?, base? (absolute paths of layers of the export's chain), keep?, speed?, bufSize?,
 * maxOps?, granularity?, copyMode?, maxLagMs?, onSourceError?, onTargetError?.
 */
import { lockOf, PERM_ALL, PERM_CONSISTENT_READ, type ImageLock, type LockPerms } from '../block/image-lock.js';
import type { BlockNode } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { openImage, type ImageFormat } from '../block/open.js';
import { Qcow2Node } from '../block/qcow2/node.js';
import { sameImage } from '../image/chain.js';
import { ActiveCommitJob, CommitJob } from './commit.js';
import { definedFields, registerJobType, type JobContext } from './daemon-jobs.js';
import { ERROR_POLICIES, type ErrorPolicy } from './job.js';
import { COPY_MODES, type CopyMode } from './mirror.js';
import { arg, parseVerbArgs } from '../control/verb.js';
import { z } from 'zod';

export interface LiveCommitOptions {
  /** a layer below the export's image: an intermediate commit of it (and the layers down to above the base) */
  top?: string;
  base?: string;
  /** intermediate commit: do not make the committed layers empty */
  keep?: boolean;
  speed?: number;
  bufSize?: number;
  maxOps?: number;
  granularity?: number;
  copyMode?: CopyMode;
  maxLagMs?: number;
  onSourceError?: ErrorPolicy;
  onTargetError?: ErrorPolicy;
}


/** job-start's args of a commit (an unknown field is refused). */
export const LIVE_COMMIT_ARGS = z.strictObject({
  top: arg.name().optional().describe('the layer to commit from (default: the overlay: an active commit)'),
  base: arg.name().optional().describe('the layer to commit into (default: the bottom of the chain)'),
  keep: arg.bool().optional().describe('keep the emptied layers in the chain'),
  speed: arg.number().optional().describe('bytes per second, 0 = unlimited'),
  bufSize: arg.number().optional().describe('bytes of copy buffers'),
  maxOps: arg.number().optional().describe('copy operations in flight'),
  granularity: arg.number().optional().describe('bytes per dirty bit'),
  copyMode: arg.oneOf(COPY_MODES).optional().describe('background, write-blocking or auto (active commit)'),
  maxLagMs: arg.number().optional().describe('with copyMode auto: the lag at which writes block'),
  onSourceError: arg.oneOf(ERROR_POLICIES).optional().describe('what a read error does'),
  onTargetError: arg.oneOf(ERROR_POLICIES).optional().describe('what a write error of the base does'),
});

/** job-start's args → options, every field checked by the schema. */
export function parseLiveCommitArgs(args: Record<string, unknown>): LiveCommitOptions {
  return definedFields(parseVerbArgs('job-start', LIVE_COMMIT_ARGS, args, 'job type commit'));
}

/** The export's chain: the overlay first, each node's backing after it. */
function chainOf(overlay: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n: BlockNode | undefined = overlay; n; n = n instanceof Qcow2Node ? n.backing : undefined) out.push(n);
  return out;
}

/** Index in `chain` (≥ 1) of the image `spec` names, or -1. */
async function findLayer(chain: BlockNode[], spec: string): Promise<number> {
  for (let i = 1; i < chain.length; i++) {
    const d = chain[i]!.description;
    if (d === spec || (await sameImage(spec, d).catch(() => false))) return i;
  }
  return -1;
}

/**
 * Make chain[b] (the base) and chain[t..b-1] (the layers an intermediate commit empties)
 * writable: reopen chain[1..b] — the base read-write with its own chain, the layers above it
 * over it — and put the new chain under the overlay (Qcow2Node.replaceBacking, while no request
 * is in flight), then close the old one. Returns the new chain.
 */
async function reopenWritable(chain: BlockNode[], t: number, b: number): Promise<BlockNode[]> {
  const needsRw = (i: number): boolean => i === b || (i >= t && i < b);
  if (chain.every((n, i) => i === 0 || !needsRw(i) || n.caps.canWrite)) return chain;
  // a node left writable by an earlier commit holds no dirty metadata once flushed, so closing it later writes nothing
  for (let i = 1; i <= b; i++) if (chain[i]!.caps.canWrite) await chain[i]!.flush?.();
  const overlay = chain[0] as Qcow2Node;
  const opened: BlockNode[] = [];
  // the old chain's locks do not share writing: relax them to a plain reader's (as QEMU updates the
  // permissions of the nodes it reopens) so the read-write opens below are not refused by our own
  // files; they are restored if the reopen fails, and go with the old chain once it is replaced
  const relaxed = await relaxLocks(chain.slice(1, b + 1));
  try {
    const old = chain[b]!;
    const base = await openImage(old.description, { readOnly: false, format: old.driver === 'qcow2' ? 'qcow2' : ('raw' as ImageFormat) });
    opened.unshift(base);
    if (base.size !== old.size) throw new BlkrepError('ERR_BACKING', `${old.description} reopened read-write is ${base.size} bytes, not ${old.size}`, { errno: 'EIO', details: { image: old.description } });
    for (let i = b - 1; i >= 1; i--) opened.unshift(await Qcow2Node.open(chain[i]!.description, { readOnly: !needsRw(i), backing: opened[0]! }));
  } catch (err) {
    // closing the top of what was opened closes the rest below it
    await opened[0]?.close().catch(() => {});
    await relaxed.restore();
    throw err;
  }
  const oldBacking = await overlay.replaceBacking(opened[0]!);
  await oldBacking?.close().catch(() => {});
  return chainOf(overlay);
}

/** Let the nodes' files be opened read-write elsewhere (they keep reading); restore() undoes it. */
async function relaxLocks(nodes: BlockNode[]): Promise<{ restore(): Promise<void> }> {
  const held: Array<[ImageLock, LockPerms]> = [];
  for (const n of nodes) {
    const lock = lockOf(n);
    if (!lock) continue;
    held.push([lock, lock.perms]);
    await lock.update({ perm: PERM_CONSISTENT_READ, shared: PERM_ALL });
  }
  return {
    async restore() {
      for (const [lock, perms] of held) await lock.update(perms).catch(() => {});
    },
  };
}

async function createLiveCommit(ctx: JobContext, o: LiveCommitOptions): Promise<ActiveCommitJob | CommitJob> {
  const exp = ctx.export;
  if (exp.readOnly) throw new BlkrepError('ERR_READ_ONLY', `export "${exp.name}" is read-only: commit its image offline with blkrep commit IMAGE`, { errno: 'EPERM', details: { export: exp.name } });
  const overlay = exp.imageNode;
  if (!(overlay instanceof Qcow2Node)) {
    throw new BlkrepError('ERR_NO_BACKING', `export "${exp.name}" serves ${exp.image}, a ${overlay.driver} image: only a qcow2 overlay has a backing file to commit into`, { errno: 'EINVAL', details: { export: exp.name, driver: overlay.driver } });
  }
  let chain = chainOf(overlay);
  if (chain.length < 2) {
    throw new BlkrepError('ERR_NO_BACKING', `${overlay.description} (export "${exp.name}") has no backing file: there is nothing to commit it into`, { errno: 'EINVAL', details: { export: exp.name } });
  }
  const names = chain.map((n) => n.description);
  // t: the top of what is committed (0: the overlay itself, an active commit); b: the base
  let t = 0;
  if (o.top !== undefined && o.top !== overlay.description && !(await sameImage(o.top, overlay.description).catch(() => false))) {
    t = await findLayer(chain, o.top);
    if (t < 0) throw new BlkrepError('ERR_NOT_IN_CHAIN', `"${o.top}" is not in the backing chain of export "${exp.name}" (${names.join(' → ')})`, { errno: 'EINVAL', details: { export: exp.name, top: o.top, chain: names } });
  }
  let b = t + 1;
  if (o.base !== undefined) {
    b = await findLayer(chain, o.base);
    if (b < 0) throw new BlkrepError('ERR_NOT_IN_CHAIN', `"${o.base}" is not in the backing chain of export "${exp.name}" (${names.join(' → ')})`, { errno: 'EINVAL', details: { export: exp.name, base: o.base, chain: names } });
    if (b <= t) throw new BlkrepError('ERR_NOT_IN_CHAIN', `the base "${o.base}" is not below the top "${o.top}" in the chain of export "${exp.name}" (${names.join(' → ')})`, { errno: 'EINVAL', details: { export: exp.name, base: o.base, top: o.top ?? null } });
  }
  if (b >= chain.length) throw new BlkrepError('ERR_NO_BACKING', `${chain[t]!.description} has no backing file: there is nothing to commit it into`, { errno: 'EINVAL', details: { export: exp.name } });
  if (chain[b]!.driver !== 'qcow2' && chain[b]!.driver !== 'raw') {
    throw new BlkrepError('ERR_UNSUPPORTED_FORMAT', `the base ${chain[b]!.description} is a ${chain[b]!.driver} node: a live commit writes into a raw or qcow2 file`, { errno: 'ENOTSUP', details: { base: chain[b]!.description } });
  }
  if (t === 0 && chain[b]!.size !== overlay.size) {
    throw new BlkrepError('ERR_SIZE_MISMATCH', `the base ${chain[b]!.description} is ${chain[b]!.size} bytes and ${overlay.description} is ${overlay.size}: a live commit of the active layer needs the same size (grow the base offline)`, {
      errno: 'EINVAL',
      details: { baseSize: chain[b]!.size, size: overlay.size },
    });
  }
  chain = await reopenWritable(chain, t, b);
  const base = chain[b]!;
  const common = {
    id: ctx.id,
    ...(o.speed !== undefined ? { speed: o.speed } : {}),
    ...(o.bufSize !== undefined ? { bufSize: o.bufSize } : {}),
    ...(o.maxOps !== undefined ? { maxOps: o.maxOps } : {}),
    ...(o.onSourceError ? { onSourceError: o.onSourceError } : {}),
    ...(o.onTargetError ? { onTargetError: o.onTargetError } : {}),
  };
  if (t > 0) {
    // intermediate: nothing writes chain[t..b-1] (the export writes the overlay above them);
    // the job ends by itself, having emptied them
    const top = chain[t]!;
    const job = new CommitJob({ ...common, top, base, layers: b - t, makeEmpty: o.keep ? [] : chain.slice(t, b) });
    void job.whenConcluded().then(() => {
      if (job.emptied.length > 0) ctx.log('info', `job ${ctx.id}: ${chain.slice(t, b).map((n) => n.description).join(', ')} committed into ${base.description} and made empty`);
    });
    return job;
  }
  const job = new ActiveCommitJob({
    ...common,
    overlay,
    base,
    via: exp.tracking,
    ...(o.granularity !== undefined ? { granularity: o.granularity } : {}),
    ...(o.copyMode ? { copyMode: o.copyMode } : {}),
    ...(o.maxLagMs !== undefined ? { maxLagMs: o.maxLagMs } : {}),
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
  summary: "Commit layers of the export's qcow2 chain into a layer below, while it is written to.",
  args: LIVE_COMMIT_ARGS,
  start: async (ctx) => createLiveCommit(ctx, parseLiveCommitArgs(ctx.args)),
});
