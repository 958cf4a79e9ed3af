// test-bitmap-memory: DirtyBitmap against a naive model (one boolean per granule), at 512 B,
// 64 KiB and 128 KiB granularity, with writes that cover a granule, start or end inside one,
// touch a neighbour, start at 0 and end at the disk's end, on sizes that are and are not
// multiples of the granularity. Seeded: a failure prints its seed and shrunk case.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { DirtyBitmap, MAX_BITS, PAGE_BYTES, popcount32, type Run } from '../../src/bitmap/dirty-bitmap.js';

const SEED = 0x5eed_b17;
const KiB = 1024;

/** One boolean per granule; set rounds outward, clear inward (the last granule ends at the disk's end). */
class Model {
  readonly bits: boolean[];
  enabled = true;
  constructor(
    readonly size: number,
    readonly g: number,
  ) {
    this.bits = new Array(Math.ceil(size / g)).fill(false);
  }
  granuleEnd(i: number): number {
    return Math.min((i + 1) * this.g, this.size);
  }
  fill(offset: number, length: number): void {
    for (let i = 0; i < this.bits.length; i++) if (length > 0 && i * this.g < offset + length && this.granuleEnd(i) > offset) this.bits[i] = true;
  }
  set(offset: number, length: number): void {
    if (this.enabled) this.fill(offset, length);
  }
  clear(offset: number, length: number): void {
    for (let i = 0; i < this.bits.length; i++) if (i * this.g >= offset && this.granuleEnd(i) <= offset + length) this.bits[i] = false;
  }
  dirtyAt(pos: number): boolean {
    return this.bits[Math.floor(pos / this.g)]!;
  }
  runs(offset = 0, length = this.size - offset): Run[] {
    const out: Run[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const i = Math.floor(pos / this.g);
      const stop = Math.min(end, this.granuleEnd(i));
      if (this.bits[i]) {
        const last = out[out.length - 1];
        if (last && last.offset + last.length === pos) last.length += stop - pos;
        else out.push({ offset: pos, length: stop - pos });
      }
      pos = stop;
    }
    return out;
  }
  next(offset: number, end: number, dirty: boolean): number {
    for (let pos = offset; pos < end; pos = this.granuleEnd(Math.floor(pos / this.g))) if (this.dirtyAt(pos) === dirty) return pos;
    return -1;
  }
  bytes(): number {
    let n = 0;
    this.bits.forEach((b, i) => {
      if (b) n += this.granuleEnd(i) - i * this.g;
    });
    return n;
  }
}

function expectSame(b: DirtyBitmap, m: Model): void {
  for (let i = 0; i < m.bits.length; i++) if (b.testBit(i) !== m.bits[i]) expect.fail(`granule ${i}: bitmap ${b.testBit(i)}, model ${m.bits[i]}`);
  expect(b.dirtyGranules).toBe(m.bits.filter(Boolean).length);
  expect(b.dirtyBytes).toBe(m.bytes());
  expect([...b.dirtyRuns()]).toEqual(m.runs());
}

/** Offsets that matter: 0, the end, granule boundaries and their neighbours, anything. */
function position(size: number, g: number): fc.Arbitrary<number> {
  const granules = Math.ceil(size / g);
  return fc.oneof(
    fc.constant(0),
    fc.constant(size),
    fc.integer({ min: 0, max: granules }).map((i) => Math.min(size, i * g)),
    fc.tuple(fc.integer({ min: 0, max: granules }), fc.constantFrom(-1, 1, -511, 511, g / 2)).map(([i, d]) => Math.max(0, Math.min(size, i * g + d))),
    fc.integer({ min: 0, max: size }),
  );
}

type Op =
  | { kind: 'set' | 'clear' | 'fill'; a: number; b: number }
  | { kind: 'setAll' }
  | { kind: 'clearAll' }
  | { kind: 'toggle' };

function ops(size: number, g: number): fc.Arbitrary<Op[]> {
  const range = fc.tuple(position(size, g), position(size, g));
  const op: fc.Arbitrary<Op> = fc.oneof(
    { weight: 6, arbitrary: range.map(([a, b]) => ({ kind: 'set' as const, a, b })) },
    { weight: 4, arbitrary: range.map(([a, b]) => ({ kind: 'clear' as const, a, b })) },
    { weight: 1, arbitrary: range.map(([a, b]) => ({ kind: 'fill' as const, a, b })) },
    { weight: 1, arbitrary: fc.constantFrom({ kind: 'setAll' as const }, { kind: 'clearAll' as const }, { kind: 'toggle' as const }) },
  );
  return fc.array(op, { minLength: 1, maxLength: 40 });
}

function apply(b: DirtyBitmap, m: Model, op: Op): void {
  if (op.kind === 'setAll') {
    b.setAll();
    m.fill(0, m.size);
  } else if (op.kind === 'clearAll') {
    b.clearAll();
    m.clear(0, m.size);
  } else if (op.kind === 'toggle') {
    b.enabled = !b.enabled;
    m.enabled = b.enabled;
  } else {
    const offset = Math.min(op.a, op.b);
    const length = Math.abs(op.a - op.b);
    b[op.kind](offset, length);
    m[op.kind](offset, length);
  }
}

