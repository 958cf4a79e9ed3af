/**
 * The beat frame: what one node tells the other on every heartbeat path, signed with the pair key.
 * Pure: encode to a Buffer, decode and check a Buffer; no sockets, no clocks.
 *
 *   0  magic "BKHB"             4 bytes
 *   4  version (1)              u8
 *   5  flags                    u8   bit 0: keyed; bit 1: the sender is primary
 *   6  node id length (1..64)   u8
 *   7  reserved (0)             u8
 *   8  incarnation              u64  the sender's start (ms since the epoch): orders restarts
 *  16  seq                      u64  per incarnation, from 1, +1 per beat
 *  24  epoch                    u64  the fencing token (the sender's term: +1 at each takeover)
 *  32  generation               u64  the sender's current generation (16 hex digits)
 *  40  node id                  UTF-8
 *  ..  HMAC-SHA256(key, all bytes before it)  32 bytes
 *
 * Without a key the MAC is computed with an empty key: the frame has the same shape and a receiver
 * holding a key rejects it (flag bit 0 says which the sender used, so the reason is "unkeyed", not
 * a bare "bad MAC"). Replays are refused per path by (incarnation, seq) order (ReplayGuard).
 */
import { createHmac, timingSafeEqual } from 'node:crypto';

export const BEAT_MAGIC = Buffer.from('BKHB', 'latin1');
export const BEAT_VERSION = 1;
export const MAX_NODE_ID_BYTES = 64;
const HEADER_BYTES = 40;
const MAC_BYTES = 32;
const FLAG_KEYED = 1;
const FLAG_PRIMARY = 2;

export interface Beat {
  node: string;
  incarnation: bigint;
  seq: bigint;
  epoch: bigint;
  /** 16 lowercase hex digits */
  generation: string;
  /** the sender serves its disk read-write (a pair's primary); absent: it does not */
  primary?: boolean;
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

function checkU64(name: string, v: bigint): void {
  if (v < 0n || v > U64_MAX) throw new RangeError(`beat ${name} ${v} does not fit in 64 bits`);
}

export function encodeBeat(beat: Beat, key: Buffer | undefined): Buffer {
  const id = Buffer.from(beat.node, 'utf8');
  if (id.length < 1 || id.length > MAX_NODE_ID_BYTES) throw new RangeError(`node id "${beat.node}" is ${id.length} bytes; 1 to ${MAX_NODE_ID_BYTES} allowed`);
  if (!/^[0-9a-f]{16}$/.test(beat.generation)) throw new RangeError(`generation "${beat.generation}" is not 16 lowercase hex digits`);
  checkU64('incarnation', beat.incarnation);
  checkU64('seq', beat.seq);
  checkU64('epoch', beat.epoch);
  const frame = Buffer.alloc(HEADER_BYTES + id.length + MAC_BYTES);
  BEAT_MAGIC.copy(frame, 0);
  frame[4] = BEAT_VERSION;
  frame[5] = (key && key.length > 0 ? FLAG_KEYED : 0) | (beat.primary ? FLAG_PRIMARY : 0);
  frame[6] = id.length;
  frame.writeBigUInt64BE(beat.incarnation, 8);
  frame.writeBigUInt64BE(beat.seq, 16);
  frame.writeBigUInt64BE(beat.epoch, 24);
  frame.write(beat.generation, 32, 'hex');
  id.copy(frame, HEADER_BYTES);
  mac(key, frame.subarray(0, HEADER_BYTES + id.length)).copy(frame, HEADER_BYTES + id.length);
  return frame;
}

function mac(key: Buffer | undefined, data: Buffer): Buffer {
  return createHmac('sha256', key ?? Buffer.alloc(0)).update(data).digest();
}

/** Parse and authenticate a frame; says why when it is refused. Does not check replays or node ids. */
export function decodeBeat(frame: Buffer, key: Buffer | undefined): Decoded {
  if (frame.length < HEADER_BYTES + 1 + MAC_BYTES) return refuse('malformed', `${frame.length} bytes, a beat has at least ${HEADER_BYTES + 1 + MAC_BYTES}`);
  if (!frame.subarray(0, 4).equals(BEAT_MAGIC)) return refuse('malformed', `magic ${frame.subarray(0, 4).toString('hex')} is not "BKHB"`);
  if (frame[4] !== BEAT_VERSION) return refuse('malformed', `version ${frame[4]}, this node speaks ${BEAT_VERSION}`);
  const idLength = frame[6]!;
  if (idLength < 1 || idLength > MAX_NODE_ID_BYTES || frame.length !== HEADER_BYTES + idLength + MAC_BYTES) {
    return refuse('malformed', `${frame.length} bytes for a node id of ${idLength}: expected ${HEADER_BYTES + idLength + MAC_BYTES}`);
  }
  const keyed = (frame[5]! & FLAG_KEYED) !== 0;
  const haveKey = key !== undefined && key.length > 0;
  if (keyed && !haveKey) return refuse('keyed', 'the sender signs its beats with a key and this node has none (--heartbeat-key)');
  if (!keyed && haveKey) return refuse('unkeyed', 'the sender has no --heartbeat-key and this node has one');
  const body = frame.subarray(0, HEADER_BYTES + idLength);
  if (!timingSafeEqual(mac(key, body), frame.subarray(HEADER_BYTES + idLength))) {
    return refuse('bad-mac', 'the HMAC does not match: the sender has another --heartbeat-key');
  }
  return {
    ok: true,
    beat: {
      node: frame.toString('utf8', HEADER_BYTES, HEADER_BYTES + idLength),
      incarnation: frame.readBigUInt64BE(8),
      seq: frame.readBigUInt64BE(16),
      epoch: frame.readBigUInt64BE(24),
      generation: frame.toString('hex', 32, 40),
      ...((frame[5]! & FLAG_PRIMARY) !== 0 ? { primary: true } : {}),
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
