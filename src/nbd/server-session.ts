/**
 * One client connection to the NBD server: the fixed-newstyle handshake, then the transmission
 * phase. Phases, in order: flags → options → transmission → closing → closed.
 *
 * Bytes arrive in a ByteQueue and are parsed as far as they go (pump). Requests run concurrently
 * and reply as they finish, so replies may be out of order. Backpressure both ways: parsing stops
 * while too many requests or bytes are in flight or while the socket's send buffer is full, and
 * the socket is paused so the kernel pushes back on the client.
 */
import type { Duplex } from 'node:stream';
import { NBD_ERRNO, toBlkrepError, type Errno } from '../api/errors.js';
import type { Extent } from '../api/block.js';
import { ByteQueue } from './byte-queue.js';
import type { BudgetWaiter, BufferBudget } from './server-budget.js';
import { sharedPool } from './buffer-pool.js';
import { ReceiveGc } from '../util/gc.js';
import {
  CMD, CMD_FLAG, CMD_NAMES, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
  IHAVEOPT, INFO, MAX_OPTION_LENGTH, MAX_PAYLOAD, MAX_STRING, OPT, REP, REQUEST_MAGIC, TF,
} from './constants.js';
import {
  decodeOptionHeader, decodeRequest, encodeBlockStatusChunk, encodeDataChunkHeader, encodeErrorChunk,
  encodeGreeting, encodeHoleChunk, encodeMessage, encodeNoneChunk, encodeOptionReply, encodeSimpleReply,
  OPTION_HEADER_LENGTH, REQUEST_LENGTH, type Request,
} from './codec.js';
import type { Descriptor, Export } from './export.js';

/** The server side a session needs; implemented by NbdServer. */
export interface SessionHost {
  readonly shuttingDown: boolean;
  readonly handshakeTimeoutMs: number;
  /** the memory all connections share */
  readonly budget: BufferBudget;
  findExport(name: string): Export | undefined;
  listExports(): Export[];
  log(level: 'debug' | 'info' | 'warn', message: string): void;
  sessionOpened(session: ServerSession): void;
  sessionClosed(session: ServerSession, reason: string): void;
  /** a blkrep extension option this server takes (the replication pair's link), if any */
  optionExtension?(option: number): OptionExtension | undefined;
}

/**
 * An NBD option outside the spec that hands the connection over to another protocol once
 * acknowledged, as STARTTLS hands it to TLS. The pair link uses it (src/pair): one listener,
 * one transport and one TLS set-up serve both the replica export and the link. A server that
 * does not know the option answers NBD_REP_ERR_UNSUP, so a client learns it talks to a plain
 * NBD server.
 */
export interface OptionExtension {
  /** for logs: "pair link" */
  readonly name: string;
  /**
   * Decide on the option. A string refuses it (NBD_REP_ERR_POLICY with that message; the
   * handshake goes on). A function takes the connection: the server replies ACK, stops reading
   * the stream (it is left paused: the new owner calls `resume()`), forgets the connection, and
   * calls the function with the stream and any bytes the client sent after the option.
   */
  accept(data: Buffer, peer: string): string | ((stream: Duplex, rest: Buffer) => void);
}

type Phase = 'flags' | 'options' | 'transmission' | 'closing' | 'closed';

/** Parsing stops while this many requests are running on one connection … */
const MAX_INFLIGHT = 64;
/** … or while this many payload bytes are held by running requests … */
const MAX_INFLIGHT_BYTES = 64 * 1024 * 1024;
/** … or while this many reply bytes wait in the socket's send buffer. */
const MAX_SEND_BUFFER = 64 * 1024 * 1024;
/** In the handshake, options are not read while this many reply bytes wait to be sent. */
const MAX_HANDSHAKE_SEND_BUFFER = 256 * 1024;
/**
 * A connection holding more than this (replies the client does not read, or a write payload it
 * stopped sending midway) is disconnected when it makes no progress for the stall timeout.
 */
export const STALL_MIN_BYTES = 1024 * 1024;
/**
 * A write payload at least this large that arrives over many socket reads is copied into its
 * buffer as it comes, so the received chunks are not held beside the copy (twice the memory).
 */
const FILL_MIN = 1024 * 1024;
/**
 * Reads shorter than this are sent as data without asking the node for holes: a hole chunk
 * would save little, and the extents lookup (two lseeks on the event loop for a raw file)
 * costs a quarter of the rate of 4 KiB random reads.
 */
const SPARSE_READ_MIN = 64 * 1024;
/** block status replies carry at most this many descriptors (the spec's recommendation) */
const MAX_DESCRIPTORS = 1 << 20;

const KNOWN_CMD_FLAGS = CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.DF | CMD_FLAG.REQ_ONE | CMD_FLAG.FAST_ZERO;

let nextSessionId = 1;

/** shared by every connection: what matters is the process's receive rate */
const receiveGc = new ReceiveGc();

export interface SessionCounters {
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
}

