/**
 * The client side of the fixed-newstyle handshake, as an explicit state machine (after libnbd's
 * generator/states-*.c): the states and their allowed transitions are data, the machine is pure
 * (bytes in through a ByteQueue, frames out as Buffers, no sockets or timers), and negotiate()
 * wires it to a stream.
 *
 *   GREETING ──▶ OPT_STRUCTURED_REPLY ──▶ OPT_SET_META_CONTEXT ──▶ OPT_GO ──▶ DONE
 *      │                   │                                          │
 *      │                   └──────────────(no contexts / refused)─────┤
 *      │                                                  ERR_UNSUP   ▼
 *      └──(server is not fixed-newstyle)─────────────────▶ EXPORT_NAME_REPLY ──▶ DONE
 *   any state ──▶ FAILED (after an OPT_ABORT when the server can still hear it)
 *
 * - NO_ZEROES is set when offered; FIXED_NEWSTYLE when offered (otherwise only EXPORT_NAME works).
 * - STRUCTURED_REPLY is asked for unless disabled; any refusal means simple replies only.
 * - SET_META_CONTEXT only after structured replies were agreed; refusal means no block status.
 * - GO asks for INFO_BLOCK_SIZE (always: a server that needs it may refuse clients that do not),
 *   plus NAME and DESCRIPTION. ERR_UNSUP falls back to EXPORT_NAME (item 38 of the checklist).
 * - ERR_SHUTDOWN on any option: soft disconnect (OPT_ABORT) and fail with ESHUTDOWN.
 */
import type { Duplex } from 'node:stream';
import { BlkrepError } from '../api/errors.js';
import { ByteQueue } from './byte-queue.js';
import {
  FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, MAX_OPTION_LENGTH, NBDMAGIC,
  OPT, OPTION_REPLY_MAGIC, REP, TF,
} from './constants.js';
import { decodeOptionReplyHeader, encodeInfoRequest, encodeMetaContextRequest, encodeOption, GREETING_LENGTH } from './codec.js';
import { abortError } from './client-errors.js';
import { StateMachine } from '../util/state-machine.js';

export type HandshakeState =
  | 'GREETING'
  | 'OPT_STRUCTURED_REPLY'
  | 'OPT_SET_META_CONTEXT'
  | 'OPT_GO'
  | 'EXPORT_NAME_REPLY'
  | 'DONE'
  | 'FAILED';

/** Which state may follow which; goto() refuses anything else. */
export const HANDSHAKE_TRANSITIONS: Readonly<Record<HandshakeState, readonly HandshakeState[]>> = {
  GREETING: ['OPT_STRUCTURED_REPLY', 'OPT_GO', 'EXPORT_NAME_REPLY', 'FAILED'],
  OPT_STRUCTURED_REPLY: ['OPT_SET_META_CONTEXT', 'OPT_GO', 'FAILED'],
  OPT_SET_META_CONTEXT: ['OPT_GO', 'FAILED'],
  OPT_GO: ['DONE', 'EXPORT_NAME_REPLY', 'FAILED'],
  EXPORT_NAME_REPLY: ['DONE', 'FAILED'],
  DONE: [],
  FAILED: [],
};

/** the option each waiting state has sent and waits for the final reply of */
const OPTION_OF: Partial<Record<HandshakeState, number>> = {
  OPT_STRUCTURED_REPLY: OPT.STRUCTURED_REPLY,
  OPT_SET_META_CONTEXT: OPT.SET_META_CONTEXT,
  OPT_GO: OPT.GO,
};

/** oldstyle servers send this after NBDMAGIC instead of IHAVEOPT */
const CLISERV_MAGIC = 0x00420281861253n;
const OPTION_REPLY_HEADER = 20;
const EXPORT_NAME_REPLY = 10;
const EXPORT_NAME_PADDING = 124;

export interface HandshakeOptions {
  exportName: string;
  /** ask for structured replies (default true) */
  structuredReplies?: boolean;
  /** meta contexts to select when structured replies are on (default none) */
  metaContexts?: readonly string[];
  /** ask for the export's NAME and DESCRIPTION in GO (default true) */
  fullInfo?: boolean;
  /**
   * the greeting was already read and the client flags sent (STARTTLS ran first, starttls.ts):
   * the machine starts with its first option, on the upgraded stream
   */
  greeted?: { fixedNewstyle: boolean; noZeroes: boolean };
}

