/**
 * One NBD connection in the transmission phase, seen from the client: requests go out with a
 * cookie, replies come back in any order and are matched by it. States (as data below):
 *
 *   READY ──(close(): DISC once idle; or the server answered ESHUTDOWN: DISC at once)──▶ DRAINING
 *   READY | DRAINING ──(socket closed; protocol violation → hard disconnect)──▶ CLOSED
 *
 * Replies are parsed by a second, smaller machine (HEADER → SIMPLE_DATA | CHUNK_OFFSET →
 * CHUNK_DATA | CHUNK_PAYLOAD → HEADER). Read data is copied from the socket's buffers straight
 * into the caller's buffer as it arrives, so a 32 MiB read never sits in memory twice.
 *
 * What the server sends is checked before it is believed: a reply for an unknown cookie, a chunk
 * type that is not an error type and not known, a chunk outside its request or overlapping an
 * earlier one, a chunk longer than the request could need, or a read reply that does not cover
 * the request all mean the server cannot be trusted: hard disconnect, and every request on the
 * connection fails with ERR_NBD_PROTOCOL. An error chunk (including unknown types with bit 15)
 * fails only its request. ESHUTDOWN from the server: the request is handed back for a retry and
 * the connection is soft-disconnected (DISC).
 *
 * This class never retries or queues: NbdClient (client.ts) owns the requests and decides.
 */
import type { Duplex } from 'node:stream';
import { BlkrepError } from '../api/errors.js';
import { ByteQueue } from './byte-queue.js';
import {
  CHUNK_HEADER_LENGTH, decodeBlockStatusPayload, decodeChunkHeader, decodeErrorPayload, decodeSimpleReply, encodeRequest,
  REQUEST_LENGTH, SIMPLE_REPLY_LENGTH, type ChunkHeader, type SimpleReplyHeader,
} from './codec.js';
import { CHUNK, CMD, CMD_NAMES, REPLY_FLAG_DONE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC } from './constants.js';
import { protocolError, serverError } from './client-errors.js';
import type { ExportInfo } from './client-handshake.js';
import { StateMachine } from '../util/state-machine.js';

/** One NBD command as it goes on the wire. */
export interface CommandSpec {
  cmd: number;
  flags: number;
  offset: number;
  length: number;
  /** WRITE: the payload (`length` bytes); never kept after the request settles */
  data?: Buffer;
  /** READ: where the data goes (`length` bytes) */
  target?: Buffer;
}

export interface CommandReply {
  /** BLOCK_STATUS: [length, flags] descriptors by meta context name */
  blockStatus?: Map<string, Array<[number, number]>>;
}

/**
 * A request as the client tracks it. It may be sent again on another connection after this one
 * is lost, so sessions call back instead of owning a promise.
 */
export interface ClientOp {
  readonly spec: CommandSpec;
  /** the caller gave up: its read buffer must not be touched any more */
  abandoned: boolean;
  /** the caller may give up on it (an AbortSignal): a WRITE then needs `payloadSent` */
  readonly abortable?: boolean;
  /** set by the session that sends an abortable WRITE: resolves once the socket no longer holds the payload */
  payloadSent?: Promise<void>;
  succeed(reply: CommandReply): void;
  fail(err: BlkrepError): void;
}

export interface SessionEnd {
  /** why it closed */
  cause: BlkrepError;
  /** requests the server did not answer, or answered ESHUTDOWN: not performed, may be sent again */
  orphans: ClientOp[];
  /** closed by disconnect(): DISC sent, every request answered */
  clean: boolean;
  /** the server said it is shutting down */
  shutdown: boolean;
  /** the server broke the protocol */
  violation: boolean;
}

export interface SessionOwner {
  /** the session can take requests again (a reply came, the socket drained) */
  sessionAvailable(session: ClientSession): void;
  sessionClosed(session: ClientSession, end: SessionEnd): void;
}

export type SessionState = 'READY' | 'DRAINING' | 'CLOSED';

