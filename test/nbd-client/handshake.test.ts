/**
 * The client handshake machine on its own: server bytes in, client frames out, no sockets.
 */
import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../../src/nbd/byte-queue.js';
import { HANDSHAKE_TRANSITIONS, HandshakeMachine, type HandshakeOptions } from '../../src/nbd/client-handshake.js';
import { encodeOptionReply } from '../../src/nbd/codec.js';
import { FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, NBDMAGIC, OPT, REP, TF } from '../../src/nbd/constants.js';

function greeting(flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(flags, 16);
  return b;
}

function info(type: number, payload: Buffer): Buffer {
  const b = Buffer.alloc(2 + payload.length);
  b.writeUInt16BE(type, 0);
  payload.copy(b, 2);
  return encodeOptionReply(OPT.GO, REP.INFO, b);
}

function exportInfo(size: number, flags: number): Buffer {
  const p = Buffer.alloc(10);
  p.writeBigUInt64BE(BigInt(size), 0);
  p.writeUInt16BE(flags, 8);
  return info(INFO.EXPORT, p);
}

function blockSize(min: number, pref: number, max: number): Buffer {
  const p = Buffer.alloc(12);
  p.writeUInt32BE(min, 0);
  p.writeUInt32BE(pref, 4);
  p.writeUInt32BE(max, 8);
  return info(INFO.BLOCK_SIZE, p);
}

function metaContext(id: number, name: string): Buffer {
  const p = Buffer.alloc(4 + name.length);
  p.writeUInt32BE(id, 0);
  p.write(name, 4);
  return encodeOptionReply(OPT.SET_META_CONTEXT, REP.META_CONTEXT, p);
}

/** Options the client sent, decoded from its output frames (client flags first). */
function sentOptions(frames: Buffer[]): Array<{ option: number; data: Buffer }> {
  const all = Buffer.concat(frames);
  const out: Array<{ option: number; data: Buffer }> = [];
  let p = 0;
  while (p + 16 <= all.length) {
    if (all.readBigUInt64BE(p) !== IHAVEOPT) {
      p += 4; // client flags
      continue;
    }
    const len = all.readUInt32BE(p + 12);
    out.push({ option: all.readUInt32BE(p + 8), data: all.subarray(p + 16, p + 16 + len) });
    p += 16 + len;
  }
  return out;
}

class Harness {
  readonly m: HandshakeMachine;
  readonly q = new ByteQueue();
  readonly out: Buffer[] = [];

  constructor(options: Partial<HandshakeOptions> = {}) {
    this.m = new HandshakeMachine({ exportName: 'disk', metaContexts: ['base:allocation'], ...options });
  }

  feed(...bufs: Buffer[]): this {
    for (const b of bufs) {
      this.q.push(b);
      this.out.push(...this.m.advance(this.q));
    }
    return this;
  }

  /** feed one byte at a time */
  trickle(...bufs: Buffer[]): this {
    const all = Buffer.concat(bufs);
    for (let i = 0; i < all.length; i++) this.feed(all.subarray(i, i + 1));
    return this;
  }

  options(): number[] {
    return sentOptions(this.out).map((o) => o.option);
  }
}

const FULL = [
  greeting(),
  encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ACK),
  metaContext(3, 'base:allocation'),
  encodeOptionReply(OPT.SET_META_CONTEXT, REP.ACK),
  exportInfo(1 << 20, TF.HAS_FLAGS | TF.SEND_FLUSH | TF.CAN_MULTI_CONN),
  blockSize(512, 4096, 1 << 20),
  info(INFO.NAME, Buffer.from('disk')),
  info(INFO.DESCRIPTION, Buffer.from('a disk')),
  info(42, Buffer.from('unknown info is ignored')),
  encodeOptionReply(OPT.GO, REP.ACK),
];