export interface BlockSizeInfo {
  minimum: number;
  preferred: number;
  /** 0xffffffff = no limit */
  maximum: number;
}

/** What the handshake learned about the export. */
export interface ExportInfo {
  /** the name asked for */
  exportName: string;
  size: number;
  /** transmission flags (TF.*); 0 when the server did not set HAS_FLAGS */
  flags: number;
  blockSize?: BlockSizeInfo;
  /** the server's canonical name and description, when it sent them */
  name?: string;
  description?: string;
  structured: boolean;
  /** selected meta contexts: id → name */
  contexts: Map<number, string>;
  fixedNewstyle: boolean;
  noZeroes: boolean;
  /** GO was refused with ERR_UNSUP and EXPORT_NAME was used */
  viaExportName: boolean;
}

function handshakeError(message: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_NBD_HANDSHAKE', message, { errno: 'EIO', details });
}

const REP_NAMES: Record<number, string> = Object.fromEntries(Object.entries(REP).map(([k, v]) => [v, k]));
const OPT_NAMES: Record<number, string> = Object.fromEntries(Object.entries(OPT).map(([k, v]) => [v, k]));

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

export class HandshakeMachine {
  /** the states and HANDSHAKE_TRANSITIONS; a transition not listed is a bug here, not in the server */
  private readonly machine = new StateMachine<HandshakeState>({ name: 'handshake', transitions: HANDSHAKE_TRANSITIONS }, 'GREETING');
  private out: Buffer[] = [];
  private failure: BlkrepError | undefined;
  /** the reply header of the option reply whose payload is awaited */
  private reply: { type: number; length: number } | undefined;
  private readonly structuredWanted: boolean;
  private readonly contextsWanted: readonly string[];
  private readonly fullInfo: boolean;
  private readonly info: ExportInfo;
  private haveExportInfo = false;
  private readonly greeted: boolean;

  constructor(options: HandshakeOptions) {
    this.greeted = options.greeted !== undefined;
    this.structuredWanted = options.structuredReplies ?? true;
    this.contextsWanted = options.metaContexts ?? [];
    this.fullInfo = options.fullInfo ?? true;
    this.info = {
      exportName: options.exportName, size: 0, flags: 0, structured: false, contexts: new Map(),
      fixedNewstyle: options.greeted?.fixedNewstyle ?? false, noZeroes: options.greeted?.noZeroes ?? false, viaExportName: false,
    };
  }

  get state(): HandshakeState {
    return this.current;
  }

  /** the export, once DONE */
  get result(): ExportInfo | undefined {
    return this.current === 'DONE' ? this.info : undefined;
  }

  /** why it FAILED */
  get error(): BlkrepError | undefined {
    return this.failure;
  }

  /** Parse what `q` holds as far as it goes; returns the frames to send, in order. */
  advance(q: ByteQueue): Buffer[] {
    while (this.step(q)) {
      if (this.current === 'DONE' || this.current === 'FAILED') break;
    }
    return this.out.splice(0);
  }

  /** The stream ended (or closed) before DONE: the error to report (`why`: the socket's error). */
  eof(why?: string): BlkrepError {
    if (this.current === 'DONE' || this.current === 'FAILED') return this.failure ?? handshakeError('connection closed');
    const err =
      this.current === 'EXPORT_NAME_REPLY'
        ? new BlkrepError(
            'ERR_NBD_NO_EXPORT',
            `the server closed the connection after EXPORT_NAME "${this.info.exportName}": it has no such export (or refuses this client)`,
            { errno: 'EINVAL', details: { exportName: this.info.exportName } },
          )
        : handshakeError(`the server closed the connection during the handshake (state ${this.current})${why ? `: ${why}` : ''}`, { state: this.current });
    this.fail(err, false);
    return err;
  }

  private get current(): HandshakeState {
    return this.machine.state;
  }

  private goto(next: HandshakeState): void {
    this.machine.goto(next);
  }

  /** Fail; `abort` sends OPT_ABORT first so the server sees a soft disconnect. */
  private fail(err: BlkrepError, abort: boolean): false {
    if (abort && this.info.fixedNewstyle) this.out.push(encodeOption(OPT.ABORT));
    this.failure = err;
    if (this.current !== 'FAILED') this.goto('FAILED');
    return false;
  }

