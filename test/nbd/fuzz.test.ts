/**
 * Seeded protocol fuzzing: well-formed handshakes and requests, mutated (flipped bits, random
 * lengths, random option codes and command fields, truncations) and sent over many connections.
 * After each frame the connection must either answer it (well-formed reply echoing the cookie /
 * option) or be closed; every wait is bounded. At the end the server is still up, has no
 * connections left, and a well-formed client reads back the data written before the fuzzing.
 *
 * The PRNG is seeded, so a failure replays exactly: the failing frame is in the error message.
 */
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import {
  CHUNK, CMD, CMD_FLAG, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, INFO, OPT, OPTION_REPLY_MAGIC, REP, REPLY_FLAG_DONE,
  REQUEST_MAGIC, STATE_ZERO, TF,
} from '../../src/nbd/constants.js';
import {
  EofError, RawClient, assembleStructuredRead, blockStatusDescriptors, infoPayload, isFinalOptionReply, metaPayload,
  optionFrame, replyError, u32, type Reply,
} from '../support/raw-client.js';
import { pattern, startServer, waitIdle, type TestServer } from './helpers.js';

vi.setConfig({ testTimeout: 120_000, hookTimeout: 30_000 });

/** fixed; FUZZ_SEED=n explores other sequences */
const SEED = Number(process.env.FUZZ_SEED ?? 0x6e62_6466); // "nbdf"
const TARGET_MALFORMED = 30_000;
const MiB = 1 << 20;
const MAIN_SIZE = 8 * MiB;
const STEP_MS = 5000;

/** export name → size; sizes differ so a GO/EXPORT_NAME answer tells which export we reached */
const SIZES: Record<string, number> = { '': MAIN_SIZE, ro: MAIN_SIZE, scratch: 1 * MiB, scratch4k: 2 * MiB };
const ERRNOS = new Set([1, 22, 28, 75, 95, 108]); // EIO (5) would mean the server failed internally

class Prng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  /** mulberry32 */
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  u32(): number {
    return (this.int(0x10000) * 0x10000 + this.int(0x10000)) >>> 0;
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)]!;
  }
  weighted<T>(choices: Array<[number, T]>): T {
    const total = choices.reduce((s, [w]) => s + w, 0);
    let x = this.next() * total;
    for (const [w, v] of choices) {
      x -= w;
      if (x < 0) return v;
    }
    return choices[choices.length - 1]![1];
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
  flipBits(b: Buffer, count: number, from = 0): void {
    for (let i = 0; i < count; i++) {
      const at = from + this.int(b.length - from);
      b[at]! ^= 1 << this.int(8);
    }
  }
}

interface Stats {
  frames: number;
  optionFrames: number;
  requestFrames: number;
  ok: number;
  /** successful reads and block status answers checked against the shadow */
  verified: number;
  malformed: number;
  connections: number;
  closes: number;
  errors: number;
}

/** One request of a burst, as the server sees it. */
interface Sent {
  cookie: bigint;
  type: number;
  length: number;
  flags: number;
  offset: bigint;
  frame: Buffer;
  mutated: boolean;
  payload?: Buffer;
}

/**
 * What an export must contain: bytes whose value is known (written or zeroed by a request
 * that succeeded and did not race another write in its burst) and bytes that are not (trimmed,
 * or raced).
 */
class Shadow {
  readonly data: Buffer;
  readonly known: Uint8Array;
  constructor(readonly size: number, initial?: (data: Buffer) => void) {
    this.data = Buffer.alloc(size);
    this.known = new Uint8Array(size).fill(1);
    initial?.(this.data);
  }
  set(offset: number, bytes: Buffer): void {
    bytes.copy(this.data, offset);
    this.known.fill(1, offset, offset + bytes.length);
  }
  forget(offset: number, length: number): void {
    this.known.fill(0, offset, offset + length);
  }
  /** first offset where `got` contradicts a known byte, or -1 */
  mismatch(offset: number, got: Buffer): number {
    for (let i = 0; i < got.length; i++) if (this.known[offset + i] && this.data[offset + i] !== got[i]) return offset + i;
    return -1;
  }
}

