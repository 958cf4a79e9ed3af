/**
 * A job's front end: the filter an export's requests go through while a job runs (the mirror's
 * "mirror" node, the backup's "copy-before-write" node). Reads, extents and cache go straight to
 * `next`; writes, write-zeroes, trims and flushes go to the job, which decides what happens
 * before (copy-before-write), around (write-blocking) or instead of them.
 *
 * close() closes nothing: the job's caller owns source and target.
 */
import type { BlockNode, IoOptions, WriteOptions, ZeroOptions } from '../../api/block.js';
import { Filter } from '../filter.js';
import type { ModifyOp } from './tracking.js';

/** What a front end hands its requests to. */
export interface FrontEndJob {
  frontWrite(op: ModifyOp, offset: number, length: number, o: ZeroOptions | undefined, data?: Buffer): Promise<void>;
  frontFlush(o?: IoOptions): Promise<void>;
}

export class FrontEnd extends Filter {
  constructor(
    readonly driver: string,
    next: BlockNode,
    private readonly job: FrontEndJob,
  ) {
    super(next);
  }

  /** Reads (and, through the job, writes) go to `node` from now on. */
  route(node: BlockNode): void {
    this.setNext(node);
  }

  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return this.job.frontWrite('write', offset, data.length, o, data);
  }
  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return this.job.frontWrite('write-zeroes', offset, length, o);
  }
  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return this.job.frontWrite('trim', offset, length, o);
  }
  override flush(o?: IoOptions): Promise<void> {
    return this.job.frontFlush(o);
  }
  override async close(): Promise<void> {}
}