  /** One step; false when more bytes are needed (or it is over). */
  private step(q: ByteQueue): boolean {
    switch (this.current) {
      case 'GREETING':
        return this.onGreeting(q);
      case 'OPT_STRUCTURED_REPLY':
      case 'OPT_SET_META_CONTEXT':
      case 'OPT_GO':
        return this.onOptionReply(q);
      case 'EXPORT_NAME_REPLY':
        return this.onExportNameReply(q);
      case 'DONE':
      case 'FAILED':
        return false;
    }
  }

  private onGreeting(q: ByteQueue): boolean {
    if (this.greeted) {
      this.firstOption();
      return true;
    }
    if (q.length >= 8 && q.peek(8).readBigUInt64BE(0) !== NBDMAGIC) {
      return this.fail(handshakeError('this is not an NBD server (its first 8 bytes are not "NBDMAGIC")'), false);
    }
    if (q.length >= 16 && q.peek(16).readBigUInt64BE(8) === CLISERV_MAGIC) {
      return this.fail(handshakeError('the server speaks the oldstyle NBD handshake, which is not supported (use a newstyle server)'), false);
    }
    if (q.length < GREETING_LENGTH) return false;
    const g = q.take(GREETING_LENGTH);
    if (g.readBigUInt64BE(8) !== IHAVEOPT) {
      return this.fail(handshakeError(`unknown NBD greeting: 0x${g.readBigUInt64BE(8).toString(16)} after NBDMAGIC`), false);
    }
    const flags = g.readUInt16BE(16);
    this.info.fixedNewstyle = (flags & FLAG_FIXED_NEWSTYLE) !== 0;
    this.info.noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
    const clientFlags = (this.info.fixedNewstyle ? FLAG_C_FIXED_NEWSTYLE : 0) | (this.info.noZeroes ? FLAG_C_NO_ZEROES : 0);
    const cf = Buffer.alloc(4);
    cf.writeUInt32BE(clientFlags, 0);
    this.out.push(cf);
    this.firstOption();
    return true;
  }

  private firstOption(): void {
    if (!this.info.fixedNewstyle) {
      // Plain newstyle: a server that cannot answer options with errors; EXPORT_NAME is all there is.
      this.sendExportName();
    } else if (this.structuredWanted) {
      this.sendOption('OPT_STRUCTURED_REPLY', OPT.STRUCTURED_REPLY);
    } else {
      this.sendGo();
    }
  }

  private sendOption(next: HandshakeState, option: number, data?: Buffer): void {
    this.out.push(encodeOption(option, data));
    this.goto(next);
  }

  private sendGo(): void {
    const infos = [INFO.BLOCK_SIZE, ...(this.fullInfo ? [INFO.NAME, INFO.DESCRIPTION] : [])];
    this.sendOption('OPT_GO', OPT.GO, encodeInfoRequest(this.info.exportName, infos));
  }

  private sendExportName(): void {
    this.info.viaExportName = true;
    this.out.push(encodeOption(OPT.EXPORT_NAME, Buffer.from(this.info.exportName, 'utf8')));
    this.goto('EXPORT_NAME_REPLY');
  }

