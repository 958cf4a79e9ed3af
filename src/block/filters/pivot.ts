/**
 * The live mirror's target as the mirror sees it. Until the pivot, requests go to the target
 * itself; redirect() then sends them through another node that forwards to the target (the
 * export's tracking filter), so the writes the mirror's front end held back during the drain are
 * recorded by the export's bitmaps too. It shows the target's description, size, limits and caps
 * throughout (PinnedFilter), and close() closes the target.
 */
import type { BlockNode, CompleteBlockNode } from '../../api/block.js';
import { completeNode } from '../node.js';
import { PinnedFilter } from './pinned.js';

export class PivotTarget extends PinnedFilter {
  readonly driver: string;
  readonly inner: CompleteBlockNode;

  constructor(private readonly opened: BlockNode & { retryNow?: () => Promise<boolean> }) {
    const inner = completeNode(opened);
    super(inner, inner);
    this.inner = inner;
    this.driver = inner.driver;
  }

  /** Reconnectable (jobs/mirror.ts): the target's lost connection tried again now (true at once for a file). */
  retryNow(): Promise<boolean> {
    return typeof this.opened.retryNow === 'function' ? this.opened.retryNow() : Promise.resolve(true);
  }

  /** Requests go through `node` from now on (it must forward to the target). */
  redirect(node: BlockNode): void {
    this.setNext(node);
  }

  override get description(): string {
    return this.inner.description;
  }
  override close(): Promise<void> {
    return this.inner.close();
  }
}
