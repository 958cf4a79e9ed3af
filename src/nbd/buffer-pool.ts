/**
 * Reusable buffers for read replies and write payloads. Without it every 1 MiB request
 * allocates a fresh Buffer and the garbage collector lets tens of MiB of them pile up before
 * it runs; with it a busy connection keeps reusing the same few.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
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
    if (this.pooled + cap > this.maxPooledBytes) return;
    let list = this.free.get(cap);
    if (!list) this.free.set(cap, (list = []));
    list.push(buffer);
    this.pooled += cap;
  }

  get pooledBytes(): number {
    return this.pooled;
  }
}

/** One pool for the whole process: connections come and go, buffers stay. */
export const sharedPool = new BufferPool();
