import { mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import type { Extent } from '../../src/api/block.js';
import { BlkrepError } from '../../src/api/errors.js';
import { MemoryNode } from '../../src/block/memory.js';
import { loadNative, nativeStatus, type SparseOps } from '../../src/block/native.js';
import { openImage } from '../../src/block/open.js';
import { RawNode, ZERO_DETECT_MAX } from '../../src/block/raw.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
let counter = 0;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'blkrep-raw-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** A fresh sparse file of `size` bytes, optionally with contents at offset 0. */
function makeFile(size: number, contents?: Buffer): string {
  const path = join(dir, `img-${++counter}.raw`);
  writeFileSync(path, contents ?? Buffer.alloc(0));
  truncateSync(path, size);
  return path;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 7 + 1) & 0xff || 1;
  return b;
}

function isZero(b: Buffer): boolean {
  return b.every((x) => x === 0);
}

async function rejection(p: Promise<unknown>): Promise<BlkrepError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(BlkrepError);
    return err as BlkrepError;
  }
  throw new Error('expected a rejection');
}

/** extents must cover exactly [offset, offset+length), be coalesced, and zero runs must read zeros */
async function checkExtents(node: RawNode, offset: number, length: number): Promise<Extent[]> {
  const runs = await node.extents(offset, length);
  expect(runs.reduce((s, r) => s + r.length, 0)).toBe(length);
  for (let i = 0; i < runs.length; i++) {
    expect(runs[i]!.length).toBeGreaterThan(0);
    if (i > 0) expect(runs[i]!.hole !== runs[i - 1]!.hole || runs[i]!.zero !== runs[i - 1]!.zero).toBe(true);
    if (runs[i]!.hole) expect(runs[i]!.zero).toBe(true);
  }
  let pos = offset;
  for (const r of runs) {
    if (r.zero) expect(isZero(await node.read(pos, r.length))).toBe(true);
    pos += r.length;
  }
  return runs;
}

const native = loadNative();
const modes: Array<{ name: string; native: SparseOps | null }> = [
  { name: 'native addon', native },
  { name: 'portable fallback', native: null },
];

if (!native) console.warn(`raw.test: native addon unavailable, its suite is skipped: ${nativeStatus().reason}`);

// The addon is part of the product: where the machine can build it (CI installs make, g++ and
// python3), a missing addon is a failure, not a skipped suite.
it('the native addon is built and loads', () => {
  if (process.env.CI || process.env.BLKREP_REQUIRE_NATIVE) expect(nativeStatus().reason ?? 'loaded').toBe('loaded');
  expect(typeof nativeStatus().loaded).toBe('boolean');
});