export class ServerSession implements BudgetWaiter {
  readonly id = nextSessionId++;
  readonly openedAt = new Date();
  readonly counters: SessionCounters = { requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0 };
  private phase: Phase = 'flags';
  private readonly queue = new ByteQueue();
  private noZeroes = false;
  private structured = false;
  /** export named by the last SET_META_CONTEXT, and the contexts it selected (id → name) */
  private metaExport: string | undefined;
  private selected = new Map<number, string>();
  private nextContextId = 1;
  private exp: Export | undefined;
  private tflags = 0;
  private inflight = 0;
  private inflightBytes = 0;
  private paused = false;
  /** bytes reserved in the budget for the request at the head of the queue (not started yet) */
  private reserved = 0;
  /** reply bytes charged to the budget: the socket's writableLength when last looked at */
  private unsent = 0;
  /** waiting in the budget's line, socket not read */
  private waitingBudget = false;
  /** bytes received and bytes handed to the socket, for the stall check */
  private received = 0;
  private queuedOut = 0;
  private stallMark = { received: 0, sent: 0, since: 0 };
  /** a large write whose payload is being copied into its buffer as it arrives */
  private filling: { req: Request; pooled: Buffer; got: number } | undefined;
  private stopping = false;
  /** the final flush and close have started */
  private finishing = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private closeWaiters: Array<() => void> = [];
  /** what the session listens to on the stream (removed when an extension takes it over) */
  private readonly listeners: Record<string, (...args: never[]) => void>;

