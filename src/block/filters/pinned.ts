/**
 * A filter whose `next` is replaced at run time (a switch, the export stack's entry) while what it
 * announced stays: size, limits and caps are the first `next`'s, as an NBD export announces them
 * once, at the handshake. close() closes nothing: whoever opened a node under it closes it.
 */
import type { BlockLimits, BlockNode, Capabilities } from '../../api/block.js';
import { Filter } from '../filter.js';

export abstract class PinnedFilter extends Filter {
  private readonly pinned: { size: number; limits: BlockLimits; caps: Capabilities };

  /** `shape`: the node whose size, limits and caps are announced (default `initial` as given, not completed) */
  constructor(initial: BlockNode, shape: Pick<BlockNode, 'size' | 'limits' | 'caps'> = initial) {
    super(initial);
    this.pinned = { size: shape.size, limits: shape.limits, caps: shape.caps };
  }

  override get size(): number {
    return this.pinned.size;
  }
  override get limits(): BlockLimits {
    return this.pinned.limits;
  }
  override get caps(): Capabilities {
    return this.pinned.caps;
  }
  /** Closes nothing: the nodes under it belong to whoever opened them. */
  override async close(): Promise<void> {}
}