describe.each(modes)('RawNode with $name', ({ name, native: ops }) => {
  const sparse = ops !== null;
  const open = (path: string, readOnly = false) => RawNode.open(path, { readOnly, native: ops });

  describe.skipIf(name === 'native addon' && !native)('driver', () => {
    it('reports size, limits and capabilities', async () => {
      const node = await open(makeFile(3 * MiB + 17));
      try {
        expect(node.driver).toBe('raw');
        expect(node.size).toBe(3 * MiB + 17);
        expect(node.limits).toEqual({ minimum: 1, preferred: 4096, maximum: 32 * MiB });
        expect(node.caps).toEqual({
          canWrite: true, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: sparse,
          canMultiConn: true, canExtents: true, canCache: true, cheapExtents: sparse,
        });
        expect(node.sparse).toBe(sparse);
        expect(node.isBlockDevice).toBe(false);
      } finally {
        await node.close();
      }
    });

    it('round-trips writes byte for byte', async () => {
      const size = 2 * MiB + 123;
      const path = makeFile(size);
      const node = await open(path);
      const model = Buffer.alloc(size);
      try {
        const writes: Array<[number, number]> = [[0, 1], [1, 4095], [4096, 65536], [size - 100, 100], [777_777, 300_001], [MiB - 3, 7]];
        for (const [i, [offset, length]] of writes.entries()) {
          const data = randomBytes(length);
          await node.write(offset, data, { fua: i % 2 === 0 });
          data.copy(model, offset);
        }
        await node.flush();
        expect((await node.read(0, size)).equals(model)).toBe(true);
        expect((await node.read(777_000, 2000)).equals(model.subarray(777_000, 779_000))).toBe(true);
        expect((await node.read(size, 0)).length).toBe(0);
      } finally {
        await node.close();
      }
      // and it reached the file
      const reopened = await open(path, true);
      try {
        expect((await reopened.read(0, size)).equals(model)).toBe(true);
      } finally {
        await reopened.close();
      }
    });

    it('reads zeros past the end of a file that shrank', async () => {
      const path = makeFile(256 * KiB, pattern(256 * KiB, 1));
      const node = await open(path);
      try {
        truncateSync(path, 100 * KiB + 5);
        const data = await node.read(64 * KiB, 192 * KiB);
        expect(data.subarray(0, 36 * KiB + 5).equals(pattern(256 * KiB, 1).subarray(64 * KiB, 100 * KiB + 5))).toBe(true);
        expect(isZero(data.subarray(36 * KiB + 5))).toBe(true);
        await checkExtents(node, 0, 256 * KiB);
      } finally {
        await node.close();
      }
    });

    it('rejects writes beyond the end with ENOSPC and reads with EINVAL', async () => {
      const path = makeFile(64 * KiB);
      const node = await open(path);
      try {
        const w = await rejection(node.write(64 * KiB - 10, Buffer.alloc(11)));
        expect(w.errno).toBe('ENOSPC');
        expect(w.code).toBe('ERR_OUT_OF_RANGE');
        expect(w.message).toContain(String(64 * KiB));
        expect((await rejection(node.writeZeroes(64 * KiB, 1))).errno).toBe('ENOSPC');
        expect((await rejection(node.read(64 * KiB - 1, 2))).errno).toBe('EINVAL');
        expect((await rejection(node.read(-1, 1))).errno).toBe('EINVAL');
        expect((await rejection(node.extents(0, 64 * KiB + 1))).errno).toBe('EINVAL');
        expect((await rejection(node.trim(64 * KiB, 4096))).code).toBe('ERR_OUT_OF_RANGE');
        expect(statSync(path).size).toBe(64 * KiB);
      } finally {
        await node.close();
      }
    });

    it(sparse ? 'punches holes on trim: extents report them and they read as zeros' : 'treats trim as a no-op', async () => {
      const size = 1 * MiB;
      const path = makeFile(size, pattern(size, 2));
      const node = await open(path);
      try {
        expect(await checkExtents(node, 0, size)).toEqual([{ length: size, hole: false, zero: false }]);
        await node.trim(256 * KiB, 128 * KiB, { fua: true });
        const data = await node.read(0, size);
        if (sparse) {
          expect(isZero(data.subarray(256 * KiB, 384 * KiB))).toBe(true);
          expect(data.subarray(0, 256 * KiB).equals(pattern(size, 2).subarray(0, 256 * KiB))).toBe(true);
          expect(data.subarray(384 * KiB).equals(pattern(size, 2).subarray(384 * KiB))).toBe(true);
          expect(await checkExtents(node, 0, size)).toEqual([
            { length: 256 * KiB, hole: false, zero: false },
            { length: 128 * KiB, hole: true, zero: true },
            { length: 640 * KiB, hole: false, zero: false },
          ]);
          expect(await checkExtents(node, 300 * KiB, 10)).toEqual([{ length: 10, hole: true, zero: true }]);
        } else {
          expect(data.equals(pattern(size, 2))).toBe(true);
        }
      } finally {
        await node.close();
      }
    });

    it('writeZeroes reads as zeros (may punch a hole)', async () => {
      const size = 512 * KiB;
      const path = makeFile(size, pattern(size, 3));
      const node = await open(path);
      try {
        const before = statSync(path).blocks;
        await node.writeZeroes(64 * KiB, 128 * KiB);
        await node.writeZeroes(1000, 5, { fua: true });
        const expected = pattern(size, 3);
        expected.fill(0, 64 * KiB, 192 * KiB).fill(0, 1000, 1005);
        expect((await node.read(0, size)).equals(expected)).toBe(true);
        const runs = await checkExtents(node, 0, size);
        if (sparse) {
          expect(statSync(path).blocks).toBeLessThan(before);
          expect(runs).toContainEqual({ length: 128 * KiB, hole: true, zero: true });
        } else {
          expect(runs).toContainEqual({ length: 128 * KiB, hole: false, zero: true });
        }
      } finally {
        await node.close();
      }
    });

    it('writeZeroes with noHole keeps the range allocated', async () => {
      const size = 512 * KiB;
      const path = makeFile(size, pattern(size, 4));
      const node = await open(path);
      try {
        const before = statSync(path).blocks;
        await node.writeZeroes(128 * KiB, 256 * KiB, { noHole: true });
        await node.flush();
        expect(statSync(path).blocks).toBeGreaterThanOrEqual(before);
        const expected = pattern(size, 4).fill(0, 128 * KiB, 384 * KiB);
        expect((await node.read(0, size)).equals(expected)).toBe(true);
        await checkExtents(node, 0, size);
      } finally {
        await node.close();
      }
      // a hole zeroed with noHole gets allocated
      const holey = makeFile(256 * KiB);
      const node2 = await open(holey);
      try {
        await node2.writeZeroes(0, 256 * KiB, { noHole: true });
        await node2.flush();
        expect(statSync(holey).blocks * 512).toBeGreaterThanOrEqual(256 * KiB);
        expect(isZero(await node2.read(0, 256 * KiB))).toBe(true);
      } finally {
        await node2.close();
      }
    });

    it(sparse ? 'zeroes fast' : 'refuses fast zeroing with ENOTSUP, changing nothing', async () => {
      const size = 256 * KiB;
      const path = makeFile(size, pattern(size, 5));
      const node = await open(path);
      try {
        for (const noHole of [false, true]) {
          if (sparse) {
            await node.writeZeroes(4096, 8192 + (noHole ? 1 : 0), { fast: true, noHole });
            expect(isZero(await node.read(4096, 8192 + (noHole ? 1 : 0)))).toBe(true);
          } else {
            const err = await rejection(node.writeZeroes(4096, 8192, { fast: true, noHole }));
            expect(err.errno).toBe('ENOTSUP');
            expect(err.code).toBe('ERR_NOT_FAST');
            expect((await node.read(0, size)).equals(pattern(size, 5))).toBe(true);
          }
        }
      } finally {
        await node.close();
      }
    });

    it('returns coalesced extents covering exactly the range asked', async () => {
      const size = 2 * MiB + 999;
      const path = makeFile(size);
      const node = await open(path);
      try {
        await node.write(512 * KiB, pattern(64 * KiB, 6));
        await node.write(576 * KiB, pattern(64 * KiB, 7)); // adjacent: one run
        await node.write(size - 10, pattern(10, 8));
        const cases: Array<[number, number]> = [[0, size], [1, size - 1], [500 * KiB, 200 * KiB], [600 * KiB, 1], [size - 1, 1], [12345, 67890], [0, 1]];
        for (const [offset, length] of cases) await checkExtents(node, offset, length);
        const all = await node.extents(0, size);
        if (sparse) {
          expect(all.slice(0, 3)).toEqual([
            { length: 512 * KiB, hole: true, zero: true },
            { length: 128 * KiB, hole: false, zero: false },
            { length: all[2]!.length, hole: true, zero: true },
          ]);
          expect(all[all.length - 1]).toEqual({ length: all[all.length - 1]!.length, hole: false, zero: false });
        } else {
          expect(all.every((r) => !r.hole)).toBe(true);
          expect(all[0]).toEqual({ length: 512 * KiB, hole: false, zero: true });
          expect(all[1]).toEqual({ length: 128 * KiB, hole: false, zero: false });
        }
        expect(await node.extents(size, 0)).toEqual([]);
      } finally {
        await node.close();
      }
    });

    if (!sparse) it('bounds zero detection without the addon', async () => {
      const size = ZERO_DETECT_MAX + 3 * MiB;
      const node = await open(makeFile(size));
      try {
        expect(await checkExtents(node, 0, size)).toEqual([
          { length: ZERO_DETECT_MAX, hole: false, zero: true },
          { length: 3 * MiB, hole: false, zero: false },
        ]);
      } finally {
        await node.close();
      }
    });

    it('refuses writes on a read-only node with EPERM', async () => {
      const size = 64 * KiB;
      const path = makeFile(size, pattern(size, 9));
      const node = await open(path, true);
      try {
        expect(node.caps.canWrite).toBe(false);
        expect(node.caps.canTrim).toBe(false);
        expect(node.caps.canZero).toBe(false);
        expect(node.caps.canFastZero).toBe(false);
        for (const p of [node.write(0, Buffer.alloc(1)), node.writeZeroes(0, 10), node.trim(0, 4096), node.writeZeroes(0, 10, { fast: true })]) {
          const err = await rejection(p);
          expect(err.errno).toBe('EPERM');
          expect(err.message).toContain(path);
        }
        expect((await node.read(0, size)).equals(pattern(size, 9))).toBe(true);
        await node.flush();
        await node.cache(0, size);
      } finally {
        await node.close();
      }
    });

    it('names the path in open errors (ERR_OPEN)', async () => {
      const missing = join(dir, 'no-such-file.img');
      for (const readOnly of [true, false]) {
        const err = await rejection(open(missing, readOnly));
        expect(err.code).toBe('ERR_OPEN');
        expect(err.message).toContain(missing);
        expect(err.message).toMatch(/no such file/);
      }
      const sub = join(dir, `a-directory-${++counter}`);
      mkdirSync(sub);
      for (const readOnly of [true, false]) {
        const err = await rejection(open(sub, readOnly));
        expect(err.code).toBe('ERR_OPEN');
        expect(err.message).toContain(sub);
        expect(err.message).toMatch(/directory/);
      }
      const err = await rejection(open('/dev/null'));
      expect(err.code).toBe('ERR_OPEN');
      expect(err.message).toContain('/dev/null');
    });

    it('finishes requests in flight on close, then refuses with ESHUTDOWN', async () => {
      const path = makeFile(4 * MiB);
      const node = await open(path);
      const data = randomBytes(4 * MiB);
      const writing = node.write(0, data);
      const closing = node.close();
      await writing;
      await closing;
      await node.close(); // idempotent
      expect((await rejection(node.read(0, 1))).errno).toBe('ESHUTDOWN');
      const again = await open(path, true);
      try {
        expect((await again.read(0, 4 * MiB)).equals(data)).toBe(true);
      } finally {
        await again.close();
      }
    });

    it('honours an aborted signal', async () => {
      const node = await open(makeFile(4096));
      try {
        const ac = new AbortController();
        ac.abort();
        await expect(node.read(0, 1, { signal: ac.signal })).rejects.toMatchObject({ name: 'AbortError' });
      } finally {
        await node.close();
      }
    });

    it('matches an in-memory model under random writes, zeroes and trims', async () => {
      const size = 256 * KiB + 13;
      type Op =
        | { kind: 'write'; offset: number; length: number; seed: number }
        | { kind: 'zeroes'; offset: number; length: number; noHole: boolean; fua: boolean }
        | { kind: 'trim'; offset: number; length: number };
      const range = fc
        .tuple(fc.nat({ max: size - 1 }), fc.oneof(fc.integer({ min: 1, max: 300 }), fc.integer({ min: 1, max: 96 * KiB })))
        .map(([offset, length]) => ({ offset, length: Math.min(length, size - offset) }));
      // bias towards block-aligned ranges so holes really get punched
      const aligned = fc
        .tuple(fc.nat({ max: 63 }), fc.integer({ min: 1, max: 16 }))
        .map(([block, blocks]) => ({ offset: block * 4096, length: Math.min(blocks * 4096, size - block * 4096) }));
      const where = fc.oneof(range, aligned);
      const op: fc.Arbitrary<Op> = fc.oneof(
        fc.tuple(where, fc.nat(255)).map(([r, seed]): Op => ({ kind: 'write', ...r, seed })),
        fc.tuple(where, fc.boolean(), fc.boolean()).map(([r, noHole, fua]): Op => ({ kind: 'zeroes', ...r, noHole, fua })),
        where.map((r): Op => ({ kind: 'trim', ...r })),
      );
      await fc.assert(
        fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 25 }), async (ops) => {
          const path = makeFile(size);
          const node = await open(path);
          const model = Buffer.alloc(size);
          try {
            for (const o of ops) {
              if (o.kind === 'write') {
                const data = pattern(o.length, o.seed);
                await node.write(o.offset, data);
                data.copy(model, o.offset);
              } else if (o.kind === 'zeroes') {
                await node.writeZeroes(o.offset, o.length, { noHole: o.noHole, fua: o.fua });
                model.fill(0, o.offset, o.offset + o.length);
              } else {
                await node.trim(o.offset, o.length);
                // with the addon trim punches a hole (reads zeros); without it trim is a no-op
                if (sparse) model.fill(0, o.offset, o.offset + o.length);
              }
            }
            expect((await node.read(0, size)).equals(model)).toBe(true);
            const runs = await checkExtents(node, 0, size);
            let pos = 0;
            for (const r of runs) {
              if (r.zero) expect(isZero(model.subarray(pos, pos + r.length))).toBe(true);
              pos += r.length;
            }
          } finally {
            await node.close();
            rmSync(path, { force: true });
          }
        }),
        { numRuns: 40 },
      );
    });
  });
});