let S: TestServer;
const clients = new Set<RawClient>();
const MAIN_DATA = pattern(2 * MiB, 0xf022);
const MAIN_TAIL = pattern(65536, 0xf023);
/** shadows by export size (sizes are distinct): the main export is only reachable read-only */
const SHADOWS = new Map<number, Shadow>([
  [MAIN_SIZE, new Shadow(MAIN_SIZE, (d) => {
    MAIN_DATA.copy(d, 0);
    MAIN_TAIL.copy(d, MAIN_SIZE - 65536);
  })],
  [SIZES.scratch!, new Shadow(SIZES.scratch!)],
  [SIZES.scratch4k!, new Shadow(SIZES.scratch4k!)],
]);

beforeAll(async () => {
  const main = new MemoryNode(MAIN_SIZE);
  S = await startServer({
    handshakeTimeoutMs: 10_000,
    exports: [
      { name: '', node: completeNode(main) },
      { name: 'ro', node: completeNode(main), readOnly: true },
      { name: 'scratch', node: completeNode(new MemoryNode(SIZES.scratch!)) },
      { name: 'scratch4k', node: completeNode(new MemoryNode(SIZES.scratch4k!)), minimumBlockSize: 4096 },
    ],
  });
});

afterAll(async () => {
  for (const c of clients) c.destroy();
  await S?.close();
});

async function connect(): Promise<RawClient> {
  const c = await RawClient.connect(S.path, STEP_MS);
  clients.add(c);
  c.socket.once('close', () => clients.delete(c));
  return c;
}

function hex(b: Buffer): string {
  return b.length > 64 ? `${b.subarray(0, 64).toString('hex')}… (${b.length} bytes)` : b.toString('hex');
}

class Fuzzer {
  readonly stats: Stats = { frames: 0, optionFrames: 0, requestFrames: 0, ok: 0, verified: 0, malformed: 0, connections: 0, closes: 0, errors: 0 };
  constructor(private readonly r: Prng) {}

  private fail(what: string, frame: Buffer, err?: unknown): never {
    const why = err instanceof Error ? `: ${err.message}` : '';
    throw new Error(`fuzz frame #${this.stats.frames} (${what}) ${hex(frame)}${why}`);
  }

  /** The connection must be closed by the server, with nothing more sent. */
  private async expectClose(c: RawClient, what: string, frame: Buffer): Promise<void> {
    let rest: Buffer;
    try {
      rest = await c.expectEof(STEP_MS);
    } catch (e) {
      this.fail(`${what}: expected the server to close`, frame, e);
    }
    if (rest.length) this.fail(`${what}: ${rest.length} unexpected bytes before close`, frame);
    this.stats.closes++;
    c.destroy();
  }

  // -------------------------------------------------------------------------------------------
  // handshake

  private name(): Buffer {
    return this.r.weighted<Buffer>([
      [30, Buffer.from('scratch')],
      [15, Buffer.from('scratch4k')],
      [20, Buffer.from('ro')],
      [10, Buffer.from('nope')],
      [5, Buffer.alloc(0)],
      [20, this.r.bytes(this.r.int(24))],
    ]);
  }

  private optionData(code: number): Buffer {
    const r = this.r;
    switch (code) {
      case OPT.INFO:
      case OPT.GO: {
        const infos = Array.from({ length: r.int(5) }, () => (r.chance(0.8) ? r.int(5) : r.int(0x10000)));
        return infoPayload(this.name(), infos);
      }
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT: {
        const qs = Array.from({ length: r.int(4) }, () => r.pick(['base:allocation', 'base:', 'qemu:', 'qemu:dirty-bitmap:', 'x-a:b', '', r.bytes(r.int(12)).toString('latin1')]));
        return metaPayload(this.name().toString('utf8'), qs);
      }
      case OPT.EXPORT_NAME:
        return this.name();
      case 0:
        return r.bytes(r.int(200));
      default:
        return r.chance(0.1) ? r.bytes(r.int(64)) : Buffer.alloc(0);
    }
  }

