/**
 * Reusable buffers for read replies and write payloads. Without it every 1 MiB request
 * allocates a fresh Buffer and the garbage collector lets tens of MiB of them pile up before
 * it runs; with it a busy connection keeps reusing the same few.
 *
 * Buffers are kept by size (powers of two). When a buffer given back does not fit under the
 * bound, free buffers of the size least recently asked for make room for it (only other sizes:
 * a size's own buffers are never dropped for one more of it). Without that, one burst of a size
 * filled the pool for good: a pair's secondary received its initial full copy in 256 KiB
 * writes (up to 64 at once), kept 16 MiB of them, and then allocated a fresh buffer for every
 * 1 MiB write that followed: V8 counts their backing stores as external memory and ran a major
 * GC every 17-21 MiB received (session 15: 88 mark-compacts in 1.5 GiB, against 1).
 *
 * A size nobody asked for in the last IDLE_TICKS acquires and releases gives its free buffers
 * back (a secondary kept its full copy's 15 MiB of 256 KiB buffers for good while it received
 * 4 KiB writes); free buffers dropped (idle or evicted) are freed at once (freeBufferNow), not
 * left to a major GC.
 */
import { freeBufferNow } from '../util/free-buffer.js';

/** acquires and releases after which a size's free buffers, not asked for meanwhile, are freed */
export const IDLE_TICKS = 4096;
/** acquires between two looks for idle sizes */
export const IDLE_CHECK_EVERY = 512;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  /** when each size was last asked for or given back (a counter, not a clock) */
  private readonly used = new Map<number, number>();
  private tick = 0;
  private acquires = 0;
  private pooled = 0;

  constructor(
    /** buffers kept for reuse at most, in bytes */
    private readonly maxPooledBytes = 16 * 1024 * 1024,
    /** smaller requests are not worth pooling */
    readonly minSize = 4096,
  ) {}

  /** A buffer of at least `size` bytes (a power of two); use subarray(0, size). */
  acquire(size: number): Buffer {
    const cap = size <= this.minSize ? this.minSize : 2 ** Math.ceil(Math.log2(size));
    this.used.set(cap, ++this.tick);
    if (++this.acquires % IDLE_CHECK_EVERY === 0) this.dropIdle();
    const list = this.free.get(cap);
    const b = list?.pop();
    if (b) {
      this.pooled -= cap;
      return b;
    }
    return Buffer.allocUnsafeSlow(cap);
  }

  /** Give back a buffer from acquire(); nothing may use it afterwards. */
  release(buffer: Buffer): void {
    const cap = buffer.length;
    // refused: left to the GC (a session gives back a payload it was receiving into as it closes)
    if (cap > this.maxPooledBytes) return;
    if (this.pooled + cap > this.maxPooledBytes && !this.evictFor(cap)) return;
    let list = this.free.get(cap);
    if (!list) this.free.set(cap, (list = []));
    list.push(buffer);
    this.pooled += cap;
    this.used.set(cap, ++this.tick);
  }

  get pooledBytes(): number {
    return this.pooled;
  }

  /** Free the buffers of sizes not asked for in the last IDLE_TICKS acquires and releases. */
  private dropIdle(): void {
    for (const [size, list] of this.free) {
      if ((this.used.get(size) ?? 0) > this.tick - IDLE_TICKS) continue;
      for (const b of list) freeBufferNow(b);
      this.pooled -= size * list.length;
      this.free.delete(size);
    }
  }

  /** free buffers kept of this size (tests) */
  freeCount(size: number): number {
    return this.free.get(size)?.length ?? 0;
  }

  /**
   * Drop free buffers of other sizes, least recently used size first, until `cap` more bytes
   * fit; false (nothing dropped) when they cannot.
   */
  private evictFor(cap: number): boolean {
    let others = 0;
    for (const [size, list] of this.free) if (size !== cap) others += size * list.length;
    if (this.pooled - others + cap > this.maxPooledBytes) return false;
    const sizes = [...this.free.keys()].filter((s) => s !== cap).sort((a, b) => (this.used.get(a) ?? 0) - (this.used.get(b) ?? 0));
    for (const size of sizes) {
      const list = this.free.get(size)!;
      while (list.length > 0 && this.pooled + cap > this.maxPooledBytes) {
        freeBufferNow(list.pop()!);
        this.pooled -= size;
      }
      if (list.length === 0) this.free.delete(size);
      if (this.pooled + cap <= this.maxPooledBytes) return true;
    }
    return true;
  }
}

/** One pool for the whole process: connections come and go, buffers stay. */
export const sharedPool = new BufferPool();
