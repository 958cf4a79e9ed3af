/**
 * The beat frame: what one node tells the other on every heartbeat path, signed with the pair key.
 * Pure: encode to a Buffer, decode and check a Buffer; no sockets, no clocks.
 *
 *   0  magic "BKHB"             4 bytes
 *   4  version (1 or 2)         u8
 *   5  flags                    u8   bit 0: keyed; bit 1: the sender is primary; bit 2: the sender decodes version 2
 *   6  node id length (1..64)   u8
 *   7  reserved (0)             u8
 *   8  incarnation              u64  the sender's start (ms since the epoch): orders restarts
 *  16  seq                      u64  per incarnation, from 1, +1 per beat
 *  24  epoch                    u64  the fencing token (the sender's term: +1 at each takeover)
 *  32  generation               u64  the sender's first paired export's generation (16 hex digits)
 *  40  node id                  UTF-8
 *      version 2 only, the sender's paired exports:
 *  ..  count (0..MAX_BEAT_EXPORTS)  u8
 *  ..  per export: name length (0..64) u8, name UTF-8, generation u64, flags u8
 *                  (bit 0: the sender's disk for it is Outdated; bit 1: the sender is its primary;
 *                  other bits: ignored, for later versions)
 *  ..  HMAC-SHA256(key, all bytes before it)  32 bytes
 *
 * An export is named as the pair link names it: the secondary's replica export (`replicate
 * URI`'s export name on the primary, the secondary's own export name), so both ends of a pair
 * use the same name. A whole frame is at most HEARTBEAT_MAX_FRAME_BYTES (256, what every
 * backend must carry): the list has 256 - 72 - node id bytes - 1 for entries of 10 + name bytes;
 * encodeBeat refuses a list that does not fit (RangeError), the service announces the exports
 * that fit (fitExports) and says which it leaves out.
 *
 * Versions (a rolling upgrade has one node of each): a version 1 node refuses a version 2 frame
 * as malformed, so a node sends version 1 frames, with flag bit 2 set (a version 1 decoder ignores
 * it, and it is under the MAC), until it hears its peer say it decodes version 2 (a version 2
 * frame, or flag bit 2 on a version 1 frame); then it sends version 2. The choice is per peer, by
 * the peer's latest incarnation: a peer restarted with an older build (no bit 2) is sent version 1
 * again. A version 2 node accepts both versions; from a version 1 frame a receiver knows only the
 * header's generation (the first paired export's), as before.
 *
 * Without a key the MAC is computed with an empty key: the frame has the same shape and a receiver
 * holding a key rejects it (flag bit 0 says which the sender used, so the reason is "unkeyed", not
 * a bare "bad MAC"). Replays are refused per path by (incarnation, seq) order (ReplayGuard).
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { HEARTBEAT_MAX_FRAME_BYTES } from '../api/heartbeat.js';

export const BEAT_MAGIC = Buffer.from('BKHB', 'latin1');
/** the highest version this node decodes (and sends, to a peer that decodes it) */
export const BEAT_VERSION = 2;
export const MAX_NODE_ID_BYTES = 64;
/** an export's name in a version 2 beat, in bytes */
export const MAX_BEAT_EXPORT_NAME_BYTES = 64;
/** entries in a version 2 beat (the 256-byte frame bounds them first) */
export const MAX_BEAT_EXPORTS = 32;
const HEADER_BYTES = 40;
const MAC_BYTES = 32;
const ENTRY_FIXED_BYTES = 1 + 8 + 1;
const FLAG_KEYED = 1;
const FLAG_PRIMARY = 2;
const FLAG_SPEAKS_V2 = 4;
const EXPORT_OUTDATED = 1;
const EXPORT_PRIMARY = 2;

/** One paired export of the sender, in a version 2 beat. */
export interface BeatExport {
  /** the pair's export name (the secondary's replica export), 0..64 bytes of UTF-8 */
  name: string;
  /** the sender's generation for it, 16 lowercase hex digits */
  generation: string;
  /** the sender's disk for it is Outdated; absent: it is not */
  outdated?: boolean;
  /** the sender is its primary; absent: it is not */
  primary?: boolean;
}

