/**
 * make-empty (B.8, B.12 item 10): afterwards every cluster is unallocated (reads fall through to
 * the backing file, `qemu-img map` shows nothing at depth 0), `qemu-img check` is clean, and the
 * file gives its space back. In the common layout the result is the file QEMU leaves after
 * `qemu-img commit`; images whose tables moved, and images with bitmaps (whose clusters must
 * stay), take the other paths.
 */
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadNative } from '../../src/block/native.js';
import { Qcow2Node } from '../../src/block/qcow2/index.js';
import { makeTempDir } from '../support/spawn.js';
import { expectClean, expectSame, pattern, qemuCheck, qemuInfo, qemuMap, tool, KiB, MiB } from './helpers.js';

async function overlayWithData(dir: string, clusterSize: number, size: number): Promise<{ top: string; base: Buffer }> {
  const base = pattern(size, 3);
  await writeFile(join(dir, 'base.raw'), base);
  const top = join(dir, 'top.qcow2');
  await Qcow2Node.create(top, { clusterSize, backing: 'base.raw', backingFormat: 'raw' });
  const node = await Qcow2Node.open(top);
  for (let i = 0; i < 200; i++) {
    const at = (i * 104729 * 37) % (size - 70 * KiB);
    if (i % 5 === 3) await node.writeZeroes(at, 64 * KiB);
    else if (i % 5 === 4) await node.trim(at, 64 * KiB);
    else await node.write(at, pattern(3000 + i * 301, i));
  }
  await node.close();
  return { top, base };
}

async function expectEmpty(top: string, base: Buffer): Promise<void> {
  await expectClean(top);
  for (const m of await qemuMap(top)) expect(m.depth, JSON.stringify(m)).toBeGreaterThanOrEqual(1);
  const node = await Qcow2Node.open(top, { readOnly: true });
  try {
    expectSame(await node.read(0, node.size), base, 'reads fall through to the backing file');
    expect((await node.extents(0, node.size)).every((e) => e.depth === 2)).toBe(true);
  } finally {
    await node.close();
  }
}

