/**
 * A qcow2 container in memory that behaves like a disk with a volatile write cache: writes since
 * the last sync() are pending, and a crash keeps any subset of their 512-byte sectors (each
 * independently: writes may be reordered and torn). Used to check the write ordering of B.5
 * exhaustively, far beyond what kill -9 of a process can show (the page cache survives that).
 */
import type { Qcow2Container } from '../../src/block/qcow2/file.js';

const SECTOR = 512;

interface Pending {
  offset: number;
  data: Buffer;
}

export class CrashContainer implements Qcow2Container {
  readonly readOnly = false;
  private durable: Buffer;
  private pending: Pending[] = [];
  private view: Buffer;
  /** called before every write and sync: the moment a crash could happen */
  onCrashPoint: (() => void) | undefined;

  constructor(
    readonly path: string,
    initial: Buffer,
  ) {
    this.durable = Buffer.from(initial);
    this.view = Buffer.from(initial);
  }

  get length(): number {
    return this.view.length;
  }

  async read(offset: number, target: Buffer): Promise<void> {
    target.fill(0);
    if (offset < this.view.length) this.view.copy(target, 0, offset, Math.min(this.view.length, offset + target.length));
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.onCrashPoint?.();
    this.pending.push({ offset, data: Buffer.from(data) });
    this.view = apply(this.view, offset, data);
    await Promise.resolve();
  }

  async sync(): Promise<void> {
    this.onCrashPoint?.();
    for (const p of this.pending) this.durable = apply(this.durable, p.offset, p.data);
    this.pending = [];
  }

  async truncate(length: number): Promise<void> {
    // modelled as durable at once (only make-empty truncates, after a sync)
    const resize = (b: Buffer): Buffer => (length <= b.length ? Buffer.from(b.subarray(0, length)) : Buffer.concat([b, Buffer.alloc(length - b.length)]));
    this.durable = resize(this.durable);
    this.view = resize(this.view);
    this.pending = this.pending.filter((p) => p.offset < length);
  }

  async punch(offset: number, length: number): Promise<void> {
    const end = Math.min(offset + length, this.view.length);
    if (end > offset) await this.write(offset, Buffer.alloc(end - offset));
  }

  async close(): Promise<void> {}

  /** The disk after a crash now: durable data plus a random subset of pending sectors. */
  crashImage(random: () => number): Buffer {
    let image: Buffer = Buffer.from(this.durable);
    for (const p of this.pending) {
      for (let at = 0; at < p.data.length; at += SECTOR) {
        if (random() < 0.5) image = apply(image, p.offset + at, p.data.subarray(at, Math.min(p.data.length, at + SECTOR)));
      }
    }
    return image;
  }

  /** Everything written so far, as if synced (the state a clean shutdown leaves). */
  current(): Buffer {
    return Buffer.from(this.view);
  }
}

function apply(target: Buffer, offset: number, data: Buffer): Buffer {
  let out = target;
  if (offset + data.length > out.length) out = Buffer.concat([out, Buffer.alloc(offset + data.length - out.length)]);
  data.copy(out, offset);
  return out;
}