  private onOptionReply(q: ByteQueue): boolean {
    const option = OPTION_OF[this.current]!;
    if (!this.reply) {
      if (q.length < OPTION_REPLY_HEADER) return false;
      const h = decodeOptionReplyHeader(q.take(OPTION_REPLY_HEADER));
      if (h.magic !== OPTION_REPLY_MAGIC) {
        return this.fail(handshakeError(`option reply magic is 0x${h.magic.toString(16)}, expected 0x${OPTION_REPLY_MAGIC.toString(16)}`), false);
      }
      if (h.option !== option) {
        return this.fail(handshakeError(`the server answered option ${h.option} while ${OPT_NAMES[option]} (${option}) was asked`), false);
      }
      if (h.length > MAX_OPTION_LENGTH) {
        return this.fail(handshakeError(`reply to ${OPT_NAMES[option]} claims ${h.length} bytes, over the limit of ${MAX_OPTION_LENGTH}`), false);
      }
      this.reply = { type: h.type, length: h.length };
    }
    if (q.length < this.reply.length) return false;
    const { type, length } = this.reply;
    this.reply = undefined;
    const data = q.take(length);
    if ((type & 0x80000000) !== 0) return this.onOptionError(option, type, data.toString('utf8'));
    switch (this.current) {
      case 'OPT_STRUCTURED_REPLY':
        if (type !== REP.ACK) return this.unexpectedReply(option, type);
        this.info.structured = true;
        if (this.contextsWanted.length) this.sendOption('OPT_SET_META_CONTEXT', OPT.SET_META_CONTEXT, encodeMetaContextRequest(this.info.exportName, [...this.contextsWanted]));
        else this.sendGo();
        return true;
      case 'OPT_SET_META_CONTEXT':
        if (type === REP.META_CONTEXT) {
          if (length < 5) return this.fail(handshakeError(`REP_META_CONTEXT of ${length} bytes is too short for an id and a name`), false);
          this.info.contexts.set(data.readUInt32BE(0), data.toString('utf8', 4));
          return true;
        }
        if (type !== REP.ACK) return this.unexpectedReply(option, type);
        this.sendGo();
        return true;
      case 'OPT_GO':
        if (type === REP.INFO) return this.onInfo(data);
        if (type !== REP.ACK) return this.unexpectedReply(option, type);
        if (!this.haveExportInfo) return this.fail(handshakeError('the server acknowledged GO without sending INFO_EXPORT (size and flags)'), true);
        this.goto('DONE');
        return true;
      default:
        return false;
    }
  }

  private unexpectedReply(option: number, type: number): false {
    return this.fail(handshakeError(`unexpected reply ${REP_NAMES[type] ?? type} to ${OPT_NAMES[option]}`), true);
  }

  private onOptionError(option: number, type: number, message: string): boolean {
    const said = message ? `: ${message}` : '';
    const name = REP_NAMES[type] ?? `error 0x${type.toString(16)}`;
    if (type === REP.ERR_SHUTDOWN) {
      return this.fail(new BlkrepError('ERR_NBD_SHUTDOWN', `the NBD server is shutting down${said}`, { errno: 'ESHUTDOWN' }), true);
    }
    if (option === OPT.STRUCTURED_REPLY) {
      // nbdkit --no-sr, nbd-server: simple replies only, and so no meta contexts either.
      this.sendGo();
      return true;
    }
    if (option === OPT.SET_META_CONTEXT) {
      this.info.contexts.clear();
      this.sendGo();
      return true;
    }
    // GO
    if (type === REP.ERR_UNSUP) {
      this.sendExportName();
      return true;
    }
    const exportName = this.info.exportName;
    if (type === REP.ERR_UNKNOWN) {
      return this.fail(new BlkrepError('ERR_NBD_NO_EXPORT', `the NBD server has no export named "${exportName}"${said}`, { errno: 'EINVAL', details: { exportName } }), true);
    }
    if (type === REP.ERR_TLS_REQD) {
      return this.fail(
        new BlkrepError('ERR_NBD_TLS_REQUIRED', `the NBD server requires TLS for export "${exportName}"${said}: connect with nbds:// (or nbds+unix://) and tls-certificates=DIR or tls-psk-file=FILE`, {
          errno: 'EPERM',
          details: { exportName },
        }),
        true,
      );
    }
    return this.fail(handshakeError(`the NBD server refused export "${exportName}" with ${name}${said}`, { exportName, reply: type }), true);
  }

