/**
 * The secondary's copy-before-write filter (replication.md §2, "S write path"): the replica
 * export's writes go through it to the disk. For each cluster a write touches whose bit is clear
 * this epoch, the disk's old content is read and written to the hidden disk (FUA: durable before
 * the disk is written, so a kill -9 or a host crash never leaves a disk cluster changed whose old
 * content is not kept), then the bit is set; writers to a cluster being copied wait for that
 * copy. If the copy fails, the disk is not written and the request fails (QEMU's
 * ON_CBW_ERROR_BREAK_GUEST_WRITE). Reads go to the disk.
 *
 * The bits are reset at each checkpoint (step 6), when the hidden disk is emptied; at start they
 * are the clusters the hidden disk holds, so a restart never overwrites a kept old cluster.
 */
import type { BlockNode, CompleteBlockNode, WriteOptions, ZeroOptions } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { Filter } from '../block/filter.js';
import { gated, WriteGate } from './write-gate.js';

export class CbwFilter extends Filter {
  readonly driver = 'copy-before-write';
  /** one byte per cluster: copied to hidden this epoch */
  private readonly copied: Uint8Array;
  private readonly copying = new Map<number, Promise<void>>();
  readonly gate = new WriteGate();

  constructor(
    next: BlockNode,
    private readonly hidden: CompleteBlockNode,
    readonly clusterSize: number,
    /** a copy into the hidden disk failed (failure case 3: an event for the HA side) */
    private readonly onCopyError: (err: BlkrepError) => void = () => {},
    /** the disk write itself failed (failure case 4: the secondary's disk is Failed) */
    private readonly onDiskError: (err: Error) => void = () => {},
  ) {
    super(next);
    this.copied = new Uint8Array(Math.ceil(this.next.size / clusterSize));
  }

  /** clusters copied this epoch */
  get copiedClusters(): number {
    let n = 0;
    for (const b of this.copied) n += b;
    return n;
  }

  /** Mark clusters the hidden disk holds already (at start, from its allocation map). */
  markCopied(offset: number, length: number): void {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last && c < this.copied.length; c++) this.copied[c] = 1;
  }

  /** A new epoch: nothing copied. Only while the gate is held (checkpoint step 6). */
  reset(): void {
    this.copied.fill(0);
  }

  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return gated(this.gate, async () => {
      await this.copyOld(offset, data.length);
      await this.toDisk(() => this.next.write(offset, data, o));
    });
  }

  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return gated(this.gate, async () => {
      await this.copyOld(offset, length);
      await this.toDisk(() => this.next.writeZeroes(offset, length, o));
    });
  }

  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return gated(this.gate, async () => {
      await this.copyOld(offset, length);
      await this.toDisk(() => this.next.trim(offset, length, o));
    });
  }

  private async toDisk(op: () => Promise<void>): Promise<void> {
    try {
      await op();
    } catch (err) {
      this.onDiskError(err as Error);
      throw err;
    }
  }

  /** The daemon owns the disk; the secondary owns the hidden disk. */
  override close(): Promise<void> {
    return Promise.resolve();
  }

  private async copyOld(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    const waits: Promise<void>[] = [];
    for (let c = first; c <= last; c++) {
      if (this.copied[c]) continue;
      let p = this.copying.get(c);
      if (!p) {
        p = this.copyCluster(c).finally(() => this.copying.delete(c));
        this.copying.set(c, p);
      }
      waits.push(p);
    }
    if (waits.length) await Promise.all(waits);
  }

  private async copyCluster(c: number): Promise<void> {
    const at = c * this.clusterSize;
    const length = Math.min(this.clusterSize, this.next.size - at);
    try {
      const old = await this.next.read(at, length);
      await this.hidden.write(at, old, { fua: true });
    } catch (err) {
      const e = new BlkrepError('ERR_PAIR_CBW', `copy-before-write of cluster ${c} (bytes ${at}–${at + length}) into the hidden disk failed: ${(err as Error).message}; the disk was not written`, {
        errno: (err as { errno?: string }).errno === 'ENOSPC' ? 'ENOSPC' : 'EIO',
        cause: err,
        details: { cluster: c, offset: at, length },
      });
      this.onCopyError(e);
      throw e;
    }
    this.copied[c] = 1;
  }
}