export interface Beat {
  node: string;
  incarnation: bigint;
  seq: bigint;
  epoch: bigint;
  /** 16 lowercase hex digits */
  generation: string;
  /** the sender serves its disk read-write (a pair's primary); absent: it does not */
  primary?: boolean;
  /** a version 1 frame whose sender decodes version 2 (flag bit 2); absent: not said */
  capable?: boolean;
  /** the sender's paired exports: present, the frame is version 2 (an empty list too); absent: version 1 */
  exports?: BeatExport[];
}

export type RejectReason =
  /** not a beat frame at all, or a version we do not speak */
  | 'malformed'
  /** signed with another key */
  | 'bad-mac'
  /** the sender has no key and we have one */
  | 'unkeyed'
  /** the sender has a key and we have none */
  | 'keyed'
  /** an old (incarnation, seq): a replay, or a reordered datagram */
  | 'replay'
  /** our own beat came back */
  | 'self'
  /** from a node that is not our peer */
  | 'unknown-node';

export type Decoded = { ok: true; beat: Beat } | { ok: false; reason: RejectReason; detail: string };

const U64_MAX = (1n << 64n) - 1n;
const GENERATION = /^[0-9a-f]{16}$/;

function checkU64(name: string, v: bigint): void {
  if (v < 0n || v > U64_MAX) throw new RangeError(`beat ${name} ${v} does not fit in 64 bits`);
}

/** the version of the frame `beat` encodes to: 2 with an export list, else 1 */
export function beatVersion(beat: Beat): 1 | 2 {
  return beat.exports === undefined ? 1 : 2;
}

/** bytes of a frame for this node id and these exports (version 2; version 1: exports undefined) */
export function beatBytes(node: string, exports: readonly BeatExport[] | undefined): number {
  let n = HEADER_BYTES + Buffer.byteLength(node, 'utf8') + MAC_BYTES;
  if (exports === undefined) return n;
  n += 1;
  for (const e of exports) n += ENTRY_FIXED_BYTES + Buffer.byteLength(e.name, 'utf8');
  return n;
}

/**
 * The exports of `exports`, in order, that fit a version 2 frame from `node`: those whose name is
 * too long, or that come after the frame is full, are left out (returned in `left`, with why).
 */
export function fitExports(node: string, exports: readonly BeatExport[]): { fit: BeatExport[]; left: Array<{ name: string; why: string }> } {
  const fit: BeatExport[] = [];
  const left: Array<{ name: string; why: string }> = [];
  let bytes = beatBytes(node, []);
  for (const e of exports) {
    const name = Buffer.byteLength(e.name, 'utf8');
    if (name > MAX_BEAT_EXPORT_NAME_BYTES) left.push({ name: e.name, why: `its name is ${name} bytes, a beat carries at most ${MAX_BEAT_EXPORT_NAME_BYTES}` });
    else if (fit.length >= MAX_BEAT_EXPORTS) left.push({ name: e.name, why: `a beat carries at most ${MAX_BEAT_EXPORTS} exports` });
    else if (bytes + ENTRY_FIXED_BYTES + name > HEARTBEAT_MAX_FRAME_BYTES) left.push({ name: e.name, why: `the beat would be more than ${HEARTBEAT_MAX_FRAME_BYTES} bytes` });
    else {
      fit.push(e);
      bytes += ENTRY_FIXED_BYTES + name;
    }
  }
  return { fit, left };
}