  private onInfo(data: Buffer): boolean {
    if (data.length < 2) return this.fail(handshakeError(`REP_INFO of ${data.length} bytes has no type`), true);
    const type = data.readUInt16BE(0);
    switch (type) {
      case INFO.EXPORT:
        if (data.length !== 12) return this.fail(handshakeError(`INFO_EXPORT is ${data.length} bytes, expected 12`), true);
        if (!this.setSizeAndFlags(data.readBigUInt64BE(2), data.readUInt16BE(10))) return false;
        this.haveExportInfo = true;
        return true;
      case INFO.BLOCK_SIZE: {
        if (data.length !== 14) return this.fail(handshakeError(`INFO_BLOCK_SIZE is ${data.length} bytes, expected 14`), true);
        const minimum = data.readUInt32BE(2);
        const preferred = data.readUInt32BE(6);
        const maximum = data.readUInt32BE(10);
        if (!isPowerOfTwo(minimum) || minimum > 65536 || !isPowerOfTwo(preferred) || preferred < minimum || maximum < preferred) {
          return this.fail(
            handshakeError(`INFO_BLOCK_SIZE is invalid: minimum ${minimum}, preferred ${preferred}, maximum ${maximum} (powers of two expected, minimum ≤ 65536 ≤ …, minimum ≤ preferred ≤ maximum)`),
            true,
          );
        }
        this.info.blockSize = { minimum, preferred, maximum };
        return true;
      }
      case INFO.NAME:
        this.info.name = data.toString('utf8', 2);
        return true;
      case INFO.DESCRIPTION:
        this.info.description = data.toString('utf8', 2);
        return true;
      default:
        return true; // unknown information is ignored (proto.md)
    }
  }

  private setSizeAndFlags(size: bigint, flags: number): boolean {
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
      return this.fail(handshakeError(`export size ${size} is larger than 2^53 bytes, which this client cannot address`), true);
    }
    this.info.size = Number(size);
    this.info.flags = (flags & TF.HAS_FLAGS) !== 0 ? flags : 0;
    return true;
  }

  private onExportNameReply(q: ByteQueue): boolean {
    const need = EXPORT_NAME_REPLY + (this.info.noZeroes ? 0 : EXPORT_NAME_PADDING);
    if (q.length < need) return false;
    const b = q.take(need);
    if (!this.setSizeAndFlags(b.readBigUInt64BE(0), b.readUInt16BE(8))) return false;
    this.goto('DONE');
    return true;
  }
}

export interface NegotiateOptions extends HandshakeOptions {
  signal?: AbortSignal;
}

/**
 * Run the handshake on `stream`. On success the stream is paused and the bytes already received
 * after the handshake are in `leftover`, for the transmission session to take over. On failure
 * the stream is ended (after OPT_ABORT where that is polite) and destroyed.
 */
export function negotiate(stream: Duplex, options: NegotiateOptions): Promise<{ info: ExportInfo; leftover: ByteQueue }> {
  const { signal } = options;
  const machine = new HandshakeMachine(options);
  const queue = new ByteQueue();
  // Errors are reported through 'close' below and, later, by the session; never uncaught.
  stream.on('error', () => {});
  return new Promise((resolve, reject) => {
    let lastError: Error | undefined;
    const cleanup = (): void => {
      stream.off('data', onData);
      stream.off('end', onEnd);
      stream.off('close', onEnd);
      stream.off('error', onError);
      signal?.removeEventListener('abort', onAbort);
    };
    const fail = (err: BlkrepError, polite: boolean): void => {
      cleanup();
      if (polite && !stream.destroyed) {
        const timer = setTimeout(() => stream.destroy(), 1000);
        timer.unref?.();
        stream.end(() => {
          clearTimeout(timer);
          stream.destroy();
        });
      } else {
        stream.destroy();
      }
      reject(err);
    };
    const onData = (chunk: Buffer): void => {
      queue.push(chunk);
      const out = machine.advance(queue);
      for (const b of out) stream.write(b);
      if (machine.state === 'DONE') {
        cleanup();
        stream.pause();
        resolve({ info: machine.result!, leftover: queue });
      } else if (machine.state === 'FAILED') {
        fail(machine.error!, true);
      }
    };
    const onEnd = (): void => fail(machine.eof(lastError?.message), false);
    const onError = (err: Error): void => {
      lastError = err;
    };
    const onAbort = (): void => fail(abortError('NBD handshake', signal?.reason), false);
    if (signal?.aborted) {
      onAbort();
      return;
    }
    if (stream.destroyed) {
      fail(machine.eof('the connection was closed before the handshake began'), false);
      return;
    }
    stream.on('data', onData);
    stream.on('end', onEnd);
    stream.on('close', onEnd);
    stream.on('error', onError);
    signal?.addEventListener('abort', onAbort, { once: true });
    // after STARTTLS the client speaks first: its first option goes out without waiting for bytes
    if (options.greeted) onData(Buffer.alloc(0));
    stream.resume();
  });
}
