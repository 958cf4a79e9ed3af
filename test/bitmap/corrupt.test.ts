// test-bitmap-corrupt: damaged bitmap files. Whatever the damage — any header byte, a torn header
// write, a bad checksum, a truncated file, the wrong size, an unknown version, random bytes — a
// load gives a clean error, or an all-dirty bitmap with a reason, or a bitmap that still holds
// every region written (a superset). Never a crash, never a bitmap missing a written region.
import { copyFileSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { crc32c } from '../../src/bitmap/crc32c.js';
import { DirtyBitmap } from '../../src/bitmap/dirty-bitmap.js';
import { AL_OFFSET, HEADER_BYTES, HEADER_SLOT_BYTES, computeLayout, encodeAlBlock } from '../../src/bitmap/format.js';
import { PersistentBitmap, type OpenOptions } from '../../src/bitmap/persistent.js';

const SEED = 0xc0_44_0f7;
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB + 1000;
const GRAN = 512;
const GEOMETRY = { size: SIZE, granularity: GRAN, extentSize: 1 * MiB, hotExtents: 16, alSlots: 4 };
const LAYOUT = computeLayout(GEOMETRY);
/** regions written into the reference files */
const WRITES: Array<[number, number]> = [
  [0, 1],
  [5 * MiB + 3, 70_000],
  [SIZE - 1, 1],
  [40 * MiB, 2 * MiB],
];

let dir: string;
let counter = 0;
/** closed cleanly: header slots gen 2 (in use) and gen 3 (clean) */
let cleanFile: string;
/** the same file before its clean close: gen 2 (in use), writes only in the activity log and memory */
let crashedFile: string;
/** the clean file as it was right after create (gen 1 only) */
let createdFile: string;
let truth: DirtyBitmap;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'blkrep-bitmap-corrupt-'));
  cleanFile = join(dir, 'clean.bitmap');
  const pb = await PersistentBitmap.create(cleanFile, GEOMETRY);
  createdFile = join(dir, 'created.bitmap');
  copyFileSync(cleanFile, createdFile);
  truth = new DirtyBitmap(SIZE, { granularity: GRAN });
  for (const [o, l] of WRITES) {
    const t = await pb.beforeWrite(o, l);
    pb.afterWrite(t);
    truth.set(o, l);
  }
  await pb.flush();
  // one more write after the flush: only the activity log holds it
  const t = await pb.beforeWrite(20 * MiB, 4096);
  pb.afterWrite(t);
  truth.set(20 * MiB, 4096);
  crashedFile = join(dir, 'crashed.bitmap');
  copyFileSync(cleanFile, crashedFile);
  await pb.close();
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

function damaged(from: string, change: (b: Buffer) => Buffer | void): string {
  const path = join(dir, `d-${++counter}.bitmap`);
  const b = readFileSync(from);
  writeFileSync(path, change(b) ?? b);
  return path;
}

/** the header slot holding generation `gen` */
const slotOf = (gen: number) => (gen % 2) * HEADER_SLOT_BYTES;

function fixHeaderCrc(b: Buffer, slot: number): void {
  b.writeUInt32BE(crc32c(b.subarray(slot, slot + HEADER_BYTES - 4)), slot + HEADER_BYTES - 4);
}

type Verdict = { kind: 'error'; err: BlkrepError } | { kind: 'all-dirty'; reason: string } | { kind: 'trusted'; state: string };