const GRANULARITIES = [512, 64 * KiB, 128 * KiB];

describe('DirtyBitmap against a model', () => {
  for (const g of GRANULARITIES) {
    // multiples and non-multiples of g; one granule; less than one; across 1, 2 and 3 words
    const sizes = [g, 1, g * 37, g * 37 + 1, g * 64 + g / 2 - 3, g * 33 - 1, g * 97 + 511];
    for (const size of sizes) {
      it(`granularity ${g}, size ${size}: equal to the model after every step`, () => {
        fc.assert(
          fc.property(ops(size, g), (list) => {
            const b = new DirtyBitmap(size, { granularity: g });
            const m = new Model(size, g);
            for (const op of list) {
              apply(b, m, op);
              expectSame(b, m);
            }
          }),
          { seed: SEED, numRuns: 60 },
        );
      });
    }
  }

  it('rounds a write outward and a clear inward (worked example at 64 KiB)', () => {
    const g = 64 * KiB;
    const b = new DirtyBitmap(10 * g + 100, { granularity: g });
    b.set(g - 1, 2); // touches granules 0 and 1
    expect([...b.dirtyRuns()]).toEqual([{ offset: 0, length: 2 * g }]);
    b.clear(1, 2 * g - 1); // granule 0 only partly covered: stays dirty
    expect([...b.dirtyRuns()]).toEqual([{ offset: 0, length: g }]);
    b.set(10 * g + 99, 1); // the last, partial granule
    expect(b.dirtyBytes).toBe(g + 100);
    b.clear(10 * g, 100); // whole last granule: it ends at the disk's end
    expect(b.dirtyBytes).toBe(g);
    b.set(0, 0); // empty write: nothing
    expect(b.dirtyGranules).toBe(1);
  });

  it('a disabled bitmap ignores set but not fill, clear, setAll or merge', () => {
    const b = new DirtyBitmap(1 << 20, { granularity: 4096, enabled: false });
    b.set(0, 4096);
    expect(b.dirtyGranules).toBe(0);
    b.fill(0, 4096);
    expect(b.dirtyGranules).toBe(1);
    b.setAll();
    expect(b.dirtyGranules).toBe(256);
  });
});

describe('DirtyBitmap searches, runs, counts and merge (properties)', () => {
  const g = 512;
  const size = g * 300 + 77;
  const granules = Math.ceil(size / g);
  const bitsArb = fc.array(fc.boolean(), { minLength: granules, maxLength: granules });
  // long clean and dirty stretches, as real bitmaps have, as well as noise
  const stretchy = fc.array(fc.tuple(fc.boolean(), fc.integer({ min: 1, max: 90 })), { maxLength: 12 }).map((parts) => {
    const out: boolean[] = [];
    for (const [v, n] of parts) for (let i = 0; i < n && out.length < granules; i++) out.push(v);
    while (out.length < granules) out.push(false);
    return out;
  });
  const pattern = fc.oneof(bitsArb, stretchy);

  function build(bits: boolean[]): [DirtyBitmap, Model] {
    const b = new DirtyBitmap(size, { granularity: g });
    const m = new Model(size, g);
    bits.forEach((v, i) => {
      if (v) {
        b.set(i * g, 1);
        m.set(i * g, 1);
      }
    });
    return [b, m];
  }

  it('nextDirty and nextClean find what a linear scan finds', () => {
    fc.assert(
      fc.property(pattern, fc.integer({ min: 0, max: size }), fc.integer({ min: 0, max: size }), (bits, x, y) => {
        const [b, m] = build(bits);
        const [lo, hi] = [Math.min(x, y), Math.max(x, y)];
        expect(b.nextDirty(lo, hi)).toBe(m.next(lo, hi, true));
        expect(b.nextClean(lo, hi)).toBe(m.next(lo, hi, false));
        expect(b.nextDirty(lo)).toBe(m.next(lo, size, true));
        expect(b.nextClean(lo)).toBe(m.next(lo, size, false));
        expect(b.isDirty(lo, hi - lo)).toBe(hi > lo ? m.next(lo, hi, true) >= 0 : lo < size && m.dirtyAt(lo));
      }),
      { seed: SEED, numRuns: 400 },
    );
  });

  it('dirtyRuns of any window are the model runs, merged, clipped to the window', () => {
    fc.assert(
      fc.property(pattern, fc.integer({ min: 0, max: size }), fc.integer({ min: 0, max: size }), (bits, x, y) => {
        const [b, m] = build(bits);
        const [lo, hi] = [Math.min(x, y), Math.max(x, y)];
        const runs = [...b.dirtyRuns(lo, hi - lo)];
        expect(runs).toEqual(m.runs(lo, hi - lo));
        for (let i = 1; i < runs.length; i++) expect(runs[i]!.offset).toBeGreaterThan(runs[i - 1]!.offset + runs[i - 1]!.length);
      }),
      { seed: SEED, numRuns: 400 },
    );
  });

  it('statusRuns alternate and cover the window exactly', () => {
    fc.assert(
      fc.property(pattern, fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 1, max: size }), (bits, lo, len) => {
        const [b, m] = build(bits);
        const length = Math.min(len, size - lo);
        const runs = b.statusRuns(lo, length);
        expect(runs.reduce((s, [n]) => s + n, 0)).toBe(length);
        let pos = lo;
        runs.forEach(([n, dirty], i) => {
          expect(n).toBeGreaterThan(0);
          if (i > 0) expect(dirty).toBe(!runs[i - 1]![1]);
          expect(m.dirtyAt(pos)).toBe(dirty);
          expect(m.dirtyAt(pos + n - 1)).toBe(dirty);
          pos += n;
        });
      }),
      { seed: SEED, numRuns: 300 },
    );
  });

  it('count and merge (OR) agree with the model; serialize round-trips', () => {
    fc.assert(
      fc.property(pattern, pattern, (x, y) => {
        const [a, ma] = build(x);
        const [b] = build(y);
        a.merge(b);
        y.forEach((v, i) => {
          if (v) ma.set(i * g, 1);
        });
        expectSame(a, ma);
        const again = DirtyBitmap.deserialize(a.serialize(), size, { granularity: g });
        expect(again.equals(a)).toBe(true);
        expect(again.hash()).toBe(a.hash());
      }),
      { seed: SEED, numRuns: 200 },
    );
  });

  it('popcount32 counts bits', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), (x) => {
        expect(popcount32(x)).toBe(x.toString(2).replace(/0/g, '').length);
      }),
      { seed: SEED, numRuns: 500 },
    );
  });
});

