/**
 * What the driver refuses, and how (B.11, B.12 items 13–16): features it does not implement are
 * refused naming the feature; dirty images, images marked corrupt and images with internal
 * snapshots open read-only only; malformed headers and tables give a clean BlkrepError naming the
 * numbers involved — never a crash, never a huge allocation. Autoclear bits are handled as C.1
 * asks; the bitmaps extension is kept byte for byte.
 */
import { open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { openImage } from '../../src/block/open.js';
import { Qcow2Node } from '../../src/block/qcow2/index.js';
import { makeTempDir, run } from '../support/spawn.js';
import { expectClean, pattern, qemuCheck, qemuInfo, tool, KiB } from './helpers.js';

async function patch(path: string, offset: number, bytes: Buffer): Promise<void> {
  const h = await open(path, 'r+');
  try {
    await h.write(bytes, 0, bytes.length, offset);
  } finally {
    await h.close();
  }
}

const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
};

async function openError(path: string, readOnly: boolean): Promise<BlkrepError | undefined> {
  try {
    const node = await openImage(path, { readOnly });
    await node.close();
    return undefined;
  } catch (err) {
    if (!(err instanceof BlkrepError)) throw err;
    return err;
  }
}

/** A 1 MiB qcow2 image with data in its first cluster, made by qemu-img. */
async function sample(dir: string, name: string, extra: string[] = []): Promise<string> {
  const path = join(dir, name);
  await tool('qemu-img', ['create', '-q', '-f', 'qcow2', ...extra, path, '1M']);
  await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', path]);
  return path;
}