export const SESSION_TRANSITIONS: Readonly<Record<SessionState, readonly SessionState[]>> = {
  READY: ['DRAINING', 'CLOSED'],
  DRAINING: ['CLOSED'],
  CLOSED: [],
};

type ReplyState = 'HEADER' | 'SIMPLE_DATA' | 'CHUNK_OFFSET' | 'CHUNK_DATA' | 'CHUNK_PAYLOAD';

/** largest BLOCK_STATUS payload accepted: the spec's 2^20 descriptors, twice over */
const MAX_BLOCK_STATUS_PAYLOAD = 4 + 8 * (1 << 21);
/** largest error chunk accepted: a 4096-byte message with its fields, and slack for unknown types */
const MAX_ERROR_PAYLOAD = 64 * 1024;
const ERROR_BIT = 0x8000;
const MAX_COOKIE = BigInt(Number.MAX_SAFE_INTEGER);
const ESHUTDOWN_WIRE = 108;
/** a structured reply's flags and type (bytes 4–7) for a NONE chunk with DONE: the reply to a write or flush */
const NONE_DONE = ((REPLY_FLAG_DONE << 16) | CHUNK.NONE) >>> 0;

/**
 * A request's header (codec.ts encodeRequest without the BigInts and the zero-filled buffer of
 * its own: every forwarded write of a pair makes one). The cookie and offset are safe integers.
 */
function requestHeader(flags: number, type: number, cookie: number, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_LENGTH);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(Math.floor(cookie / 0x1_0000_0000), 8);
  b.writeUInt32BE(cookie >>> 0, 12);
  b.writeUInt32BE(Math.floor(offset / 0x1_0000_0000), 16);
  b.writeUInt32BE(offset >>> 0, 20);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

const CHUNK_NAMES: Record<number, string> = {
  [CHUNK.NONE]: 'NONE', [CHUNK.OFFSET_DATA]: 'OFFSET_DATA', [CHUNK.OFFSET_HOLE]: 'OFFSET_HOLE',
  [CHUNK.BLOCK_STATUS]: 'BLOCK_STATUS', [CHUNK.ERROR]: 'ERROR', [CHUNK.ERROR_OFFSET]: 'ERROR_OFFSET',
};

interface InFlight {
  op: ClientOp;
  cookie: number;
  cmd: number;
  offset: number;
  length: number;
  /** a structured chunk came for it (a simple reply may no longer) */
  sawChunk: boolean;
  /** READ: bytes covered by data and hole chunks, and where (request-relative, sorted, merged) */
  covered: number;
  ranges: Array<[number, number]>;
  error?: BlkrepError;
  blockStatus?: Map<string, Array<[number, number]>>;
  payloadDone?: () => void;
}

export interface SessionOptions {
  /** requests on the wire at once (default 64) */
  maxInFlight?: number;
  /** for messages: which server and connection ("nbd+unix:///x?socket=… #2") */
  label?: string;
  /** after DISC, the server must close within this, or the connection is dropped (default 5000 ms) */
  discTimeoutMs?: number;
  /** gather the requests sent in one turn of the event loop into one socket write (see batch()) */
  batchSends?: boolean;
}

export class ClientSession {
  /** the session's states (SESSION_TRANSITIONS) */
  private readonly machine = new StateMachine<SessionState>({ name: 'ClientSession', transitions: SESSION_TRANSITIONS }, 'READY');
  private readonly pending = new Map<number, InFlight>();
  private nextCookie = 1;
  private blocked = false;
  private discSent = false;
  private shutdownSeen = false;
  private readonly orphans: ClientOp[] = [];
  private lastSocketError: Error | undefined;
  private discTimer: NodeJS.Timeout | undefined;
  private readonly maxInFlight: number;
  private readonly discTimeoutMs: number;
  private readonly batchSends: boolean;
  /** the stream is corked until the end of this turn (batch()) */
  private corked = false;
  readonly label: string;
  // reply parser
  private rstate: ReplyState = 'HEADER';
  private cur: InFlight | undefined;
  private chunk: { flags: number; type: number; length: number } | undefined;
  private dataAt = 0;
  private dataLeft = 0;
  /** counters, for status */
  requests = 0;