export function encodeBeat(beat: Beat, key: Buffer | undefined): Buffer {
  const id = Buffer.from(beat.node, 'utf8');
  if (id.length < 1 || id.length > MAX_NODE_ID_BYTES) throw new RangeError(`node id "${beat.node}" is ${id.length} bytes; 1 to ${MAX_NODE_ID_BYTES} allowed`);
  if (!GENERATION.test(beat.generation)) throw new RangeError(`generation "${beat.generation}" is not 16 lowercase hex digits`);
  checkU64('incarnation', beat.incarnation);
  checkU64('seq', beat.seq);
  checkU64('epoch', beat.epoch);
  const exports = beat.exports;
  if (exports !== undefined) {
    if (exports.length > MAX_BEAT_EXPORTS) throw new RangeError(`a beat carries at most ${MAX_BEAT_EXPORTS} exports, not ${exports.length}`);
    for (const e of exports) {
      const n = Buffer.byteLength(e.name, 'utf8');
      if (n > MAX_BEAT_EXPORT_NAME_BYTES) throw new RangeError(`export name "${e.name.slice(0, 80)}" is ${n} bytes; a beat carries at most ${MAX_BEAT_EXPORT_NAME_BYTES}`);
      if (!GENERATION.test(e.generation)) throw new RangeError(`export "${e.name}": generation "${e.generation}" is not 16 lowercase hex digits`);
    }
  }
  const total = beatBytes(beat.node, exports);
  if (total > HEARTBEAT_MAX_FRAME_BYTES) throw new RangeError(`the beat is ${total} bytes with ${exports?.length ?? 0} exports; a path carries at most ${HEARTBEAT_MAX_FRAME_BYTES} (fitExports)`);
  const frame = Buffer.alloc(total);
  BEAT_MAGIC.copy(frame, 0);
  frame[4] = beatVersion(beat);
  frame[5] = (key && key.length > 0 ? FLAG_KEYED : 0) | (beat.primary ? FLAG_PRIMARY : 0) | (beat.capable && exports === undefined ? FLAG_SPEAKS_V2 : 0);
  frame[6] = id.length;
  frame.writeBigUInt64BE(beat.incarnation, 8);
  frame.writeBigUInt64BE(beat.seq, 16);
  frame.writeBigUInt64BE(beat.epoch, 24);
  frame.write(beat.generation, 32, 'hex');
  id.copy(frame, HEADER_BYTES);
  let at = HEADER_BYTES + id.length;
  if (exports !== undefined) {
    frame[at++] = exports.length;
    for (const e of exports) {
      const name = Buffer.from(e.name, 'utf8');
      frame[at++] = name.length;
      name.copy(frame, at);
      at += name.length;
      frame.write(e.generation, at, 'hex');
      at += 8;
      frame[at++] = (e.outdated ? EXPORT_OUTDATED : 0) | (e.primary ? EXPORT_PRIMARY : 0);
    }
  }
  mac(key, frame.subarray(0, at)).copy(frame, at);
  return frame;
}

function mac(key: Buffer | undefined, data: Buffer): Buffer {
  return createHmac('sha256', key ?? Buffer.alloc(0)).update(data).digest();
}

const UTF8 = new TextDecoder('utf-8', { fatal: true });

/** The export list of a version 2 frame, between `from` and `end` (the MAC): the entries, or why not. */
function decodeExports(frame: Buffer, from: number, end: number): BeatExport[] | string {
  if (from >= end) return 'a version 2 beat has no export count';
  const count = frame[from]!;
  if (count > MAX_BEAT_EXPORTS) return `${count} exports, a beat carries at most ${MAX_BEAT_EXPORTS}`;
  const exports: BeatExport[] = [];
  let at = from + 1;
  for (let i = 0; i < count; i++) {
    if (at >= end) return `export ${i} of ${count}: the frame ends at byte ${at}`;
    const length = frame[at]!;
    if (length > MAX_BEAT_EXPORT_NAME_BYTES) return `export ${i}: a name of ${length} bytes, at most ${MAX_BEAT_EXPORT_NAME_BYTES}`;
    if (at + 1 + length + 9 > end) return `export ${i} of ${count}: ${1 + length + 9} bytes at byte ${at}, the frame's list ends at ${end}`;
    let name: string;
    try {
      name = UTF8.decode(frame.subarray(at + 1, at + 1 + length));
    } catch {
      return `export ${i}: its name is not UTF-8`;
    }
    at += 1 + length;
    const generation = frame.toString('hex', at, at + 8);
    const flags = frame[at + 8]!;
    at += 9;
    exports.push({ name, generation, ...((flags & EXPORT_OUTDATED) !== 0 ? { outdated: true } : {}), ...((flags & EXPORT_PRIMARY) !== 0 ? { primary: true } : {}) });
  }
  if (at !== end) return `${end - at} bytes after the ${count} exports`;
  return exports;
}

