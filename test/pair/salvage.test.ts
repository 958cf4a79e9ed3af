// test-pair-salvage: a split brain's victim keeps its diverged clusters in a qcow2 overlay over its
// disk. Checked with the real peers: qemu-img check finds it clean, qemu-io reads the victim's
// bytes in the salvaged ranges and the (resynced) disk's elsewhere, and qemu-img convert of the
// overlay after the resync gives back the victim's disk byte for byte. Errors: a range outside the
// disk, an existing overlay, a failing read (no file is left behind); listing for `status`.
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { BlockNode } from '../../src/api/block.js';
import { BlkrepError } from '../../src/api/errors.js';
import { MemoryNode } from '../../src/block/memory.js';
import { RawNode } from '../../src/block/raw.js';
import { listSalvage, planRanges, salvage, salvagePath } from '../../src/pair/salvage.js';
import { expectClean, tool } from '../qcow2/helpers.js';
import { makeTempDir } from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;
/** the victim's diverged writes: unaligned on purpose (rounded out to 64 KiB clusters) */
const DIVERGED = [
  { offset: 70_000, length: 100 },
  { offset: MiB, length: 192 * KiB },
  { offset: MiB + 128 * KiB, length: 256 * KiB }, // overlaps the previous one
  { offset: SIZE - 5000, length: 5000 }, // the last cluster
];

function fill(buf: Buffer, byte: number, ranges: Array<{ offset: number; length: number }>): void {
  for (const r of ranges) buf.fill(byte, r.offset, r.offset + r.length);
}