  constructor(
    private readonly stream: Duplex,
    private readonly queue: ByteQueue,
    readonly info: ExportInfo,
    private readonly owner: SessionOwner,
    options: SessionOptions = {},
  ) {
    this.maxInFlight = options.maxInFlight ?? 64;
    this.discTimeoutMs = options.discTimeoutMs ?? 5000;
    this.batchSends = options.batchSends === true;
    this.label = options.label ?? 'NBD server';
  }

  /** Start reading (call once the owner is ready for callbacks). */
  start(): void {
    this.stream.on('data', (chunk: Buffer) => {
      if (this.current === 'CLOSED') return;
      this.queue.push(chunk);
      this.parse();
    });
    this.stream.on('end', () => this.onSocketClosed());
    this.stream.on('close', () => this.onSocketClosed());
    this.stream.on('error', (err) => {
      this.lastSocketError = err;
    });
    this.stream.on('drain', () => {
      if (!this.blocked) return;
      this.blocked = false;
      if (this.current === 'READY') this.owner.sessionAvailable(this);
    });
    this.stream.resume();
    if (this.queue.length) this.parse();
  }

  get state(): SessionState {
    return this.current;
  }

  get inFlight(): number {
    return this.pending.size;
  }

  /** Whether submit() may be called now (READY, socket not full, fewer than maxInFlight on the wire). */
  get acceptsRequests(): boolean {
    return this.current === 'READY' && !this.blocked && this.pending.size < this.maxInFlight;
  }

  /** Send a request. Only while acceptsRequests. */
  submit(op: ClientOp): void {
    if (this.current !== 'READY') throw new Error(`ClientSession.submit in state ${this.current}`); // the client checks first
    const s = op.spec;
    const cookie = this.nextCookie++;
    const e: InFlight = { op, cookie, cmd: s.cmd, offset: s.offset, length: s.length, sawChunk: false, covered: 0, ranges: [] };
    this.pending.set(cookie, e);
    this.requests++;
    const header = requestHeader(s.flags, s.cmd, cookie, s.offset, s.length);
    this.batch();
    let ok: boolean;
    if (s.cmd === CMD.WRITE && s.data && s.data.length) {
      const data = s.data;
      this.stream.cork();
      this.stream.write(header);
      if (op.abortable) {
        let written = false;
        op.payloadSent = new Promise<void>((resolve) => {
          e.payloadDone = () => {
            if (written) return;
            written = true;
            resolve();
          };
        });
        ok = this.stream.write(data, () => e.payloadDone?.());
      } else {
        ok = this.stream.write(data);
      }
      this.stream.uncork();
    } else {
      ok = this.stream.write(header);
    }
    // corked, the turn's requests wait in the stream's buffer (references to the callers'
    // buffers, at most maxInFlight of them): whether the socket is full is known at the flush
    if (!ok && !this.corked) this.blocked = true;
  }

  /**
   * Gather the requests sent in this turn of the event loop into one socket write, as the
   * server's replies are (server-session.ts batch()): the stream stays corked until the check
   * phase (setImmediate), after the poll phase whose reads made them. The pair's forwarding
   * connection: with 4 KiB writes QD32 the primary's server reads several requests at once and
   * forwards each; one writev per forward cost a trip through the socket's send path and a wake-up
   * of the secondary per request, and the secondary then read one request per read().
   */
  private batch(): void {
    if (!this.batchSends || this.corked) return;
    this.corked = true;
    this.stream.cork();
    setImmediate(this.flushBatch);
  }

  private readonly flushBatch = (): void => {
    this.corked = false;
    if (this.stream.destroyed || this.stream.writableEnded) return;
    this.stream.uncork();
    if (this.stream.writableNeedDrain) this.blocked = true;
  };

  /**
   * Soft disconnect: take no more requests; once every request is answered send DISC and end
   * the stream. sessionClosed() follows when the server closes.
   */
  disconnect(): void {
    if (this.current !== 'READY') return;
    this.goto('DRAINING');
    if (this.pending.size === 0) this.sendDisc();
  }