describe('qcow2 make-empty', () => {
  it('leaves what qemu-img commit leaves in the top image', async () => {
    const dir = await makeTempDir();
    const { top, base } = await overlayWithData(dir, 64 * KiB, 8 * MiB);
    const twin = await makeTempDir();
    await copyFile(top, join(twin, 'top.qcow2'));
    await copyFile(join(dir, 'base.raw'), join(twin, 'base.raw'));
    const sizeBefore = (await stat(top)).size;

    const node = await Qcow2Node.open(top);
    await node.makeEmpty();
    await node.close();
    await tool('qemu-img', ['commit', '-q', join(twin, 'top.qcow2')]);

    await expectEmpty(top, base);
    expect((await stat(top)).size).toBeLessThan(sizeBefore);
    expectSame(await readFile(top), await readFile(join(twin, 'top.qcow2')), 'our top against QEMU’s after commit');
  });

  it('works when the refcount table has moved (512-byte clusters), and the image stays usable', async () => {
    const dir = await makeTempDir();
    const { top, base } = await overlayWithData(dir, 512, 12 * MiB);
    let node = await Qcow2Node.open(top);
    for (let at = 0; at < 10 * MiB; at += 128 * KiB) await node.write(at, pattern(100 * KiB, at));
    await node.flush();
    const header = await readFile(top);
    expect(Number(header.readBigUInt64BE(48)), 'refcount table moved').toBeGreaterThan(512);
    const usedBefore = (await stat(top)).blocks * 512;
    await node.makeEmpty();
    await node.close();
    await expectEmpty(top, base);
    // the moved refcount table keeps the file long; the space before it is punched out
    if (loadNative()) expect((await stat(top)).blocks * 512).toBeLessThan(usedBefore / 4);

    // and it keeps working: write, make empty again, write again
    node = await Qcow2Node.open(top);
    const data = pattern(300 * KiB, 9);
    await node.write(5 * MiB + 7, data);
    await node.makeEmpty();
    await node.write(MiB, data);
    await node.close();
    await expectClean(top);
    const expected = Buffer.from(base);
    data.copy(expected, MiB);
    const check = await Qcow2Node.open(top, { readOnly: true });
    expectSame(await check.read(0, check.size), expected, 'after the second make-empty');
    await check.close();
  });

  it('keeps bitmaps (and their clusters) by discarding cluster by cluster', async () => {
    const dir = await makeTempDir();
    const { top, base } = await overlayWithData(dir, 64 * KiB, 4 * MiB);
    await tool('qemu-img', ['bitmap', '--add', '--disable', top, 'kept']);
    const node = await Qcow2Node.open(top);
    await node.makeEmpty();
    await node.close();
    await expectEmpty(top, base);
    const info = await qemuInfo(top);
    expect((info['format-specific'] as { data: { bitmaps: unknown } }).data.bitmaps).toEqual([{ flags: [], name: 'kept', granularity: 65536 }]);
  });

  it('waits for requests in flight; writes after it stay', async () => {
    const dir = await makeTempDir();
    const { top, base } = await overlayWithData(dir, 64 * KiB, 4 * MiB);
    const node = await Qcow2Node.open(top);
    const before = node.write(0, pattern(64 * KiB, 1));
    const empty = node.makeEmpty();
    await before;
    await empty;
    const after = pattern(10 * KiB, 2);
    await node.write(100 * KiB, after);
    await node.close();
    await expectClean(top);
    const expected = Buffer.from(base);
    after.copy(expected, 100 * KiB);
    const check = await Qcow2Node.open(top, { readOnly: true });
    expectSame(await check.read(0, check.size), expected, 'contents');
    await check.close();
  });

  it('keepSpaceOnEmpty (the hidden disk): the file keeps its length, new clusters land inside it from the start, qemu-img check clean; cut back after an epoch that used under a quarter', async () => {
    const dir = await makeTempDir();
    const base = pattern(8 * MiB, 3);
    await writeFile(join(dir, 'base.raw'), base);
    const top = join(dir, 'top.qcow2');
    await Qcow2Node.create(top, { clusterSize: 64 * KiB, backing: 'base.raw', backingFormat: 'raw' });
    let node = await Qcow2Node.open(top, { keepSpaceOnEmpty: true });
    // epoch 1: 64 clusters (4 MiB), as copies land in hidden
    for (let c = 0; c < 64; c++) await node.write(c * 2 * 64 * KiB, pattern(64 * KiB, 100 + c));
    await node.flush();
    const length1 = (await stat(top)).size;
    const allocated1 = (await stat(top)).blocks * 512;
    expect(length1).toBeGreaterThan(4 * MiB);
    await node.makeEmpty();
    expect((await stat(top)).size, 'the file keeps its length').toBe(length1);
    if (loadNative()) expect((await stat(top)).blocks * 512, 'nor is anything punched').toBe(allocated1);
    expect(node.mapsNothing).toBe(true);
    await node.close();
    await expectEmpty(top, base);

    // epoch 2 (reopened, as after a restart): 20 clusters reuse the freed ones, the file does not grow
    node = await Qcow2Node.open(top, { keepSpaceOnEmpty: true });
    const expected = Buffer.from(base);
    for (let c = 0; c < 20; c++) {
      const data = pattern(64 * KiB, 200 + c);
      await node.write((c * 3 + 1) * 64 * KiB, data);
      data.copy(expected, (c * 3 + 1) * 64 * KiB);
    }
    await node.flush();
    expect((await stat(top)).size, 'new clusters land inside the old length').toBe(length1);
    const hosts = (await qemuMap(top)).filter((m) => m.depth === 0 && m.data).map((m) => m.offset!);
    expect(hosts.length).toBeGreaterThan(0);
    // the first free clusters: right after the metadata that stayed (header, refcount table and block, L1)
    expect(Math.max(...hosts), 'reused from the start of the data area').toBeLessThan(32 * 64 * KiB);
    expectSame(await node.read(0, node.size), expected, 'epoch 2 contents');
    await node.close();
    await expectClean(top);
    node = await Qcow2Node.open(top, { keepSpaceOnEmpty: true });

    // emptied right after an open: the whole file counts as reached (init), so nothing is cut
    await node.makeEmpty();
    expect((await stat(top)).size).toBe(length1);
    // an epoch of 8 clusters since that make-empty (reached: 4 of metadata, an L2 table and 8, under a
    // quarter of the file's 69): cut back to them
    for (let c = 0; c < 8; c++) await node.write(c * 64 * KiB, pattern(64 * KiB, 300 + c));
    await node.makeEmpty();
    const length3 = (await stat(top)).size;
    expect(length1).toBe(69 * 64 * KiB);
    expect(length3).toBe(13 * 64 * KiB);
    const data = pattern(300 * KiB, 9);
    await node.write(MiB + 7, data);
    await node.close();
    await expectClean(top);
    const final = Buffer.from(base);
    data.copy(final, MiB + 7);
    const check = await Qcow2Node.open(top, { readOnly: true });
    expectSame(await check.read(0, check.size), final, 'after the cut back');
    await check.close();
    const c = await qemuCheck(top);
    expect({ leaks: c.leaks, corruptions: c.corruptions }).toEqual({ leaks: 0, corruptions: 0 });
  });

  it('mapsNothing: true for a new overlay and after make-empty, false once a cluster is mapped (a zero cluster too)', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'base.raw'), Buffer.alloc(4 * MiB, 1));
    const top = join(dir, 'top.qcow2');
    await Qcow2Node.create(top, { clusterSize: 64 * KiB, backing: 'base.raw', backingFormat: 'raw' });
    const node = await Qcow2Node.open(top);
    try {
      expect(node.mapsNothing).toBe(true);
      await node.writeZeroes(3 * MiB, 64 * KiB);
      expect(node.mapsNothing).toBe(false);
      await node.makeEmpty();
      expect(node.mapsNothing).toBe(true);
      await node.write(0, pattern(512, 1));
      expect(node.mapsNothing).toBe(false);
    } finally {
      await node.close();
    }
  });
});