describe('openImage', () => {
  it('opens memory:SIZE as a memory node', async () => {
    const node = await openImage('memory:1G');
    expect(node).toBeInstanceOf(MemoryNode);
    expect(node.size).toBe(2 ** 30);
    await node.close();
    const ro = await openImage('memory:64K', { readOnly: true });
    expect(ro.caps.canWrite).toBe(false);
    await ro.close();
  });

  it('opens a path as a raw node', async () => {
    const path = makeFile(12345);
    const node = await openImage(path, { readOnly: true });
    expect(node).toBeInstanceOf(RawNode);
    expect(node.driver).toBe('raw');
    expect(node.size).toBe(12345);
    expect(node.description).toBe(path);
    expect(node.caps.canWrite).toBe(false);
    await node.close();
    const explicit = await openImage(`raw:${path}`, { native: null });
    expect((explicit as RawNode).sparse).toBe(false);
    await explicit.close();
  });

  it('rejects bad specs with ERR_BAD_IMAGE naming them', async () => {
    for (const spec of ['memory:', 'memory:lots', 'memory:1X', '', 'raw:', 'http://host/export']) {
      const err = await rejection(openImage(spec));
      expect(err.code).toBe('ERR_BAD_IMAGE');
      expect(err.message).toContain(`"${spec}"`);
    }
    const err = await rejection(openImage(join(dir, 'missing.img')));
    expect(err.code).toBe('ERR_OPEN');
  });

  it('recognises a qcow2 header instead of serving it as raw', async () => {
    const header = Buffer.alloc(512);
    header.writeUInt32BE(0x514649fb, 0);
    header.writeUInt32BE(3, 4);
    const path = makeFile(64 * KiB, header);
    // the qcow2 driver takes it, and refuses this header (cluster_bits 0)
    const err = await rejection(openImage(path));
    expect(err.code).toMatch(/^ERR_QCOW2_/);
    expect(err.message).toContain('qcow2');
    const raw = await openImage(`raw:${path}`, { readOnly: true });
    expect((await raw.read(0, 4)).readUInt32BE(0)).toBe(0x514649fb);
    await raw.close();
  });
});

