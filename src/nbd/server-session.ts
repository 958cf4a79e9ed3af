/**
 * One client connection to the NBD server: the fixed-newstyle handshake, then the transmission
 * phase. Phases, in order: flags → options (→ starttls → options) → transmission → closing → closed.
 * The handshake's decisions are made by the pure ServerHandshake (server-handshake.ts): this
 * class carries them out on the stream (send, close, upgrade to TLS, hand over, serve).
 *
 * Bytes arrive in a ByteQueue and are parsed as far as they go (pump). Requests run concurrently
 * and reply as they finish, so replies may be out of order. Backpressure both ways: parsing stops
 * while too many requests or bytes are in flight or while the socket's send buffer is full, and
 * the socket is paused so the kernel pushes back on the client.
 */
import type { Duplex } from 'node:stream';
import type { ConnectionUpgrader } from '../api/transport.js';
import { NBD_ERRNO, toBlkrepError, type Errno } from '../api/errors.js';
import type { Extent } from '../api/block.js';
import { ByteQueue } from './byte-queue.js';
import { moveToDirectReceive, type DirectReader } from './direct-receive.js';
import type { BudgetWaiter, BufferBudget } from './server-budget.js';
import { sharedPool } from './buffer-pool.js';
import { ReceiveGc } from '../util/gc.js';
import {
  CMD, CMD_FLAG, CMD_NAMES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, MAX_OPTION_LENGTH, MAX_PAYLOAD, REQUEST_MAGIC, TF,
} from './constants.js';
import {
  decodeOptionHeader, decodeRequest, encodeBlockStatusChunk, encodeDataChunkHeader, encodeErrorChunk,
  encodeGreeting, encodeHoleChunk, encodeNoneChunk, encodeSimpleReply, OPTION_HEADER_LENGTH, REQUEST_LENGTH, type Request,
} from './codec.js';
import type { Descriptor, Export } from './export.js';
import { StateMachine, type MachineSpec } from '../util/state-machine.js';
import { ServerHandshake, type HandshakeHost, type HandshakeStep, type TlsMode } from './server-handshake.js';
import { envFlag } from '../util/env.js';

export { parseMetaContextRequest, type OptionExtension } from './server-handshake.js';

/** The server side a session needs; implemented by NbdServer. */
export interface SessionHost extends HandshakeHost {
  readonly handshakeTimeoutMs: number;
  /** the memory all connections share */
  readonly budget: BufferBudget;
  /** TLS on this server (undefined: none; STARTTLS gets ERR_POLICY) */
  readonly tls?: SessionTls;
  log(level: 'debug' | 'info' | 'warn', message: string): void;
  sessionOpened(session: ServerSession): void;
  sessionClosed(session: ServerSession, reason: string): void;
  /** told of every request once it is answered (serve-nbd --metrics); undefined: nothing is timed */
  readonly requestObserver?: RequestObserver | undefined;
}

/** (export, command name, seconds from the parsed request to its reply queued) */
export type RequestObserver = (exportName: string, command: string, seconds: number) => void;

/** STARTTLS on the server: the mode, and the upgrader that turns a stream into a TLS one. */
export interface SessionTls {
  readonly mode: TlsMode;
  readonly upgrader: ConnectionUpgrader;
  /** the upgrader's settings (certificates …), passed to it as given */
  readonly settings?: Readonly<Record<string, string>>;
}

type Phase = 'flags' | 'options' | 'starttls' | 'transmission' | 'closing' | 'closed';

/** A connection's phases; the handshake's decisions within 'options' are ServerHandshake's. */
export const SESSION_PHASES: MachineSpec<Phase> = {
  name: 'server session',
  transitions: {
    flags: ['options', 'closed'],
    // closing: OPT_ABORT; closed: a hard close, or an extension took the connection
    options: ['starttls', 'transmission', 'closing', 'closed'],
    starttls: ['options', 'closed'],
    transmission: ['closing', 'closed'],
    closing: ['closed'],
    closed: [],
  },
};

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
/**
 * A plain socket in the transmission phase reads into this when no write payload is being
 * received, and the session copies the bytes out at once (direct-receive.ts); so one buffer
 * serves every connection. 256 KiB: many small requests per read call.
 */