  constructor(
    private readonly host: SessionHost,
    private readonly stream: Duplex,
    readonly peer: string,
  ) {
    this.listeners = {
      data: (chunk: Buffer) => {
        receiveGc.note(chunk.length);
        this.received += chunk.length;
        this.queue.push(chunk);
        this.pump();
      },
      end: () => this.onEnd(),
      error: (err: Error) => this.close(`socket error: ${err.message}`),
      close: () => this.close('connection closed'),
      drain: () => {
        this.noteUnsent();
        this.updateFlow();
      },
    };
    for (const [event, fn] of Object.entries(this.listeners)) stream.on(event, fn as (...args: unknown[]) => void);
    this.host.sessionOpened(this);
    this.handshakeTimer = setTimeout(() => {
      this.host.log('warn', `connection ${this.id} from ${this.peer}: handshake not finished within ${this.host.handshakeTimeoutMs} ms, closing`);
      this.close('handshake timeout');
    }, this.host.handshakeTimeoutMs);
    this.handshakeTimer.unref?.();
    this.stallMark.since = Date.now();
    this.send(encodeGreeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
  }

  get exportName(): string | undefined {
    return this.exp?.name;
  }

  /** the export chosen by GO / EXPORT_NAME (undefined in the handshake) */
  get attachedExport(): Export | undefined {
    return this.exp;
  }

  get state(): Phase {
    return this.phase;
  }

  get requestsInFlight(): number {
    return this.inflight;
  }

  /**
   * Server shutdown: requests already running finish; requests that arrive from now on get
   * ESHUTDOWN; then the export is flushed and the connection closed. In the handshake, options
   * get ERR_SHUTDOWN. Resolves when the connection is closed.
   */
  shutdown(): Promise<void> {
    if (this.phase === 'closed') return Promise.resolve();
    const done = new Promise<void>((resolve) => this.closeWaiters.push(resolve));
    if (this.phase === 'transmission') {
      this.stopping = true;
      this.pump();
      this.finishIfIdle();
    } else if (this.phase === 'closing') {
      this.finishIfIdle();
    }
    return done;
  }

  /** Hard disconnect. */
  close(reason: string): void {
    if (this.phase === 'closed') return;
    const wasTransmission = this.phase === 'transmission' || this.phase === 'closing';
    this.phase = 'closed';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.queue.clear();
    if (this.filling) sharedPool.release(this.filling.pooled);
    this.filling = undefined;
    this.stream.destroy();
    // What in-flight requests hold is given back as each one finishes.
    if (this.waitingBudget) this.host.budget.forget(this);
    this.host.budget.release(this.reserved + this.unsent);
    this.reserved = 0;
    this.unsent = 0;
    if (wasTransmission && this.exp) this.exp.counters.connections--;
    this.host.sessionClosed(this, reason);
    for (const w of this.closeWaiters.splice(0)) w();
  }

  // ---------------------------------------------------------------------------------------------
  // input

  private pump(): void {
    for (;;) {
      switch (this.phase) {
        case 'flags':
          if (this.queue.length < 4) return;
          this.onClientFlags(this.queue.take(4).readUInt32BE(0));
          break;
        case 'options': {
          if (this.overloaded()) {
            // A client that sends options without reading the replies: stop reading it.
            this.updateFlow();
            return;
          }
          if (this.queue.length < OPTION_HEADER_LENGTH) return;
          const h = decodeOptionHeader(this.queue.peek(OPTION_HEADER_LENGTH));
          if (h.magic !== IHAVEOPT) {
            this.protocolError(`option magic is 0x${h.magic.toString(16)}, expected IHAVEOPT`);
            return;
          }
          if (h.length > MAX_OPTION_LENGTH) {
            // Never buffer or allocate what a client claims; an option this long is an attack.
            this.protocolError(`option ${h.option} has length ${h.length}, over the limit of ${MAX_OPTION_LENGTH} bytes`);
            return;
          }
          if (this.queue.length < OPTION_HEADER_LENGTH + h.length) return;
          this.queue.skip(OPTION_HEADER_LENGTH);
          this.onOption(h.option, this.queue.take(h.length));
          break;
        }
        case 'transmission': {
          if (this.overloaded()) return;
          if (this.filling) {
            if (!this.fill()) return;
            break;
          }
          if (this.queue.length < REQUEST_LENGTH) return;
          const req = decodeRequest(this.queue.peek(REQUEST_LENGTH));
          if (req.magic !== REQUEST_MAGIC) {
            this.protocolError(`request magic is 0x${req.magic.toString(16)}, expected 0x${REQUEST_MAGIC.toString(16)}`);
            return;
          }
          let payload: Buffer | undefined;
          let pooled: Buffer | undefined;
          if (req.type === CMD.WRITE && req.length > MAX_PAYLOAD) {
            // We cannot skip a payload this large without reading it; the spec allows a disconnect.
            this.protocolError(`write of ${req.length} bytes at offset ${req.rawOffset} exceeds the maximum payload of ${MAX_PAYLOAD} bytes`);
            return;
          }
          if (this.reserved === 0 && !this.stopping) {
            // The payload (a write) or the data (a read) is reserved before it is read.
            const bytes = req.type === CMD.WRITE ? req.length : req.type === CMD.READ ? Math.min(req.length, MAX_PAYLOAD) : 0;
            if (bytes !== 0 && !this.host.budget.reserve(this, this.reserved + this.inflightBytes + this.unsent, bytes)) {
              this.waitingBudget = true;
              this.updateFlow();
              return;
            }
            this.reserved = bytes;
          }
          if (req.type === CMD.WRITE) {
            if (this.queue.length < REQUEST_LENGTH + req.length) {
              // Let the socket keep flowing until the payload is complete.
              if (req.length < FILL_MIN) return;
              this.queue.skip(REQUEST_LENGTH);
              this.filling = { req, pooled: sharedPool.acquire(req.length), got: 0 };
              if (!this.fill()) return;
              break;
            }
            this.queue.skip(REQUEST_LENGTH);
            if (!this.queue.contiguous(req.length)) pooled = sharedPool.acquire(req.length);
            payload = this.queue.take(req.length, pooled);
          } else {
            this.queue.skip(REQUEST_LENGTH);
          }
          this.onRequest(req, payload, pooled);
          break;
        }
        default:
          return;
      }
    }
  }

  /** Copy what arrived of a large write's payload; true once it is complete and started. */
  private fill(): boolean {
    const f = this.filling!;
    const n = Math.min(this.queue.length, f.req.length - f.got);
    this.queue.takeCopy(n, f.pooled.subarray(f.got));
    f.got += n;
    if (f.got < f.req.length) return false;
    this.filling = undefined;
    this.onRequest(f.req, f.pooled.subarray(0, f.req.length), f.pooled);
    return true;
  }

  private onEnd(): void {
    // Client half-closed: finish what runs, then close (a DISC without the DISC).
    if (this.phase === 'transmission') {
      this.phase = 'closing';
      this.finishIfIdle();
    } else if (this.phase !== 'closing') {
      this.close('client closed the connection');
    }
  }

  private protocolError(message: string): void {
    this.host.log('warn', `connection ${this.id} from ${this.peer}: ${message}; disconnecting`);
    this.close(message);
  }

  // ---------------------------------------------------------------------------------------------
  // handshake

  private onClientFlags(flags: number): void {
    const known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if ((flags & ~known) !== 0) {
      this.protocolError(`client flags 0x${flags.toString(16)} include bits the server did not offer`);
      return;
    }
    this.noZeroes = (flags & FLAG_C_NO_ZEROES) !== 0;
    this.phase = 'options';
  }

  private reply(option: number, type: number, data?: Buffer): void {
    this.send(encodeOptionReply(option, type, data));
  }

  private replyError(option: number, type: number, message: string): void {
    // The message may echo a client's name: keep it a valid NBD string (≤ 4096 bytes, no NUL).
    this.reply(option, type, encodeMessage(message));
  }

  private onOption(option: number, data: Buffer): void {
    if (this.host.shuttingDown && option !== OPT.ABORT) {
      if (option === OPT.EXPORT_NAME) {
        this.close('server shutting down');
        return;
      }
      this.replyError(option, REP.ERR_SHUTDOWN, 'server is shutting down');
      return;
    }
    switch (option) {
      case OPT.EXPORT_NAME:
        return this.onExportName(data);
      case OPT.ABORT:
        this.reply(option, REP.ACK);
        this.phase = 'closing';
        this.stream.end();
        return;
      case OPT.LIST:
        return this.onList(data);
      case OPT.STARTTLS:
        if (data.length) return this.replyError(option, REP.ERR_INVALID, 'STARTTLS must carry no data');
        return this.replyError(option, REP.ERR_POLICY, 'TLS is not configured on this server');
      case OPT.INFO:
      case OPT.GO:
        return this.onInfoGo(option, data);
      case OPT.STRUCTURED_REPLY:
        if (data.length) return this.replyError(option, REP.ERR_INVALID, 'STRUCTURED_REPLY must carry no data');
        this.structured = true;
        return this.reply(option, REP.ACK);
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT:
        return this.onMetaContext(option, data);
      case OPT.EXTENDED_HEADERS:
        return this.replyError(option, REP.ERR_UNSUP, 'extended headers are not supported');
      default: {
        const extension = this.host.optionExtension?.(option);
        if (extension) return this.onExtension(option, extension, data);
        return this.replyError(option, REP.ERR_UNSUP, `option ${option} is not supported`);
      }
    }
  }

  private onExtension(option: number, extension: OptionExtension, data: Buffer): void {
    const decision = extension.accept(data, this.peer);
    if (typeof decision === 'string') return this.replyError(option, REP.ERR_POLICY, decision);
    this.reply(option, REP.ACK);
    this.stream.pause();
    for (const [event, fn] of Object.entries(this.listeners)) this.stream.off(event, fn as (...args: unknown[]) => void);
    const rest = this.queue.take(this.queue.length);
    this.phase = 'closed';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    if (this.waitingBudget) this.host.budget.forget(this);
    this.host.budget.release(this.reserved + this.unsent);
    this.reserved = 0;
    this.unsent = 0;
    this.host.log('debug', `connection ${this.id} from ${this.peer}: taken over by the ${extension.name}`);
    this.host.sessionClosed(this, `taken over by the ${extension.name}`);
    for (const w of this.closeWaiters.splice(0)) w();
    decision(this.stream, rest);
  }

  private onExportName(data: Buffer): void {
    const name = data.toString('utf8');
    const exp = data.length <= MAX_STRING ? this.host.findExport(name) : undefined;
    if (!exp) {
      // EXPORT_NAME has no error reply: the only answer is to close.
      this.protocolError(`EXPORT_NAME asked for unknown export "${name.slice(0, 256)}"`);
      return;
    }
    const b = Buffer.alloc(this.noZeroes ? 10 : 134);
    b.writeBigUInt64BE(BigInt(exp.size), 0);
    this.enterTransmission(exp);
    b.writeUInt16BE(this.tflags, 8);
    this.send(b);
  }

  private onList(data: Buffer): void {
    if (data.length) return this.replyError(OPT.LIST, REP.ERR_INVALID, 'LIST must carry no data');
    for (const exp of this.host.listExports()) {
      const name = Buffer.from(exp.name, 'utf8');
      const desc = Buffer.from(exp.description ?? '', 'utf8');
      const b = Buffer.alloc(4 + name.length + desc.length);
      b.writeUInt32BE(name.length, 0);
      name.copy(b, 4);
      desc.copy(b, 4 + name.length);
      this.reply(OPT.LIST, REP.SERVER, b);
    }
    this.reply(OPT.LIST, REP.ACK);
  }

  private onInfoGo(option: number, data: Buffer): void {
    const what = option === OPT.GO ? 'GO' : 'INFO';
    if (data.length < 6) return this.replyError(option, REP.ERR_INVALID, `${what} data is ${data.length} bytes, at least 6 are needed`);
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6) {
      return this.replyError(option, REP.ERR_INVALID, `${what} name length ${nameLength} exceeds the option length ${data.length} less 6`);
    }
    if (nameLength > MAX_STRING) return this.replyError(option, REP.ERR_INVALID, `export name of ${nameLength} bytes is longer than ${MAX_STRING}`);
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 6 + nameLength + 2 * count) {
      return this.replyError(option, REP.ERR_INVALID, `${what} asks for ${count} information types but carries ${data.length - 6 - nameLength} bytes for them`);
    }
    const requested = new Set<number>();
    for (let i = 0; i < count; i++) requested.add(data.readUInt16BE(6 + nameLength + 2 * i));
    const exp = this.host.findExport(name);
    if (!exp) return this.replyError(option, REP.ERR_UNKNOWN, `no export named "${name}"`);