  /**
   * One connection that starts with a (mutated) handshake. Returns when the connection is over,
   * or hands it on to the request fuzzer when a GO/EXPORT_NAME succeeded.
   */
  async handshakeSession(): Promise<void> {
    const r = this.r;
    this.stats.connections++;
    const c = await connect();
    await c.readGreeting(STEP_MS);
    // client flags
    const flags = r.weighted<number>([
      [70, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES],
      [10, FLAG_C_FIXED_NEWSTYLE],
      [5, 0],
      [15, r.chance(0.5) ? r.u32() : 1 << r.int(32)],
    ]);
    c.sendClientFlags(flags);
    if ((flags & ~3) !== 0) {
      this.stats.frames++;
      this.stats.malformed++;
      return this.expectClose(c, 'client flags with unknown bits', u32(flags));
    }
    const noZeroes = (flags & FLAG_C_NO_ZEROES) !== 0;
    let structured = false;
    const options = 1 + r.int(40);
    for (let i = 0; i < options; i++) {
      this.stats.frames++;
      this.stats.optionFrames++;
      const code = r.weighted<number>([
        [10, OPT.STRUCTURED_REPLY], [8, OPT.LIST], [12, OPT.INFO], [6, OPT.GO], [3, OPT.EXPORT_NAME], [2, OPT.ABORT],
        [5, OPT.STARTTLS], [10, OPT.LIST_META_CONTEXT], [10, OPT.SET_META_CONTEXT], [3, OPT.EXTENDED_HEADERS],
        [3, OPT.PEEK_EXPORT], [10, r.u32()], [3, 0],
      ]);
      let frame = optionFrame(code, this.optionData(code));
      let mutated = false;
      let truncate = false;
      if (r.chance(0.6)) {
        mutated = true;
        const kind = r.weighted<string>([[30, 'flip'], [25, 'length'], [15, 'code'], [20, 'data'], [5, 'truncate'], [5, 'junk']]);
        if (kind === 'flip') r.flipBits(frame, 1 + r.int(3), r.chance(0.8) ? 8 : 0);
        else if (kind === 'length') {
          const len = r.pick([0, frame.length - 16 + 1 + r.int(8), Math.max(0, frame.length - 16 - 1 - r.int(8)), r.int(4096), r.int(70_000), 0xffffffff, r.u32()]);
          frame.writeUInt32BE(len >>> 0, 12);
        } else if (kind === 'code') frame.writeUInt32BE(r.u32(), 8);
        else if (kind === 'data' && frame.length > 16) r.flipBits(frame, 1 + r.int(8), 16);
        else if (kind === 'truncate') truncate = true;
        else if (kind === 'junk') frame = r.bytes(16 + r.int(64));
      }
      const magic = frame.length >= 16 ? frame.readBigUInt64BE(0) : 0n;
      const opt = frame.length >= 16 ? frame.readUInt32BE(8) : 0;
      const declared = frame.length >= 16 ? frame.readUInt32BE(12) : 0;
      if (truncate) {
        this.stats.malformed++;
        c.write(frame.subarray(0, r.int(frame.length)));
        c.end();
        return this.expectClose(c, 'truncated option', frame);
      }
      if (magic !== IHAVEOPT) {
        this.stats.malformed++;
        c.write(frame);
        return this.expectClose(c, 'option with bad magic', frame);
      }
      if (declared > 128 * 1024) {
        this.stats.malformed++;
        c.write(frame.subarray(0, 16 + Math.min(frame.length - 16, 1024)));
        return this.expectClose(c, 'option with a huge length', frame);
      }
      // make the data exactly as long as declared (padding with random bytes)
      const data = frame.length - 16 >= declared ? frame.subarray(16, 16 + declared) : Buffer.concat([frame.subarray(16), r.bytes(declared - (frame.length - 16))]);
      frame = Buffer.concat([frame.subarray(0, 16), data]);
      c.write(frame);

      if (opt === OPT.EXPORT_NAME) {
        let answer: Buffer;
        try {
          answer = await c.readExact(noZeroes ? 10 : 134, STEP_MS);
        } catch (e) {
          if (!(e instanceof EofError)) this.fail('EXPORT_NAME', frame, e);
          this.stats.malformed++;
          return this.expectClose(c, 'EXPORT_NAME of an unknown export', frame);
        }
        if (mutated) this.stats.malformed++;
        if (!noZeroes && !answer.subarray(10).equals(Buffer.alloc(124))) this.fail('EXPORT_NAME padding not zero', frame);
        return this.transmission(c, Number(answer.readBigUInt64BE(0)), answer.readUInt16BE(8), structured);
      }
      if (declared > 64 * 1024) {
        // over the server's option limit: an answer or a close are both fine
        this.stats.malformed++;
        try {
          const replies = await c.readOptionReplies(STEP_MS);
          this.checkOptionReplies(replies, opt, frame);
          continue;
        } catch (e) {
          if (!(e instanceof EofError)) this.fail('long option', frame, e);
          return this.expectClose(c, 'long option', frame);
        }
      }
      let replies;
      try {
        replies = await c.readOptionReplies(STEP_MS);
      } catch (e) {
        this.fail(`option ${opt} must be answered`, frame, e);
      }
      this.checkOptionReplies(replies, opt, frame);
      const last = replies[replies.length - 1]!;
      if (mutated || last.type !== REP.ACK) this.stats.malformed++;
      if (last.type & 0x80000000) this.stats.errors++;
      if (opt === OPT.STRUCTURED_REPLY && last.type === REP.ACK) structured = true;
      if (opt === OPT.ABORT) {
        if (last.type !== REP.ACK) this.fail('ABORT not ACKed', frame);
        return this.expectClose(c, 'ABORT', frame);
      }
      if (opt === OPT.GO && last.type === REP.ACK) {
        const ei = replies.find((x) => x.type === REP.INFO && x.data.readUInt16BE(0) === INFO.EXPORT);
        if (!ei || ei.length !== 12) this.fail('GO without INFO_EXPORT', frame);
        return this.transmission(c, Number(ei.data.readBigUInt64BE(2)), ei.data.readUInt16BE(10), structured);
      }
    }
    c.destroy();
  }