  /** Hard disconnect; unanswered requests are handed back as orphans. */
  destroy(cause: BlkrepError): void {
    this.terminate(cause, false);
  }

  private get current(): SessionState {
    return this.machine.state;
  }

  private goto(next: SessionState): void {
    this.machine.goto(next);
  }

  private sendDisc(): void {
    if (this.discSent || this.stream.destroyed) return;
    this.discSent = true;
    this.stream.end(encodeRequest(0, CMD.DISC, BigInt(this.nextCookie++), 0, 0));
    // A server that neither answers nor closes must not keep the connection (and its requests) forever.
    this.discTimer = setTimeout(() => {
      const cause = this.shutdownSeen
        ? new BlkrepError('ERR_NBD_SHUTDOWN', `${this.label} is shutting down, and did not close within ${this.discTimeoutMs} ms of DISC`, { errno: 'ESHUTDOWN' })
        : new BlkrepError('ERR_NBD_DISCONNECTED', `${this.label} did not close within ${this.discTimeoutMs} ms of DISC`, { errno: 'EIO' });
      this.terminate(cause, false);
    }, this.discTimeoutMs);
    this.discTimer.unref?.();
  }

  private onSocketClosed(): void {
    if (this.current === 'CLOSED') return;
    const clean = this.discSent && this.pending.size === 0 && !this.shutdownSeen;
    const why = this.lastSocketError ? `: ${this.lastSocketError.message}` : '';
    const cause = this.shutdownSeen
      ? new BlkrepError('ERR_NBD_SHUTDOWN', `${this.label} is shutting down (it answered ESHUTDOWN)`, { errno: 'ESHUTDOWN' })
      : clean
        ? new BlkrepError('ERR_NBD_CLOSED', `connection to ${this.label} closed`, { errno: 'EIO' })
        : new BlkrepError('ERR_NBD_DISCONNECTED', `lost the connection to ${this.label}${why}`, { errno: 'EIO' });
    this.terminate(cause, false);
  }

  private terminate(cause: BlkrepError, violation: boolean): void {
    if (this.current === 'CLOSED') return;
    this.goto('CLOSED');
    if (this.discTimer) clearTimeout(this.discTimer);
    this.stream.destroy();
    this.queue.clear();
    const unanswered = [...this.pending.values()];
    this.pending.clear();
    for (const e of unanswered) e.payloadDone?.();
    const ops = unanswered.map((e) => e.op);
    if (violation) for (const op of ops) op.fail(cause);
    const orphans = violation ? [...this.orphans] : [...this.orphans, ...ops];
    this.orphans.length = 0;
    this.owner.sessionClosed(this, { cause, orphans, clean: !violation && orphans.length === 0 && this.discSent && !this.shutdownSeen, shutdown: this.shutdownSeen, violation });
  }

  /** The server broke the protocol: hard disconnect, every request here fails. */
  private violation(message: string, details: Record<string, unknown> = {}): void {
    this.terminate(protocolError(`${this.label} broke the NBD protocol: ${message}; disconnected`, details), true);
  }

  // ---------------------------------------------------------------------------------------------
  // replies

  private lookup(cookie: bigint): InFlight | undefined {
    return cookie <= MAX_COOKIE ? this.pending.get(Number(cookie)) : undefined;
  }

  private describe(e: InFlight): string {
    return `${CMD_NAMES[e.cmd] ?? `command ${e.cmd}`} of ${e.length} bytes at offset ${e.offset}`;
  }

