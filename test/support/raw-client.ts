/**
 * A raw-socket NBD client for tests: it speaks the protocol byte by byte so tests can send
 * anything (well-formed or not) and look at exactly what the server answers. It is deliberately
 * independent of the product's client code.
 *
 * Every wait is bounded (DEFAULT_TIMEOUT_MS unless told otherwise) and rejects on timeout, so a
 * misbehaving server makes a test fail instead of hang. Nothing here sleeps.
 */
import net from 'node:net';
import {
  CHUNK, CMD, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, INFO, OPT, REP,
  REPLY_FLAG_DONE, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
} from '../../src/nbd/constants.js';
import { encodeRequest } from '../../src/nbd/codec.js';

export const DEFAULT_TIMEOUT_MS = 5000;

export class TimeoutError extends Error {
  constructor(what: string, ms: number) {
    super(`timed out after ${ms} ms waiting for ${what}`);
    this.name = 'TimeoutError';
  }
}

export class EofError extends Error {
  constructor(what: string) {
    super(`connection closed while waiting for ${what}`);
    this.name = 'EofError';
  }
}

export interface OptionReplyFrame {
  magic: bigint;
  option: number;
  type: number;
  length: number;
  data: Buffer;
}

export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
  payload: Buffer;
}

export type Reply =
  | { kind: 'simple'; cookie: bigint; error: number; data?: Buffer }
  | { kind: 'structured'; cookie: bigint; chunks: Chunk[] };

interface Pending {
  type: number;
  length: number;
}

export interface HandshakeOptions {
  /** export to GO to (default '') */
  exportName?: string;
  /** set C_NO_ZEROES (default true) */
  noZeroes?: boolean;
  /** negotiate STRUCTURED_REPLY (default false) */
  structured?: boolean;
  /** SET_META_CONTEXT with these queries (needs structured); undefined = no SET at all */
  metaContexts?: string[];
  /** info types asked for in GO (default [INFO.BLOCK_SIZE]) */
  infoRequests?: number[];
  /** finish with EXPORT_NAME instead of GO */
  useExportName?: boolean;
  /** start with the options: greeting and flags were exchanged already (after STARTTLS); handshakeFlags is then 0 */
  optionsOnly?: boolean;
  timeoutMs?: number;
}

export interface HandshakeResult {
  handshakeFlags: number;
  size: number;
  transmissionFlags: number;
  /** REP_INFO payloads by info type (GO only) */
  infos: Map<number, Buffer>;
  blockSize?: { minimum: number; preferred: number; maximum: number };
  /** context id → name, from SET_META_CONTEXT */
  contexts: Map<number, string>;
}

export interface RequestOptions {
  flags?: number;
  offset?: number | bigint;
  /** defaults to data.length, or 0 */
  length?: number;
  data?: Buffer;
  cookie?: bigint;
}

