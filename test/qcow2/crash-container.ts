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

/** A byte array that grows by doubling (the image grows a cluster at a time). */
class Bytes {
  buf: Buffer;
  length: number;

  constructor(initial: Buffer) {
    this.buf = Buffer.from(initial);
    this.length = initial.length;
  }

  write(offset: number, data: Buffer): void {
    const end = offset + data.length;
    if (end > this.buf.length) {
      const bigger = Buffer.alloc(Math.max(end, this.buf.length * 2));
      this.buf.copy(bigger, 0, 0, this.length);
      this.buf = bigger;
    }
    data.copy(this.buf, offset);
    if (end > this.length) this.length = end;
  }

  resize(length: number): void {
    if (length > this.buf.length) this.write(length, Buffer.alloc(0));
    if (length < this.length) this.buf.fill(0, length, this.length);
    this.length = length;
  }

  copy(): Bytes {
    return new Bytes(this.buf.subarray(0, this.length));
  }

  bytes(): Buffer {
    return Buffer.from(this.buf.subarray(0, this.length));
  }
}

export class CrashContainer implements Qcow2Container {
  readonly readOnly = false;
  private durable: Bytes;
  private pending: Pending[] = [];
  private view: Bytes;
  /** called before every write and sync: the moment a crash could happen */
  onCrashPoint: (() => void) | undefined;

  constructor(
    readonly path: string,
    initial: Buffer,
  ) {
    this.durable = new Bytes(initial);
    this.view = new Bytes(initial);
  }

  get length(): number {
    return this.view.length;
  }

  async read(offset: number, target: Buffer): Promise<void> {
    target.fill(0);
    if (offset < this.view.length) this.view.buf.copy(target, 0, offset, Math.min(this.view.length, offset + target.length));
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.onCrashPoint?.();
    this.pending.push({ offset, data: Buffer.from(data) });
    this.view.write(offset, data);
    await Promise.resolve();
  }

  async sync(): Promise<void> {
    this.onCrashPoint?.();
    for (const p of this.pending) this.durable.write(p.offset, p.data);
    this.pending = [];
  }

  async truncate(length: number): Promise<void> {
    // modelled as durable at once (only make-empty truncates, after a sync)
    this.durable.resize(length);
    this.view.resize(length);
    this.pending = this.pending.filter((p) => p.offset < length);
  }

  async punch(offset: number, length: number): Promise<void> {
    const end = Math.min(offset + length, this.view.length);
    if (end > offset) await this.write(offset, Buffer.alloc(end - offset));
  }

  async close(): Promise<void> {}

  /** The disk after a crash now: durable data plus a random subset of pending sectors. */
  crashImage(random: () => number): Buffer {
    const image = this.durable.copy();
    for (const p of this.pending) {
      for (let at = 0; at < p.data.length; at += SECTOR) {
        if (random() < 0.5) image.write(p.offset + at, p.data.subarray(at, Math.min(p.data.length, at + SECTOR)));
      }
    }
    return image.bytes();
  }

  /** Everything written so far, as if synced (the state a clean shutdown leaves). */
  current(): Buffer {
    return this.view.bytes();
  }
}
