/**
 * The filter base (DESIGN.md §4), as nbdkit's filters: a filter holds `next`, the node under it,
 * and forwards every operation and capability to it by a direct call; a filter overrides only
 * what it changes. The filters themselves live in src/block/filters/ (see its README).
 *
 *   class Counting extends Filter {
 *     readonly driver = 'counting';
 *     writes = 0;
 *     override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
 *       this.writes++;
 *       return this.next.write(offset, data, o);
 *     }
 *   }
 *
 * `next` is always complete (completeNode() fills in what a driver leaves out, once, when the
 * filter is built), so a filter is itself a CompleteBlockNode: it can be served, stacked under
 * another filter or handed to a job without another adapter. Forwarding adds no promise, await
 * or allocation: each method returns next's own promise.
 *
 * A filter whose `next` changes at run time (a switch, a pivot) calls setNext(); requests already
 * issued finish on the node they were issued to. close() closes `next`; a filter over a node it
 * does not own overrides it.
 */
import type { BlockLimits, BlockNode, Capabilities, CompleteBlockNode, Extent, FileRange, IoOptions, WriteOptions, ZeroOptions } from '../api/block.js';
import { completeNode } from './node.js';

export abstract class Filter implements CompleteBlockNode {
  abstract readonly driver: string;
  /** the node under this filter; replaced only by setNext() */
  readonly next: CompleteBlockNode;

  constructor(next: BlockNode) {
    this.next = completeNode(next);
  }

  /** New requests go to `node` from now on (those in flight finish where they were issued). */
  protected setNext(node: BlockNode): CompleteBlockNode {
    const complete = completeNode(node);
    (this as { next: CompleteBlockNode }).next = complete;
    return complete;
  }

  /**
   * Link `filter` onto `node` from outside (the export stack, src/serve/export-stack.ts, when it
   * inserts or removes the slot under `filter`): as setNext().
   */
  static relink(filter: Filter, node: BlockNode): CompleteBlockNode {
    return filter.setNext(node);
  }

  get description(): string {
    return this.next.description;
  }
  get size(): number {
    return this.next.size;
  }
  get limits(): BlockLimits {
    return this.next.limits;
  }
  get caps(): Capabilities {
    return this.next.caps;
  }

  read(offset: number, length: number, o?: IoOptions): Promise<Buffer> {
    return this.next.read(offset, length, o);
  }
  readInto(offset: number, target: Buffer, o?: IoOptions): Promise<void> {
    return this.next.readInto(offset, target, o);
  }
  write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return this.next.write(offset, data, o);
  }
  writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return this.next.writeZeroes(offset, length, o);
  }
  trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return this.next.trim(offset, length, o);
  }
  flush(o?: IoOptions): Promise<void> {
    return this.next.flush(o);
  }
  extents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    return this.next.extents(offset, length, o);
  }
  cache(offset: number, length: number, o?: IoOptions): Promise<void> {
    return this.next.cache(offset, length, o);
  }
  /**
   * None by default: a filter may change, check or count reads, which a range sent straight from
   * the file would bypass. A filter whose reads are `next`'s, unchanged, overrides this with
   * passFileRange().
   */
  fileRange(_offset: number, _length: number): FileRange | undefined {
    return undefined;
  }
  /** `next`'s file range, for a filter that passes reads through unchanged */
  protected passFileRange(offset: number, length: number): FileRange | undefined {
    return this.next.fileRange?.(offset, length);
  }
  close(): Promise<void> {
    return this.next.close();
  }
}

// A filter is complete by construction: completeNode() hands it back as it is.
Object.defineProperty(Filter.prototype, Symbol.for('blkrep.completeNode'), { value: true });