describe.runIf(native !== null)('RawNode: reads and writes ≤ 64 KiB tried with RWF_NOWAIT on the loop first', () => {
  /** the real addon, with preadNowait/pwriteNowait replaced by `nowait` and their calls counted */
  function spy(nowait: (real: (...a: Parameters<NonNullable<SparseOps['preadNowait']>>) => number, ...a: Parameters<NonNullable<SparseOps['preadNowait']>>) => number) {
    const calls = { read: 0, write: 0 };
    const ops: SparseOps = {
      ...native!,
      preadNowait: (...a) => (calls.read++, nowait(native!.preadNowait!, ...a)),
      pwriteNowait: (...a) => (calls.write++, nowait(native!.pwriteNowait!, ...a)),
    };
    return { ops, calls };
  }

  it('a cached 4 KiB read is answered on the loop: the bytes, one call, none for a 1 MiB read', async () => {
    const data = randomBytes(2 * MiB);
    const path = makeFile(2 * MiB, data);
    const { ops, calls } = spy((real, ...a) => real(...a));
    const node = await RawNode.open(path, { readOnly: true, native: ops });
    expect((await node.read(12345, 4096)).equals(data.subarray(12345, 12345 + 4096))).toBe(true);
    expect(calls.read).toBe(1);
    expect((await node.read(0, MiB)).equals(data.subarray(0, MiB))).toBe(true);
    expect(calls.read).toBe(1);
    await node.close();
  });

  it('a bulk read (the copy engine\'s) is tried on the loop up to 1 MiB: the bytes, one call each; 2 MiB goes to the pool', async () => {
    const data = randomBytes(3 * MiB);
    const path = makeFile(3 * MiB, data);
    const { ops, calls } = spy((real, ...a) => real(...a));
    const node = await RawNode.open(path, { readOnly: true, native: ops });
    const quarter = Buffer.alloc(256 * KiB);
    await node.readInto(4096, quarter, { bulk: true });
    expect(quarter.equals(data.subarray(4096, 4096 + 256 * KiB))).toBe(true);
    expect(calls.read).toBe(1);
    const one = Buffer.alloc(MiB);
    await node.readInto(MiB, one, { bulk: true });
    expect(one.equals(data.subarray(MiB, 2 * MiB))).toBe(true);
    expect(calls.read).toBe(2);
    const two = Buffer.alloc(2 * MiB);
    await node.readInto(MiB, two, { bulk: true });
    expect(two.equals(data.subarray(MiB, 3 * MiB))).toBe(true);
    expect(calls.read).toBe(2);
    // without the hint a 256 KiB read stays on the pool
    await node.readInto(0, quarter);
    expect(calls.read).toBe(2);
    // read() (a buffer of its own) takes the hint as readInto() does
    expect((await node.read(2 * MiB, MiB, { bulk: true })).equals(data.subarray(2 * MiB, 3 * MiB))).toBe(true);
    expect(calls.read).toBe(3);
    expect((await node.read(0, 256 * KiB)).equals(data.subarray(0, 256 * KiB))).toBe(true);
    expect(calls.read).toBe(3);
    await node.close();
  });

  it('a bulk read that would block (-1) goes on through the thread pool, with the same bytes', async () => {
    const data = randomBytes(512 * KiB);
    const path = makeFile(512 * KiB, data);
    const { ops, calls } = spy(() => -1);
    const node = await RawNode.open(path, { readOnly: true, native: ops });
    const buf = Buffer.alloc(256 * KiB);
    await node.readInto(100, buf, { bulk: true });
    expect(buf.equals(data.subarray(100, 100 + 256 * KiB))).toBe(true);
    expect(calls.read).toBe(1);
    await node.close();
  });

  it('EAGAIN (-1) and a short read go on through the thread pool, with the same bytes', async () => {
    const data = randomBytes(64 * KiB);
    const path = makeFile(64 * KiB, data);
    // first call: a short read of 1000 bytes; every later one: would block
    const { ops, calls } = spy((real, fd, buf, at, len, pos) => (calls.read === 1 ? real(fd, buf, at, Math.min(len, 1000), pos) : -1));
    const node = await RawNode.open(path, { native: ops });
    expect((await node.read(100, 8192)).equals(data.subarray(100, 100 + 8192))).toBe(true);
    expect(calls.read).toBe(2);
    await node.write(0, Buffer.alloc(4096, 7));
    expect((await node.read(0, 4096)).equals(Buffer.alloc(4096, 7))).toBe(true);
    await node.close();
  });

  it('-2 (no RWF_NOWAIT for this file) stops the attempts for that node', async () => {
    const path = makeFile(64 * KiB, randomBytes(64 * KiB));
    const { ops, calls } = spy(() => -2);
    const node = await RawNode.open(path, { native: ops });
    for (let i = 0; i < 3; i++) await node.read(i * 4096, 4096);
    for (let i = 0; i < 3; i++) await node.write(i * 4096, Buffer.alloc(4096, i));
    expect(calls).toEqual({ read: 1, write: 1 });
    expect((await node.read(8192, 4096)).equals(Buffer.alloc(4096, 2))).toBe(true);
    await node.close();
  });

  it('BLKREP_NO_NOWAIT=1: every read and write through the pool', async () => {
    const path = makeFile(64 * KiB, randomBytes(64 * KiB));
    const { ops, calls } = spy((real, ...a) => real(...a));
    process.env.BLKREP_NO_NOWAIT = '1';
    let node: RawNode;
    try {
      node = await RawNode.open(path, { native: ops });
    } finally {
      delete process.env.BLKREP_NO_NOWAIT;
    }
    await node.write(0, Buffer.alloc(4096, 1));
    await node.read(0, 4096);
    expect(calls).toEqual({ read: 0, write: 0 });
    await node.close();
  });

  it('an error from preadv2 itself is the read error (ERR_SYSTEM_EIO, errno EIO, naming the file), not a crash', async () => {
    const path = makeFile(64 * KiB);
    const { ops } = spy(() => {
      throw Object.assign(new Error('EIO: i/o error, preadv2(RWF_NOWAIT)'), { code: 'EIO', errno: -5, syscall: 'preadv2(RWF_NOWAIT)' });
    });
    const node = await RawNode.open(path, { native: ops });
    await expect(node.read(0, 4096)).rejects.toMatchObject({ code: 'ERR_SYSTEM_EIO', errno: 'EIO', message: expect.stringContaining(path) });
    await node.close();
  });
});