/** Load read-only and check the promise: error, all-dirty with a reason, or a superset of the truth. */
async function judge(path: string, options: OpenOptions = { size: SIZE }): Promise<Verdict> {
  let opened;
  try {
    opened = await PersistentBitmap.open(path, { readOnly: true, ...options });
  } catch (err) {
    if (!(err instanceof BlkrepError)) throw new Error(`not a clean error: ${String(err)}`, { cause: err });
    expect(err.code).toMatch(/^ERR_/);
    return { kind: 'error', err };
  }
  const { bitmap, loadState } = opened;
  try {
    const b = bitmap.bitmap;
    if (loadState.state === 'all-dirty') {
      expect(loadState.reason.length).toBeGreaterThan(5);
      expect(b.dirtyGranules).toBe(b.bits);
      return { kind: 'all-dirty', reason: loadState.reason };
    }
    expect(b.size).toBe(SIZE);
    expect(b.granularity).toBe(GRAN);
    for (const r of truth.dirtyRuns()) {
      if (b.nextClean(r.offset, r.offset + r.length) >= 0) expect.fail(`${loadState.state} load of ${path} misses written region ${r.offset}+${r.length}`);
    }
    return { kind: 'trusted', state: loadState.state };
  } finally {
    await bitmap.close();
  }
}

describe('reference files', () => {
  it('load as expected undamaged', async () => {
    expect(await judge(cleanFile)).toEqual({ kind: 'trusted', state: 'clean' });
    expect(await judge(crashedFile)).toEqual({ kind: 'trusted', state: 'recovered' });
  });
});

describe('every header byte', () => {
  for (const [name, file, gen] of [['clean', () => cleanFile, 3], ['crashed', () => crashedFile, 2]] as const) {
    it(`${name} file: any byte of the current header flipped → falls back to the other slot, never trusted wrongly`, async () => {
      const verdicts = new Map<string, number>();
      for (let i = 0; i < HEADER_BYTES; i++) {
        const v = await judge(damaged(file(), (b) => void (b[slotOf(gen) + i]! ^= 0xff)));
        const key = v.kind === 'trusted' ? v.state : v.kind;
        verdicts.set(key, (verdicts.get(key) ?? 0) + 1);
      }
      // The other slot is an older, in-use header: a recovery, which is safe.
      expect([...verdicts.keys()].every((k) => k === 'recovered' || k === 'all-dirty' || k === 'error')).toBe(true);
    });

    it(`${name} file: any header byte changed with its checksum recomputed → error, all-dirty or still a superset`, async () => {
      for (let i = 0; i < HEADER_BYTES - 4; i++) {
        for (const x of [0x01, 0x80, 0xff]) {
          const path = damaged(file(), (b) => {
            b[slotOf(gen) + i]! ^= x;
            fixHeaderCrc(b, slotOf(gen));
          });
          const v = await judge(path);
          // A clean load despite the change only for fields that say nothing about the bits of a
          // clean file: generation, enabled, hot extents, session, epoch, times. (A recovery from the other
          // slot is fine: judge() checked it holds every write.)
          if (v.kind === 'trusted' && v.state === 'clean') expect([...range(16, 24), 39, ...range(40, 44), ...range(48, 80)], `byte ${i} ^ ${x}`).toContain(i);
        }
      }
    });
  }

  it('both slots destroyed: all-dirty given the disk size, an error without it or when strict', async () => {
    const path = damaged(cleanFile, (b) => void b.fill(0x5a, 0, 2 * HEADER_SLOT_BYTES));
    const v = await judge(path);
    expect(v).toMatchObject({ kind: 'all-dirty' });
    expect((v as { reason: string }).reason).toMatch(/no valid header|not a blkrep bitmap/);
    expect(await judge(path, {})).toMatchObject({ kind: 'error', err: { code: 'ERR_BITMAP_CORRUPT' } });
    expect(await judge(path, { size: SIZE, strict: true })).toMatchObject({ kind: 'error', err: { code: 'ERR_BITMAP_CORRUPT' } });
  });

  it('an unknown version is never read past: all-dirty, or an error when strict', async () => {
    const path = damaged(cleanFile, (b) => {
      b.writeUInt32BE(2, slotOf(3) + 8);
      fixHeaderCrc(b, slotOf(3));
    });
    expect(await judge(path)).toMatchObject({ kind: 'all-dirty', reason: expect.stringMatching(/unknown version 2/) });
    expect(await judge(path, { size: SIZE, strict: true })).toMatchObject({ kind: 'error', err: { code: 'ERR_BITMAP_CORRUPT' } });
    // and it is never overwritten
    const before = readFileSync(path);
    await expect(PersistentBitmap.open(path, { size: SIZE })).rejects.toMatchObject({ code: 'ERR_BITMAP_VERSION' });
    expect(readFileSync(path).equals(before)).toBe(true);
  });

  it('the wrong disk size is a clean error', async () => {
    const v = await judge(cleanFile, { size: SIZE + 512 });
    expect(v).toMatchObject({ kind: 'error', err: { code: 'ERR_BITMAP_SIZE_MISMATCH' } });
    expect((v as { err: Error }).err.message).toContain(String(SIZE));
  });

  it('a torn header write (new bytes over an old slot, cut anywhere) loads the previous header', async () => {
    // The clean close wrote generation 3 over slot 1, which held generation 1 from create.
    const newer = readFileSync(cleanFile);
    const older = readFileSync(createdFile);
    for (const cut of [1, 7, 8, 16, 64, 100, 123, 124, 127]) {
      const path = damaged(cleanFile, (b) => {
        older.copy(b, slotOf(3) + cut, slotOf(1) + cut, slotOf(1) + HEADER_SLOT_BYTES);
        newer.copy(b, slotOf(3), slotOf(3), slotOf(3) + cut);
      });
      expect(await judge(path), `cut at ${cut}`).toEqual({ kind: 'trusted', state: 'recovered' });
    }
  });
});