/** `true` for option reply types that end an option's answer. */
export function isFinalOptionReply(type: number): boolean {
  return type === REP.ACK || (type & 0x80000000) !== 0;
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

/** INFO/GO payload: u32 namelen, name, u16 n, u16[n]. */
export function infoPayload(name: string | Buffer, infos: number[] = []): Buffer {
  const n = typeof name === 'string' ? Buffer.from(name, 'utf8') : name;
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

/** LIST/SET_META_CONTEXT payload: u32 namelen, name, u32 nq, nq × (u32 len, query). */
export function metaPayload(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name, 'utf8');
  const qs = queries.map((q) => {
    const b = Buffer.from(q, 'utf8');
    return Buffer.concat([u32(b.length), b]);
  });
  return Buffer.concat([u32(n.length), n, u32(queries.length), ...qs]);
}

/** An option frame with explicit (possibly lying) length and magic. */
export function optionFrame(option: number, data: Buffer = Buffer.alloc(0), length = data.length, magic = IHAVEOPT): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(magic, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(length >>> 0, 12);
  return Buffer.concat([b, data]);
}

export class RawClient {
  private chunks: Buffer[] = [];
  private total = 0;
  private closedFlag = false;
  private listeners = new Set<() => void>();
  private readonly pending = new Map<bigint, Pending>();
  private readonly partial = new Map<bigint, Chunk[]>();
  private readonly completed = new Map<bigint, Reply>();
  private nextCookie = 1n;
  /** negotiated structured replies (set by handshake, or by hand) */
  structured = false;
  /** last socket error seen (EPIPE/ECONNRESET are normal when the server hangs up) */
  socketError: Error | undefined;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.total += b.length;
      this.notify();
    });
    const closed = () => {
      this.closedFlag = true;
      this.notify();
    };
    socket.on('end', closed);
    socket.on('close', closed);
    socket.on('error', (err) => {
      this.socketError = err;
      closed();
    });
  }

  static connect(path: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection(path);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new TimeoutError(`connect to ${path}`, timeoutMs));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeListener('error', onError);
        resolve(new RawClient(socket));
      });
      const onError = (err: Error) => {
        clearTimeout(timer);
        reject(err);
      };
      socket.once('error', onError);
    });
  }

  /** A client over a socket already connected (the TLS socket after STARTTLS). */
  static over(socket: net.Socket): RawClient {
    return new RawClient(socket);
  }

  /** Connect and do the whole handshake. */
  static async open(path: string, options: HandshakeOptions = {}): Promise<{ client: RawClient; info: HandshakeResult }> {
    const client = await RawClient.connect(path, options.timeoutMs);
    try {
      const info = await client.handshake(options);
      return { client, info };
    } catch (err) {
      client.destroy();
      throw err;
    }
  }

  /** true once the server closed (or the socket failed) */
  get closed(): boolean {
    return this.closedFlag;
  }

  /** bytes received and not yet consumed */
  get buffered(): number {
    return this.total;
  }

  private notify(): void {
    for (const l of [...this.listeners]) l();
  }

  /** Resolve once `ready()` holds; reject on timeout, or on EOF if `ready()` still does not hold. */
  private waitFor(ready: () => boolean, what: string, timeoutMs: number, failOnEof = true): Promise<void> {
    if (ready()) return Promise.resolve();
    if (failOnEof && this.closedFlag) return Promise.reject(new EofError(what));
    return new Promise((resolve, reject) => {
      const check = () => {
        if (ready()) {
          done();
          resolve();
        } else if (failOnEof && this.closedFlag) {
          done();
          reject(new EofError(what));
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new TimeoutError(what, timeoutMs));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.listeners.delete(check);
      };
      this.listeners.add(check);
    });
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.total -= n;
      return out;
    }
    const parts: Buffer[] = [];
    let need = n;
    while (need > 0) {
      const c = this.chunks[0]!;
      if (c.length <= need) {
        parts.push(c);
        this.chunks.shift();
        need -= c.length;
      } else {
        parts.push(c.subarray(0, need));
        this.chunks[0] = c.subarray(need);
        need = 0;
      }
    }
    this.total -= n;
    return Buffer.concat(parts, n);
  }

  /** Exactly n bytes; rejects on EOF before n bytes or on timeout. */
  async readExact(n: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Buffer> {
    await this.waitFor(() => this.total >= n, `${n} bytes (have ${this.total})`, timeoutMs);
    return this.take(n);
  }

  /**
   * Resolve when the server has closed the connection, with whatever bytes arrived before the
   * close and were not consumed; reject on timeout.
   */
  async expectEof(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Buffer> {
    await this.waitFor(() => this.closedFlag, 'EOF', timeoutMs, false);
    const rest = this.total ? this.take(this.total) : Buffer.alloc(0);
    return rest;
  }

  /** Write bytes; never throws (a server that hung up shows as EOF on the next read). */
  write(...buffers: Buffer[]): void {
    if (this.socket.destroyed || this.socket.writableEnded) return;
    for (const b of buffers) this.socket.write(b);
  }

  /** Half-close our side. */
  end(): void {
    if (!this.socket.destroyed && !this.socket.writableEnded) this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Stop reading from the socket (the kernel then pushes back on the server). */
  pause(): void {
    this.socket.pause();
  }

  resume(): void {
    this.socket.resume();
  }

  // -----------------------------------------------------------------------------------------------
  // handshake

  async readGreeting(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<{ magic: bigint; ihaveopt: bigint; flags: number; raw: Buffer }> {
    const raw = await this.readExact(18, timeoutMs);
    return { magic: raw.readBigUInt64BE(0), ihaveopt: raw.readBigUInt64BE(8), flags: raw.readUInt16BE(16), raw };
  }

  sendClientFlags(flags: number): void {
    this.write(u32(flags));
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    this.write(optionFrame(option, data));
  }

  async readOptionReply(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<OptionReplyFrame> {
    const h = await this.readExact(20, timeoutMs);
    const frame = { magic: h.readBigUInt64BE(0), option: h.readUInt32BE(8), type: h.readUInt32BE(12), length: h.readUInt32BE(16) };
    const data = await this.readExact(frame.length, timeoutMs);
    return { ...frame, data };
  }

  /** Replies up to and including the final one (ACK or an error). */
  async readOptionReplies(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<OptionReplyFrame[]> {
    const out: OptionReplyFrame[] = [];
    for (;;) {
      const r = await this.readOptionReply(timeoutMs);
      out.push(r);
      if (isFinalOptionReply(r.type)) return out;
      if (out.length > 10_000) throw new Error('more than 10000 option replies');
    }
  }

  /** Send one option and read all its replies. */
  async option(option: number, data: Buffer = Buffer.alloc(0), timeoutMs = DEFAULT_TIMEOUT_MS): Promise<OptionReplyFrame[]> {
    this.sendOption(option, data);
    return this.readOptionReplies(timeoutMs);
  }

  /** The whole fixed-newstyle handshake; throws on anything unexpected. */
  async handshake(o: HandshakeOptions = {}): Promise<HandshakeResult> {
    const t = o.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const noZeroes = o.noZeroes ?? true;
    const g = o.optionsOnly ? { flags: 0 } : await this.readGreeting(t);
    if (!o.optionsOnly) {
      const greeting = g as Awaited<ReturnType<RawClient['readGreeting']>>;
      if (greeting.magic !== 0x4e42444d41474943n || greeting.ihaveopt !== IHAVEOPT) throw new Error('bad greeting');
      this.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | (noZeroes ? FLAG_C_NO_ZEROES : 0));
    }
    const exportName = o.exportName ?? '';
    const contexts = new Map<number, string>();
    if (o.structured) {
      const r = await this.option(OPT.STRUCTURED_REPLY, undefined, t);
      if (r.length !== 1 || r[0]!.type !== REP.ACK) throw new Error(`STRUCTURED_REPLY answered 0x${r[r.length - 1]!.type.toString(16)}`);
      this.structured = true;
    }
    if (o.metaContexts) {
      const r = await this.option(OPT.SET_META_CONTEXT, metaPayload(exportName, o.metaContexts), t);
      const last = r[r.length - 1]!;
      if (last.type !== REP.ACK) throw new Error(`SET_META_CONTEXT answered 0x${last.type.toString(16)}`);
      for (const m of r.slice(0, -1)) {
        if (m.type !== REP.META_CONTEXT) throw new Error(`unexpected reply ${m.type} to SET_META_CONTEXT`);
        contexts.set(m.data.readUInt32BE(0), m.data.toString('utf8', 4));
      }
    }
    if (o.useExportName) {
      this.sendOption(OPT.EXPORT_NAME, Buffer.from(exportName, 'utf8'));
      const b = await this.readExact(noZeroes ? 10 : 134, t);
      return { handshakeFlags: g.flags, size: Number(b.readBigUInt64BE(0)), transmissionFlags: b.readUInt16BE(8), infos: new Map(), contexts };
    }
    const r = await this.option(OPT.GO, infoPayload(exportName, o.infoRequests ?? [INFO.BLOCK_SIZE]), t);
    const last = r[r.length - 1]!;
    if (last.type !== REP.ACK) throw new Error(`GO answered 0x${last.type.toString(16)}: ${last.data.toString('utf8')}`);
    const infos = new Map<number, Buffer>();
    for (const m of r.slice(0, -1)) {
      if (m.type !== REP.INFO) throw new Error(`unexpected reply ${m.type} to GO`);
      infos.set(m.data.readUInt16BE(0), m.data);
    }
    const ex = infos.get(INFO.EXPORT);
    if (!ex) throw new Error('GO succeeded without INFO_EXPORT');
    const bs = infos.get(INFO.BLOCK_SIZE);
    const result: HandshakeResult = {
      handshakeFlags: g.flags,
      size: Number(ex.readBigUInt64BE(2)),
      transmissionFlags: ex.readUInt16BE(10),
      infos,
      contexts,
    };
    if (bs) result.blockSize = { minimum: bs.readUInt32BE(2), preferred: bs.readUInt32BE(6), maximum: bs.readUInt32BE(10) };
    return result;
  }

  // -----------------------------------------------------------------------------------------------
  // transmission

  /** Remember a request sent by hand (sendRaw), so its reply can be parsed. */
  track(cookie: bigint, type: number, length: number): void {
    this.pending.set(cookie, { type, length });
  }

  sendRaw(...buffers: Buffer[]): void {
    this.write(...buffers);
  }

  /** Send one request (header + data); returns its cookie. */
  send(type: number, o: RequestOptions = {}): bigint {
    const cookie = o.cookie ?? this.nextCookie++;
    const length = o.length ?? o.data?.length ?? 0;
    this.track(cookie, type, length);
    const header = encodeRequest(o.flags ?? 0, type, cookie, o.offset ?? 0, length);
    if (o.data) this.write(header, o.data);
    else this.write(header);
    return cookie;
  }

  /** Read one frame (a simple reply or one chunk) and file it; returns the cookie it belonged to. */
  private async readFrame(timeoutMs: number): Promise<bigint> {
    const magic = (await this.readExact(4, timeoutMs)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const h = await this.readExact(12, timeoutMs);
      const error = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      const p = this.pending.get(cookie);
      const reply: Reply = { kind: 'simple', cookie, error };
      if (p && p.type === CMD.READ && error === 0) reply.data = await this.readExact(p.length, timeoutMs);
      this.pending.delete(cookie);
      this.completed.set(cookie, reply);
      return cookie;
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const h = await this.readExact(16, timeoutMs);
      const chunk: Chunk = { flags: h.readUInt16BE(0), type: h.readUInt16BE(2), cookie: h.readBigUInt64BE(4), length: h.readUInt32BE(12), payload: Buffer.alloc(0) };
      chunk.payload = await this.readExact(chunk.length, timeoutMs);
      const list = this.partial.get(chunk.cookie) ?? [];
      list.push(chunk);
      if (chunk.flags & REPLY_FLAG_DONE) {
        this.partial.delete(chunk.cookie);
        this.pending.delete(chunk.cookie);
        this.completed.set(chunk.cookie, { kind: 'structured', cookie: chunk.cookie, chunks: list });
      } else {
        this.partial.set(chunk.cookie, list);
      }
      return chunk.cookie;
    }
    throw new Error(`reply with unknown magic 0x${magic.toString(16)}`);
  }

  /** The complete reply for `cookie` (or the next complete reply of any request). */
  async readReply(cookie?: bigint, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Reply> {
    for (;;) {
      if (cookie === undefined) {
        const first = this.completed.entries().next();
        if (!first.done) {
          this.completed.delete(first.value[0]);
          return first.value[1];
        }
      } else {
        const r = this.completed.get(cookie);
        if (r) {
          this.completed.delete(cookie);
          return r;
        }
      }
      await this.readFrame(timeoutMs);
    }
  }

  /** Send and wait for the reply. */
  async request(type: number, o: RequestOptions = {}, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Reply> {
    const cookie = this.send(type, o);
    return this.readReply(cookie, timeoutMs);
  }

  /** READ that must succeed; checks chunk invariants when structured. */
  async read(offset: number, length: number, flags = 0): Promise<Buffer> {
    const r = await this.request(CMD.READ, { offset, length, flags });
    return readReplyData(r, offset, length);
  }

  /** A command that must succeed. */
  async ok(type: number, o: RequestOptions = {}): Promise<void> {
    const r = await this.request(type, o);
    const e = replyError(r);
    if (e !== 0) throw new Error(`command ${type} at ${o.offset ?? 0}+${o.length ?? o.data?.length ?? 0} failed with error ${e}: ${errorMessage(r)}`);
  }
}

/** The error a reply carries (0 = success). For structured replies: the first error chunk's value. */
export function replyError(r: Reply): number {
  if (r.kind === 'simple') return r.error;
  for (const c of r.chunks) {
    if (c.type & 0x8000) return c.payload.length >= 4 ? c.payload.readUInt32BE(0) : -1;
  }
  return 0;
}

/** The message of the first error chunk ('' if none). */
export function errorMessage(r: Reply): string {
  if (r.kind === 'simple') return '';
  for (const c of r.chunks) {
    if (c.type & 0x8000 && c.payload.length >= 6) {
      const n = c.payload.readUInt16BE(4);
      return c.payload.toString('utf8', 6, 6 + n);
    }
  }
  return '';
}

/**
 * Check the structured-read invariants of doc/proto.md and reassemble the data:
 * chunks lie within the request, never overlap, cover it fully, DONE only on the last,
 * OFFSET_HOLE is exactly 12 bytes, OFFSET_DATA carries ≥ 1 byte. Throws on any violation.
 */
export function assembleStructuredRead(chunks: Chunk[], offset: number, length: number): { data: Buffer; dataChunks: number; holeChunks: number } {
  const data = Buffer.alloc(length);
  const covered: Array<[number, number]> = [];
  let dataChunks = 0;
  let holeChunks = 0;
  chunks.forEach((c, i) => {
    const last = i === chunks.length - 1;
    if (((c.flags & REPLY_FLAG_DONE) !== 0) !== last) throw new Error(`DONE flag on chunk ${i} of ${chunks.length}`);
    if (c.type & 0x8000) throw new Error(`error chunk 0x${c.type.toString(16)} in a successful read`);
    let at: number;
    let n: number;
    if (c.type === CHUNK.OFFSET_DATA) {
      if (c.length < 9) throw new Error(`OFFSET_DATA chunk of length ${c.length}`);
      at = Number(c.payload.readBigUInt64BE(0));
      n = c.length - 8;
      dataChunks++;
    } else if (c.type === CHUNK.OFFSET_HOLE) {
      if (c.length !== 12) throw new Error(`OFFSET_HOLE chunk of length ${c.length}`);
      at = Number(c.payload.readBigUInt64BE(0));
      n = c.payload.readUInt32BE(8);
      if (n === 0) throw new Error('OFFSET_HOLE of size 0');
      holeChunks++;
    } else if (c.type === CHUNK.NONE) {
      if (c.length !== 0 || !last) throw new Error('bad NONE chunk');
      return;
    } else {
      throw new Error(`chunk type ${c.type} in a read reply`);
    }
    if (at < offset || at + n > offset + length) throw new Error(`chunk [${at}, +${n}) outside the request [${offset}, +${length})`);
    for (const [s, e] of covered) if (at < e && s < at + n) throw new Error(`chunk [${at}, +${n}) overlaps [${s}, ${e})`);
    covered.push([at, at + n]);
    if (c.type === CHUNK.OFFSET_DATA) c.payload.copy(data, at - offset, 8);
  });
  const sum = covered.reduce((s, [a, b]) => s + (b - a), 0);
  if (sum !== length) throw new Error(`chunks cover ${sum} of ${length} bytes`);
  return { data, dataChunks, holeChunks };
}

/** Data of a successful READ reply, simple or structured (checked). */
export function readReplyData(r: Reply, offset: number, length: number): Buffer {
  const e = replyError(r);
  if (e !== 0) throw new Error(`read of ${length} bytes at ${offset} failed with error ${e}: ${errorMessage(r)}`);
  if (r.kind === 'simple') {
    if (!r.data || r.data.length !== length) throw new Error('simple read reply without its data');
    return r.data;
  }
  return assembleStructuredRead(r.chunks, offset, length).data;
}

/** Descriptors of one BLOCK_STATUS chunk. */
export function blockStatusDescriptors(c: Chunk): { contextId: number; descriptors: Array<[number, number]> } {
  if (c.type !== CHUNK.BLOCK_STATUS) throw new Error(`chunk type ${c.type} is not BLOCK_STATUS`);
  if (c.length < 12 || (c.length - 4) % 8 !== 0) throw new Error(`BLOCK_STATUS chunk of length ${c.length}`);
  const descriptors: Array<[number, number]> = [];
  for (let p = 4; p < c.length; p += 8) descriptors.push([c.payload.readUInt32BE(p), c.payload.readUInt32BE(p + 4)]);
  return { contextId: c.payload.readUInt32BE(0), descriptors };
}
