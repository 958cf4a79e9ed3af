/**
 * A tiny scripted NBD server for client tests: a valid fixed-newstyle handshake (overridable per
 * option), then every request is handed to the test, which answers with whatever bytes it likes,
 * well-formed or not. Independent of the product's server.
 */
import net from 'node:net';
import { join } from 'node:path';
import { ByteQueue } from '../../src/nbd/byte-queue.js';
import {
  encodeBlockStatusChunk, encodeChunkHeader, encodeDataChunkHeader, encodeErrorChunk, encodeHoleChunk, encodeNoneChunk,
  encodeOptionReply, encodeSimpleReply, decodeRequest, type Request,
} from '../../src/nbd/codec.js';
import { CMD, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, NBDMAGIC, OPT, REP, TF } from '../../src/nbd/constants.js';
import { makeTempDir } from '../support/spawn.js';

export const HOSTILE_FLAGS = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_DF;

export interface HostileConnection {
  readonly socket: net.Socket;
  /** requests received so far, DISC included */
  readonly requests: Request[];
  /** options received, in order */
  readonly options: number[];
  send(...buffers: Buffer[]): void;
}

export interface HostileOptions {
  size?: number;
  flags?: number;
  /** greeting flags (default FIXED_NEWSTYLE | NO_ZEROES) */
  greeting?: number;
  /** answer STRUCTURED_REPLY with ACK (default true) */
  structured?: boolean;
  /** meta contexts SET_META_CONTEXT selects: [id, name] (default [[7, "base:allocation"]]) */
  contexts?: Array<[number, string]>;
  /** answer an option in place of the default; return true when handled */
  onOption?(conn: HostileConnection, option: number, data: Buffer): boolean;
  /** on DISC keep the connection open instead of closing it */
  ignoreDisc?: boolean;
  /** every request after the handshake (DISC included); `payload` for writes */
  onRequest?(conn: HostileConnection, req: Request, payload: Buffer | undefined): void;
}

export interface HostileServer {
  socket: string;
  uri: string;
  connections: HostileConnection[];
  close(): Promise<void>;
}

export async function startHostile(options: HostileOptions = {}): Promise<HostileServer> {
  const dir = await makeTempDir();
  const socketPath = join(dir, 'h.sock');
  const size = options.size ?? 1024 * 1024;
  const flags = options.flags ?? HOSTILE_FLAGS;
  const contexts = options.contexts ?? [[7, 'base:allocation']];
  const connections: HostileConnection[] = [];
  const sockets = new Set<net.Socket>();

  // allowHalfOpen with ignoreDisc: the client's end() after DISC must not close our side for us.
  const server = net.createServer({ allowHalfOpen: Boolean(options.ignoreDisc) }, (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const conn: HostileConnection = {
      socket,
      requests: [],
      options: [],
      send: (...buffers) => {
        if (!socket.destroyed && socket.writable) for (const b of buffers) socket.write(b);
      },
    };
    connections.push(conn);
    const q = new ByteQueue();
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    let noZeroes = false;
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NBDMAGIC, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(options.greeting ?? FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    socket.write(greeting);

    const defaultOption = (option: number): void => {
      switch (option) {
        case OPT.STRUCTURED_REPLY:
          conn.send(encodeOptionReply(option, options.structured === false ? REP.ERR_UNSUP : REP.ACK));
          return;
        case OPT.SET_META_CONTEXT:
          for (const [id, name] of contexts) {
            const b = Buffer.alloc(4 + Buffer.byteLength(name));
            b.writeUInt32BE(id, 0);
            b.write(name, 4);
            conn.send(encodeOptionReply(option, REP.META_CONTEXT, b));
          }
          conn.send(encodeOptionReply(option, REP.ACK));
          return;
        case OPT.GO: {
          const info = Buffer.alloc(12);
          info.writeUInt16BE(INFO.EXPORT, 0);
          info.writeBigUInt64BE(BigInt(size), 2);
          info.writeUInt16BE(flags, 10);
          conn.send(encodeOptionReply(option, REP.INFO, info), encodeOptionReply(option, REP.ACK));
          phase = 'transmission';
          return;
        }
        case OPT.EXPORT_NAME: {
          const b = Buffer.alloc(noZeroes ? 10 : 134);
          b.writeBigUInt64BE(BigInt(size), 0);
          b.writeUInt16BE(flags, 8);
          conn.send(b);
          phase = 'transmission';
          return;
        }
        case OPT.ABORT:
          conn.send(encodeOptionReply(option, REP.ACK));
          socket.end();
          return;
        default:
          conn.send(encodeOptionReply(option, REP.ERR_UNSUP));
      }
    };

    socket.on('data', (chunk: Buffer) => {
      q.push(chunk);
      for (;;) {
        if (phase === 'flags') {
          if (q.length < 4) return;
          noZeroes = (q.take(4).readUInt32BE(0) & 2) !== 0;
          phase = 'options';
        } else if (phase === 'options') {
          if (q.length < 16) return;
          const h = q.peek(16);
          const length = h.readUInt32BE(12);
          if (q.length < 16 + length) return;
          const option = h.readUInt32BE(8);
          q.skip(16);
          const data = Buffer.from(q.take(length));
          conn.options.push(option);
          // Only the default handlers of GO and EXPORT_NAME enter transmission.
          if (!options.onOption?.(conn, option, data)) defaultOption(option);
        } else {
          if (q.length < 28) return;
          const req = decodeRequest(q.peek(28));
          const need = req.type === CMD.WRITE ? 28 + req.length : 28;
          if (q.length < need) return;
          q.skip(28);
          const payload = req.type === CMD.WRITE ? Buffer.from(q.take(req.length)) : undefined;
          conn.requests.push(req);
          if (req.type === CMD.DISC) {
            if (!options.ignoreDisc) socket.end();
            return;
          }
          options.onRequest?.(conn, req, payload);
        }
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => resolve());
  });
  return {
    socket: socketPath,
    uri: `nbd+unix:///?socket=${socketPath}`,
    connections,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

// replies, for handlers

export const reply = {
  simple: (req: Request, error = 0, data?: Buffer): Buffer[] => [encodeSimpleReply(error, req.cookie), ...(data ? [data] : [])],
  data: (cookie: bigint, offset: number, data: Buffer, done: boolean): Buffer[] => [encodeDataChunkHeader(cookie, offset, data.length, done), data],
  hole: (cookie: bigint, offset: number, length: number, done: boolean): Buffer => encodeHoleChunk(cookie, offset, length, done),
  none: (cookie: bigint): Buffer => encodeNoneChunk(cookie),
  error: (cookie: bigint, errno: number, message: string, offset?: number): Buffer => encodeErrorChunk(cookie, errno, message, offset),
  blockStatus: (cookie: bigint, id: number, extents: Array<[number, number]>, done: boolean): Buffer => encodeBlockStatusChunk(cookie, id, extents, done),
  /** a chunk header with any type/length, and a payload (which may be shorter than `length`) */
  raw: (cookie: bigint, type: number, flags: number, length: number, payload: Buffer = Buffer.alloc(0)): Buffer[] => {
    const h = encodeChunkHeader(flags, type, cookie, length);
    return [h, payload];
  },
};