describe.runIf(native !== null)('RawNode: writes ≤ 64 KiB off the loop are gathered per turn into one pwriteBatch job', () => {
  /** the real addon without RWF_NOWAIT writes (as on ext4), its pwriteBatch calls recorded */
  function spy(batch: (real: NonNullable<SparseOps['pwriteBatch']>, ...a: Parameters<NonNullable<SparseOps['pwriteBatch']>>) => Promise<Array<number | Error>> = (real, ...a) => real(...a)) {
    const jobs: number[][] = [];
    const ops: SparseOps = {
      ...native!,
      pwriteNowait: () => -2,
      pwriteBatch: (fd, buffers, positions) => (jobs.push(buffers.map((b) => b.length)), batch(native!.pwriteBatch!, fd, buffers, positions)),
    };
    return { ops, jobs };
  }

  it('32 writes started together are one job with 32 writes; 100 are two (64 + 36); the bytes land', async () => {
    const path = makeFile(MiB);
    const { ops, jobs } = spy();
    const node = await RawNode.open(path, { native: ops });
    await Promise.all(Array.from({ length: 32 }, (_, i) => node.write(512 * KiB + i * 8192, Buffer.alloc(4096, i + 1))));
    expect(jobs).toEqual([Array(32).fill(4096)]);
    await Promise.all(Array.from({ length: 100 }, (_, i) => node.write(i * 4096, Buffer.alloc(4096, 200))));
    expect(jobs.slice(1).map((j) => j.length)).toEqual([64, 36]);
    const data = readFileSync(path);
    expect(data.subarray(0, 100 * 4096).equals(Buffer.alloc(100 * 4096, 200))).toBe(true);
    expect(data.subarray(100 * 4096, 512 * KiB).equals(Buffer.alloc(512 * KiB - 100 * 4096))).toBe(true);
    for (let i = 0; i < 32; i++) {
      const at = 512 * KiB + i * 8192;
      expect(data.subarray(at, at + 8192).equals(Buffer.concat([Buffer.alloc(4096, i + 1), Buffer.alloc(4096)]))).toBe(true);
    }
    await node.close();
  });

  it('a 1 MiB write is not gathered (its own thread-pool job)', async () => {
    const path = makeFile(2 * MiB);
    const { ops, jobs } = spy();
    const node = await RawNode.open(path, { native: ops });
    await node.write(0, Buffer.alloc(MiB, 9));
    expect(jobs).toEqual([]);
    expect(readFileSync(path).subarray(0, MiB).equals(Buffer.alloc(MiB, 9))).toBe(true);
    await node.close();
  });

  it('one failing write of a job fails alone (ERR_SYSTEM_EIO, errno EIO, naming the file); a short one is finished', async () => {
    const path = makeFile(64 * KiB);
    const eio = Object.assign(new Error('EIO: i/o error, pwrite'), { code: 'EIO', errno: -5, syscall: 'pwrite' });
    // in the first job: write 0 fails, write 1 is short (1000 bytes), write 2 is done
    const { ops, jobs } = spy(async (real, fd, buffers, positions) => {
      if (jobs.length > 1) return real(fd, buffers, positions);
      await real(fd, [buffers[1]!.subarray(0, 1000), buffers[2]!], [positions[1]!, positions[2]!]);
      return [eio, 1000, buffers[2]!.length];
    });
    const node = await RawNode.open(path, { native: ops });
    const results = await Promise.allSettled([0, 1, 2].map((i) => node.write(i * 4096, Buffer.alloc(4096, i + 1))));
    expect(results[0]).toMatchObject({ status: 'rejected', reason: { code: 'ERR_SYSTEM_EIO', errno: 'EIO', message: expect.stringContaining(path) } });
    expect(results.slice(1).map((r) => r.status)).toEqual(['fulfilled', 'fulfilled']);
    expect(jobs).toEqual([[4096, 4096, 4096], [3096]]);
    expect(readFileSync(path).subarray(4096, 3 * 4096).equals(Buffer.concat([Buffer.alloc(4096, 2), Buffer.alloc(4096, 3)]))).toBe(true);
    await node.close();
  });

  it('BLKREP_NO_WRITE_BATCHING=1: one pool job per write, no pwriteBatch', async () => {
    const path = makeFile(64 * KiB);
    const { ops, jobs } = spy();
    process.env.BLKREP_NO_WRITE_BATCHING = '1';
    let node: RawNode;
    try {
      node = await RawNode.open(path, { native: ops });
    } finally {
      delete process.env.BLKREP_NO_WRITE_BATCHING;
    }
    await Promise.all([node.write(0, Buffer.alloc(4096, 1)), node.write(4096, Buffer.alloc(4096, 2))]);
    expect(jobs).toEqual([]);
    expect(readFileSync(path).subarray(0, 8192).equals(Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2)]))).toBe(true);
    await node.close();
  });
});