describe('DirtyBitmap edges and errors', () => {
  it('serialises as QEMU does: least significant bit first', () => {
    const a = new DirtyBitmap(4 * 1024 * 1024, { granularity: 64 * KiB });
    a.set(0, 64 * KiB);
    expect(a.serialize()[0]).toBe(0x01);
    const b = new DirtyBitmap(64 * KiB, { granularity: 512 });
    b.set(4096, 4096);
    expect([...b.serialize().subarray(0, 2)]).toEqual([0x00, 0xff]);
  });

  it('refuses data with bits past the last granule or too short', () => {
    const data = Buffer.from([0x00, 0x02]); // 9 granules: bit 9 is past the end
    expect(() => DirtyBitmap.deserialize(data, 9 * 512, { granularity: 512 })).toThrow(/past its last granule/);
    expect(() => DirtyBitmap.deserialize(Buffer.alloc(1), 9 * 512, { granularity: 512 })).toThrow(/needed/);
    expect(() => DirtyBitmap.deserialize(Buffer.from([0, 0, 1]), 9 * 512, { granularity: 512 })).toThrow(/past its last granule/);
  });

  it('refuses bad granularity, size, ranges and mismatched merges with typed errors', () => {
    for (const g of [0, 256, 1000, 128 * 1024 * 1024, 0.5]) expect(() => new DirtyBitmap(1 << 20, { granularity: g })).toThrow(BlkrepError);
    expect(() => new DirtyBitmap(-1)).toThrow(/size -1/);
    expect(() => new DirtyBitmap(MAX_BITS * 512 + 1, { granularity: 512 })).toThrow(/use a granularity of at least/);
    const b = new DirtyBitmap(1 << 20);
    try {
      b.set(1 << 20, 1);
      expect.fail('no error');
    } catch (err) {
      expect((err as BlkrepError).code).toBe('ERR_OUT_OF_RANGE');
      expect((err as BlkrepError).message).toContain('1048576');
    }
    expect(() => b.merge(new DirtyBitmap(1 << 20, { granularity: 4096 }))).toThrow(/granularity 4096/);
  });

  it('an empty disk has an empty bitmap', () => {
    const b = new DirtyBitmap(0);
    b.set(0, 0);
    b.setAll();
    expect(b.dirtyGranules).toBe(0);
    expect([...b.dirtyRuns()]).toEqual([]);
    expect(b.nextDirty(0)).toBe(-1);
  });

  it('tracks the 4 KiB pages that change, for the bitmap file', () => {
    const g = 512;
    const perPage = PAGE_BYTES * 8;
    const b = new DirtyBitmap(g * perPage * 3 + g, { granularity: g });
    b.trackChanges();
    expect(b.takeChangedPages()).toEqual([0, 1, 2, 3]);
    expect(b.takeChangedPages()).toEqual([]);
    b.set(g * (perPage - 1), 2 * g); // straddles pages 0 and 1
    b.set(g * perPage * 3, 1);
    expect(b.takeChangedPages()).toEqual([0, 1, 3]);
    b.set(g * (perPage - 1), 1); // already dirty: no change
    expect(b.takeChangedPages()).toEqual([]);
    b.clear(0, g * perPage * 3); // whole pages 0-2, only 0 and 1 had bits
    expect(b.takeChangedPages()).toEqual([0, 1]);
  });
});