const SCRATCH_LENGTH = 256 * 1024;
const SCRATCH = Buffer.allocUnsafeSlow(SCRATCH_LENGTH);
/**
 * Once a connection has sent a write of ADOPT_MIN bytes or more, its reads go into a pooled
 * buffer of its own (ADOPT_SIZE, read at most SCRATCH_LENGTH at a time) instead of the shared
 * scratch buffer. When such a read ends in the first part of a large write's payload, that
 * buffer becomes the payload's (the rest of the payload is read in place after it) and the
 * connection takes a fresh one: the part that came with the header is not copied (up to 256 KiB
 * of every 1 MiB write otherwise). Only the pages a read touches are ever backed by memory.
 */
const ADOPT_MIN = 128 * 1024;
const ADOPT_SIZE = 2 * 1024 * 1024;
/**
 * Plain read replies from SPLICE_MIN to SPLICE_MAX bytes of a node with a file range (a raw
 * file) go from the file to the socket without a copy through user space (spliceRead()).
 * SPLICE_MAX: the pool worker's pipe (1 MiB, the kernel's default pipe-max-size). SPLICE_MIN:
 * smaller reads are served from the loop (RWF_NOWAIT) and batched, which a pool job per reply
 * would undo; not tuned.
 */
const SPLICE_MIN = 256 * 1024;
const SPLICE_MAX = 1024 * 1024;
/** the page size the pipe's room is counted in (the addon checks the real one: a larger page falls back there) */
const PAGE = 4096;
/**
 * A connection's splice replies in flight: each holds a pool thread (filling its pipe, waiting
 * for its turn or for socket space); more wait for a place. 4: QD8 1 MiB reads keep the socket
 * busy with 4 (not tuned on a quiet machine).
 */
const SPLICE_PER_CONNECTION = 4;
/** splice replies in flight in the process (pool threads held) */
let splicesRunning = 0;
let spliceMax: number | undefined;
/** at most half of libuv's thread pool (UV_THREADPOOL_SIZE, 4 when unset; bin/run.js sets 16) for splice replies: beyond, the usual read */
function spliceMaxRunning(): number {
  if (spliceMax === undefined) {
    const n = Number(process.env.UV_THREADPOOL_SIZE);
    spliceMax = Math.max(1, Math.floor((Number.isInteger(n) && n > 0 ? n : 4) / 2));
  }
  return spliceMax;
}
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

export class ServerSession implements BudgetWaiter, DirectReader {
  readonly id = nextSessionId++;
  readonly openedAt = new Date();
  readonly counters: SessionCounters = { requests: 0, bytesRead: 0, bytesWritten: 0, errors: 0 };
  private readonly machine = new StateMachine(SESSION_PHASES, 'flags');
  private readonly queue = new ByteQueue();
  private readonly handshake: ServerHandshake;
  /** what the handshake agreed, for the transmission phase */
  private structured = false;
  /** the meta contexts selected for the export served (id → name) */
  private selected = new Map<number, string>();
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
  private bytesReceived = 0;
  private queuedOut = 0;
  private stallMark = { received: 0, sent: 0, since: 0 };
  /** a large write whose payload is being copied into its buffer as it arrives */
  private filling: { req: Request; pooled: Buffer; base: number; got: number } | undefined;
  /** large writes' first parts are received in this connection's own buffer (adopt()); off: BLKREP_NO_RECV_ADOPT=1 */
  private adopting = false;
  /**
   * this connection's own read buffer (ADOPT_SIZE): taken for the reads after a large write
   * (wantRecvBuf), given back after a read that ends on a request boundary with no large write
   * begun, so a connection not receiving large writes holds none
   */
  private recvBuf: Buffer | undefined;
  private wantRecvBuf = false;
  /** the buffer the read being handled went into (received() → pump()) */
  private lastRead: Buffer | undefined;
  /** the socket reads where nextBuffer() says (direct-receive.ts) */
  private direct = false;
  /** replies are gathered per turn of the event loop (see batch()); set once goDirect() has run */
  private batching = false;
  /** the stream is corked until the scheduled flush */
  private corked = false;
  /** the socket's fd for splice replies (spliceRead()): set by goDirect() unless BLKREP_NO_SPLICE; -1: none */
  private sockFd = -1;
  /** the splice replies' lane (FileRange.sendTo): they reach the socket in the order started; [0] set to 1 at close */
  private readonly spliceLane = Buffer.from(new Int32Array(3).buffer);
  /** splice replies started and not settled (at most SPLICE_PER_CONNECTION) */
  private spliceActive = 0;
  /** splice replies waiting for a place (spliceDone() hands one over) */
  private spliceWaiters: Array<() => void> = [];
  /** their bytes (held, for the stall check) */
  private spliceBytes = 0;
  private readonly flushBatch = (): void => {
    this.corked = false;
    if (this.stream.writableCorked > 0) this.stream.uncork();
    this.noteUnsent();
  };
  private stopping = false;
  /** the final flush and close have started */
  private finishing = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  /** aborts the TLS upgrade in progress (phase starttls) when the connection closes */
  private upgradeAbort: AbortController | undefined;
  private closeWaiters: Array<() => void> = [];
  /** what the session listens to on the stream (removed when an extension takes it over) */
  private readonly listeners: Record<string, (...args: never[]) => void>;

