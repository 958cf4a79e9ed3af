/**
 * memory:SIZE — a sparse in-memory disk, for tests and the embedded default. Data lives in 64 KiB
 * pages allocated on first write; a page that is zeroed or trimmed as a whole is dropped, so holes
 * are reported by extents() as they would be on a sparse file.
 */
import type { BlockNode, Capabilities, Extent, WriteOptions, ZeroOptions } from '../api/block.js';
import { checkRange } from './node.js';

const PAGE_SHIFT = 16;
const PAGE = 1 << PAGE_SHIFT;

export const MAX_PAYLOAD = 32 * 1024 * 1024;

export class MemoryNode implements BlockNode {
  readonly driver = 'memory';
  readonly description: string;
  readonly limits = { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD };
  readonly caps: Capabilities;
  private readonly pages = new Map<number, Buffer>();

  constructor(readonly size: number, options: { readOnly?: boolean } = {}) {
    this.description = `memory:${size}`;
    const rw = !options.readOnly;
    this.caps = {
      canWrite: rw, canFlush: true, canFua: true, canTrim: rw, canZero: rw, canFastZero: rw,
      canMultiConn: true, canExtents: true, canCache: true, cheapExtents: true,
    };
  }

  /** bytes held in pages (for status) */
  get allocated(): number {
    return this.pages.size * PAGE;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(length);
    await this.readInto(offset, out);
    return out;
  }

  async readInto(offset: number, out: Buffer): Promise<void> {
    const length = out.length;
    checkRange(this, offset, length, 'read');
    let pos = offset;
    while (pos < offset + length) {
      const index = Math.floor(pos / PAGE);
      const within = pos - index * PAGE;
      const n = Math.min(PAGE - within, offset + length - pos);
      const page = this.pages.get(index);
      if (page) page.copy(out, pos - offset, within, within + n);
      else out.fill(0, pos - offset, pos - offset + n);
      pos += n;
    }
  }

  async write(offset: number, data: Buffer, _o?: WriteOptions): Promise<void> {
    checkRange(this, offset, data.length, 'write');
    let pos = offset;
    const end = offset + data.length;
    while (pos < end) {
      const index = Math.floor(pos / PAGE);
      const within = pos - index * PAGE;
      const n = Math.min(PAGE - within, end - pos);
      let page = this.pages.get(index);
      if (!page) {
        page = Buffer.alloc(Math.min(PAGE, this.size - index * PAGE));
        this.pages.set(index, page);
      }
      data.copy(page, within, pos - offset, pos - offset + n);
      pos += n;
    }
  }

  async writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    checkRange(this, offset, length, 'write-zeroes');
    this.zero(offset, length, !o?.noHole);
  }

  async trim(offset: number, length: number): Promise<void> {
    checkRange(this, offset, length, 'trim');
    this.zero(offset, length, true);
  }

  private zero(offset: number, length: number, punch: boolean): void {
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const index = Math.floor(pos / PAGE);
      const within = pos - index * PAGE;
      const page = this.pages.get(index);
      const n = Math.min(PAGE - within, end - pos);
      if (page) {
        if (punch && within === 0 && n >= page.length) this.pages.delete(index);
        else page.fill(0, within, within + n);
      } else if (!punch) {
        const fresh = Buffer.alloc(Math.min(PAGE, this.size - index * PAGE));
        this.pages.set(index, fresh);
      }
      pos += n;
    }
  }

  async flush(): Promise<void> {}

  async extents(offset: number, length: number): Promise<Extent[]> {
    checkRange(this, offset, length, 'extents');
    const out: Extent[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const index = Math.floor(pos / PAGE);
      const pageEnd = Math.min((index + 1) * PAGE, this.size);
      const present = this.pages.has(index);
      const n = Math.min(pageEnd, end) - pos;
      const last = out[out.length - 1];
      if (last && last.hole === !present) last.length += n;
      else out.push({ length: n, hole: !present, zero: !present });
      pos += n;
    }
    return out;
  }

  async close(): Promise<void> {
    this.pages.clear();
  }
}