  private checkOptionReplies(replies: Array<{ magic: bigint; option: number; type: number; length: number; data: Buffer }>, opt: number, frame: Buffer): void {
    for (const x of replies) {
      if (x.magic !== OPTION_REPLY_MAGIC) this.fail('option reply magic', frame);
      if (x.option !== opt) this.fail(`option reply echoes ${x.option}, not ${opt}`, frame);
      if (x.type === REP.ERR_TLS_REQD) this.fail('ERR_TLS_REQD in NOTLS mode', frame);
      if (!isFinalOptionReply(x.type) && ![REP.SERVER, REP.INFO, REP.META_CONTEXT].includes(x.type as 2 | 3 | 4)) this.fail(`reply type ${x.type}`, frame);
      if (x.type === REP.INFO && x.data.readUInt16BE(0) === INFO.BLOCK_SIZE && x.length !== 14) this.fail('INFO_BLOCK_SIZE length', frame);
    }
  }

  /** Reached transmission through the fuzzed handshake: fuzz requests unless it is the verified export. */
  private async transmission(c: RawClient, size: number, tflags: number, structured: boolean): Promise<void> {
    c.structured = structured;
    if ((tflags & TF.SEND_DF) !== 0 !== structured) this.fail('SEND_DF does not match structured replies', Buffer.alloc(0));
    const readOnly = (tflags & TF.READ_ONLY) !== 0;
    if (size === MAIN_SIZE && !readOnly) {
      // the export whose data is verified at the end: leave it alone
      c.end();
      return this.expectClose(c, 'end after handshake', Buffer.alloc(0));
    }
    return this.requestSession(c, size, readOnly, 1 + this.r.int(200));
  }

  // -------------------------------------------------------------------------------------------
  // transmission

  /** Well-formed handshake to a fuzzable export, then requests. */
  async cleanSession(): Promise<void> {
    const r = this.r;
    this.stats.connections++;
    const exportName = r.pick(['ro', 'scratch', 'scratch', 'scratch4k']);
    const structured = r.chance(0.6);
    const c = await connect();
    const info = await c.handshake({
      exportName,
      structured,
      metaContexts: structured ? r.pick([['base:allocation'], [], ['base:'], ['base:allocation', 'x-y:z']]) : undefined,
      timeoutMs: STEP_MS,
    });
    return this.requestSession(c, info.size, (info.transmissionFlags & TF.READ_ONLY) !== 0, 50 + r.int(400));
  }

  private offset(size: number): bigint {
    const r = this.r;
    return r.weighted<bigint>([
      [25, 0n],
      [30, BigInt(r.int(size))],
      [10, BigInt(r.int(size / 4096) * 4096)],
      [8, BigInt(size - r.int(8192))],
      [5, BigInt(size)],
      [4, BigInt(size + r.int(8192))],
      [3, 2n ** 32n],
      [3, 2n ** 53n - 1n],
      [3, 2n ** 63n],
      [3, 2n ** 64n - 1n],
      [6, r.u64()],
    ]);
  }

