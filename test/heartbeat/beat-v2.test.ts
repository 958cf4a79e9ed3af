/**
 * Beat version 2 (an export list: name, generation, Outdated, primary per paired export):
 * round trip and totality as properties (fast-check, seeded), the 256-byte bound, and interop
 * with the version 1 codec as session 15 shipped it (fixtures/beat-v1.ts): an old node decodes
 * a new node's version 1 frames (flag bit 2 set) and refuses version 2 as malformed; a new node
 * decodes the old node's frames.
 */
import { createHmac } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { HEARTBEAT_MAX_FRAME_BYTES } from '../../src/api/heartbeat.js';
import { beatBytes, decodeBeat, encodeBeat, fitExports, MAX_BEAT_EXPORT_NAME_BYTES, MAX_BEAT_EXPORTS, type Beat, type BeatExport } from '../../src/heartbeat/beat.js';
import * as v1 from './fixtures/beat-v1.js';

const KEY = Buffer.from('0123456789abcdef0123456789abcdef');
const SEED = { seed: 0x5eed16, numRuns: 400 };
const beat = (over: Partial<Beat> = {}): Beat => ({ node: 'alpha', incarnation: 1_700_000_000_000n, seq: 1n, epoch: 7n, generation: '0123456789abcdef', ...over });

const hex16 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }).map((v) => v.toString(16).padStart(16, '0'));
const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const utf8 = (min: number, max: number): fc.Arbitrary<string> =>
  fc.string({ unit: 'grapheme', maxLength: max }).filter((s) => Buffer.byteLength(s) >= min && Buffer.byteLength(s) <= max);
const exportArb: fc.Arbitrary<BeatExport> = fc.record({ name: utf8(0, MAX_BEAT_EXPORT_NAME_BYTES), generation: hex16, outdated: fc.constantFrom(true, undefined), primary: fc.constantFrom(true, undefined) }).map((e) => {
  const out: BeatExport = { name: e.name, generation: e.generation };
  if (e.outdated) out.outdated = true;
  if (e.primary) out.primary = true;
  return out;
});
/** a beat of either version that fits a frame */
const beatArb: fc.Arbitrary<Beat> = fc
  .record({ node: utf8(1, 64), incarnation: u64, seq: u64, epoch: u64, generation: hex16, primary: fc.boolean(), capable: fc.boolean(), exports: fc.option(fc.array(exportArb, { maxLength: 12 }), { nil: undefined }) })
  .map((r) => {
    const b: Beat = { node: r.node, incarnation: r.incarnation, seq: r.seq, epoch: r.epoch, generation: r.generation };
    if (r.primary) b.primary = true;
    if (r.exports !== undefined) b.exports = fitExports(r.node, r.exports).fit;
    else if (r.capable) b.capable = true;
    return b;
  });
const keyArb = fc.constantFrom<Buffer | undefined>(KEY, undefined);