describe('data, checksum table and activity log', () => {
  it('a data byte changed in a clean file → all-dirty (data checksum)', async () => {
    for (const at of [0, 1, 4095, 4096, LAYOUT.dataLength - 1]) {
      const v = await judge(damaged(cleanFile, (b) => void (b[LAYOUT.dataOffset + at]! ^= 0x10)));
      expect(v).toMatchObject({ kind: 'all-dirty', reason: expect.stringMatching(/checksum/) });
    }
  });

  it('a checksum-table byte changed → all-dirty in a clean file, the page distrusted in a crashed one', async () => {
    expect(await judge(damaged(cleanFile, (b) => void (b[LAYOUT.crcTableOffset + 2]! ^= 1)))).toMatchObject({ kind: 'all-dirty' });
    expect(await judge(damaged(cleanFile, (b) => void (b[LAYOUT.crcTableOffset + LAYOUT.crcTableLength - 1]! ^= 1)))).toMatchObject({ kind: 'all-dirty' });
    const path = damaged(crashedFile, (b) => void (b[LAYOUT.crcTableOffset + 2]! ^= 1));
    const { bitmap, loadState } = await PersistentBitmap.open(path, { readOnly: true });
    expect(loadState).toMatchObject({ state: 'recovered', pagesDistrusted: 1 });
    expect(bitmap.bitmap.nextClean(0, 4096 * 8 * GRAN)).toBe(-1);
    await bitmap.close();
  });

  it('bits past the last granule with matching checksums → all-dirty (tail bits)', async () => {
    const { PageChecksum } = await import('../../src/bitmap/format.js');
    const path = damaged(cleanFile, (b) => {
      const bits = Math.ceil(SIZE / GRAN);
      const lastByte = LAYOUT.dataOffset + Math.floor(bits / 8);
      b[lastByte]! |= 0x80;
      const page = Math.floor((lastByte - LAYOUT.dataOffset) / 4096);
      const sum = new PageChecksum(SIZE, GRAN).of(b.subarray(LAYOUT.dataOffset + page * 4096, LAYOUT.dataOffset + (page + 1) * 4096), page);
      b.writeUInt32BE(sum, LAYOUT.crcTableOffset + 4 * page);
    });
    expect(await judge(path)).toMatchObject({ kind: 'all-dirty', reason: expect.stringMatching(/past its last granule/) });
  });

  it('an activity-log block with a valid checksum but impossible contents → all-dirty, not an older block', async () => {
    const h = { session: 1, extentSize: 1 * MiB, hotExtents: 16 };
    for (const [what, block] of [
      ['an extent past the disk', encodeAlBlock({ session: 1, sequence: 99, extents: [1_000_000] }, h.extentSize, LAYOUT.alBlockSize)],
      ['another extent size', encodeAlBlock({ session: 1, sequence: 99, extents: [1] }, 2 * MiB, LAYOUT.alBlockSize)],
      ['a newer session', encodeAlBlock({ session: 7, sequence: 1, extents: [1] }, h.extentSize, LAYOUT.alBlockSize)],
      ['descending extents', encodeAlBlock({ session: 1, sequence: 99, extents: [3, 2] }, h.extentSize, LAYOUT.alBlockSize)],
    ] as const) {
      const path = damaged(crashedFile, (b) => void block.copy(b, AL_OFFSET + 3 * LAYOUT.alBlockSize));
      expect(await judge(path), what).toMatchObject({ kind: 'all-dirty', reason: expect.stringMatching(/activity-log block 3/) });
    }
  });

  it('a torn activity-log write (the transaction being written at the crash) is ignored: the previous one covers every write issued', async () => {
    const b = readFileSync(crashedFile);
    // the newest valid transaction and the slot the next one would be written to
    let newest = { seq: 0, slot: 0 };
    for (let s = 0; s < GEOMETRY.alSlots; s++) {
      const at = AL_OFFSET + s * LAYOUT.alBlockSize;
      if (b.readUInt32BE(at) === 0x4252414c && b.readBigUInt64BE(at + 16) > BigInt(newest.seq)) newest = { seq: Number(b.readBigUInt64BE(at + 16)), slot: s };
    }
    expect(newest.seq).toBeGreaterThan(0);
    const next = (newest.seq + 1) % GEOMETRY.alSlots;
    const at = AL_OFFSET + newest.slot * LAYOUT.alBlockSize;
    const session = Number(b.readBigUInt64BE(at + 8));
    const previous = Array.from({ length: b.readUInt32BE(at + 24) }, (_, i) => Number(b.readBigUInt64BE(at + 32 + 8 * i)));
    // what the next transaction would hold: the hot set plus the extents a new write waits for
    const extents = [...new Set([...previous, 0, 1, 2, 60])].sort((x, y) => x - y);
    const torn = encodeAlBlock({ session, sequence: newest.seq + 1, extents }, GEOMETRY.extentSize, LAYOUT.alBlockSize);
    for (const cut of [8, 24, 33, 40, 512, 4000]) {
      const path = damaged(crashedFile, (f) => void torn.copy(f, AL_OFFSET + next * LAYOUT.alBlockSize, 0, cut));
      expect(await judge(path), `cut at ${cut}`).toEqual({ kind: 'trusted', state: 'recovered' });
    }
  });
});