    const flags = exp.transmissionFlags(this.structured);
    const info = Buffer.alloc(12);
    info.writeUInt16BE(INFO.EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.size), 2);
    info.writeUInt16BE(flags, 10);
    this.reply(option, REP.INFO, info);
    if (requested.has(INFO.NAME)) {
      this.reply(option, REP.INFO, Buffer.concat([u16(INFO.NAME), Buffer.from(exp.name, 'utf8')]));
    }
    if (requested.has(INFO.DESCRIPTION) && exp.description !== undefined) {
      this.reply(option, REP.INFO, Buffer.concat([u16(INFO.DESCRIPTION), Buffer.from(exp.description, 'utf8')]));
    }
    // Block size is sent whether asked or not: it costs nothing and lets clients do better.
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(INFO.BLOCK_SIZE, 0);
    bs.writeUInt32BE(exp.minimum, 2);
    bs.writeUInt32BE(exp.preferred, 6);
    bs.writeUInt32BE(Math.min(exp.maximum, MAX_PAYLOAD), 10);
    this.reply(option, REP.INFO, bs);
    this.reply(option, REP.ACK);
    if (option === OPT.GO) this.enterTransmission(exp);
  }

  private onMetaContext(option: number, data: Buffer): void {
    const set = option === OPT.SET_META_CONTEXT;
    const what = set ? 'SET_META_CONTEXT' : 'LIST_META_CONTEXT';
    if (set) {
      // SET replaces earlier selections even when it fails.
      this.selected = new Map();
      this.metaExport = undefined;
    }
    if (!this.structured) return this.replyError(option, REP.ERR_INVALID, `${what} needs STRUCTURED_REPLY first`);
    const parsed = parseMetaContextRequest(data);
    if (typeof parsed === 'string') return this.replyError(option, REP.ERR_INVALID, `${what}: ${parsed}`);
    const exp = this.host.findExport(parsed.exportName);
    if (!exp) return this.replyError(option, REP.ERR_UNKNOWN, `no export named "${parsed.exportName}"`);
    const available = exp.metaContextNames();
    const matches: string[] = [];
    if (!set && parsed.queries.length === 0) matches.push(...available);
    for (const q of parsed.queries) {
      for (const name of available) {
        // In LIST a query ending in ':' is a wildcard for everything under it ("base:" → "base:allocation").
        const hit = name === q || (!set && q.endsWith(':') && name.startsWith(q));
        if (hit && !matches.includes(name)) matches.push(name);
      }
    }
    for (const name of matches) {
      const id = set ? this.nextContextId++ : 0;
      if (set) this.selected.set(id, name);
      const b = Buffer.alloc(4 + Buffer.byteLength(name));
      b.writeUInt32BE(id, 0);
      b.write(name, 4, 'utf8');
      this.reply(option, REP.META_CONTEXT, b);
    }
    if (set) this.metaExport = exp.name;
    this.reply(option, REP.ACK);
  }

  private enterTransmission(exp: Export): void {
    this.exp = exp;
    this.tflags = exp.transmissionFlags(this.structured);
    if (this.metaExport !== exp.name) this.selected = new Map();
    this.phase = 'transmission';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    exp.counters.connections++;
    exp.counters.totalConnections++;
    this.host.log('debug', `connection ${this.id} from ${this.peer}: serving export "${exp.name}"`);
  }

  // ---------------------------------------------------------------------------------------------
  // transmission

  private overloaded(): boolean {
    if (this.phase === 'options') return this.stream.writableLength >= MAX_HANDSHAKE_SEND_BUFFER;
    return this.waitingBudget || this.inflight >= MAX_INFLIGHT || this.inflightBytes >= MAX_INFLIGHT_BYTES || this.stream.writableLength >= MAX_SEND_BUFFER;
  }

  /** The budget made the reservation this connection waited for: read on. */
  granted(bytes: number): void {
    this.waitingBudget = false;
    if (this.phase !== 'transmission') {
      this.host.budget.release(bytes);
      return;
    }
    this.reserved = bytes;
    this.updateFlow();
  }

  /**
   * Called by the server about once a second: take a fresh look at the reply bytes held, and
   * disconnect a connection that holds more than STALL_MIN_BYTES and has made no progress
   * (sent nothing it was owed, read nothing of a payload it started) for `timeoutMs`.
   */
  checkStall(now: number, timeoutMs: number): void {
    if (this.phase === 'closed') return;
    this.noteUnsent();
    const sent = this.queuedOut - this.stream.writableLength;
    const mark = this.stallMark;
    // a payload partly received, while this side reads the socket
    const partial = this.paused ? 0 : this.filling ? this.filling.got : this.reserved !== 0 ? this.queue.length : 0;
    if (sent !== mark.sent || this.received !== mark.received || Math.max(this.unsent, partial) <= STALL_MIN_BYTES) {
      mark.sent = sent;
      mark.received = this.received;
      mark.since = now;
      return;
    }
    if (now - mark.since < timeoutMs) return;
    const why = this.unsent > STALL_MIN_BYTES
      ? `stall timeout: the client read none of ${this.unsent} bytes of replies for ${timeoutMs / 1000} s`
      : `stall timeout: the client sent none of the rest of a ${this.reserved}-byte write payload for ${timeoutMs / 1000} s (${partial} bytes received)`;
    this.host.log('warn', `connection ${this.id} from ${this.peer}: ${why}; disconnecting`);
    this.close(why);
  }

  /** Charge the budget with the reply bytes the socket holds now. */
  private noteUnsent(): void {
    if (this.phase === 'closed') return;
    const now = this.stream.writableLength;
    const delta = now - this.unsent;
    if (delta === 0) return;
    this.unsent = now;
    this.host.budget.adjust(delta);
  }

  private updateFlow(): void {
    if (this.phase === 'closed') return;
    const stop = this.overloaded() || this.phase === 'closing' || this.stopping;
    if (stop && !this.paused) {
      this.paused = true;
      this.stream.pause();
    } else if (!stop && this.paused) {
      this.paused = false;
      this.stream.resume();
      this.pump();
    }
  }

  /** `pooled`, when given, backs `payload` and goes back to the pool once the request is done. */
  private onRequest(req: Request, payload: Buffer | undefined, pooled?: Buffer): void {
    const exp = this.exp!;
    this.counters.requests++;
    const name = CMD_NAMES[req.type];
    if (name) exp.counters.requests[name] = (exp.counters.requests[name] ?? 0) + 1;
    if (req.type === CMD.DISC) {
      // No reply; finish what runs, make it durable, close.
      this.phase = 'closing';
      this.updateFlow();
      this.finishIfIdle();
      return;
    }
    // the bytes reserved for this request are held until it is done
    const bytes = this.reserved;
    this.reserved = 0;
    this.inflight++;
    this.inflightBytes += bytes;
    this.updateFlow();
    void this.run(req, payload).finally(() => {
      if (pooled) sharedPool.release(pooled);
      this.inflight--;
      this.inflightBytes -= bytes;
      if (bytes !== 0) this.host.budget.release(bytes);
      this.updateFlow();
      this.finishIfIdle();
    });
  }

  private finishIfIdle(): void {
    if (this.inflight > 0) return;
    if (this.phase === 'transmission' && this.stopping) {
      // Parsing stops while too many requests run, and the stream stays paused once stopping:
      // answer (ESHUTDOWN) what is still queued, or the connection would never close. What is
      // left after that is an incomplete request, dropped with the connection. Answering
      // ESHUTDOWN needs no buffer: a connection waiting for the budget leaves the line.
      if (this.waitingBudget) {
        this.host.budget.forget(this);
        this.waitingBudget = false;
      }
      this.pump();
      if (this.inflight > 0 || this.phase !== 'transmission') return;
    }
    if (this.finishing) return;
    if (this.phase === 'closing' || (this.phase === 'transmission' && this.stopping)) {
      this.phase = 'closing';
      this.finishing = true;
      const exp = this.exp;
      const flushed = exp && !exp.readOnly ? exp.node.flush().catch((err) => {
        this.host.log('warn', `flush of export "${exp.name}" at disconnect failed: ${toBlkrepError(err).message}`);
      }) : Promise.resolve();
      void flushed.then(() => {
        if (this.phase === 'closed') return;
        this.stream.end(() => this.close('disconnected'));
      });
    }
  }

  /** Validate, then perform, then reply. Never throws. */
  private async run(req: Request, payload: Buffer | undefined): Promise<void> {
    const exp = this.exp!;
    if (this.stopping) return this.replyFailure(req, 'ESHUTDOWN', 'server is shutting down');
    const invalid = this.validate(req, exp);
    if (invalid) return this.replyFailure(req, invalid[0], invalid[1]);
    const fua = (req.flags & CMD_FLAG.FUA) !== 0;
    const node = exp.node;
    try {
      switch (req.type) {
        case CMD.READ:
          await this.read(req);
          exp.counters.bytesRead += req.length;
          this.counters.bytesRead += req.length;
          return;
        case CMD.WRITE:
          await node.write(req.offset, payload!, { fua });
          exp.counters.bytesWritten += req.length;
          this.counters.bytesWritten += req.length;
          break;
        case CMD.FLUSH:
          await node.flush();
          break;
        case CMD.TRIM:
          if (req.length) await node.trim(req.offset, req.length, { fua });
          break;
        case CMD.WRITE_ZEROES:
          if (req.length) {
            await node.writeZeroes(req.offset, req.length, {
              fua,
              noHole: (req.flags & CMD_FLAG.NO_HOLE) !== 0,
              fast: (req.flags & CMD_FLAG.FAST_ZERO) !== 0,
            });
          }
          break;
        case CMD.CACHE:
          if (req.length) await node.cache(req.offset, req.length);
          break;
        case CMD.BLOCK_STATUS:
          return await this.blockStatus(req, exp);
      }
      this.send(encodeSimpleReply(0, req.cookie));
    } catch (err) {
      const e = toBlkrepError(err, `${CMD_NAMES[req.type]} of ${req.length} bytes at offset ${req.offset}`);
      if (e.errno !== 'ENOTSUP') this.host.log('warn', `connection ${this.id}: ${e.message}`);
      this.replyFailure(req, e.errno, e.message);
    }
  }

  private validate(req: Request, exp: Export): [Errno, string] | null {
    const name = CMD_NAMES[req.type];
    if (!name) return ['EINVAL', `unknown command ${req.type}`];
    if ((req.flags & ~KNOWN_CMD_FLAGS) !== 0) return ['EINVAL', `unknown flags 0x${req.flags.toString(16)} on ${name}`];
    const f = this.tflags;
    const has = (flag: number) => (req.flags & flag) !== 0;
    if (has(CMD_FLAG.FUA) && !(f & TF.SEND_FUA)) return ['EINVAL', `FUA flag on ${name}, but the export does not offer FUA`];
    if (has(CMD_FLAG.NO_HOLE) && req.type !== CMD.WRITE_ZEROES) return ['EINVAL', `NO_HOLE flag is only valid on write-zeroes, not ${name}`];
    if (has(CMD_FLAG.DF) && (req.type !== CMD.READ || !(f & TF.SEND_DF))) {
      return ['EINVAL', req.type !== CMD.READ ? `DF flag is only valid on read, not ${name}` : 'DF flag needs structured replies'];
    }
    if (has(CMD_FLAG.REQ_ONE) && req.type !== CMD.BLOCK_STATUS) return ['EINVAL', `REQ_ONE flag is only valid on block-status, not ${name}`];
    if (has(CMD_FLAG.FAST_ZERO) && (req.type !== CMD.WRITE_ZEROES || !(f & TF.SEND_FAST_ZERO))) {
      return ['EINVAL', req.type !== CMD.WRITE_ZEROES ? `FAST_ZERO flag is only valid on write-zeroes, not ${name}` : 'FAST_ZERO is not offered by this export'];
    }
    const writing = req.type === CMD.WRITE || req.type === CMD.TRIM || req.type === CMD.WRITE_ZEROES;
    if (writing && exp.readOnly) return ['EPERM', `${name} on read-only export "${exp.name}"`];
    if (req.type === CMD.TRIM && !(f & TF.SEND_TRIM)) return ['EINVAL', 'trim is not offered by this export'];
    if (req.type === CMD.FLUSH) return null;
    const end = req.rawOffset + BigInt(req.length);
    if (end > BigInt(exp.size)) {
      const errno: Errno = req.type === CMD.WRITE || req.type === CMD.WRITE_ZEROES ? 'ENOSPC' : 'EINVAL';
      return [errno, `${name} of ${req.length} bytes at offset ${req.rawOffset} is beyond the end of export "${exp.name}" (size ${exp.size})`];
    }
    if (exp.minimum > 1 && (req.offset % exp.minimum !== 0 || req.length % exp.minimum !== 0)) {
      return ['EINVAL', `${name} of ${req.length} bytes at offset ${req.offset} is not aligned to the minimum block size ${exp.minimum}`];
    }
    if (req.type === CMD.READ && req.length > MAX_PAYLOAD) {
      return [has(CMD_FLAG.DF) ? 'EOVERFLOW' : 'EINVAL', `read of ${req.length} bytes exceeds the maximum payload of ${MAX_PAYLOAD} bytes`];
    }
    if (req.type === CMD.BLOCK_STATUS) {
      if (this.selected.size === 0) return ['EINVAL', 'block-status without a meta context selected by SET_META_CONTEXT'];
      if (req.length === 0) return ['EINVAL', 'block-status of 0 bytes'];
    }
    return null;
  }

  private async read(req: Request): Promise<void> {
    const node = this.exp!.node;
    const { offset, length, cookie } = req;
    if (length === 0) {
      this.send(this.structured ? encodeNoneChunk(cookie) : encodeSimpleReply(0, cookie));
      return;
    }
    const df = (req.flags & CMD_FLAG.DF) !== 0;
    let runs: Extent[] | undefined;
    if (this.structured && !df && length >= SPARSE_READ_MIN && node.caps.canExtents && node.caps.cheapExtents) runs = clipExtents(await node.extents(offset, length), length);
    if (!runs || runs.length === 0 || (runs.length === 1 && !runs[0]!.zero)) {
      // One piece of data: read into a pooled buffer, returned once the socket has sent it.
      const pooled = sharedPool.acquire(length);
      const data = pooled.subarray(0, length);
      try {
        await node.readInto(offset, data);
      } catch (err) {
        sharedPool.release(pooled);
        throw err;
      }
      const header = this.structured ? encodeDataChunkHeader(cookie, offset, length, true) : encodeSimpleReply(0, cookie);
      if (!this.sendData(header, data, () => sharedPool.release(pooled))) sharedPool.release(pooled);
      return;
    }
    // Sparse read: holes as OFFSET_HOLE chunks, data runs read in parallel.
    const parts: Array<{ at: number; len: number; data?: Promise<Buffer> }> = [];
    let at = offset;
    for (const r of runs) {
      parts.push(r.zero ? { at, len: r.length } : { at, len: r.length, data: node.read(at, r.length) });
      at += r.length;
    }
    const datas = await Promise.all(parts.map((p) => p.data));
    const out: Buffer[] = [];
    parts.forEach((p, i) => {
      const last = i === parts.length - 1;
      const d = datas[i];
      if (d) out.push(encodeDataChunkHeader(cookie, p.at, p.len, last), d);
      else out.push(encodeHoleChunk(cookie, p.at, p.len, last));
    });
    this.send(...out);
  }

  private async blockStatus(req: Request, exp: Export): Promise<void> {
    const reqOne = (req.flags & CMD_FLAG.REQ_ONE) !== 0;
    const chunks: Buffer[] = [];
    const ids = [...this.selected.keys()];
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      const source = exp.metaContext(this.selected.get(id)!);
      let descriptors: Descriptor[] = source ? await source.blockStatus(req.offset, req.length) : [[req.length, 0]];
      descriptors = clipDescriptors(descriptors, req.length, reqOne ? 1 : MAX_DESCRIPTORS);
      if (descriptors.length === 0) descriptors = [[req.length, 0]];
      chunks.push(encodeBlockStatusChunk(req.cookie, id, descriptors, i === ids.length - 1));
    }
    this.send(...chunks);
  }

  private replyFailure(req: Request, errno: Errno, message: string): void {
    this.counters.errors++;
    if (this.exp) this.exp.counters.errors++;
    const code = NBD_ERRNO[errno];
    if (this.structured) this.send(encodeErrorChunk(req.cookie, code, message));
    else this.send(encodeSimpleReply(code, req.cookie));
  }

  // ---------------------------------------------------------------------------------------------
  // output

  private send(...buffers: Buffer[]): void {
    if (this.phase === 'closed' || this.stream.destroyed || this.stream.writableEnded) return;
    if (buffers.length === 1) {
      this.queuedOut += buffers[0]!.length;
      this.stream.write(buffers[0]);
      this.noteUnsent();
      return;
    }
    this.stream.cork();
    for (const b of buffers) {
      if (!b.length) continue;
      this.queuedOut += b.length;
      this.stream.write(b);
    }
    this.stream.uncork();
    this.noteUnsent();
  }

  /**
   * Send a header and a data buffer; `sent` runs once the socket is done with the data.
   * Returns false (and never calls `sent`) when the connection is already gone.
   */
  private sendData(header: Buffer, data: Buffer, sent: () => void): boolean {
    if (this.phase === 'closed' || this.stream.destroyed || this.stream.writableEnded) return false;
    this.stream.cork();
    this.stream.write(header);
    this.stream.write(data, () => sent());
    this.stream.uncork();
    this.queuedOut += header.length + data.length;
    this.noteUnsent();
    return true;
  }
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

