/**
 * ActiveCommitJob — the overlay is the active layer: clients write through `job.node`
 * meanwhile. A MirrorJob with sync top from the overlay into BASE, where BASE must be the very
 * node the overlay reads through as its backing (opened read-write): a second node on the same
 * file would keep caches that go stale. Ready once BASE has caught up; complete() drains
 * (writes wait), flushes BASE, makes the overlay empty while the writes still wait, then lets
 * them flow to the (now empty) overlay again — no pivot. cancel() before ready (or force):
 * BASE holds part of the data, shadowed by the overlay; after ready: BASE is a consistent copy
 * as of the cancel and the overlay is left as it is. Its policy is the mirror's (src/jobs/mirror/).
 */
import type { BlockNode } from '../../api/block.js';
import { BlkrepError } from '../../api/errors.js';
import { Qcow2Node } from '../../block/qcow2/node.js';
import { MirrorJob, type MirrorOptions } from '../mirror.js';
import { badOption, type CommitJob } from './commit.js';


export interface ActiveCommitOptions extends Omit<MirrorOptions, 'source' | 'target' | 'sync' | 'pivot' | 'onConsistent' | 'bitmap' | 'bitmapMode' | 'targetIsZero'> {
  /** the active layer (a qcow2 node) whose backing is BASE */
  overlay: BlockNode;
  /** BASE: must be the overlay's backing node, writable (default: that node) */
  base?: BlockNode;
  /**
   * What writes go through to reach the overlay, read as the overlay (default: the overlay). A
   * daemon gives its export's dirty-tracking filter, so the export's bitmaps keep recording.
   */
  via?: BlockNode;
}

/** The node an overlay reads through (a qcow2 image's backing), if any. */
function backingNode(node: BlockNode): BlockNode | undefined {
  return node instanceof Qcow2Node ? node.backing : undefined;
}

function checkActive(options: ActiveCommitOptions): { overlay: BlockNode; base: BlockNode; depth: number } {
  const overlay = options.overlay;
  const backing = backingNode(overlay);
  if (!backing) throw new BlkrepError('ERR_NO_BACKING', `${overlay.description} has no backing node: there is nothing to commit it into`, { errno: 'EINVAL', details: { image: overlay.description } });
  const base = options.base ?? backing;
  // how deep BASE is in the chain the overlay reads through (1: its backing)
  let depth = 1;
  for (let n: BlockNode | undefined = backing; n !== base; n = backingNode(n), depth++) {
    if (!n) {
      throw badOption(`the base ${base.description} is not a node ${overlay.description} reads through (${backing.description} …): an active commit writes into that very node, or its caches would go stale`, {
        overlay: overlay.description,
        base: base.description,
        backing: backing.description,
      });
    }
  }
  if (!base.caps.canWrite) {
    throw new BlkrepError('ERR_READ_ONLY', `the backing node ${base.description} of ${overlay.description} is read-only: open it read-write to commit into it`, { errno: 'EPERM', details: { base: base.description } });
  }
  if (!overlay.caps.canWrite || !overlay.makeEmpty) throw new BlkrepError('ERR_READ_ONLY', `${overlay.description} is read-only: an active commit makes it empty at the end`, { errno: 'EPERM', details: { image: overlay.description } });
  return { overlay, base, depth };
}

/**
 * Active commit: a mirror (sync top) from the overlay into its own backing node. See the file
 * comment. Clients write through `job.node`.
 */
export class ActiveCommitJob extends MirrorJob {
  readonly overlay: BlockNode;
  readonly base: BlockNode;
  /** the overlay was made empty (complete) */
  emptied = false;

  /** how deep the base is below the overlay (1: its backing); the layers between must be empty */
  readonly baseDepth: number;

  constructor(options: ActiveCommitOptions) {
    const { overlay, base, depth } = checkActive(options);
    let self: ActiveCommitJob | undefined;
    const granularity = options.granularity ?? (overlay instanceof Qcow2Node ? Math.min(64 << 20, Math.max(512, overlay.image.clusterSize)) : undefined);
    super({
      ...options,
      id: options.id ?? 'commit0',
      source: options.via ?? overlay,
      target: base,
      sync: 'top',
      ...(granularity === undefined ? {} : { granularity }),
      onConsistent: async (reason) => {
        // writes wait and BASE (flushed) holds everything the overlay shows: drop the overlay
        if (reason === 'complete') {
          await overlay.makeEmpty!();
          if (self) self.emptied = true;
        }
      },
    });
    self = this;
    // the job type: a mirror underneath, a commit to everyone who looks
    Object.defineProperty(this, 'type', { value: 'commit', enumerable: true });
    this.overlay = overlay;
    this.base = base;
    this.baseDepth = depth;
  }

  /**
   * A base further down: the layers between must hold nothing (commit them first, e.g. with an
   * intermediate CommitJob that empties them), since the mirror copies only what the overlay
   * itself holds. Nothing writes them meanwhile: writes go to the overlay.
   */
  protected override async execute(): Promise<void> {
    if (this.baseDepth > 1) {
      const size = this.overlay.size;
      for (let pos = 0; pos < size; ) {
        const runs = await this.overlay.extents!(pos, size - pos, { signal: this.signal });
        if (runs.length === 0) break;
        for (const r of runs) {
          const n = Math.min(r.length, size - pos);
          if (n <= 0) break;
          if (r.depth !== undefined && r.depth >= 2 && r.depth <= this.baseDepth) {
            throw new BlkrepError('ERR_NOT_EMPTY', `a layer between ${this.overlay.description} and the base ${this.base.description} holds data (at offset ${pos}, ${n} bytes, depth ${r.depth}): commit it into the base first, then commit the overlay`, {
              errno: 'EINVAL',
              details: { offset: pos, length: n, depth: r.depth },
            });
          }
          pos += n;
        }
      }
    }
    return super.execute();
  }

  protected override extraInfo(): Record<string, unknown> {
    return { ...super.extraInfo(), active: true, top: this.overlay.description, base: this.base.description, layers: this.baseDepth };
  }

  /** complete never pivots: the writes go on to the (now empty) overlay. */
  protected override onComplete(options: Record<string, unknown>): void {
    super.onComplete({ ...options, pivot: false });
  }
}

/** The node a commit reads through for an open overlay (its backing), for callers choosing the job kind. */
export function commitBaseOf(overlay: BlockNode): BlockNode | undefined {
  return backingNode(overlay);
}

export type AnyCommitJob = CommitJob | ActiveCommitJob;