describe('truncated and foreign files', () => {
  it('truncated anywhere → all-dirty with a reason (or an error without the size)', async () => {
    for (const length of [0, 1, 100, 4096, 4096 + 64, 8192, AL_OFFSET + 10, LAYOUT.crcTableOffset, LAYOUT.dataOffset + 1, LAYOUT.fileLength - 1]) {
      const path = damaged(cleanFile, () => {});
      truncateSync(path, length);
      const v = await judge(path);
      expect(v.kind, `truncated to ${length}`).toBe('all-dirty');
      if (length > 8192) expect((v as { reason: string }).reason).toMatch(/truncated/);
      expect((await judge(path, {})).kind).not.toBe('trusted');
    }
  });

  it('a file that is not a bitmap → all-dirty "not a blkrep bitmap", strict → ERR_BITMAP_CORRUPT', async () => {
    const path = join(dir, 'text.bitmap');
    writeFileSync(path, 'hello, I am a text file\n'.repeat(1000));
    expect(await judge(path)).toMatchObject({ kind: 'all-dirty', reason: expect.stringMatching(/not a blkrep bitmap/) });
    expect(await judge(path, { size: SIZE, strict: true })).toMatchObject({ kind: 'error', err: { code: 'ERR_BITMAP_CORRUPT' } });
  });

  it('a missing file or a directory is a clean error', async () => {
    expect(await judge(join(dir, 'nope.bitmap'))).toMatchObject({ kind: 'error' });
    expect(await judge(dir)).toMatchObject({ kind: 'error' });
  });
});

