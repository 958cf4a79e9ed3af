/**
 * delay — slow requests down, as nbdkit's delay filter: a request of a delayed kind reaches
 * `next` that many milliseconds after it was issued (requests are not serialised: each waits
 * on its own). Kinds without a delay pass straight through. An abort signal that fires while a
 * request waits fails it with the signal's reason, before it reaches `next`. A delayed
 * block-status is not announced as cheap (the NBD server would delay every large read by it).
 */
import type { BlockNode, Capabilities, Extent, IoOptions, WriteOptions, ZeroOptions } from '../../api/block.js';
import { Filter } from '../filter.js';
import type { FaultOp } from './error.js';

export type DelayFilterOptions = Partial<Record<FaultOp, number>>;

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  if (signal?.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export class DelayFilter extends Filter {
  readonly driver = 'delay';
  private readonly ms: Readonly<Record<FaultOp, number>>;
  private readonly filteredCaps: Capabilities;

  constructor(next: BlockNode, delays: DelayFilterOptions = {}) {
    super(next);
    this.ms = { read: 0, write: 0, zero: 0, trim: 0, flush: 0, 'block-status': 0, ...delays };
    this.filteredCaps = this.ms['block-status'] > 0 ? { ...this.next.caps, cheapExtents: false } : this.next.caps;
  }

  override get caps(): Capabilities {
    return this.filteredCaps;
  }

  override read(offset: number, length: number, o?: IoOptions): Promise<Buffer> {
    const ms = this.ms.read;
    return ms > 0 ? sleep(ms, o?.signal).then(() => this.next.read(offset, length, o)) : this.next.read(offset, length, o);
  }
  override readInto(offset: number, target: Buffer, o?: IoOptions): Promise<void> {
    const ms = this.ms.read;
    return ms > 0 ? sleep(ms, o?.signal).then(() => this.next.readInto(offset, target, o)) : this.next.readInto(offset, target, o);
  }
  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    const ms = this.ms.write;
    return ms > 0 ? sleep(ms, o?.signal).then(() => this.next.write(offset, data, o)) : this.next.write(offset, data, o);
  }
  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    const ms = this.ms.zero;
    return ms > 0 ? sleep(ms, o?.signal).then(() => this.next.writeZeroes(offset, length, o)) : this.next.writeZeroes(offset, length, o);
  }
  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    const ms = this.ms.trim;
    return ms > 0 ? sleep(ms, o?.signal).then(() => this.next.trim(offset, length, o)) : this.next.trim(offset, length, o);
  }
  override flush(o?: IoOptions): Promise<void> {
    const ms = this.ms.flush;
    return ms > 0 ? sleep(ms, o?.signal).then(() => this.next.flush(o)) : this.next.flush(o);
  }
  override extents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    const ms = this.ms['block-status'];
    return ms > 0 ? sleep(ms, o?.signal).then(() => this.next.extents(offset, length, o)) : this.next.extents(offset, length, o);
  }
}
