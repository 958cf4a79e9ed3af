/**
 * Pure encoders and decoders for NBD frames: Buffers in, Buffers out, no sockets or timers.
 */
import {
  CHUNK, NBDMAGIC, IHAVEOPT, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
  REPLY_FLAG_DONE, MAX_ERROR_MESSAGE,
} from './constants.js';

export const GREETING_LENGTH = 18;
export const OPTION_HEADER_LENGTH = 16;
export const REQUEST_LENGTH = 28;
export const SIMPLE_REPLY_LENGTH = 16;
export const CHUNK_HEADER_LENGTH = 20;

export function encodeGreeting(flags: number): Buffer {
  const b = Buffer.alloc(GREETING_LENGTH);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(flags, 16);
  return b;
}

export interface OptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

export function decodeOptionHeader(b: Buffer): OptionHeader {
  return { magic: b.readBigUInt64BE(0), option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_LENGTH + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_LENGTH);
  return b;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

export interface OptionReply {
  magic: bigint;
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(b: Buffer): OptionReply {
  return { magic: b.readBigUInt64BE(0), option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

export interface Request {
  magic: number;
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  /** offset as sent, for values beyond 2^53 */
  rawOffset: bigint;
  length: number;
}

export function decodeRequest(b: Buffer): Request {
  const rawOffset = b.readBigUInt64BE(16);
  return {
    magic: b.readUInt32BE(0),
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8),
    rawOffset,
    offset: rawOffset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(rawOffset),
    length: b.readUInt32BE(24),
  };
}

export function encodeRequest(flags: number, type: number, cookie: bigint, offset: number | bigint, length: number): Buffer {
  const b = Buffer.alloc(REQUEST_LENGTH);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_LENGTH);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

export function encodeChunkHeader(flags: number, type: number, cookie: bigint, length: number, extra = 0): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER_LENGTH + extra);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** Header (20 bytes) + the 8-byte offset of an OFFSET_DATA chunk; the data follows separately. */
export function encodeDataChunkHeader(cookie: bigint, offset: number, dataLength: number, done: boolean): Buffer {
  const b = encodeChunkHeader(done ? REPLY_FLAG_DONE : 0, CHUNK.OFFSET_DATA, cookie, 8 + dataLength, 8);
  b.writeBigUInt64BE(BigInt(offset), 20);
  return b;
}

export function encodeHoleChunk(cookie: bigint, offset: number, length: number, done: boolean): Buffer {
  const b = encodeChunkHeader(done ? REPLY_FLAG_DONE : 0, CHUNK.OFFSET_HOLE, cookie, 12, 12);
  b.writeBigUInt64BE(BigInt(offset), 20);
  b.writeUInt32BE(length, 28);
  return b;
}

export function encodeNoneChunk(cookie: bigint): Buffer {
  return encodeChunkHeader(REPLY_FLAG_DONE, CHUNK.NONE, cookie, 0);
}

/**
 * A human-readable message as an NBD string: UTF-8 without NUL, at most `max` bytes, cut at a
 * character boundary.
 */
export function encodeMessage(message: string, max = MAX_ERROR_MESSAGE): Buffer {
  const b = Buffer.from(message.replace(/\0/g, '\ufffd'), 'utf8');
  if (b.length <= max) return b;
  let n = max;
  while (n > 0 && (b[n]! & 0xc0) === 0x80) n--; // do not split a multi-byte sequence
  return b.subarray(0, n);
}

export function encodeErrorChunk(cookie: bigint, error: number, message: string, offset?: number): Buffer {
  const msg = encodeMessage(message);
  const withOffset = offset !== undefined;
  const payload = 6 + msg.length + (withOffset ? 8 : 0);
  const b = encodeChunkHeader(REPLY_FLAG_DONE, withOffset ? CHUNK.ERROR_OFFSET : CHUNK.ERROR, cookie, payload, payload);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  if (withOffset) b.writeBigUInt64BE(BigInt(offset), 26 + msg.length);
  return b;
}

/** BLOCK_STATUS chunk: u32 context id, then (u32 length, u32 flags) pairs. */
export function encodeBlockStatusChunk(cookie: bigint, contextId: number, extents: Array<[number, number]>, done: boolean): Buffer {
  const payload = 4 + 8 * extents.length;
  const b = encodeChunkHeader(done ? REPLY_FLAG_DONE : 0, CHUNK.BLOCK_STATUS, cookie, payload, payload);
  b.writeUInt32BE(contextId, 20);
  let p = 24;
  for (const [len, flags] of extents) {
    b.writeUInt32BE(len, p);
    b.writeUInt32BE(flags, p + 4);
    p += 8;
  }
  return b;
}

// -------------------------------------------------------------------------------------------------
// client side: option payloads it sends, replies it reads

/** Payload of NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, u16 info types. */
export function encodeInfoRequest(exportName: string, infos: number[]): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const b = Buffer.alloc(4 + name.length + 2 + 2 * infos.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + name.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + name.length + 2 * i));
  return b;
}

