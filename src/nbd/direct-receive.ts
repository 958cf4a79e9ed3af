/**
 * Receiving into buffers the session chooses. By default a Node socket reads every chunk into a
 * fresh 64 KiB buffer: a 1 MiB write payload then arrives as 16+ reads that the session copies
 * into the payload's buffer — one extra copy of every byte written, 16 read calls and 16 fresh
 * buffers for the garbage collector per MiB. Node's `onread` option lets the reader say where
 * each read goes instead: the session points it at the rest of a write payload being received
 * (each read then lands in place, as large as the socket has), and at a scratch buffer
 * otherwise (request headers, small writes), which it copies out before the next read.
 *
 * `onread` can only be given when a socket is made, and the transports hand over sockets made
 * by their listeners. So a plain TCP or Unix socket is moved to a new net.Socket with `onread`
 * over the same libuv handle (same file descriptor, options, peer) once the handshake is done.
 * Anything else (TLS, a test's Duplex, a socket with bytes still queued either way) is left as
 * it is and read the usual way; BLKREP_NO_DIRECT_RECEIVE=1 does that for every connection
 * (bench/serve-nbd compares the two).
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { envFlag } from '../util/env.js';

/** what the new socket asks for each read, and tells of each read done */
export interface DirectReader {
  /** the buffer the next read goes into (read at most its length) */
  nextBuffer(): Buffer;
  /** `n` bytes were read into the start of `buffer` (the one nextBuffer returned) */
  received(n: number, buffer: Buffer): void;
}

/** the parts of Node's socket (not in its types) the move needs */
interface SocketInternals {
  _handle?: { readStop(): number; reading?: boolean; useUserBuffer?: unknown } | null;
}

export function directReceiveDisabled(): boolean {
  return envFlag('BLKREP_NO_DIRECT_RECEIVE');
}

/**
 * Move a plain socket to a new net.Socket that reads where `reader` says. The new socket starts
 * paused (resume() reads). Returns undefined, and leaves `stream` untouched, when it cannot.
 * The old socket object is destroyed without closing the handle; whoever listened to it must
 * stop listening first.
 */
export function moveToDirectReceive(stream: Duplex, reader: DirectReader): net.Socket | undefined {
  if (directReceiveDisabled()) return undefined;
  // exactly net.Socket: a TLSSocket (a subclass) reads through its TLS layer
  if (!(stream instanceof net.Socket) || stream.constructor !== net.Socket) return undefined;
  const old = stream as net.Socket & SocketInternals;
  const handle = old._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function' || old.destroyed || old.connecting) return undefined;
  // bytes Node read but nobody took, or replies not yet given to the kernel, would be lost
  if (old.readableLength !== 0 || old.writableLength !== 0 || old.readableEnded || old.writableEnded) return undefined;
  handle.readStop();
  handle.reading = false;
  old._handle = null;
  const opts = {
    handle,
    allowHalfOpen: old.allowHalfOpen,
    pauseOnCreate: true,
    onread: {
      buffer: () => reader.nextBuffer(),
      callback: (n: number, buf: Uint8Array) => {
        reader.received(n, buf as Buffer);
      },
    },
  };
  const fresh = new net.Socket(opts as unknown as net.SocketConstructorOpts);
  old.destroy();
  return fresh;
}