/** Parse the payload of LIST/SET_META_CONTEXT; a string is the reason it is malformed. */
export function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | string {
  if (data.length < 8) return `payload of ${data.length} bytes is shorter than the 8 bytes of its fixed fields`;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return `export name length ${nameLength} runs past the payload of ${data.length} bytes`;
  if (nameLength > MAX_STRING) return `export name of ${nameLength} bytes is longer than ${MAX_STRING}`;
  const exportName = data.toString('utf8', 4, 4 + nameLength);
  let p = 4 + nameLength;
  const count = data.readUInt32BE(p);
  p += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (p + 4 > data.length) return `query ${i + 1} of ${count} runs past the payload of ${data.length} bytes`;
    const len = data.readUInt32BE(p);
    p += 4;
    if (len > data.length - p) return `query ${i + 1} of ${count} (length ${len}) runs past the payload of ${data.length} bytes`;
    if (len > MAX_STRING) return `query ${i + 1} is ${len} bytes, longer than ${MAX_STRING}`;
    queries.push(data.toString('utf8', p, p + len));
    p += len;
  }
  if (p !== data.length) return `${data.length - p} bytes left over after ${count} queries`;
  return { exportName, queries };
}

/** Runs from the node, clipped to the request and merged where the read reply treats them alike. */
function clipExtents(extents: Extent[], length: number): Extent[] {
  const out: Extent[] = [];
  let total = 0;
  for (const e of extents) {
    if (total >= length) break;
    const n = Math.min(e.length, length - total);
    if (n <= 0) continue;
    const last = out[out.length - 1];
    if (last && last.zero === e.zero) last.length += n;
    else out.push({ length: n, hole: e.hole, zero: e.zero });
    total += n;
  }
  if (total < length) {
    // The node described less than asked: treat the rest as data.
    const last = out[out.length - 1];
    if (last && !last.zero) last.length += length - total;
    else out.push({ length: length - total, hole: false, zero: false });
  }
  return out;
}

function clipDescriptors(descriptors: Descriptor[], length: number, max: number): Descriptor[] {
  const out: Descriptor[] = [];
  let total = 0;
  for (const [len, flags] of descriptors) {
    if (total >= length || out.length >= max) break;
    const n = Math.min(len, length - total);
    if (n <= 0) continue;
    const last = out[out.length - 1];
    if (last && last[1] === flags) last[0] += n;
    else out.push([n, flags]);
    total += n;
  }
  return out;
}

