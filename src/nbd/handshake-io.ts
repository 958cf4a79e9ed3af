/**
 * Exact reads from a stream during a handshake, for the parts of the NBD handshake that run
 * before a protocol takes the connection over (extension options, STARTTLS).
 */
import type { Duplex } from 'node:stream';
import { BlkrepError } from '../api/errors.js';

/** Reading exact byte counts from a stream during a handshake. */
export interface HandshakeIo {
  read(n: number): Promise<Buffer>;
  write(b: Buffer): void;
  /** stop reading (a TLS upgrade takes the stream over); returns what was read beyond the reads */
  detach?(): Buffer;
}

/** Buffers a stream's data and hands out exact byte counts. */
export class ExactReader implements HandshakeIo {
  private chunks: Buffer[] = [];
  private length = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;
  private readonly onData = (chunk: Buffer) => {
    this.chunks.push(chunk);
    this.length += chunk.length;
    this.settle();
  };
  private readonly onEnd = () => this.fail(new BlkrepError('ERR_NBD_HANDSHAKE', 'the server closed the connection in the handshake'));
  private readonly onError = (err: Error) => this.fail(err instanceof BlkrepError ? err : new BlkrepError('ERR_NBD_CONNECT', `connection failed in the handshake: ${err.message}`, { cause: err }));

  constructor(private readonly stream: Duplex) {
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
  }

  read(n: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('one read at a time'));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.settle();
    });
  }

  write(b: Buffer): void {
    this.stream.write(b);
  }

  /** stop listening; returns what was read beyond the reads */
  detach(): Buffer {
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onError);
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.length = 0;
    return rest;
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.settle();
  }

  private settle(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.length >= w.n) {
      this.waiter = undefined;
      const all = Buffer.concat(this.chunks);
      this.chunks = all.length > w.n ? [all.subarray(w.n)] : [];
      this.length = all.length - w.n;
      w.resolve(all.subarray(0, w.n));
    } else if (this.failure) {
      this.waiter = undefined;
      w.reject(this.failure);
    }
  }
}