  private parse(): void {
    const q = this.queue;
    while (this.current !== 'CLOSED') {
      switch (this.rstate) {
        case 'HEADER': {
          if (q.length < 4) return;
          const magic = q.peek(4).readUInt32BE(0);
          if (magic === SIMPLE_REPLY_MAGIC) {
            if (q.length < SIMPLE_REPLY_LENGTH) return;
            this.onSimpleReply(decodeSimpleReply(q.take(SIMPLE_REPLY_LENGTH)));
          } else if (magic === STRUCTURED_REPLY_MAGIC) {
            if (q.length < CHUNK_HEADER_LENGTH) return;
            const b = q.take(CHUNK_HEADER_LENGTH);
            // a write's, a flush's reply: one NONE chunk with DONE, for a request in flight
            if (b.readUInt32BE(4) === NONE_DONE && b.readUInt32BE(16) === 0 && b.readUInt32BE(8) === 0 && this.info.structured) {
              const e = this.pending.get(b.readUInt32BE(12));
              if (e) {
                // what onChunkHeader() and endChunk() do for it, without the decoded header
                e.sawChunk = true;
                this.finish(e);
                break;
              }
            }
            this.onChunkHeader(decodeChunkHeader(b));
          } else {
            this.violation(`reply magic 0x${magic.toString(16).padStart(8, '0')} is neither a simple nor a structured reply`);
            return;
          }
          break;
        }
        case 'SIMPLE_DATA':
        case 'CHUNK_DATA': {
          if (q.length === 0) return;
          this.copyOut(Math.min(q.length, this.dataLeft));
          if (this.dataLeft > 0) return;
          if (this.rstate === 'SIMPLE_DATA') {
            this.rstate = 'HEADER';
            const e = this.cur!;
            this.cur = undefined;
            this.finish(e);
          } else {
            this.endChunk();
          }
          break;
        }
        case 'CHUNK_OFFSET':
          if (q.length < 8) return;
          this.onDataOffset(q.take(8).readBigUInt64BE(0));
          break;
        case 'CHUNK_PAYLOAD': {
          const length = this.chunk!.length;
          if (q.length < length) return;
          this.onChunkPayload(q.take(length));
          break;
        }
      }
    }
  }

  /** Move n queued bytes of read data into the request's buffer (or drop them if abandoned). */
  private copyOut(n: number): void {
    const e = this.cur!;
    const target = e.op.abandoned ? undefined : e.op.spec.target;
    if (target) {
      const dest = target.subarray(this.dataAt, this.dataAt + n);
      const got = this.queue.take(n, dest);
      if (got.buffer !== dest.buffer || got.byteOffset !== dest.byteOffset) got.copy(dest);
    } else {
      this.queue.skip(n);
    }
    this.dataAt += n;
    this.dataLeft -= n;
  }

  private onSimpleReply(h: SimpleReplyHeader): void {
    const e = this.lookup(h.cookie);
    if (!e) return this.violation(`simple reply for unknown cookie ${h.cookie}`, { cookie: h.cookie.toString() });
    if (e.sawChunk) return this.violation(`simple reply to ${this.describe(e)}, which already had structured chunks`);
    if (h.error !== 0) {
      e.error = serverError(`NBD ${this.describe(e)}`, h.error, undefined, { offset: e.offset, length: e.length });
      return this.finish(e);
    }
    if (e.cmd === CMD.BLOCK_STATUS) return this.violation(`block status answered by a simple reply, without descriptors`);
    if (e.cmd === CMD.READ && e.length > 0) {
      e.covered = e.length;
      this.cur = e;
      this.dataAt = 0;
      this.dataLeft = e.length;
      this.rstate = 'SIMPLE_DATA';
      return;
    }
    this.finish(e);
  }