describe('qcow2 refusals', () => {
  it('refuses encryption, external data files, extended L2 and zstd, naming them', async () => {
    const dir = await makeTempDir();
    const cases: Array<[string, string[], RegExp]> = [
      ['luks', ['--object', 'secret,id=sec0,data=x', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0'], /encrypt.*LUKS/i],
      ['datafile', ['-o', `data_file=${join(dir, 'data.raw')}`], /external data file/],
      ['extl2', ['-o', 'extended_l2=on'], /extended L2/],
      ['zstd', ['-o', 'compression_type=zstd'], /zstd/],
    ];
    for (const [name, opts, message] of cases) {
      const path = join(dir, `${name}.qcow2`);
      const made = await run('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, path, '1M'], { timeoutMs: 60_000 });
      if (made.code !== 0) {
        // LUKS key setup times the CPU and fails on a busy machine ("Unable to get accurate CPU
        // usage"): then mark a plain image as LUKS-encrypted, which is what the driver looks at
        expect(name, made.stderr).toBe('luks');
        await tool('qemu-img', ['create', '-q', '-f', 'qcow2', path, '1M']);
        await patch(path, 32, u32(2));
      }
      for (const readOnly of [false, true]) {
        const err = await openError(path, readOnly);
        expect(err?.code, `${name} read-only=${readOnly}`).toBe('ERR_QCOW2_UNSUPPORTED');
        expect(err?.message).toMatch(message);
      }
    }
  });

  it('refuses an unknown incompatible feature bit, naming it from the feature table', async () => {
    const dir = await makeTempDir();
    const path = await sample(dir, 'unknown.qcow2');
    await patch(path, 72, u64(1n << 10n));
    // give bit 10 a name in the feature table (its first entry, "dirty bit", becomes it)
    const entry = Buffer.alloc(48);
    entry[0] = 0;
    entry[1] = 10;
    entry.write('frobnication', 2);
    await patch(path, 112 + 8, entry);
    const err = await openError(path, true);
    expect(err?.code).toBe('ERR_QCOW2_UNSUPPORTED');
    expect(err?.message).toContain('10 ("frobnication")');
  });

  it('a dirty image (lazy refcounts, crashed writer) opens read-only, and read-write is refused with the repair command', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'dirty.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', path, '1M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', '-c', 'abort', path], [-1, 134]);
    expect((await qemuInfo(path))['dirty-flag']).toBe(true);
    const err = await openError(path, false);
    expect(err?.code).toBe('ERR_QCOW2_UNSUPPORTED');
    expect(err?.message).toMatch(/dirty/);
    expect(err?.message).toContain('qemu-img check -r all');
    const node = await openImage(path, { readOnly: true });
    expect((await node.read(0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0x5a))).toBe(true);
    expect((await node.info!()).dirty).toBe(true);
    await node.close();
  });

  it('an image marked corrupt opens read-only only', async () => {
    const dir = await makeTempDir();
    const path = await sample(dir, 'corrupt.qcow2');
    await patch(path, 72, u64(2n));
    const err = await openError(path, false);
    expect(err?.code).toBe('ERR_QCOW2_CORRUPT');
    expect(err?.message).toMatch(/marked corrupt/);
    expect(await openError(path, true)).toBeUndefined();
  });

  it('internal snapshots: read-only works and the image is untouched; read-write is refused', async () => {
    const dir = await makeTempDir();
    const path = await sample(dir, 'snap.qcow2');
    await tool('qemu-img', ['snapshot', '-c', 's1', path]);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x6b 0 4k', path]);
    const before = await readFile(path);
    const err = await openError(path, false);
    expect(err?.code).toBe('ERR_QCOW2_UNSUPPORTED');
    expect(err?.message).toMatch(/internal snapshots/);
    const node = await openImage(path, { readOnly: true });
    const head = await node.read(0, 8 * KiB);
    expect(head.subarray(0, 4 * KiB).equals(Buffer.alloc(4 * KiB, 0x6b))).toBe(true);
    expect(head.subarray(4 * KiB).equals(Buffer.alloc(4 * KiB, 0x5a))).toBe(true);
    expect(((await node.info!()).snapshots as Array<{ name: string }>).map((s) => s.name)).toEqual(['s1']);
    await node.close();
    expect((await readFile(path)).equals(before)).toBe(true);
    await expectClean(path);
  });

  it('version 2 images: read-only', async () => {
    const dir = await makeTempDir();
    const path = await sample(dir, 'v2.qcow2', ['-o', 'compat=0.10']);
    expect((await openError(path, false))?.message).toMatch(/version 2/);
    expect(await openError(path, true)).toBeUndefined();
  });

  it('clears unknown autoclear bits when opened read-write; keeps the bitmaps bit only while no bitmap is enabled', async () => {
    const dir = await makeTempDir();
    // unknown autoclear bit 5
    const a = await sample(dir, 'autoclear.qcow2');
    await patch(a, 88, u64(1n << 5n));
    await (await openImage(a, { readOnly: true })).close();
    expect((await readFile(a)).readBigUInt64BE(88)).toBe(1n << 5n); // read-only: untouched
    await (await openImage(a)).close();
    expect((await readFile(a)).readBigUInt64BE(88)).toBe(0n);

    // a disabled bitmap: our writes do not concern it, QEMU still trusts it afterwards
    const d = await sample(dir, 'disabled.qcow2');
    await tool('qemu-img', ['bitmap', '--add', '--disable', d, 'frozen']);
    const extBefore = (await readFile(d)).subarray(0, 4096);
    let node = await openImage(d);
    await node.write(0, pattern(8 * KiB, 1));
    expect((await node.info!()).bitmaps).toEqual([{ name: 'frozen', granularity: 65536, flags: [] }]);
    await node.close();
    const after = await readFile(d);
    expect(after.readBigUInt64BE(88)).toBe(1n);
    expect(after.subarray(0, 4096).equals(extBefore)).toBe(true);
    await expectClean(d);
    const bitmaps = ((await qemuInfo(d))['format-specific'] as { data: { bitmaps?: unknown[] } }).data.bitmaps;
    expect(bitmaps).toEqual([{ flags: [], name: 'frozen', granularity: 65536 }]);

    // an enabled bitmap would miss our writes: bit 0 is cleared, the extension stays as it was
    const e = await sample(dir, 'enabled.qcow2');
    await tool('qemu-img', ['bitmap', '--add', e, 'live']);
    const header = (await readFile(e)).subarray(0, 4096);
    node = await openImage(e);
    await node.write(0, pattern(8 * KiB, 2));
    await node.close();
    const now = await readFile(e);
    expect(now.readBigUInt64BE(88)).toBe(0n);
    expect(now.subarray(0, 88).equals(header.subarray(0, 88))).toBe(true);
    expect(now.subarray(96, 4096).equals(header.subarray(96, 4096))).toBe(true);
    // QEMU now treats the bitmap as inconsistent: its clusters are leaks, nothing is corrupt
    const c = await qemuCheck(e);
    expect(c.corruptions).toBe(0);
  });
});