  constructor(
    private readonly host: SessionHost,
    /** the connection's stream; after STARTTLS, the TLS stream over it */
    private stream: Duplex,
    readonly peer: string,
  ) {
    this.handshake = new ServerHandshake(host, { tls: host.tls?.mode, peer });
    this.listeners = {
      data: (chunk: Buffer) => {
        receiveGc.note(chunk.length);
        this.bytesReceived += chunk.length;
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
    this.listen(stream);
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
    return this.machine.state;
  }

  private get phase(): Phase {
    return this.machine.state;
  }

  /** the TLS phase of the handshake: 'tls' once STARTTLS succeeded */
  get tlsPhase(): string {
    return this.handshake.tlsPhase;
  }

  private listen(stream: Duplex): void {
    for (const [event, fn] of Object.entries(this.listeners)) stream.on(event, fn as (...args: unknown[]) => void);
  }

  private unlisten(stream: Duplex): void {
    for (const [event, fn] of Object.entries(this.listeners)) stream.off(event, fn as (...args: unknown[]) => void);
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
    this.machine.goto('closed');
    this.spliceLane.writeInt32LE(1, 0);
    // the waiting replies get their places (and find the connection gone)
    this.spliceActive += this.spliceWaiters.length;
    for (const w of this.spliceWaiters.splice(0)) w();
    this.handshake.closed();
    this.upgradeAbort?.abort();
    this.upgradeAbort = undefined;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.queue.clear();
    if (this.filling) sharedPool.release(this.filling.pooled);
    this.filling = undefined;
    if (this.recvBuf) sharedPool.release(this.recvBuf);
    this.recvBuf = undefined;
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
          this.machine.goto('options');
          this.carryOut(this.handshake.clientFlags(this.queue.take(4).readUInt32BE(0)));
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
          const data = this.queue.take(h.length);
          this.carryOut(this.handshake.option(h.option, data, this.queue.length));
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
              // Let the socket keep flowing until the payload is complete; a direct socket
              // reads the rest straight into the payload's buffer.
              if (req.length < FILL_MIN && !this.direct) return;
              if (this.adopting && req.length >= ADOPT_MIN) {
                if (this.adopt(req)) return;
                this.wantRecvBuf = true;
              }
              this.queue.skip(REQUEST_LENGTH);
              this.filling = { req, pooled: sharedPool.acquire(req.length), base: 0, got: 0 };
              if (!this.fill()) return;
              break;
            }
            this.queue.skip(REQUEST_LENGTH);
            if (this.direct) {
              // a direct socket's bytes may be in the scratch buffer, read into again
              pooled = sharedPool.acquire(req.length);
              payload = pooled.subarray(0, req.length);
              this.queue.takeCopy(req.length, payload);
            } else {
              if (!this.queue.contiguous(req.length)) pooled = sharedPool.acquire(req.length);
              payload = this.queue.take(req.length, pooled);
            }
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

  /**
   * The rest of the queue (a large write's header and the first part of its payload, not all of
   * it) lies in this connection's own read buffer, just read into, with room after it for the
   * whole payload: make that buffer the payload's (ADOPT_MIN). True when it did.
   */
  private adopt(req: Request): boolean {
    const buf = this.recvBuf;
    if (buf === undefined || this.lastRead !== buf) return false;
    const at = this.queue.offsetIn(buf);
    if (at < 0 || at + REQUEST_LENGTH + req.length > buf.length) return false;
    const got = this.queue.length - REQUEST_LENGTH;
    this.queue.clear();
    this.filling = { req, pooled: buf, base: at + REQUEST_LENGTH, got };
    this.recvBuf = undefined;
    this.wantRecvBuf = true;
    this.lastRead = undefined;
    return true;
  }

  /** Copy what arrived of a large write's payload; true once it is complete and started. */
  private fill(): boolean {
    const f = this.filling!;
    const n = Math.min(this.queue.length, f.req.length - f.got);
    this.queue.takeCopy(n, f.pooled.subarray(f.base + f.got));
    f.got += n;
    if (f.got < f.req.length) return false;
    this.filling = undefined;
    this.onRequest(f.req, f.pooled.subarray(f.base, f.base + f.req.length), f.pooled);
    return true;
  }

  private onEnd(): void {
    // Client half-closed: finish what runs, then close (a DISC without the DISC).
    if (this.phase === 'transmission') {
      this.machine.goto('closing');
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

  /** Carry out what the handshake decided, after sending its replies. */
  private carryOut(step: HandshakeStep): void {
    const d = step.decision;
    if (d.kind === 'starttls') return this.startTls(step.replies);
    if (step.replies.length) this.send(...step.replies);
    switch (d.kind) {
      case 'next':
        return;
      case 'close':
        return this.protocolError(d.reason);
      case 'abort':
        this.machine.goto('closing');
        this.stream.end();
        return;
      case 'takeover':
        return this.takeOver(d.name, d.take);
      case 'serve':
        return this.enterTransmission(d.export, d.transmissionFlags, d.structured, d.contexts);
    }
  }

  /**
   * STARTTLS accepted: send the ACK, stop reading in clear, and once the ACK is written hand the
   * stream to the upgrader; the handshake goes on over the TLS stream it returns. The handshake
   * timer keeps running: a TLS handshake that does not finish in time closes the connection.
   */
  private startTls(replies: Buffer[]): void {
    const tls = this.host.tls!; // the handshake accepts STARTTLS only when TLS is configured
    const raw = this.stream;
    this.machine.goto('starttls');
    this.unlisten(raw);
    // The upgrader owns the stream from now on; an error on it fails the upgrade (or shows on
    // the TLS stream), and must not go unheard and end the process.
    raw.on('error', (err: Error) => this.host.log('debug', `connection ${this.id} from ${this.peer}: ${err.message} under TLS`));
    raw.pause();
    const ack = Buffer.concat(replies);
    this.queuedOut += ack.length;
    const abort = new AbortController();
    this.upgradeAbort = abort;
    raw.write(ack, () => void this.upgrade(tls, raw, abort.signal));
  }

  private async upgrade(tls: SessionTls, raw: Duplex, signal: AbortSignal): Promise<void> {
    if (this.phase !== 'starttls') return;
    let up;
    try {
      const timeoutMs = Math.max(1, this.host.handshakeTimeoutMs - (Date.now() - this.openedAt.getTime()));
      up = await tls.upgrader.server({ stream: raw, peer: this.peer }, { signal, timeoutMs, ...(tls.settings ? { settings: tls.settings } : {}) });
    } catch (err) {
      if (this.phase !== 'starttls') return;
      // one line: OpenSSL's messages end in a newline
      const why = `TLS handshake failed: ${toBlkrepError(err).message.replace(/\s+/g, ' ').trim()}`;
      this.host.log('warn', `connection ${this.id} from ${this.peer}: ${why}; disconnecting`);
      this.close(why);
      return;
    }
    if (this.phase !== 'starttls') {
      up.stream.destroy();
      return;
    }
    this.upgradeAbort = undefined;
    this.stream = up.stream;
    this.listen(up.stream);
    this.handshake.tlsUp();
    this.machine.goto('options');
    this.paused = false;
    this.host.log('debug', `connection ${this.id} from ${this.peer}: TLS is on`);
    up.stream.resume();
    this.noteUnsent();
    this.pump();
  }

  /** An extension option took the connection: let go of the stream and of this session. */
  private takeOver(name: string, take: (stream: Duplex, rest: Buffer) => void): void {
    this.stream.pause();
    this.unlisten(this.stream);
    const rest = this.queue.take(this.queue.length);
    this.machine.goto('closed');
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    if (this.waitingBudget) this.host.budget.forget(this);
    this.host.budget.release(this.reserved + this.unsent);
    this.reserved = 0;
    this.unsent = 0;
    this.host.log('debug', `connection ${this.id} from ${this.peer}: taken over by the ${name}`);
    this.host.sessionClosed(this, `taken over by the ${name}`);
    for (const w of this.closeWaiters.splice(0)) w();
    take(this.stream, rest);
  }

  private enterTransmission(exp: Export, tflags: number, structured: boolean, contexts: Map<number, string>): void {
    this.exp = exp;
    this.tflags = tflags;
    this.structured = structured;
    this.selected = contexts;
    this.machine.goto('transmission');
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    exp.counters.connections++;
    exp.counters.totalConnections++;
    this.host.log('debug', `connection ${this.id} from ${this.peer}: serving export "${exp.shownName}"`);
    // After the socket's read callback that got us here has returned.
    process.nextTick(() => this.goDirect());
  }

  /** Move a plain socket to reads into the buffers the session picks (direct-receive.ts). */
  private goDirect(): void {
    if (this.phase !== 'transmission') return;
    // from here on the stream is the one transmission keeps (a move needs no queued replies)
    this.batching = !replyBatchingDisabled();
    const old = this.stream;
    this.unlisten(old);
    const fresh = moveToDirectReceive(old, this);
    if (!fresh) {
      this.listen(old);
      return;
    }
    this.stream = fresh;
    this.direct = true;
    this.adopting = !adoptDisabled();
    if (!spliceDisabled()) this.sockFd = socketFd(fresh, spliceTcp());
    this.listen(fresh);
    if (!this.paused) fresh.resume();
  }

  nextBuffer(): Buffer {
    const f = this.filling;
    if (f) return f.pooled.subarray(f.base + f.got, f.base + f.req.length);
    if (this.wantRecvBuf && this.phase !== 'closed') this.recvBuf ??= sharedPool.acquire(ADOPT_SIZE);
    return this.recvBuf ? this.recvBuf.subarray(0, SCRATCH_LENGTH) : SCRATCH;
  }

  received(n: number, buffer: Buffer): void {
    if (this.phase === 'closed') return;
    this.bytesReceived += n;
    const f = this.filling;
    if (f && buffer.buffer === f.pooled.buffer && buffer.byteOffset === f.pooled.byteOffset + f.base + f.got) {
      // read in place: the payload's buffer
      f.got += n;
      if (f.got === f.req.length) {
        this.filling = undefined;
        this.onRequest(f.req, f.pooled.subarray(f.base, f.base + f.req.length), f.pooled);
      }
      this.pump();
      return;
    }
    // The scratch buffer is read into again: what pump() leaves (a partial request) is copied.
    // Payloads taken from it are copied too (pump), headers are decoded at once.
    this.queue.push(buffer.subarray(0, n));
    // this connection's own buffer (recvBuf) may become a large write's payload (adopt())
    this.lastRead = this.recvBuf !== undefined && buffer.buffer === this.recvBuf.buffer && buffer.byteOffset === this.recvBuf.byteOffset ? this.recvBuf : undefined;
    this.pump();
    if (this.lastRead !== undefined && this.filling === undefined && this.queue.length === 0 && this.recvBuf !== undefined) {
      // a request boundary and no large write under way: back to the shared scratch buffer
      sharedPool.release(this.recvBuf);
      this.recvBuf = undefined;
      this.wantRecvBuf = false;
    }
    this.lastRead = undefined;
    this.queue.own();
  }

  // ---------------------------------------------------------------------------------------------
  // transmission

  private overloaded(): boolean {
    if (this.phase === 'options') return this.stream.writableLength >= MAX_HANDSHAKE_SEND_BUFFER;
    return this.waitingBudget || this.inflight >= (this.exp?.maxInflight ?? MAX_INFLIGHT) || this.inflightBytes >= MAX_INFLIGHT_BYTES || this.stream.writableLength >= MAX_SEND_BUFFER;
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
    const held = this.unsent + this.spliceBytes;
    if (sent !== mark.sent || this.bytesReceived !== mark.received || Math.max(held, partial) <= STALL_MIN_BYTES) {
      mark.sent = sent;
      mark.received = this.bytesReceived;
      mark.since = now;
      return;
    }
    if (now - mark.since < timeoutMs) return;
    const why = held > STALL_MIN_BYTES
      ? `stall timeout: the client read none of ${held} bytes of replies for ${timeoutMs / 1000} s`
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
    if (this.phase === 'closed' || this.phase === 'starttls') return;
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
      this.machine.goto('closing');
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
    const observe = this.host.requestObserver;
    const started = observe ? performance.now() : 0;
    void this.run(req, payload).finally(() => {
      if (observe) observe(exp.shownName, name ?? 'unknown', (performance.now() - started) / 1000);
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
      this.machine.goto('closing');
      this.finishing = true;
      const exp = this.exp;
      const flushed = exp && !exp.readOnly ? exp.node.flush().catch((err) => {
        this.host.log('warn', `flush of export "${exp.shownName}" at disconnect failed: ${toBlkrepError(err).message}`);
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
    if (writing && exp.readOnly) return ['EPERM', `${name} on read-only export "${exp.shownName}"`];
    if (req.type === CMD.TRIM && !(f & TF.SEND_TRIM)) return ['EINVAL', 'trim is not offered by this export'];
    if (req.type === CMD.FLUSH) return null;
    const end = req.rawOffset + BigInt(req.length);
    if (end > BigInt(exp.size)) {
      const errno: Errno = req.type === CMD.WRITE || req.type === CMD.WRITE_ZEROES ? 'ENOSPC' : 'EINVAL';
      return [errno, `${name} of ${req.length} bytes at offset ${req.rawOffset} is beyond the end of export "${exp.shownName}" (size ${exp.size})`];
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
      const header = this.structured ? encodeDataChunkHeader(cookie, offset, length, true) : encodeSimpleReply(0, cookie);
      if (await this.spliceRead(offset, length, header)) return;
      // One piece of data: read into a pooled buffer, returned once the socket has sent it.
      const pooled = sharedPool.acquire(length);
      const data = pooled.subarray(0, length);
      try {
        await node.readInto(offset, data);
      } catch (err) {
        sharedPool.release(pooled);
        throw err;
      }
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

  /**
   * A read reply straight from the file to the socket (FileRange.sendTo: splice on a pool
   * thread, no copy through a buffer here): true when it was sent, or when the connection is gone;
   * false to read the usual way (not a plain socket, BLKREP_NO_SPLICE, a size out of range, a
   * node without a file range, replies waiting in the stream, or the file shorter now). A read
   * error has sent nothing and throws (the error reply); a socket error midway tore the stream
   * and closes the connection. Only plain sockets (goDirect()): TLS encrypts in user space.
   *
   * Splice replies start only when the stream holds nothing (every reply before them is with the
   * kernel); several run at once, reaching the socket in the order started (their lane), and the
   * stream is corked while any runs, so the replies made meanwhile wait and nothing comes
   * between a header and its data. Replies waiting in the stream send the next large reads the
   * usual way, so those replies are not held for long.
   */
  private async spliceRead(offset: number, length: number, header: Buffer): Promise<boolean> {
    if (!this.spliceable(offset, length)) return false;
    if (this.spliceActive < SPLICE_PER_CONNECTION) {
      if (this.spliceActive++ === 0) this.stream.cork();
    } else {
      // a finishing reply hands its place over (spliceActive unchanged, the stream stays corked)
      await new Promise<void>((resolve) => this.spliceWaiters.push(resolve));
      if (!this.spliceable(offset, length)) {
        this.spliceDone();
        return false;
      }
    }
    const range = this.exp!.node.fileRange?.(offset, length);
    if (!range) {
      this.spliceDone();
      return false;
    }
    const bytes = header.length + length;
    this.spliceBytes += bytes;
    splicesRunning++;
    try {
      if ((await range.sendTo(this.sockFd, header, this.spliceLane)) === 'fallback') return false;
      this.queuedOut += bytes;
      return true;
    } catch (err) {
      if ((err as { stage?: unknown }).stage !== 'send') throw err;
      if ((this.phase as Phase) !== 'closed') {
        const why = `read reply of ${length} bytes failed midway: ${toBlkrepError(err).message}`;
        this.host.log('warn', `connection ${this.id} from ${this.peer}: ${why}; disconnecting`);
        this.close(why);
      }
      return true;
    } finally {
      range.release();
      splicesRunning--;
      this.spliceBytes -= bytes;
      this.spliceDone();
      this.noteUnsent();
    }
  }

  /**
   * Whether a read reply of `length` at `offset` may be spliced now: a plain socket, the size in range,
   * nothing waiting in the stream (so it is not held behind splice replies for long), and a
   * pool thread to spare (splicesRunning: a client that stops reading holds the threads of its
   * replies waiting for socket space; at most half the pool, the rest for every other I/O).
   */
  private spliceable(offset: number, length: number): boolean {
    // the pipe holds whole pages: an unaligned 1 MiB touches one more than it has room for
    return this.sockFd >= 0 && length >= SPLICE_MIN && (offset % PAGE) + length <= SPLICE_MAX && this.stream.writableLength === 0 &&
      this.phase !== 'closed' && !this.stream.destroyed && !this.stream.writableEnded && splicesRunning < spliceMaxRunning();
  }

  /** A splice reply's place is free: to the next waiting, else the stream is uncorked with the last. */
  private spliceDone(): void {
    const next = this.spliceWaiters.shift();
    if (next) return next();
    if (--this.spliceActive === 0 && this.stream.writableCorked > 0) this.stream.uncork();
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

  /**
   * Gather the replies made in this turn of the event loop into one socket write: the stream
   * stays corked until the check phase (setImmediate), which runs after the poll phase that
   * read the requests and after the microtasks that answered them. With 4 KiB reads QD32 a read
   * of the socket brings several requests, answered at once from the page cache; one writev
   * per reply cost a trip through the kernel's socket send path each (on TCP, loopback's
   * whole transmit and receive path: ~14 µs a call, against ~5 µs on a Unix socket), one writev
   * for all of them costs that once. A reply waits at most for the rest of this turn.
   * BLKREP_NO_REPLY_BATCHING=1 turns it off.
   */
  private batch(): void {
    if (!this.batching || this.corked) return;
    this.corked = true;
    this.stream.cork();
    setImmediate(this.flushBatch);
  }

  private send(...buffers: Buffer[]): void {
    if (this.phase === 'closed' || this.stream.destroyed || this.stream.writableEnded) return;
    this.batch();
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
    // a large payload goes out at once: its syscall cost is spread over its bytes already, and held
    // back it waits for the turn's other large replies (1 MiB reads QD8 on a Unix socket: 0.68× the
    // throughput and 3× the p99 when batched)
    if (data.length <= BATCH_MAX_PAYLOAD) this.batch();
    this.stream.cork();
    this.stream.write(header);
    this.stream.write(data, () => sent());
    this.stream.uncork();
    this.queuedOut += header.length + data.length;
    this.noteUnsent();
    return true;
  }
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

/** read replies up to this payload are gathered with the turn's other replies (batch()) */
const BATCH_MAX_PAYLOAD = 64 * 1024;

/** BLKREP_NO_REPLY_BATCHING=1: one socket write per reply, as before batching (bench/serve-nbd compares the two). */
function replyBatchingDisabled(): boolean {
  return envFlag('BLKREP_NO_REPLY_BATCHING');
}

/** BLKREP_NO_RECV_ADOPT=1: a large write's first part is copied out of the scratch buffer, as before adopt() (bench/serve-nbd's blkrep-noadopt row). */
function adoptDisabled(): boolean {
  return envFlag('BLKREP_NO_RECV_ADOPT');
}

/** BLKREP_NO_SPLICE=1: read replies are copied through a buffer, never spliced from the file (bench/serve-nbd's blkrep-copy row). */
function spliceDisabled(): boolean {
  return envFlag('BLKREP_NO_SPLICE');
}

/**
 * BLKREP_SPLICE_TCP=1: splice read replies on TCP connections too. Off by default: on the loaded
 * machine bench/serve-nbd showed TCP at 0.29-0.44x the IOPS of the copy (Unix: less CPU per
 * request); to be measured on a quiet one (bench/serve-nbd's blkrep-splicetcp row).
 */
function spliceTcp(): boolean {
  return envFlag('BLKREP_SPLICE_TCP');
}

/** A plain socket's file descriptor (its libuv handle's), or -1; a TCP one only when `tcp`. */
function socketFd(stream: Duplex, tcp: boolean): number {
  const handle = (stream as { _handle?: { fd?: unknown; constructor?: { name?: string } } | null })._handle;
  const fd = handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return -1;
  // libuv's handle classes: Pipe (a Unix socket), TCP
  return handle?.constructor?.name === 'Pipe' || (tcp && handle?.constructor?.name === 'TCP') ? fd : -1;
}