  private onChunkHeader(h: ChunkHeader): void {
    const e = this.lookup(h.cookie);
    const name = CHUNK_NAMES[h.type] ?? `type ${h.type}`;
    if (!e) return this.violation(`${name} chunk for unknown cookie ${h.cookie}`, { cookie: h.cookie.toString() });
    if (!this.info.structured) return this.violation(`${name} chunk, but structured replies were not negotiated`);
    e.sawChunk = true;
    this.cur = e;
    this.chunk = { flags: h.flags, type: h.type, length: h.length };
    const what = this.describe(e);
    switch (h.type) {
      case CHUNK.NONE:
        if (h.length !== 0) return this.violation(`NONE chunk with a payload of ${h.length} bytes in the reply to ${what}`);
        if (!(h.flags & REPLY_FLAG_DONE)) return this.violation(`NONE chunk without the DONE flag in the reply to ${what}`);
        return this.endChunk();
      case CHUNK.OFFSET_DATA:
        if (e.cmd !== CMD.READ) return this.violation(`data chunk in the reply to ${what}`);
        if (h.length < 9) return this.violation(`data chunk of ${h.length} bytes (at least 9) in the reply to ${what}`);
        if (h.length - 8 > e.length) return this.violation(`data chunk of ${h.length - 8} bytes in the reply to ${what}`, { chunkLength: h.length - 8 });
        this.rstate = 'CHUNK_OFFSET';
        return;
      case CHUNK.OFFSET_HOLE:
        if (e.cmd !== CMD.READ) return this.violation(`hole chunk in the reply to ${what}`);
        if (h.length !== 12) return this.violation(`hole chunk of ${h.length} bytes (exactly 12) in the reply to ${what}`);
        this.rstate = 'CHUNK_PAYLOAD';
        return;
      case CHUNK.BLOCK_STATUS:
        if (e.cmd !== CMD.BLOCK_STATUS) return this.violation(`block status chunk in the reply to ${what}`);
        if (h.length < 12 || (h.length - 4) % 8 !== 0 || h.length > MAX_BLOCK_STATUS_PAYLOAD) {
          return this.violation(`block status chunk of ${h.length} bytes (4 + 8·N, N from 1 to 2^21) in the reply to ${what}`);
        }
        this.rstate = 'CHUNK_PAYLOAD';
        return;
      default:
        if (!(h.type & ERROR_BIT)) return this.violation(`unknown chunk type ${h.type} (not an error type) in the reply to ${what}`, { type: h.type });
        if (h.length > MAX_ERROR_PAYLOAD) return this.violation(`error chunk of ${h.length} bytes (at most ${MAX_ERROR_PAYLOAD}) in the reply to ${what}`);
        this.rstate = 'CHUNK_PAYLOAD';
        return;
    }
  }