describe('malformed qcow2 headers and tables', () => {
  type Case = [name: string, offset: number, bytes: Buffer, message: RegExp];
  // the sample: 64 KiB clusters, L1 at 0x30000, refcount table at 0x10000, 1 MiB
  const cases: Case[] = [
    ['header_length below 104', 100, u32(96), /header_length 96/],
    ['header_length not a multiple of 8', 100, u32(108), /header_length 108/],
    ['header_length beyond the cluster', 100, u32(0x7ffffff8), /header_length 2147483640 exceeds the cluster size 65536/],
    ['cluster_bits 8', 20, u32(8), /cluster_bits 8/],
    ['cluster_bits 22', 20, u32(22), /cluster_bits 22/],
    ['cluster_bits 2^32-1', 20, u32(0xffffffff), /cluster_bits 4294967295/],
    ['version 4', 4, u32(4), /version 4/],
    ['refcount_order 7', 96, u32(7), /refcount_order 7/],
    ['l1_table_offset unaligned', 40, u64(0x30200n), /L1 table offset 197120/],
    ['l1_table_offset huge', 40, u64(1n << 62n), /l1_table_offset 4611686018427387904/],
    ['l1_size 0', 36, u32(0), /L1 table of 0 entries is too small/],
    ['l1_size 2^31', 36, u32(0x80000000), /L1 table of 2147483648 entries/],
    ['virtual size huge', 24, u64(1n << 52n), /too small for the virtual size 4503599627370496/],
    ['virtual size above 2^53', 24, u64(1n << 60n), /size 1152921504606846976 is too large/],
    ['refcount_table_offset unaligned', 48, u64(0x10008n), /refcount table offset 65544/],
    ['refcount_table_offset 0', 48, u64(0n), /refcount table offset|refcount_table_offset is 0/],
    ['refcount_table_clusters 0', 56, u32(0), /refcount_table_clusters is 0/],
    ['refcount_table_clusters 2^32-1', 56, u32(0xffffffff), /refcount table of 4294967295 clusters/],
    ['nb_snapshots above the limit', 60, u32(0x7fffffff), /nb_snapshots 2147483647/],
    ['snapshots without a table', 60, u32(3), /snapshots_offset is 0 with 3 snapshots/],
    ['backing_file_offset beyond the cluster', 8, u64(0x20000n), /backing_file_offset 131072/],
    ['backing name too long', 8, Buffer.concat([u64(0x300n), u32(2000)]), /backing file name of 2000 bytes is too long/],
    ['backing name across the cluster end', 8, Buffer.concat([u64(0xfff0n), u32(100)]), /backing file name of 100 bytes is too long \(at most 16/],
    ['extension longer than the header cluster', 116, u32(0x7fffffff), /has length 2147483647/],
  ];

  it('each corrupted field gives a clean error naming the numbers, read-only and read-write', async () => {
    const dir = await makeTempDir();
    const good = await readFile(await sample(dir, 'good.qcow2'));
    const heapBefore = process.memoryUsage().arrayBuffers;
    for (const [name, offset, bytes, message] of cases) {
      const path = join(dir, 'bad.qcow2');
      await writeBytes(path, good, offset, bytes);
      for (const readOnly of [true, false]) {
        const err = await openError(path, readOnly);
        expect(err, `${name}: opened (read-only ${readOnly})`).toBeDefined();
        expect(['ERR_QCOW2_CORRUPT', 'ERR_QCOW2_UNSUPPORTED'], `${name}: ${err!.code} ${err!.message}`).toContain(err!.code);
        expect(err!.message, name).toMatch(message);
      }
    }
    expect(process.memoryUsage().arrayBuffers - heapBefore).toBeLessThan(64 * 1024 * 1024);
  });

  it('snapshot table fields: past the end of the file, entries too long', async () => {
    const dir = await makeTempDir();
    const path = await sample(dir, 'snap.qcow2');
    await tool('qemu-img', ['snapshot', '-c', 's1', path]);
    const good = await readFile(path);
    const snapshotsOffset = Number(good.readBigUInt64BE(64));
    const bad = join(dir, 'bad.qcow2');
    const cases: Array<[number, Buffer, RegExp]> = [
      [64, u64(BigInt(Math.ceil(good.length / 65536 + 4) * 65536)), /snapshot table at \d+ lies past the end of the file/],
      [64, u64(BigInt(snapshotsOffset + 8)), /snapshot table offset \d+ is not aligned/],
      [60, u32(1000), /snapshot 1 at offset \d+ lies past the end/],
      [snapshotsOffset + 36, u32(0x7fffffff), /snapshot 0 \(extra data 2147483647/],
      [snapshotsOffset + 8, u32(0x7fffffff), /snapshot 0 has an L1 table of 2147483647 entries/],
    ];
    for (const [offset, bytes, message] of cases) {
      await writeBytes(bad, good, offset, bytes);
      const err = await openError(bad, true);
      expect(err?.code).toBe('ERR_QCOW2_CORRUPT');
      expect(err?.message).toMatch(message);
    }
  });

  it('bad L1 and L2 entries give an I/O error when used, not a crash; a bad L2 entry marks the image corrupt as QEMU does', async () => {
    const dir = await makeTempDir();
    const good = await readFile(await sample(dir, 'good.qcow2'));
    const l1 = Number(good.readBigUInt64BE(40));
    const l2 = Number(good.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const bad = join(dir, 'bad.qcow2');
    // [name, where, bytes, message, the image is marked corrupt by the failed request]
    const cases: Array<[string, number, Buffer, RegExp, boolean]> = [
      ['L2 entry with a huge offset', l2, u64(0x80ffffffffff0000n), /data cluster offset \d+ .* too large/, true],
      ['L2 entry not cluster aligned', l2, u64(0x8000000000050200n), /data cluster offset 328192 .* not cluster aligned/, true],
      ['L1 entry with a huge offset', l1, u64(0x80ffffffffff0000n), /L2 table offset \d+ \(L1 index 0\)/, false],
      ['L1 entry not cluster aligned', l1, u64(0x8000000000040200n), /L2 table offset 262656 \(L1 index 0\)/, false],
      ['compressed entry pointing at garbage', l2, u64(0x4000000000000000n | 0x200n), /compressed cluster at 512/, false],
    ];
    for (const [name, offset, bytes, message, marks] of cases) {
      await writeBytes(bad, good, offset, bytes);
      for (const readOnly of [true, false]) {
        if (!readOnly && offset === l1) {
          // the L2 table lies outside the file: a read-write open is refused, naming the entry
          const err = await Qcow2Node.open(bad).then(
            (n) => n.close(),
            (e: unknown) => e,
          );
          expect(err, name).toBeInstanceOf(BlkrepError);
          expect((err as BlkrepError).code, name).toBe('ERR_QCOW2_CORRUPT');
          expect((err as BlkrepError).message, name).toMatch(/L2 table of L1 entry 0 \(L1\[0\]\) at offset \d+ .*(past the end of the file|not aligned)/);
          continue;
        }
        const node = await Qcow2Node.open(bad, { readOnly, onWarning: () => {} });
        try {
          const err = await node.read(0, 4096).then(
            () => undefined,
            (e: unknown) => e,
          );
          expect(err, name).toBeInstanceOf(BlkrepError);
          expect((err as BlkrepError).code, name).toBe('ERR_QCOW2_CORRUPT');
          expect((err as BlkrepError).errno, name).toBe('EIO');
          expect((err as BlkrepError).message, name).toMatch(message);
          if (!readOnly) {
            await expect(node.write(0, Buffer.alloc(512, 1))).rejects.toBeInstanceOf(BlkrepError);
            if (marks) {
              // QEMU's answer to a corrupt entry: marked corrupt, no later write goes through
              await expect(node.write(512 * 1024, Buffer.alloc(512, 1))).rejects.toMatchObject({ code: 'ERR_QCOW2_CORRUPT', errno: 'EIO' });
            } else {
              await node.write(512 * 1024, Buffer.alloc(512, 1));
            }
          }
        } finally {
          await node.close();
        }
        if (!readOnly) expect((await readFile(bad)).readBigUInt64BE(72) & 2n, `${name}: corrupt bit`).toBe(marks ? 2n : 0n);
      }
    }
    expect((await stat(bad)).size).toBeLessThan(1024 * 1024);
  });
});

async function writeBytes(path: string, base: Buffer, offset: number, bytes: Buffer): Promise<void> {
  const copy = Buffer.from(base);
  bytes.copy(copy, offset);
  const h = await open(path, 'w');
  try {
    await h.write(copy, 0, copy.length, 0);
  } finally {
    await h.close();
  }
}
