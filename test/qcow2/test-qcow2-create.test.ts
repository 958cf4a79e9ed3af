/**
 * Images we create and grow (B.12 items 1, 4, 7, 8, 17): byte for byte what `qemu-img create`
 * writes in the common cases, `qemu-img info` reads the same, `qemu-img check` is clean; the growth
 * paths (new L2 tables, new refcount blocks, a larger refcount table, a larger L1 table) stay
 * clean and keep the data.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { Qcow2Node } from '../../src/block/qcow2/index.js';
import { makeTempDir } from '../support/spawn.js';
import { expectClean, expectSame, pattern, qemuCompare, qemuInfo, tool, KiB, MiB } from './helpers.js';

function comparableInfo(info: Record<string, unknown>): Record<string, unknown> {
  const { filename: _f, 'actual-size': _a, 'full-backing-filename': _b, ...rest } = info;
  return rest;
}

describe('qcow2 create', () => {
  it('writes what qemu-img create writes', async () => {
    const dir = await makeTempDir();
    await tool('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'base.raw'), '3M']);
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '5M']);
    const cases: Array<{ size?: number; clusterSize?: number; refcountBits?: number; backing?: string; backingFormat?: string }> = [
      { size: 4 * MiB },
      { size: 1000 }, // rounded up to 1024, as qemu-img does
      { size: 0 },
      { size: 10 * 1024 * MiB, clusterSize: 512 }, // a large L1: more refcount blocks
      { size: 64 * MiB, clusterSize: 4 * KiB, refcountBits: 1 },
      { size: 64 * MiB, clusterSize: 2 * MiB, refcountBits: 64 },
      { size: 100 * MiB, refcountBits: 8 },
      { backing: 'base.raw', backingFormat: 'raw' }, // size from the backing file
      { size: 8 * MiB, backing: 'base.qcow2', backingFormat: 'qcow2' },
      { size: 8 * MiB, clusterSize: 512, backing: 'base.qcow2', backingFormat: 'qcow2' },
    ];
    for (const c of cases) {
      const what = JSON.stringify(c);
      const ours = join(dir, 'ours.qcow2');
      const theirs = join(dir, 'theirs.qcow2');
      await Qcow2Node.create(ours, c);
      const opts = [`cluster_size=${c.clusterSize ?? 65536}`, `refcount_bits=${c.refcountBits ?? 16}`];
      await tool('qemu-img', [
        'create', '-q', '-f', 'qcow2', '-o', opts.join(','),
        ...(c.backing ? ['-b', c.backing, '-F', c.backingFormat!] : []),
        theirs, ...(c.size === undefined ? [] : [String(c.size)]),
      ], [0], 60_000);
      await expectClean(ours);
      expect(comparableInfo(await qemuInfo(ours)), what).toEqual(comparableInfo(await qemuInfo(theirs)));
      expectSame(await readFile(ours), await readFile(theirs), what);
    }
  }, 60_000);

  it('refuses bad parameters', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'x.qcow2');
    await expect(Qcow2Node.create(path, { size: MiB, clusterSize: 1000 })).rejects.toThrow(/cluster size 1000/);
    await expect(Qcow2Node.create(path, { size: MiB, clusterSize: 4 * MiB })).rejects.toThrow(/cluster size 4194304/);
    await expect(Qcow2Node.create(path, { size: MiB, refcountBits: 3 })).rejects.toThrow(/refcount width 3/);
    await expect(Qcow2Node.create(path, {})).rejects.toThrow(/size .* is required/);
    await expect(Qcow2Node.create(path, { size: 2 ** 52, clusterSize: 512 })).rejects.toThrow(/too large/);
    await expect(Qcow2Node.create(path, { size: MiB, backing: 'x', backingFormat: 'vmdk' })).rejects.toThrow(/vmdk/);
    await expect(Qcow2Node.create(path, { size: MiB, backing: 'missing.raw' })).rejects.toThrow(/missing\.raw/);
  });
});

describe('qcow2 growth paths', () => {
  it('new L2 tables, new refcount blocks and a larger refcount table (512-byte clusters), then a larger L1', async () => {
    const dir = await makeTempDir();
    for (const refcountBits of [64, 16, 1]) {
      const path = join(dir, `grow${refcountBits}.qcow2`);
      const size = 12 * MiB;
      await Qcow2Node.create(path, { size, clusterSize: 512, refcountBits });
      const reftableBefore = (await readFile(path)).readBigUInt64BE(48);
      const model = Buffer.alloc(size);
      const node = await Qcow2Node.open(path);
      // scattered then sequential writes: many L2 tables, blocks and several table growths
      for (let i = 0; i < 400; i++) {
        const at = ((i * 7919 * 512) % (size - 8192)) + (i % 7) * 3;
        const data = pattern(1 + ((i * 131) % 6000), i);
        await node.write(at, data);
        data.copy(model, at);
      }
      for (let at = 0; at < size; at += 256 * KiB) {
        const data = pattern(Math.min(200 * KiB, size - at), at);
        await node.write(at, data);
        data.copy(model, at);
      }
      await node.flush();
      // grow the virtual size: the L1 table moves and grows
      await node.resize(size + 40 * MiB);
      const tail = pattern(5000, 99);
      await node.write(size + 30 * MiB, tail);
      expectSame(await node.read(0, size), model, `refcount_bits=${refcountBits}: contents`);
      await node.close();
      const header = await readFile(path);
      // one cluster of refcount table covers 2 MiB (64-bit) or 8 MiB (16-bit) of 512-byte clusters
      if (refcountBits !== 1) expect(header.readBigUInt64BE(48), `refcount_bits=${refcountBits}: the refcount table moved`).not.toBe(reftableBefore);
      expect(Number(header.readBigUInt64BE(24))).toBe(size + 40 * MiB);
      await expectClean(path);
      const full = Buffer.alloc(size + 40 * MiB);
      model.copy(full);
      tail.copy(full, size + 30 * MiB);
      await qemuCompare(path, full, join(dir, 'model.raw'));
    }
  }, 60_000);

  it('writes to the last, partial cluster of an unaligned virtual size', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'odd.qcow2');
    const size = 3 * 64 * KiB + 1536;
    await Qcow2Node.create(path, { size });
    const node = await Qcow2Node.open(path);
    await node.write(size - 1000, Buffer.alloc(1000, 0x77));
    await node.writeZeroes(size - 100, 100);
    await node.trim(size - 1536, 1536);
    await node.write(size - 512, Buffer.alloc(512, 0x78));
    await node.close();
    await expectClean(path);
    const model = Buffer.alloc(size);
    model.fill(0x78, size - 512);
    await qemuCompare(path, model, join(dir, 'model.raw'));
  });
});