  private length(size: number): number {
    const r = this.r;
    return r.weighted<number>([
      [10, 0],
      [5, 1],
      [15, 512],
      [15, 4096],
      [20, r.int(65536)],
      [8, r.int(size)],
      [3, 32 * MiB],
      [3, 32 * MiB + 1],
      [4, 0xffffffff],
      [6, r.u32()],
      [8, 65536 * (1 + r.int(4))],
    ]);
  }

  private async requestSession(c: RawClient, size: number, readOnly: boolean, count: number): Promise<void> {
    const shadow = SHADOWS.get(size);
    if (!shadow) this.fail(`export of unexpected size ${size}`, Buffer.alloc(0));
    const drain = (burst: Sent[]) => this.drain(c, burst, shadow, readOnly);
    const r = this.r;
    let sent = 0;
    while (sent < count) {
      // a burst of pipelined requests that all expect an answer
      const burst: Sent[] = [];
      const burstSize = 1 + r.int(8);
      for (let i = 0; i < burstSize && sent < count; i++, sent++) {
        this.stats.frames++;
        this.stats.requestFrames++;
        const type = r.weighted<number>([
          [25, CMD.READ], [20, CMD.WRITE], [8, CMD.TRIM], [8, CMD.WRITE_ZEROES], [5, CMD.FLUSH], [5, CMD.CACHE],
          [10, CMD.BLOCK_STATUS], [1, CMD.DISC], [3, 8], [2, 99], [3, r.int(0x10000)],
        ]);
        const flags = r.weighted<number>([[70, 0], [20, r.int(64)], [10, r.int(0x10000)]]);
        let cookie = r.u64();
        const header = Buffer.alloc(28);
        header.writeUInt32BE(REQUEST_MAGIC, 0);
        header.writeUInt16BE(flags, 4);
        header.writeUInt16BE(type, 6);
        header.writeBigUInt64BE(cookie, 8);
        header.writeBigUInt64BE(this.offset(size), 16);
        header.writeUInt32BE(type === CMD.WRITE && r.chance(0.7) ? r.pick([0, 1, 512, 4096, r.int(65536), r.int(256 * 1024)]) : this.length(size), 24);
        let mutated = flags !== 0 && r.chance(0.5); // random flags are mostly invalid
        let truncate = false;
        if (r.chance(0.35)) {
          mutated = true;
          if (r.chance(0.03)) truncate = true;
          else r.flipBits(header, 1 + r.int(3), r.chance(0.9) ? 4 : 0);
        }
        const magic = header.readUInt32BE(0);
        const fType = header.readUInt16BE(6);
        const fFlags = header.readUInt16BE(4);
        const fOffset = header.readBigUInt64BE(16);
        const fLength = header.readUInt32BE(24);
        cookie = header.readBigUInt64BE(8);
        while (burst.some((b) => b.cookie === cookie)) {
          cookie++;
          header.writeBigUInt64BE(cookie, 8);
        }
        if (fOffset + BigInt(fLength) > BigInt(size) || fType > CMD.BLOCK_STATUS) mutated = true;
        if (magic !== REQUEST_MAGIC) {
          await drain(burst);
          this.stats.malformed++;
          c.write(header);
          return this.expectClose(c, 'request with bad magic', header);
        }
        if (fType === CMD.DISC) {
          await drain(burst);
          if (mutated) this.stats.malformed++;
          c.write(header);
          return this.expectClose(c, 'DISC', header);
        }
        let payload: Buffer | undefined;
        if (fType === CMD.WRITE) {
          if (fLength > 32 * MiB) {
            await drain(burst);
            this.stats.malformed++;
            c.write(header);
            return this.expectClose(c, 'WRITE over the maximum payload', header);
          }
          if (fLength > 256 * 1024 || (truncate && fLength > 0)) {
            // send part of the payload, then hang up
            await drain(burst);
            this.stats.malformed++;
            c.write(header, r.bytes(r.int(Math.min(fLength, 4096))));
            c.end();
            return this.expectClose(c, 'truncated WRITE payload', header);
          }
          if (!truncate) payload = r.bytes(fLength);
        }
        if (truncate) {
          await drain(burst);
          this.stats.malformed++;
          c.write(header.subarray(0, r.int(28)));
          c.end();
          return this.expectClose(c, 'truncated request', header);
        }
        c.track(cookie, fType, fLength);
        if (payload) c.write(header, payload);
        else c.write(header);
        burst.push({ cookie, type: fType, length: fLength, flags: fFlags, offset: fOffset, frame: header, mutated, payload });
      }
      await drain(burst);
    }
    // end of the session: politely or not
    if (r.chance(0.5)) {
      c.write(Buffer.from(encodeDisc()));
      return this.expectClose(c, 'DISC at the end', Buffer.alloc(0));
    }
    c.destroy();
  }