describe('client handshake machine', () => {
  it('fixed newstyle: NO_ZEROES, STRUCTURED_REPLY, SET_META_CONTEXT, GO with INFO_BLOCK_SIZE', () => {
    const h = new Harness().feed(...FULL);
    expect(h.m.state).toBe('DONE');
    expect(h.out[0]!.readUInt32BE(0)).toBe(3); // C_FIXED_NEWSTYLE | C_NO_ZEROES
    expect(h.options()).toEqual([OPT.STRUCTURED_REPLY, OPT.SET_META_CONTEXT, OPT.GO]);
    const go = sentOptions(h.out)[2]!.data;
    expect(go.readUInt32BE(0)).toBe(4);
    expect(go.toString('utf8', 4, 8)).toBe('disk');
    const n = go.readUInt16BE(8);
    expect([...Array(n).keys()].map((i) => go.readUInt16BE(10 + 2 * i))).toEqual([INFO.BLOCK_SIZE, INFO.NAME, INFO.DESCRIPTION]);
    expect(h.m.result).toMatchObject({
      exportName: 'disk', size: 1 << 20, structured: true, name: 'disk', description: 'a disk', viaExportName: false,
      blockSize: { minimum: 512, preferred: 4096, maximum: 1 << 20 },
    });
    expect([...h.m.result!.contexts]).toEqual([[3, 'base:allocation']]);
  });

  it('the same, one byte at a time', () => {
    const h = new Harness().trickle(...FULL);
    expect(h.m.state).toBe('DONE');
    expect(h.m.result!.size).toBe(1 << 20);
  });

  it('bytes after the handshake stay in the queue for the session', () => {
    const h = new Harness().feed(Buffer.concat([...FULL, Buffer.from('extra')]));
    expect(h.m.state).toBe('DONE');
    expect(h.q.take(h.q.length).toString()).toBe('extra');
  });

  it('plain newstyle (nbdkit --mask-handshake=0): client flags 0, EXPORT_NAME, 124 zero bytes', () => {
    const h = new Harness().feed(greeting(0));
    expect(h.out[0]!.readUInt32BE(0)).toBe(0);
    expect(h.options()).toEqual([OPT.EXPORT_NAME]);
    expect(h.m.state).toBe('EXPORT_NAME_REPLY');
    const reply = Buffer.alloc(134);
    reply.writeBigUInt64BE(4096n, 0);
    reply.writeUInt16BE(TF.HAS_FLAGS | TF.READ_ONLY, 8);
    h.feed(reply.subarray(0, 133));
    expect(h.m.state).toBe('EXPORT_NAME_REPLY');
    h.feed(reply.subarray(133));
    expect(h.m.result).toMatchObject({ size: 4096, flags: TF.HAS_FLAGS | TF.READ_ONLY, structured: false, viaExportName: true, fixedNewstyle: false });
  });

  it('no NO_ZEROES offered (--mask-handshake=1): client flags 1, and GO still works', () => {
    const h = new Harness().feed(greeting(FLAG_FIXED_NEWSTYLE));
    expect(h.out[0]!.readUInt32BE(0)).toBe(1);
  });

  it('structured replies refused (--no-sr): no SET_META_CONTEXT, straight to GO', () => {
    const h = new Harness().feed(greeting(), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ERR_UNSUP));
    expect(h.options()).toEqual([OPT.STRUCTURED_REPLY, OPT.GO]);
    h.feed(exportInfo(512, TF.HAS_FLAGS), encodeOptionReply(OPT.GO, REP.ACK));
    expect(h.m.result).toMatchObject({ structured: false });
    expect(h.m.result!.contexts.size).toBe(0);
  });

  it('SET_META_CONTEXT refused: no contexts, GO anyway', () => {
    const h = new Harness().feed(greeting(), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ACK), encodeOptionReply(OPT.SET_META_CONTEXT, REP.ERR_INVALID));
    expect(h.options()).toEqual([OPT.STRUCTURED_REPLY, OPT.SET_META_CONTEXT, OPT.GO]);
  });

  it('GO refused with ERR_UNSUP: EXPORT_NAME (NO_ZEROES agreed: 10 bytes)', () => {
    const h = new Harness({ structuredReplies: false }).feed(greeting(), encodeOptionReply(OPT.GO, REP.ERR_UNSUP, Buffer.from('old server')));
    expect(h.options()).toEqual([OPT.GO, OPT.EXPORT_NAME]);
    const reply = Buffer.alloc(10);
    reply.writeBigUInt64BE(8192n, 0);
    reply.writeUInt16BE(TF.HAS_FLAGS, 8);
    h.feed(reply);
    expect(h.m.result).toMatchObject({ size: 8192, viaExportName: true });
  });

  it('a server without HAS_FLAGS has no flags', () => {
    const h = new Harness({ structuredReplies: false }).feed(greeting(), exportInfo(512, TF.SEND_FLUSH), encodeOptionReply(OPT.GO, REP.ACK));
    expect(h.m.result!.flags).toBe(0);
  });

  it.each([
    [REP.ERR_SHUTDOWN, 'ERR_NBD_SHUTDOWN', 'ESHUTDOWN', /shutting down: bye/],
    [REP.ERR_UNKNOWN, 'ERR_NBD_NO_EXPORT', 'EINVAL', /no export named "disk": bye/],
    [REP.ERR_TLS_REQD, 'ERR_NBD_TLS_REQUIRED', 'EPERM', /requires TLS/],
    [REP.ERR_POLICY, 'ERR_NBD_HANDSHAKE', 'EIO', /refused export "disk" with ERR_POLICY: bye/],
    [REP.ERR_BLOCK_SIZE_REQD, 'ERR_NBD_HANDSHAKE', 'EIO', /ERR_BLOCK_SIZE_REQD/],
  ])('GO answered %s: %s after a soft disconnect (OPT_ABORT)', (rep, code, errno, message) => {
    const h = new Harness({ structuredReplies: false }).feed(greeting(), encodeOptionReply(OPT.GO, rep, Buffer.from('bye')));
    expect(h.m.state).toBe('FAILED');
    expect(h.m.error).toMatchObject({ code, errno });
    expect(h.m.error!.message).toMatch(message);
    expect(h.options()).toEqual([OPT.GO, OPT.ABORT]);
  });

  it('ERR_SHUTDOWN to STRUCTURED_REPLY: soft disconnect too', () => {
    const h = new Harness().feed(greeting(), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ERR_SHUTDOWN));
    expect(h.m.error).toMatchObject({ code: 'ERR_NBD_SHUTDOWN', errno: 'ESHUTDOWN' });
    expect(h.options()).toEqual([OPT.STRUCTURED_REPLY, OPT.ABORT]);
  });

  it.each([
    ['not NBD', [Buffer.from('SSH-2.0-OpenSSH_9.2\r\n')], /not an NBD server/],
    ['oldstyle', [(() => { const b = Buffer.alloc(152); b.writeBigUInt64BE(NBDMAGIC, 0); b.writeBigUInt64BE(0x00420281861253n, 8); return b; })()], /oldstyle/],
    ['unknown greeting', [(() => { const b = greeting(); b.writeBigUInt64BE(1n, 8); return b; })()], /unknown NBD greeting/],
    ['bad reply magic', [greeting(), Buffer.alloc(20)], /option reply magic is 0x0/],
    ['reply to another option', [greeting(), encodeOptionReply(OPT.GO, REP.ACK)], /answered option 7 while STRUCTURED_REPLY/],
    ['huge option reply', [greeting(), (() => { const b = encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ACK); b.writeUInt32BE(0xffffffff, 16); return b; })()], /claims 4294967295 bytes/],
    ['GO ACK without INFO_EXPORT', [greeting(), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ERR_UNSUP), encodeOptionReply(OPT.GO, REP.ACK)], /without sending INFO_EXPORT/],
    ['INFO_EXPORT of the wrong size', [greeting(), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ERR_UNSUP), info(INFO.EXPORT, Buffer.alloc(4))], /INFO_EXPORT is 6 bytes/],
    ['invalid block sizes', [greeting(), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ERR_UNSUP), blockSize(3, 4096, 65536)], /INFO_BLOCK_SIZE is invalid: minimum 3/],
    ['size beyond 2^53', [greeting(), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ERR_UNSUP), (() => { const p = Buffer.alloc(10); p.writeBigUInt64BE(1n << 60n, 0); return info(INFO.EXPORT, p); })()], /larger than 2\^53/],
    ['ACK where META_CONTEXT is impossible', [greeting(), encodeOptionReply(OPT.STRUCTURED_REPLY, REP.INFO)], /unexpected reply INFO to STRUCTURED_REPLY/],
  ])('%s → ERR_NBD_HANDSHAKE', (_name, bufs, message) => {
    const h = new Harness().feed(...bufs);
    expect(h.m.state).toBe('FAILED');
    expect(h.m.error!.code).toBe('ERR_NBD_HANDSHAKE');
    expect(h.m.error!.message).toMatch(message);
  });

  it('EOF after EXPORT_NAME means the export does not exist', () => {
    const h = new Harness().feed(greeting(0));
    expect(h.m.eof()).toMatchObject({ code: 'ERR_NBD_NO_EXPORT', errno: 'EINVAL' });
    expect(h.m.state).toBe('FAILED');
  });

  it('EOF elsewhere names the state', () => {
    const h = new Harness().feed(greeting());
    expect(h.m.eof('ECONNRESET').message).toMatch(/closed the connection during the handshake \(state OPT_STRUCTURED_REPLY\): ECONNRESET/);
  });

  it('the transition table is closed and DONE/FAILED are final', () => {
    const states = Object.keys(HANDSHAKE_TRANSITIONS);
    for (const next of Object.values(HANDSHAKE_TRANSITIONS).flat()) expect(states).toContain(next);
    expect(HANDSHAKE_TRANSITIONS.DONE).toEqual([]);
    expect(HANDSHAKE_TRANSITIONS.FAILED).toEqual([]);
  });
});
