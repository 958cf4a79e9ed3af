/**
 * A FIFO of received chunks. take(n) returns a slice without copying when the bytes lie in one
 * chunk (the common case for request headers and small writes), and one copy otherwise.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // offset into chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** The first n bytes, without consuming them. Caller ensures n ≤ length. */
  peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    return this.gather(n, false);
  }

  /** Whether the next n bytes lie in one received chunk (take(n) then copies nothing). */
  contiguous(n: number): boolean {
    return n === 0 || (this.chunks.length > 0 && this.chunks[0]!.length - this.head >= n);
  }

  /**
   * Consume n bytes. When they span chunks they are copied into `into` (at least n bytes, e.g.
   * from a buffer pool) or into a new buffer.
   */
  take(n: number, into?: Buffer): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    const avail = first.length - this.head;
    if (avail >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    return this.gather(n, true, into);
  }

  /** Consume n bytes (n ≤ length) by copying them into `into`, so the chunks they came in can go. */
  takeCopy(n: number, into: Buffer): void {
    if (n !== 0) this.gather(n, true, into);
  }

  /**
   * Where the queued bytes start in `buf` when they all lie in one chunk that is a view of `buf`
   * (same memory); -1 otherwise.
   */
  offsetIn(buf: Buffer): number {
    if (this.chunks.length !== 1) return -1;
    const c = this.chunks[0]!;
    if (c.buffer !== buf.buffer || c.byteOffset < buf.byteOffset || c.byteOffset + c.length > buf.byteOffset + buf.length) return -1;
    return c.byteOffset - buf.byteOffset + this.head;
  }

  /** Drop up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    const k = Math.min(n, this.total);
    this.advance(k);
    return k;
  }

  /**
   * Copy the bytes still queued into one buffer of their own, so the chunks they came in (a
   * scratch buffer read into again) may change.
   */
  own(): void {
    if (this.total === 0) {
      this.chunks = [];
      this.head = 0;
      return;
    }
    const copy = Buffer.allocUnsafe(this.total);
    this.gather(this.total, false, copy);
    this.chunks = [copy];
    this.head = 0;
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.total = 0;
  }

  private gather(n: number, consume: boolean, into?: Buffer): Buffer {
    const out = into ? into.subarray(0, n) : Buffer.allocUnsafe(n);
    let copied = 0;
    let i = 0;
    let off = this.head;
    while (copied < n) {
      const c = this.chunks[i]!;
      const k = Math.min(c.length - off, n - copied);
      c.copy(out, copied, off, off + k);
      copied += k;
      off = 0;
      i++;
    }
    if (consume) this.advance(n);
    return out;
  }

  private advance(n: number): void {
    this.total -= n;
    while (n > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (avail > n) {
        this.head += n;
        return;
      }
      n -= avail;
      this.chunks.shift();
      this.head = 0;
    }
  }
}