  /** Read the replies of a burst (any order), check them, and check/update the shadow. */
  private async drain(c: RawClient, burst: Sent[], shadow: Shadow, readOnly: boolean): Promise<void> {
    const replies: Array<{ b: Sent; reply: Reply; error: number; data?: Buffer }> = [];
    for (const b of burst.splice(0)) {
      let reply: Reply;
      try {
        reply = await c.readReply(b.cookie, STEP_MS);
      } catch (e) {
        this.fail(`request type ${b.type} must be answered`, b.frame, e);
      }
      const data = this.checkReply(c, reply, b);
      const e = replyError(reply);
      if (e !== 0) this.stats.errors++;
      else this.stats.ok++;
      if (b.mutated || e !== 0) this.stats.malformed++;
      replies.push({ b, reply, error: e, data });
    }
    const modifying = (t: number) => t === CMD.WRITE || t === CMD.TRIM || t === CMD.WRITE_ZEROES;
    const writes = replies.filter((x) => x.error === 0 && modifying(x.b.type));
    if (readOnly && writes.length) this.fail('a write succeeded on a read-only export', writes[0]!.b.frame);
    const overlaps = (x: Sent, y: Sent) => x !== y && x.offset < y.offset + BigInt(y.length) && y.offset < x.offset + BigInt(x.length);
    const raced = (x: Sent) => writes.some((w) => overlaps(x, w.b));
    // reads and block status that did not race a write of their burst see the shadow
    for (const { b, error, data, reply } of replies) {
      if (error !== 0 || raced(b) || b.length === 0) continue;
      const off = Number(b.offset);
      if (b.type === CMD.READ || b.type === CMD.BLOCK_STATUS) this.stats.verified++;
      if (b.type === CMD.READ && data) {
        const at = shadow.mismatch(off, data);
        if (at >= 0) this.fail(`READ returned 0x${data[at - off]!.toString(16)} at ${at}, expected 0x${shadow.data[at]!.toString(16)}`, b.frame);
      }
      if (b.type === CMD.BLOCK_STATUS && reply.kind === 'structured') {
        for (const ch of reply.chunks) {
          let at = off;
          for (const [n, fl] of blockStatusDescriptors(ch).descriptors) {
            const end = Math.min(at + n, off + b.length);
            if (fl & STATE_ZERO && shadow.mismatch(at, Buffer.alloc(end - at)) >= 0) this.fail(`BLOCK_STATUS says [${at}, ${end}) reads as zeros`, b.frame);
            at = end;
          }
        }
      }
    }
    for (const { b } of writes) {
      const off = Number(b.offset);
      if (raced(b) || b.type === CMD.TRIM) shadow.forget(off, b.length);
      else if (b.type === CMD.WRITE) shadow.set(off, b.payload!);
      else shadow.set(off, Buffer.alloc(b.length));
    }
  }