describe('salvage overlay', () => {
  it('holds the victim clusters; after the resync it reads back as the victim disk (qemu-img check, qemu-io, convert)', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    const victim = Buffer.alloc(SIZE, 0x11);
    fill(victim, 0x22, DIVERGED);
    await writeFile(disk, victim);

    const source = await RawNode.open(disk, { readOnly: true });
    const path = salvagePath(disk, new Date('2026-12-06T02:47:05.123Z'));
    expect(path).toBe(`${disk}.salvage-20261206T024705Z.qcow2`);
    let result;
    try {
      result = await salvage(source, DIVERGED, path, { backing: { file: 'disk.img', format: 'raw' } });
    } finally {
      await source.close();
    }
    expect(result.ranges).toEqual([
      { offset: 64 * KiB, length: 64 * KiB },
      { offset: MiB, length: 384 * KiB },
      { offset: SIZE - 64 * KiB, length: 64 * KiB },
    ]);
    expect(result.bytes).toBe(512 * KiB);
    await expectClean(path);

    // the resync overwrites the victim's disk with the winner's data (0x33) in every salvaged range
    const resynced = Buffer.from(victim);
    fill(resynced, 0x33, result.ranges);
    await writeFile(disk, resynced);

    await tool('qemu-io', ['-r', '-f', 'qcow2', path, '-c', `read -P 0x22 ${MiB} ${384 * KiB}`, '-c', `read -P 0x22 70000 100`, '-c', `read -P 0x11 ${64 * KiB} 4464`, '-c', `read -P 0x11 0 ${64 * KiB}`, '-c', `read -P 0x11 ${2 * MiB} ${MiB}`, '-c', `read -P 0x22 ${SIZE - 5000} 5000`]);
    // a read of the wrong pattern fails: qemu-io really compares
    const wrong = await tool('qemu-io', ['-r', '-f', 'qcow2', path, '-c', `read -P 0x33 ${MiB} 4096`], [0, 1]);
    expect(wrong).toContain('Pattern verification failed');

    await tool('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', path, join(dir, 'back.raw')]);
    expect((await readFile(join(dir, 'back.raw'))).equals(victim)).toBe(true);
    const info = JSON.parse(await tool('qemu-img', ['info', '--output=json', path])) as Record<string, unknown>;
    expect(info).toMatchObject({ format: 'qcow2', 'virtual-size': SIZE, 'cluster-size': 65536, 'backing-filename': 'disk.img', 'backing-filename-format': 'raw' });
  });

  it('without a backing file the overlay holds just the salvaged clusters (zeros elsewhere)', async () => {
    const dir = await makeTempDir();
    const mem = new MemoryNode(MiB);
    await mem.write(0, Buffer.alloc(MiB, 0x44));
    const path = join(dir, 'x.salvage.qcow2');
    await salvage(mem, [{ offset: 128 * KiB, length: 64 * KiB }], path, { chunkBytes: 4096 });
    await expectClean(path);
    await tool('qemu-io', ['-r', '-f', 'qcow2', path, '-c', `read -P 0x44 ${128 * KiB} ${64 * KiB}`, '-c', `read -P 0 0 ${128 * KiB}`, '-c', `read -P 0 ${192 * KiB} ${MiB - 192 * KiB}`]);
  });

  it('refuses a range outside the disk, naming the numbers, and creates nothing', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'd.salvage.qcow2');
    await expect(salvage(new MemoryNode(MiB), [{ offset: MiB - 10, length: 20 }], path)).rejects.toMatchObject({
      code: 'ERR_OUT_OF_RANGE',
      message: `salvage range of 20 bytes at offset ${MiB - 10} is not inside the disk (size ${MiB})`,
    });
    await expect(salvage(new MemoryNode(MiB), [{ offset: 0, length: 0 }], path)).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    expect(await readdir(dir)).toEqual([]);
  });

  it('never replaces an existing salvage overlay (ERR_EXISTS)', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'd.salvage.qcow2');
    await writeFile(path, 'keep me');
    await expect(salvage(new MemoryNode(MiB), [{ offset: 0, length: 512 }], path)).rejects.toMatchObject({ code: 'ERR_EXISTS', message: `the salvage overlay ${path} exists already: a salvage is never replaced` });
    expect(await readFile(path, 'utf8')).toBe('keep me');
  });

  it('a read error of the victim fails the salvage with its errno and offset, leaving no file', async () => {
    const dir = await makeTempDir();
    const mem = new MemoryNode(MiB);
    const failing: BlockNode = Object.assign(Object.create(mem) as BlockNode, {
      read: async (offset: number, length: number) => {
        if (offset >= 256 * KiB) throw new BlkrepError('ERR_INJECTED', 'injected read error', { errno: 'EIO' });
        return mem.read(offset, length);
      },
    });
    const path = join(dir, 'd.salvage.qcow2');
    await expect(salvage(failing, [{ offset: 0, length: 512 * KiB }], path, { chunkBytes: 128 * KiB })).rejects.toMatchObject({
      code: 'ERR_INJECTED',
      errno: 'EIO',
      message: `salvage: reading ${128 * KiB} bytes at offset ${256 * KiB} of memory:${MiB}: injected read error`,
    });
    expect(await readdir(dir)).toEqual([]);
  });

  it('an aborted salvage leaves no file', async () => {
    const dir = await makeTempDir();
    const ac = new AbortController();
    ac.abort();
    await expect(salvage(new MemoryNode(MiB), [{ offset: 0, length: 512 }], join(dir, 'a.qcow2'), { signal: ac.signal })).rejects.toBeTruthy();
    expect(await readdir(dir)).toEqual([]);
  });

  it('listSalvage lists complete overlays oldest first with their time, then leftovers of a crash; ignores the rest', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'vm.img');
    await writeFile(disk, '');
    await writeFile(`${disk}.salvage-20261206T030000Z.qcow2`, 'b'.repeat(10));
    await writeFile(`${disk}.salvage-20251231T235959Z.qcow2`, 'a');
    await writeFile(join(dir, '.vm.img.salvage-20261206T040000Z.qcow2.tmp-123-00ff'), 'ccc');
    await writeFile(join(dir, 'vm.img.salvage-notatime.qcow2'), '');
    await writeFile(join(dir, 'other.img.salvage-20261206T030000Z.qcow2'), '');
    expect(await listSalvage(disk)).toEqual([
      { path: `${disk}.salvage-20251231T235959Z.qcow2`, createdAt: '2025-12-31T23:59:59Z', fileBytes: 1, complete: true },
      { path: `${disk}.salvage-20261206T030000Z.qcow2`, createdAt: '2026-12-06T03:00:00Z', fileBytes: 10, complete: true },
      { path: join(dir, '.vm.img.salvage-20261206T040000Z.qcow2.tmp-123-00ff'), createdAt: null, fileBytes: 3, complete: false },
    ]);
    expect(await listSalvage(join(dir, 'nowhere', 'x.img'))).toEqual([]);
  });

  it('planRanges merges touching ranges and clips the last cluster to the disk', () => {
    expect(planRanges([{ offset: 4096, length: 1 }, { offset: 65536, length: 1 }], 100_000, 65536)).toEqual([{ offset: 0, length: 100_000 }]);
  });
});