/** Payload of NBD_OPT_SET/LIST_META_CONTEXT: u32 name length, name, u32 count, (u32 length, query)… */
export function encodeMetaContextRequest(exportName: string, queries: string[]): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const qs = queries.map((q) => Buffer.from(q, 'utf8'));
  const b = Buffer.alloc(8 + name.length + qs.reduce((n, q) => n + 4 + q.length, 0));
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  let p = 4 + name.length;
  b.writeUInt32BE(qs.length, p);
  p += 4;
  for (const q of qs) {
    b.writeUInt32BE(q.length, p);
    q.copy(b, p + 4);
    p += 4 + q.length;
  }
  return b;
}

export interface SimpleReplyHeader {
  magic: number;
  error: number;
  cookie: bigint;
}

export function decodeSimpleReply(b: Buffer): SimpleReplyHeader {
  return { magic: b.readUInt32BE(0), error: b.readUInt32BE(4), cookie: b.readBigUInt64BE(8) };
}

export interface ChunkHeader {
  magic: number;
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

export function decodeChunkHeader(b: Buffer): ChunkHeader {
  return { magic: b.readUInt32BE(0), flags: b.readUInt16BE(4), type: b.readUInt16BE(6), cookie: b.readBigUInt64BE(8), length: b.readUInt32BE(16) };
}

/** BLOCK_STATUS chunk payload; a string is the reason it is malformed. */
export function decodeBlockStatusPayload(p: Buffer): { contextId: number; descriptors: Array<[number, number]> } | string {
  if (p.length < 12 || (p.length - 4) % 8 !== 0) return `block status payload of ${p.length} bytes is not 4 + 8·N bytes with N ≥ 1`;
  const descriptors: Array<[number, number]> = [];
  for (let at = 4; at < p.length; at += 8) {
    const length = p.readUInt32BE(at);
    if (length === 0) return `block status descriptor ${descriptors.length + 1} has length 0`;
    descriptors.push([length, p.readUInt32BE(at + 4)]);
  }
  return { contextId: p.readUInt32BE(0), descriptors };
}

/**
 * ERROR / ERROR_OFFSET chunk payload (u32 error, u16 message length, message[, u64 offset]).
 * Unknown error types (bit 15) share the first fields. A string is the reason it is malformed.
 */
export function decodeErrorPayload(p: Buffer, withOffset: boolean): { error: number; message: string; offset?: bigint } | string {
  if (p.length < 6) return `error chunk payload of ${p.length} bytes is shorter than 6`;
  const error = p.readUInt32BE(0);
  const msgLength = p.readUInt16BE(4);
  const need = 6 + msgLength + (withOffset ? 8 : 0);
  if (withOffset ? p.length !== need : p.length < need) {
    return `error chunk payload of ${p.length} bytes does not match its message length ${msgLength}${withOffset ? ' and offset' : ''}`;
  }
  const message = p.toString('utf8', 6, 6 + msgLength);
  return withOffset ? { error, message, offset: p.readBigUInt64BE(6 + msgLength) } : { error, message };
}