  /** Check a reply's form; returns the data of a successful READ. */
  private checkReply(c: RawClient, reply: Reply, b: Sent): Buffer | undefined {
    if (reply.cookie !== b.cookie) this.fail('cookie not echoed', b.frame);
    const e = replyError(reply);
    if (e !== 0 && !ERRNOS.has(e)) this.fail(`error value ${e}`, b.frame);
    if (reply.kind === 'simple') {
      if (c.structured && b.type === CMD.READ) this.fail('simple reply to a structured READ', b.frame);
      if (b.type === CMD.READ && e === 0 && reply.data?.length !== b.length) this.fail('simple READ reply without its data', b.frame);
      return reply.data;
    }
    if (!c.structured) this.fail('structured reply without STRUCTURED_REPLY', b.frame);
    const chunks = reply.chunks;
    chunks.forEach((ch, i) => {
      if (ch.cookie !== b.cookie) this.fail('chunk cookie', b.frame);
      if (((ch.flags & REPLY_FLAG_DONE) !== 0) !== (i === chunks.length - 1)) this.fail('DONE flag placement', b.frame);
      if (ch.type & 0x8000) {
        if (ch.length < 6 || ch.payload.readUInt16BE(4) > 4096 || ch.payload.readUInt32BE(0) === 0) this.fail('malformed error chunk', b.frame);
      }
    });
    if (e !== 0) return undefined;
    if (b.type === CMD.READ) {
      try {
        const { data, dataChunks } = assembleStructuredRead(chunks, Number(b.offset), b.length);
        if (b.flags & CMD_FLAG.DF && b.length > 0 && dataChunks !== 1) throw new Error(`DF read in ${dataChunks} data chunks`);
        return data;
      } catch (err) {
        this.fail('structured read invariants', b.frame, err);
      }
    } else if (b.type === CMD.BLOCK_STATUS) {
      for (const ch of chunks) {
        try {
          const { descriptors } = blockStatusDescriptors(ch);
          if (descriptors.length === 0 || descriptors.some(([n]) => n === 0)) throw new Error('empty descriptor');
          if (b.flags & CMD_FLAG.REQ_ONE && (descriptors.length !== 1 || descriptors[0]![0] > b.length)) throw new Error('REQ_ONE not respected');
        } catch (err) {
          this.fail('block status invariants', b.frame, err);
        }
      }
    } else {
      for (const ch of chunks) if (ch.type !== CHUNK.NONE && !(ch.type & 0x8000)) this.fail(`chunk type ${ch.type} for command ${b.type}`, b.frame);
    }
    return undefined;
  }
}

function encodeDisc(): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(CMD.DISC, 6);
  return b;
}

describe('fuzz', () => {
  it(`survives ≥ ${TARGET_MALFORMED} malformed handshake and request frames (seed 0x${SEED.toString(16)}) and keeps the data`, async () => {
    // data written by a well-formed client before the fuzzing
    {
      const { client } = await RawClient.open(S.path);
      await client.ok(CMD.WRITE, { offset: 0, data: MAIN_DATA });
      await client.ok(CMD.WRITE, { offset: MAIN_SIZE - 65536, data: MAIN_TAIL });
      await client.ok(CMD.FLUSH);
      client.destroy();
    }
    const fuzzer = new Fuzzer(new Prng(SEED));
    const started = Date.now();
    while (fuzzer.stats.malformed < TARGET_MALFORMED) {
      if (fuzzer.stats.connections % 5 < 3) await fuzzer.handshakeSession();
      else await fuzzer.cleanSession();
      if (Date.now() - started > 90_000) throw new Error(`fuzzing too slow: ${JSON.stringify(fuzzer.stats)}`);
    }
    const { stats } = fuzzer;
    expect(stats.malformed).toBeGreaterThanOrEqual(TARGET_MALFORMED);
    expect(stats.frames).toBeGreaterThanOrEqual(stats.malformed);
    expect(stats.closes).toBeGreaterThan(100);
    expect(stats.errors).toBeGreaterThan(1000);

    for (const c of clients) c.destroy();
    await waitIdle(S.srv);
    // the server still serves, and the data written before the fuzzing is intact
    const { client } = await RawClient.open(S.path, { structured: true });
    expect((await client.read(0, 2 * MiB)).equals(MAIN_DATA)).toBe(true);
    expect((await client.read(2 * MiB, 65536)).equals(Buffer.alloc(65536))).toBe(true);
    expect((await client.read(MAIN_SIZE - 65536, 65536)).equals(MAIN_TAIL)).toBe(true);
    client.destroy();
    const simple = await RawClient.open(S.path, { exportName: 'scratch' });
    const d = pattern(65536, 1);
    await simple.client.ok(CMD.WRITE, { offset: 0, data: d });
    expect((await simple.client.read(0, 65536)).equals(d)).toBe(true);
    simple.client.destroy();
    console.log(`fuzz: ${JSON.stringify(stats)} in ${Date.now() - started} ms`);
  });
});