/** Parse and authenticate a frame; says why when it is refused. Never throws. Does not check replays or node ids. */
export function decodeBeat(frame: Buffer, key: Buffer | undefined): Decoded {
  if (frame.length < HEADER_BYTES + 1 + MAC_BYTES) return refuse('malformed', `${frame.length} bytes, a beat has at least ${HEADER_BYTES + 1 + MAC_BYTES}`);
  if (frame.length > HEARTBEAT_MAX_FRAME_BYTES) return refuse('malformed', `${frame.length} bytes, a beat has at most ${HEARTBEAT_MAX_FRAME_BYTES}`);
  if (!frame.subarray(0, 4).equals(BEAT_MAGIC)) return refuse('malformed', `magic ${frame.subarray(0, 4).toString('hex')} is not "BKHB"`);
  const version = frame[4]!;
  if (version !== 1 && version !== 2) return refuse('malformed', `version ${version}, this node speaks 1 and 2`);
  const idLength = frame[6]!;
  if (idLength < 1 || idLength > MAX_NODE_ID_BYTES) return refuse('malformed', `a node id of ${idLength} bytes: 1 to ${MAX_NODE_ID_BYTES} allowed`);
  const bodyEnd = frame.length - MAC_BYTES;
  if (version === 1 && frame.length !== HEADER_BYTES + idLength + MAC_BYTES) {
    return refuse('malformed', `${frame.length} bytes for a node id of ${idLength}: expected ${HEADER_BYTES + idLength + MAC_BYTES}`);
  }
  let exports: BeatExport[] | undefined;
  if (version === 2) {
    const list = decodeExports(frame, HEADER_BYTES + idLength, bodyEnd);
    if (typeof list === 'string') return refuse('malformed', `version 2 beat of ${frame.length} bytes, node id of ${idLength}: ${list}`);
    exports = list;
  }
  const keyed = (frame[5]! & FLAG_KEYED) !== 0;
  const haveKey = key !== undefined && key.length > 0;
  if (keyed && !haveKey) return refuse('keyed', 'the sender signs its beats with a key and this node has none (--heartbeat-key)');
  if (!keyed && haveKey) return refuse('unkeyed', 'the sender has no --heartbeat-key and this node has one');
  if (!timingSafeEqual(mac(key, frame.subarray(0, bodyEnd)), frame.subarray(bodyEnd))) {
    return refuse('bad-mac', 'the HMAC does not match: the sender has another --heartbeat-key');
  }
  const flags = frame[5]!;
  return {
    ok: true,
    beat: {
      node: frame.toString('utf8', HEADER_BYTES, HEADER_BYTES + idLength),
      incarnation: frame.readBigUInt64BE(8),
      seq: frame.readBigUInt64BE(16),
      epoch: frame.readBigUInt64BE(24),
      generation: frame.toString('hex', 32, 40),
      ...((flags & FLAG_PRIMARY) !== 0 ? { primary: true } : {}),
      ...(version === 1 && (flags & FLAG_SPEAKS_V2) !== 0 ? { capable: true } : {}),
      ...(exports === undefined ? {} : { exports }),
    },
  };
}

function refuse(reason: RejectReason, detail: string): Decoded {
  return { ok: false, reason, detail };
}

/**
 * Per path: accept a beat only from the peer and only when its (incarnation, seq) is after the
 * last accepted one. A restarted peer has a later incarnation, so its seq may start again at 1.
 */
export class ReplayGuard {
  private incarnation = -1n;
  private seq = -1n;

  constructor(
    private readonly self: string,
    private readonly peer: string,
  ) {}

  check(beat: Beat): Decoded {
    if (beat.node === this.self) return refuse('self', `node id "${beat.node}" is this node's own`);
    if (beat.node !== this.peer) return refuse('unknown-node', `node "${beat.node}" is not the peer "${this.peer}" (--peer-id)`);
    if (beat.incarnation < this.incarnation || (beat.incarnation === this.incarnation && beat.seq <= this.seq)) {
      return refuse('replay', `incarnation ${beat.incarnation} seq ${beat.seq} is not after the last accepted (incarnation ${this.incarnation} seq ${this.seq})`);
    }
    this.incarnation = beat.incarnation;
    this.seq = beat.seq;
    return { ok: true, beat };
  }
}