describe('beat version 2', () => {
  it('round-trips every field of either version, keyed and unkeyed (property)', () => {
    fc.assert(
      fc.property(beatArb, keyArb, (b, key) => {
        const frame = encodeBeat(b, key);
        expect(frame.length).toBe(beatBytes(b.node, b.exports));
        expect(frame.length).toBeLessThanOrEqual(HEARTBEAT_MAX_FRAME_BYTES);
        expect(frame[4]).toBe(b.exports === undefined ? 1 : 2);
        expect(decodeBeat(frame, key)).toEqual({ ok: true, beat: b });
      }),
      SEED,
    );
  });

  it('refuses every truncation and every garbled byte, and never throws on random bytes (property)', () => {
    fc.assert(
      fc.property(beatArb, keyArb, fc.nat(), fc.integer({ min: 1, max: 255 }), (b, key, at, xor) => {
        const frame = encodeBeat(b, key);
        const cut = at % frame.length;
        const short = decodeBeat(frame.subarray(0, cut), key);
        expect(short.ok).toBe(false);
        const bad = Buffer.from(frame);
        bad[at % frame.length]! ^= xor;
        const d = decodeBeat(bad, key);
        expect(d.ok).toBe(false);
        if (!d.ok) expect(['malformed', 'bad-mac', 'keyed', 'unkeyed']).toContain(d.reason);
        // a byte appended to a valid frame
        expect(decodeBeat(Buffer.concat([frame, Buffer.from([xor])]), key).ok).toBe(false);
      }),
      SEED,
    );
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.boolean(), (bytes, v2) => {
        const buf = Buffer.from(bytes);
        if (buf.length >= 5) {
          buf.write('BKHB', 0, 'latin1');
          buf[4] = v2 ? 2 : 1;
        }
        const d = decodeBeat(buf, KEY);
        expect(d.ok).toBe(false);
        if (!d.ok) expect(d.detail.length).toBeGreaterThan(0);
      }),
      SEED,
    );
  });

  it('says what is malformed in a version 2 list: the count, a name, the length', () => {
    const frame = encodeBeat(beat({ exports: [{ name: 'a', generation: '00000000000000aa' }] }), KEY);
    const list = 40 + 5;
    expect(frame[list]).toBe(1);
    const count = Buffer.from(frame);
    count[list] = MAX_BEAT_EXPORTS + 1;
    expect(decodeBeat(count, KEY)).toMatchObject({ ok: false, reason: 'malformed', detail: expect.stringContaining(`${MAX_BEAT_EXPORTS + 1} exports, a beat carries at most ${MAX_BEAT_EXPORTS}`) });
    const two = Buffer.from(frame);
    two[list] = 2;
    expect(decodeBeat(two, KEY)).toMatchObject({ ok: false, reason: 'malformed', detail: expect.stringContaining('export 1 of 2') });
    const zero = Buffer.from(frame);
    zero[list] = 0;
    expect(decodeBeat(zero, KEY)).toMatchObject({ ok: false, reason: 'malformed', detail: expect.stringContaining('11 bytes after the 0 exports') });
    const name = Buffer.from(frame);
    name[list + 2] = 0xff;
    expect(decodeBeat(name, KEY)).toMatchObject({ ok: false, reason: 'malformed', detail: 'version 2 beat of 89 bytes, node id of 5: export 0: its name is not UTF-8' });
    expect(decodeBeat(Buffer.alloc(HEARTBEAT_MAX_FRAME_BYTES + 1), KEY)).toMatchObject({ ok: false, reason: 'malformed', detail: '257 bytes, a beat has at most 256' });
  });

  it('bounds the list by the 256-byte frame: encodeBeat refuses more, fitExports leaves out and says why', () => {
    const node = 'n'.repeat(64);
    const long = { name: 'x'.repeat(MAX_BEAT_EXPORT_NAME_BYTES + 1), generation: '0000000000000001' };
    expect(() => encodeBeat(beat({ exports: [long] }), KEY)).toThrow(/is 65 bytes; a beat carries at most 64/);
    const many = Array.from({ length: 12 }, (_, i) => ({ name: `export-${i}`, generation: '0000000000000001' }));
    expect(() => encodeBeat(beat({ node, exports: many }), KEY)).toThrow(/a path carries at most 256 \(fitExports\)/);
    const { fit, left } = fitExports(node, [long, ...many]);
    // 256 - 136 - 1 = 119 bytes of entries of 18 bytes: 6 fit
    expect(fit.map((e) => e.name)).toEqual(many.slice(0, 6).map((e) => e.name));
    expect(left[0]).toEqual({ name: long.name, why: 'its name is 65 bytes, a beat carries at most 64' });
    expect(left.slice(1).map((l) => l.why)).toEqual(Array(6).fill('the beat would be more than 256 bytes'));
    expect(encodeBeat(beat({ node, exports: fit }), KEY).length).toBe(136 + 1 + 6 * 18);
  });
});

describe('beat versions 1 and 2 in a rolling upgrade', () => {
  it('a new node decodes the old encoder\'s frames: version 1, no export list, not capable', () => {
    const old = { node: 'beta', incarnation: 5n, seq: 9n, epoch: 2n, generation: 'fedcba9876543210', primary: true };
    expect(decodeBeat(v1.encodeBeat(old, KEY), KEY)).toEqual({ ok: true, beat: old });
  });

  it('an old node decodes a new node\'s version 1 frames (flag bit 2 ignored) and refuses version 2 as malformed', () => {
    const capable = encodeBeat(beat({ capable: true, primary: true }), KEY);
    expect(capable[5]).toBe(0b111);
    expect(v1.decodeBeat(capable, KEY)).toEqual({ ok: true, beat: beat({ primary: true }) });
    const two = encodeBeat(beat({ exports: [{ name: 'a', generation: '00000000000000aa', primary: true }] }), KEY);
    expect(v1.decodeBeat(two, KEY)).toEqual({ ok: false, reason: 'malformed', detail: 'version 2, this node speaks 1' });
  });

  it('reads flag bit 2 only in version 1, and ignores unknown export flag bits', () => {
    expect(decodeBeat(encodeBeat(beat({ capable: true }), KEY), KEY)).toEqual({ ok: true, beat: beat({ capable: true }) });
    const frame = encodeBeat(beat({ exports: [{ name: 'b', generation: '00000000000000bb', outdated: true }] }), undefined);
    const flagsAt = 40 + 5 + 1 + 1 + 1 + 8;
    expect(frame[flagsAt]).toBe(1);
    frame[flagsAt] = 0xf1;
    frame[5]! |= 4;
    const body = frame.subarray(0, frame.length - 32);
    // re-sign with the empty key (unkeyed) so only the flag bits differ
    createHmac('sha256', Buffer.alloc(0)).update(body).digest().copy(frame, body.length);
    expect(decodeBeat(frame, undefined)).toEqual({ ok: true, beat: beat({ exports: [{ name: 'b', generation: '00000000000000bb', outdated: true }] }) });
  });
});