describe('random damage (seeded)', () => {
  it('1–8 random bytes changed anywhere, in a clean or a crashed file: never trusted wrongly, never a crash', async () => {
    const size = readFileSync(cleanFile).length;
    const c = readFileSync(crashedFile);
    let newestAl: [number, number] = [0, 0];
    let best = 0n;
    for (let s = 0; s < GEOMETRY.alSlots; s++) {
      const at = AL_OFFSET + s * LAYOUT.alBlockSize;
      if (c.readUInt32BE(at) === 0x4252414c && c.readBigUInt64BE(at + 16) > best) {
        best = c.readBigUInt64BE(at + 16);
        newestAl = [at, at + LAYOUT.alBlockSize];
      }
    }
    await fc.assert(
      fc.asyncProperty(
        fc.boolean(),
        fc.array(fc.tuple(fc.oneof(fc.integer({ min: 0, max: 2 * HEADER_SLOT_BYTES + LAYOUT.alBlockSize * 4 }), fc.integer({ min: 0, max: size - 1 })), fc.integer({ min: 1, max: 255 })), {
          minLength: 1,
          maxLength: 8,
        }),
        async (crashed, edits) => {
          const path = damaged(crashed ? crashedFile : cleanFile, (b) => {
            // Not the newest activity-log transaction of the crashed file: it was durable, and
            // damage to it afterwards looks exactly like a torn write of it, which the log by
            // design answers with the transaction before (see man/blkrep-bitmap.5, LIMITS).
            for (const [at, x] of edits) if (!crashed || at < newestAl[0] || at >= newestAl[1]) b[at]! ^= x;
          });
          await judge(path);
          rmSync(path);
        },
      ),
      { seed: SEED, numRuns: 300 },
    );
  });
});

describe('opening a damaged file for writing', () => {
  it('replaces it with an all-dirty bitmap that then loads clean, keeping the geometry', async () => {
    const path = damaged(cleanFile, (b) => void (b[LAYOUT.dataOffset + 5]! ^= 1));
    const { bitmap, loadState } = await PersistentBitmap.open(path, { size: SIZE });
    expect(loadState).toMatchObject({ state: 'all-dirty', fault: 'data-checksum' });
    expect(bitmap.bitmap.dirtyBytes).toBe(SIZE);
    expect(bitmap.extentSize).toBe(GEOMETRY.extentSize);
    await bitmap.close();
    const again = await PersistentBitmap.open(path, { size: SIZE });
    expect(again.loadState).toEqual({ state: 'clean' });
    expect(again.bitmap.bitmap.dirtyBytes).toBe(SIZE);
    await again.bitmap.close();
  });

  it('refuses when strict, leaving the file as it was', async () => {
    const path = damaged(cleanFile, (b) => void (b[LAYOUT.dataOffset + 5]! ^= 1));
    const before = readFileSync(path);
    await expect(PersistentBitmap.open(path, { size: SIZE, strict: true })).rejects.toMatchObject({ code: 'ERR_BITMAP_CORRUPT' });
    expect(readFileSync(path).equals(before)).toBe(true);
  });
});

function range(a: number, b: number): number[] {
  return Array.from({ length: b - a }, (_, i) => a + i);
}