  /** Whether [start, start+n) (request-relative) is new ground; records it. */
  private cover(e: InFlight, start: number, n: number): boolean {
    const r = e.ranges;
    const end = start + n;
    let lo = 0;
    let hi = r.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (r[mid]![0] < start) lo = mid + 1;
      else hi = mid;
    }
    const prev = r[lo - 1];
    const next = r[lo];
    if ((prev && prev[1] > start) || (next && next[0] < end)) return false;
    e.covered += n;
    if (prev && prev[1] === start) {
      prev[1] = end;
      if (next && next[0] === end) {
        prev[1] = next[1];
        r.splice(lo, 1);
      }
    } else if (next && next[0] === end) {
      next[0] = start;
    } else {
      r.splice(lo, 0, [start, end]);
    }
    return true;
  }

  /** Checks a data or hole chunk's range; returns its request-relative start, or -1 after a violation. */
  private placeChunk(e: InFlight, kind: string, offset: bigint, n: number): number {
    const start = offset - BigInt(e.offset);
    if (offset < BigInt(e.offset) || start + BigInt(n) > BigInt(e.length)) {
      this.violation(`${kind} chunk for ${n} bytes at offset ${offset} lies outside ${this.describe(e)}`, { chunkOffset: offset.toString(), chunkLength: n });
      return -1;
    }
    if (!this.cover(e, Number(start), n)) {
      this.violation(`${kind} chunk for ${n} bytes at offset ${offset} overlaps an earlier chunk of ${this.describe(e)}`, { chunkOffset: offset.toString(), chunkLength: n });
      return -1;
    }
    return Number(start);
  }

  private onDataOffset(offset: bigint): void {
    const e = this.cur!;
    const n = this.chunk!.length - 8;
    const start = this.placeChunk(e, 'data', offset, n);
    if (start < 0) return;
    this.dataAt = start;
    this.dataLeft = n;
    this.rstate = 'CHUNK_DATA';
  }

  private onChunkPayload(p: Buffer): void {
    const e = this.cur!;
    const { type } = this.chunk!;
    const what = `NBD ${this.describe(e)}`;
    if (type === CHUNK.OFFSET_HOLE) {
      const size = p.readUInt32BE(8);
      if (size === 0) return this.violation(`hole chunk of 0 bytes in the reply to ${this.describe(e)}`);
      const start = this.placeChunk(e, 'hole', p.readBigUInt64BE(0), size);
      if (start < 0) return;
      const target = e.op.abandoned ? undefined : e.op.spec.target;
      target?.fill(0, start, start + size);
    } else if (type === CHUNK.BLOCK_STATUS) {
      const d = decodeBlockStatusPayload(p);
      if (typeof d === 'string') return this.violation(`${d}, in the reply to ${this.describe(e)}`);
      const name = this.info.contexts.get(d.contextId);
      if (name === undefined) return this.violation(`block status for meta context id ${d.contextId}, which was not selected`);
      e.blockStatus ??= new Map();
      if (e.blockStatus.has(name)) return this.violation(`two block status chunks for meta context "${name}" in the reply to ${this.describe(e)}`);
      e.blockStatus.set(name, d.descriptors);
    } else {
      // ERROR, ERROR_OFFSET, or an error type this client does not know (bit 15 set)
      const known = type === CHUNK.ERROR || type === CHUNK.ERROR_OFFSET;
      const d = decodeErrorPayload(p, type === CHUNK.ERROR_OFFSET);
      let wire: number;
      let message: string | undefined;
      if (typeof d === 'string') {
        if (known) return this.violation(`${d}, in the reply to ${this.describe(e)}`);
        wire = p.length >= 4 ? p.readUInt32BE(0) : 22; // EINVAL, as for any unknown error
      } else {
        wire = d.error;
        message = d.message;
        if (d.offset !== undefined && (d.offset < BigInt(e.offset) || d.offset >= BigInt(e.offset) + BigInt(Math.max(e.length, 1)))) {
          return this.violation(`error chunk at offset ${d.offset} lies outside ${this.describe(e)}`);
        }
      }
      const at = typeof d !== 'string' && d.offset !== undefined ? { errorOffset: Number(d.offset) } : {};
      const kind = known ? {} : { chunkType: type };
      e.error ??= serverError(what, wire, known ? message : `${message ?? ''}${message ? ' ' : ''}(error chunk of unknown type ${type})`, {
        offset: e.offset, length: e.length, ...at, ...kind,
      });
    }
    this.endChunk();
  }

  private endChunk(): void {
    const e = this.cur!;
    const done = (this.chunk!.flags & REPLY_FLAG_DONE) !== 0;
    this.rstate = 'HEADER';
    this.cur = undefined;
    this.chunk = undefined;
    if (done) this.finish(e);
  }

  /** The reply to `e` is complete. */
  private finish(e: InFlight): void {
    if (!e.error) {
      if (e.cmd === CMD.READ && e.covered !== e.length) {
        return this.violation(`the reply to ${this.describe(e)} ended after covering ${e.covered} bytes`, { covered: e.covered });
      }
      if (e.cmd === CMD.BLOCK_STATUS) {
        for (const name of this.info.contexts.values()) {
          if (!e.blockStatus?.has(name)) return this.violation(`the reply to ${this.describe(e)} has no descriptors for meta context "${name}"`);
        }
      }
    }
    this.pending.delete(e.cookie);
    e.payloadDone?.();
    if (e.error?.details.wireErrno === ESHUTDOWN_WIRE) {
      // Not performed: the server is going away. Hand it back for a retry, and soft-disconnect.
      this.orphans.push(e.op);
      this.shutdownSeen = true;
      if (this.current === 'READY') this.goto('DRAINING');
      this.sendDisc();
      return;
    }
    if (e.error) e.op.fail(e.error);
    else e.op.succeed(e.blockStatus ? { blockStatus: e.blockStatus } : {});
    if (this.current === 'DRAINING' && this.pending.size === 0) this.sendDisc();
    else if (this.current === 'READY') this.owner.sessionAvailable(this);
  }
}
