/**
 * Table and property tests for the byte queue, the NBD frame encoders/decoders and the
 * meta-context request parser.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { ByteQueue } from '../../src/nbd/byte-queue.js';
import {
  CHUNK_HEADER_LENGTH, GREETING_LENGTH, OPTION_HEADER_LENGTH, REQUEST_LENGTH, SIMPLE_REPLY_LENGTH,
  decodeOptionHeader, decodeOptionReplyHeader, decodeRequest, encodeBlockStatusChunk, encodeChunkHeader,
  encodeDataChunkHeader, encodeErrorChunk, encodeGreeting, encodeHoleChunk, encodeMessage, encodeNoneChunk,
  encodeOption, encodeOptionReply, encodeRequest, encodeSimpleReply,
} from '../../src/nbd/codec.js';
import {
  CHUNK, IHAVEOPT, OPTION_REPLY_MAGIC, REPLY_FLAG_DONE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
} from '../../src/nbd/constants.js';
import { parseMetaContextRequest } from '../../src/nbd/server-session.js';

const SEED = 20240611;
const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
};
const str = (s: string) => Buffer.concat([u32(Buffer.byteLength(s)), Buffer.from(s)]);

// =================================================================================================
describe('ByteQueue', () => {
  type Op = ['take' | 'peek' | 'skip', number, string | number];
  const cases: Array<{ name: string; chunks: string[]; ops: Op[]; left: number }> = [
    {
      name: 'take within and across chunk boundaries',
      chunks: ['abc', 'de', 'fghij'],
      ops: [['take', 2, 'ab'], ['take', 2, 'cd'], ['take', 4, 'efgh'], ['take', 2, 'ij']],
      left: 0,
    },
    {
      name: 'take spanning three chunks',
      chunks: ['a', 'b', 'c', 'def'],
      ops: [['take', 4, 'abcd'], ['take', 2, 'ef']],
      left: 0,
    },
    {
      name: 'peek does not consume, within and across chunks',
      chunks: ['abc', 'de', 'fghij'],
      ops: [['peek', 2, 'ab'], ['peek', 5, 'abcde'], ['peek', 10, 'abcdefghij'], ['take', 1, 'a'], ['peek', 3, 'bcd']],
      left: 9,
    },
    {
      name: 'skip within, across, and past the end',
      chunks: ['abc', 'de', 'fghij'],
      ops: [['skip', 1, 1], ['take', 1, 'b'], ['skip', 3, 3], ['take', 2, 'fg'], ['skip', 100, 3], ['skip', 1, 0]],
      left: 0,
    },
    {
      name: 'skip exactly to a chunk boundary, then take',
      chunks: ['abc', 'de'],
      ops: [['skip', 3, 3], ['peek', 2, 'de'], ['take', 2, 'de']],
      left: 0,
    },
    {
      name: 'take 0 and empty chunks',
      chunks: ['', 'ab', '', 'c'],
      ops: [['take', 0, ''], ['take', 3, 'abc'], ['take', 0, '']],
      left: 0,
    },
  ];
  it.each(cases)('$name', ({ chunks, ops, left }) => {
    const q = new ByteQueue();
    for (const c of chunks) q.push(Buffer.from(c));
    for (const [op, n, want] of ops) {
      if (op === 'take') expect(q.take(n).toString()).toBe(want);
      else if (op === 'peek') expect(q.peek(n).toString()).toBe(want);
      else expect(q.skip(n)).toBe(want);
    }
    expect(q.length).toBe(left);
  });

  it('take/peek inside one chunk return views without copying', () => {
    const chunk = Buffer.from('abcdef');
    const q = new ByteQueue();
    q.push(chunk);
    q.push(Buffer.from('gh'));
    expect(q.contiguous(6)).toBe(true);
    expect(q.contiguous(7)).toBe(false);
    const p = q.peek(3);
    expect(p.buffer).toBe(chunk.buffer);
    const t = q.take(4);
    expect(t.buffer).toBe(chunk.buffer);
    expect(t.byteOffset).toBe(chunk.byteOffset);
    expect(q.contiguous(2)).toBe(true);
    expect(q.contiguous(3)).toBe(false);
  });

  it('take across chunks copies into the buffer given', () => {
    const q = new ByteQueue();
    q.push(Buffer.from('abc'));
    q.push(Buffer.from('defg'));
    const into = Buffer.alloc(16, 0x2e);
    const t = q.take(5, into);
    expect(t.toString()).toBe('abcde');
    expect(t.buffer).toBe(into.buffer);
    expect(t.byteOffset).toBe(into.byteOffset);
    expect(into.toString()).toBe('abcde...........');
    expect(q.take(2).toString()).toBe('fg');
  });

  it('clear empties the queue', () => {
    const q = new ByteQueue();
    q.push(Buffer.from('abc'));
    q.take(1);
    q.clear();
    expect(q.length).toBe(0);
    q.push(Buffer.from('xy'));
    expect(q.take(2).toString()).toBe('xy');
  });

  it('behaves like one concatenated buffer under random pushes, takes, peeks and skips (seeded)', () => {
    const op = fc.oneof(
      fc.record({ kind: fc.constant('push' as const), data: fc.uint8Array({ maxLength: 40 }) }),
      fc.record({ kind: fc.constant('take' as const), n: fc.nat(60) }),
      fc.record({ kind: fc.constant('peek' as const), n: fc.nat(60) }),
      fc.record({ kind: fc.constant('skip' as const), n: fc.nat(60) }),
      fc.record({ kind: fc.constant('takeInto' as const), n: fc.nat(60) }),
    );
    fc.assert(
      fc.property(fc.array(op, { maxLength: 80 }), (ops) => {
        const q = new ByteQueue();
        let model = Buffer.alloc(0);
        for (const o of ops) {
          if (o.kind === 'push') {
            q.push(Buffer.from(o.data));
            model = Buffer.concat([model, Buffer.from(o.data)]);
          } else if (o.kind === 'skip') {
            expect(q.skip(o.n)).toBe(Math.min(o.n, model.length));
            model = model.subarray(Math.min(o.n, model.length));
          } else {
            // callers ensure n ≤ length (and peek(0) needs a non-empty queue)
            const n = Math.min(o.n, model.length);
            if (o.kind === 'peek') {
              if (model.length === 0) continue;
              expect(q.peek(n).equals(model.subarray(0, n))).toBe(true);
            } else {
              const got = o.kind === 'takeInto' ? q.take(n, Buffer.alloc(n + 3)) : q.take(n);
              expect(got.length).toBe(n);
              expect(got.equals(model.subarray(0, n))).toBe(true);
              model = model.subarray(n);
            }
          }
          expect(q.length).toBe(model.length);
        }
      }),
      { seed: SEED, numRuns: 500 },
    );
  });
});

// =================================================================================================
describe('codec: exact bytes', () => {
  it('greeting: NBDMAGIC, IHAVEOPT, u16 flags (18 bytes)', () => {
    const g = encodeGreeting(3);
    expect(g.length).toBe(GREETING_LENGTH);
    expect(g.equals(hex('4e42444d41474943 49484156454f5054 0003'))).toBe(true);
    expect(g.subarray(0, 16).toString('latin1')).toBe('NBDMAGICIHAVEOPT');
  });

  it.each([
    ['simple reply, success', encodeSimpleReply(0, 0x0102030405060708n), '67446698 00000000 0102030405060708'],
    ['simple reply, EINVAL, cookie 2^64-1', encodeSimpleReply(22, 0xffffffffffffffffn), '67446698 00000016 ffffffffffffffff'],
    ['option', encodeOption(7, Buffer.from('ab')), '49484156454f5054 00000007 00000002 6162'],
    ['option with code 2^32-1', encodeOption(0xffffffff), '49484156454f5054 ffffffff 00000000'],
    ['option reply ACK', encodeOptionReply(8, 1), '0003e889045565a9 00000008 00000001 00000000'],
    ['option reply error with text', encodeOptionReply(5, 0x80000002, Buffer.from('no')), '0003e889045565a9 00000005 80000002 00000002 6e6f'],
    ['request', encodeRequest(0x0001, 1, 0xaan, 4096, 512), '25609513 0001 0001 00000000000000aa 0000000000001000 00000200'],
    ['request, bigint offset 2^64-1, length 2^32-1', encodeRequest(0xffff, 0xffff, 0n, 0xffffffffffffffffn, 0xffffffff), '25609513 ffff ffff 0000000000000000 ffffffffffffffff ffffffff'],
    ['NONE chunk', encodeNoneChunk(9n), '668e33ef 0001 0000 0000000000000009 00000000'],
    ['data chunk header, not done', encodeDataChunkHeader(1n, 512, 100, false), '668e33ef 0000 0001 0000000000000001 0000006c 0000000000000200'],
    ['data chunk header, done', encodeDataChunkHeader(1n, 0, 1, true), '668e33ef 0001 0001 0000000000000001 00000009 0000000000000000'],
    ['hole chunk', encodeHoleChunk(2n, 65536, 4096, true), '668e33ef 0001 0002 0000000000000002 0000000c 0000000000010000 00001000'],
    ['error chunk', encodeErrorChunk(3n, 5, 'io'), '668e33ef 0001 8001 0000000000000003 00000008 00000005 0002 696f'],
    ['error chunk with offset', encodeErrorChunk(3n, 5, '', 4096), '668e33ef 0001 8002 0000000000000003 0000000e 00000005 0000 0000000000001000'],
    ['block status chunk', encodeBlockStatusChunk(4n, 1, [[4096, 3], [512, 0]], true), '668e33ef 0001 0005 0000000000000004 00000014 00000001 00001000 00000003 00000200 00000000'],
    ['chunk header with room for a payload', encodeChunkHeader(0, 1, 5n, 8, 8).subarray(0, 20), '668e33ef 0000 0001 0000000000000005 00000008'],
  ])('%s', (_name, got, want) => {
    expect(got.toString('hex')).toBe(hex(want).toString('hex'));
  });

  it('frame lengths', () => {
    expect(OPTION_HEADER_LENGTH).toBe(16);
    expect(REQUEST_LENGTH).toBe(28);
    expect(SIMPLE_REPLY_LENGTH).toBe(16);
    expect(CHUNK_HEADER_LENGTH).toBe(20);
    expect(encodeRequest(0, 0, 0n, 0, 0).length).toBe(28);
  });
});

describe('codec: round trips (seeded)', () => {
  const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });

  it('request encode → decode', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }), u64, u64, fc.integer({ min: 0, max: 0xffffffff }), (flags, type, cookie, offset, length) => {
        const d = decodeRequest(encodeRequest(flags, type, cookie, offset, length));
        expect(d.magic).toBe(REQUEST_MAGIC);
        expect(d.flags).toBe(flags);
        expect(d.type).toBe(type);
        expect(d.cookie).toBe(cookie);
        expect(d.rawOffset).toBe(offset);
        expect(d.offset).toBe(offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset));
        expect(d.length).toBe(length);
      }),
      { seed: SEED, numRuns: 1000 },
    );
  });

  it.each([
    [0n, 0],
    [2n ** 53n - 1n, Number.MAX_SAFE_INTEGER],
    [2n ** 53n, Number.MAX_SAFE_INTEGER],
    [2n ** 64n - 1n, Number.MAX_SAFE_INTEGER],
  ])('decodeRequest keeps offset %s exact in rawOffset and clamps offset', (raw, offset) => {
    const d = decodeRequest(encodeRequest(0, 0, 0n, raw, 0));
    expect(d.rawOffset).toBe(raw);
    expect(d.offset).toBe(offset);
  });

  it('option encode → decode header', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), fc.uint8Array({ maxLength: 300 }), (option, data) => {
        const b = encodeOption(option, Buffer.from(data));
        const h = decodeOptionHeader(b);
        expect(h).toEqual({ magic: IHAVEOPT, option, length: data.length });
        expect(b.subarray(OPTION_HEADER_LENGTH).equals(Buffer.from(data))).toBe(true);
      }),
      { seed: SEED, numRuns: 500 },
    );
  });

  it('option reply encode → decode header', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: 0xffffffff }), fc.uint8Array({ maxLength: 300 }), (option, type, data) => {
        const b = encodeOptionReply(option, type, Buffer.from(data));
        expect(decodeOptionReplyHeader(b)).toEqual({ magic: OPTION_REPLY_MAGIC, option, type, length: data.length });
        expect(b.subarray(20).equals(Buffer.from(data))).toBe(true);
      }),
      { seed: SEED, numRuns: 500 },
    );
  });

  it('chunks decode back to what was encoded', () => {
    fc.assert(
      fc.property(u64, fc.nat(2 ** 40), fc.integer({ min: 1, max: 0xffffffff }), fc.boolean(), (cookie, offset, length, done) => {
        const hole = encodeHoleChunk(cookie, offset, length, done);
        expect(hole.readUInt32BE(0)).toBe(STRUCTURED_REPLY_MAGIC);
        expect(hole.readUInt16BE(4)).toBe(done ? REPLY_FLAG_DONE : 0);
        expect(hole.readUInt16BE(6)).toBe(CHUNK.OFFSET_HOLE);
        expect(hole.readBigUInt64BE(8)).toBe(cookie);
        expect(hole.readUInt32BE(16)).toBe(12);
        expect(hole.length).toBe(32);
        expect(Number(hole.readBigUInt64BE(20))).toBe(offset);
        expect(hole.readUInt32BE(28)).toBe(length);
        const data = encodeDataChunkHeader(cookie, offset, length - 8 > 0 ? length - 8 : 1, done);
        expect(data.length).toBe(28);
        expect(data.readUInt32BE(16)).toBe(8 + (length - 8 > 0 ? length - 8 : 1));
        expect(Number(data.readBigUInt64BE(20))).toBe(offset);
      }),
      { seed: SEED, numRuns: 300 },
    );
  });

  it('block status chunk: length 4 + 8N, descriptors in order', () => {
    fc.assert(
      fc.property(fc.nat(0xffffffff), fc.array(fc.tuple(fc.integer({ min: 1, max: 0xffffffff }), fc.nat(3)), { minLength: 1, maxLength: 50 }), (id, ext) => {
        const b = encodeBlockStatusChunk(1n, id, ext, true);
        expect(b.readUInt32BE(16)).toBe(4 + 8 * ext.length);
        expect(b.length).toBe(20 + 4 + 8 * ext.length);
        expect(b.readUInt32BE(20)).toBe(id);
        ext.forEach(([len, fl], i) => {
          expect(b.readUInt32BE(24 + 8 * i)).toBe(len);
          expect(b.readUInt32BE(28 + 8 * i)).toBe(fl);
        });
      }),
      { seed: SEED, numRuns: 200 },
    );
  });

  it('simple reply magic and layout', () => {
    const b = encodeSimpleReply(108, 42n);
    expect(b.readUInt32BE(0)).toBe(SIMPLE_REPLY_MAGIC);
    expect(b.readUInt32BE(4)).toBe(108);
    expect(b.readBigUInt64BE(8)).toBe(42n);
  });
});

describe('codec: error messages are NBD strings', () => {
  const valid = (b: Buffer) => Buffer.from(b.toString('utf8'), 'utf8').equals(b) && !b.includes(0) && b.length <= 4096;
  it.each([
    ['short ASCII', 'oops', 4],
    ['NUL replaced', 'a\u0000b', 5],
    ['long ASCII cut to 4096', 'x'.repeat(5000), 4096],
    ['3-byte characters cut at a boundary', '€'.repeat(2000), 4095],
    ['4-byte characters cut at a boundary', '😀'.repeat(1100), 4096],
    ['4-byte characters, one byte off', 'a' + '😀'.repeat(1100), 4093],
    ['2-byte characters', 'é'.repeat(3000), 4096],
    ['lone surrogate', 'a\ud800b', 5],
    ['exactly 4096', 'y'.repeat(4096), 4096],
  ])('%s', (_n, message, length) => {
    const m = encodeMessage(message);
    expect(m.length).toBe(length);
    expect(valid(m)).toBe(true);
    const chunk = encodeErrorChunk(1n, 5, message);
    expect(chunk.readUInt16BE(24)).toBe(length);
    expect(chunk.readUInt32BE(16)).toBe(6 + length);
    expect(chunk.subarray(26).equals(m)).toBe(true);
  });

  it('any string becomes a valid message (seeded)', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 3000 }), (s) => {
        expect(valid(encodeMessage(s))).toBe(true);
      }),
      { seed: SEED, numRuns: 300 },
    );
  });
});

// =================================================================================================
describe('parseMetaContextRequest', () => {
  const good = (name: string, queries: string[]) => Buffer.concat([str(name), u32(queries.length), ...queries.map(str)]);

  it.each([
    ['no queries', good('', []), { exportName: '', queries: [] }],
    ['one query', good('disk', ['base:allocation']), { exportName: 'disk', queries: ['base:allocation'] }],
    ['several, with empty and unicode ones', good('é', ['base:', '', 'x-ü:v']), { exportName: 'é', queries: ['base:', '', 'x-ü:v'] }],
    ['name of 4096 bytes', good('n'.repeat(4096), ['q']), { exportName: 'n'.repeat(4096), queries: ['q'] }],
    ['query of 4096 bytes', good('', ['q'.repeat(4096)]), { exportName: '', queries: ['q'.repeat(4096)] }],
  ])('valid: %s', (_n, data, want) => {
    expect(parseMetaContextRequest(data)).toEqual(want);
  });

  it.each([
    ['empty', Buffer.alloc(0)],
    ['7 bytes', Buffer.alloc(7)],
    ['name length past the end', Buffer.concat([u32(1), u32(0)])],
    ['name length 2^32-1', Buffer.concat([u32(0xffffffff), u32(0), Buffer.alloc(16)])],
    ['name over 4096 bytes', Buffer.concat([str('n'.repeat(4097)), u32(0)])],
    ['count 1, no query', Buffer.concat([str(''), u32(1)])],
    ['count 2, one query', Buffer.concat([str(''), u32(2), str('base:allocation')])],
    ['count 2^32-1, one query', Buffer.concat([str(''), u32(0xffffffff), str('base:allocation')])],
    ['query length field cut short', Buffer.concat([str(''), u32(1), Buffer.alloc(3)])],
    ['query length past the end', Buffer.concat([str(''), u32(1), u32(100), Buffer.from('abc')])],
    ['query length 2^32-1', Buffer.concat([str(''), u32(1), u32(0xffffffff), Buffer.from('abc')])],
    ['query over 4096 bytes', Buffer.concat([str(''), u32(1), str('q'.repeat(4097))])],
    ['trailing bytes after the queries', Buffer.concat([good('', ['base:allocation']), Buffer.from([0])])],
    ['trailing bytes with zero queries', Buffer.concat([good('', []), Buffer.from('junk')])],
    ['one byte short', good('', ['base:allocation']).subarray(0, -1)],
  ])('malformed: %s → a reason, not a parse', (_n, data) => {
    const r = parseMetaContextRequest(data);
    expect(typeof r).toBe('string');
    expect((r as string).length).toBeGreaterThan(0);
  });

  it('never throws on random bytes or on truncations of valid payloads (seeded)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (data) => {
        const r = parseMetaContextRequest(Buffer.from(data));
        expect(typeof r === 'string' || (typeof r === 'object' && Array.isArray(r.queries))).toBe(true);
      }),
      { seed: SEED, numRuns: 1000 },
    );
    const full = good('export', ['base:allocation', 'qemu:dirty-bitmap:b', 'x-a:b']);
    for (let k = 0; k < full.length; k++) expect(typeof parseMetaContextRequest(full.subarray(0, k))).toBe('string');
  });
});
