/**
 * openImage with qcow2: the probe, the `format` option, backing chains (relative names, formats,
 * mixed drivers, a missing backing file, loops), info().
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { MAX_CHAIN_DEPTH, openImage } from '../../src/block/open.js';
import { Qcow2Node } from '../../src/block/qcow2/index.js';
import { existsSync } from 'node:fs';
import { hasTool, makeTempDir, start, waitFor } from '../support/spawn.js';
import { pattern, tool, KiB, MiB } from './helpers.js';

async function rejection(p: Promise<unknown>): Promise<BlkrepError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof BlkrepError) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

describe('openImage and qcow2', () => {
  it('probes qcow2; format overrides the probe', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'a.qcow2');
    await Qcow2Node.create(image, { size: MiB });
    const q = await openImage(image);
    expect(q.driver).toBe('qcow2');
    expect(q.size).toBe(MiB);
    expect(q.caps.allocationDepth).toBe(true);
    await q.write(0, Buffer.alloc(4 * KiB, 1));
    await q.close();

    const raw = await openImage(image, { format: 'raw', readOnly: true });
    expect(raw.driver).toBe('raw');
    expect((await raw.read(0, 4)).readUInt32BE(0)).toBe(0x514649fb);
    await raw.close();

    await writeFile(join(dir, 'plain.raw'), Buffer.alloc(MiB));
    const err = await rejection(openImage(join(dir, 'plain.raw'), { format: 'qcow2' }));
    expect(err.code).toBe('ERR_QCOW2_CORRUPT');
    expect(err.message).toMatch(/no qcow2 magic/);
  });

  it('opens backing chains of mixed drivers, relative to the image that names them', async () => {
    const dir = await makeTempDir();
    const sub = join(dir, 'sub');
    await tool('mkdir', [sub]);
    const base = pattern(2 * MiB, 1);
    await writeFile(join(dir, 'base.raw'), base);
    await Qcow2Node.create(join(dir, 'mid.qcow2'), { backing: 'base.raw', backingFormat: 'raw' });
    // the top lives in a subdirectory and names its backing relative to itself
    await Qcow2Node.create(join(sub, 'top.qcow2'), { backing: '../mid.qcow2', backingFormat: 'qcow2', size: 3 * MiB });
    const top = await openImage(join(sub, 'top.qcow2'));
    expect((await top.read(0, 2 * MiB)).equals(base)).toBe(true);
    expect((await top.read(2 * MiB, MiB)).equals(Buffer.alloc(MiB))).toBe(true);
    expect(await top.extents!(0, 3 * MiB)).toEqual([
      { length: 2 * MiB, hole: false, zero: false, depth: 3 },
      { length: MiB, hole: true, zero: true, depth: 0 },
    ]);
    const info = await top.info!();
    expect(info).toMatchObject({ format: 'qcow2', virtualSize: 3 * MiB, clusterSize: 65536, backingFile: '../mid.qcow2', backingFormat: 'qcow2', refcountBits: 16, compat: '1.1', dirty: false, corrupt: false });
    await top.close();

    // a backing file that is not a path: memory:SIZE (any spec openImage takes works)
    await Qcow2Node.create(join(dir, 'on-memory.qcow2'), { size: MiB, backing: 'memory:1M', backingFormat: 'raw' });
    const m = await openImage(join(dir, 'on-memory.qcow2'));
    expect((await m.extents!(0, MiB))[0]).toMatchObject({ depth: 2 });
    await m.close();
  });

  it.skipIf(!hasTool('qemu-nbd'))('a qcow2 overlay over an NBD export (qemu-nbd) reads, writes and maps through it', async () => {
    const dir = await makeTempDir();
    const base = pattern(2 * MiB, 8);
    base.fill(0, MiB, MiB + 256 * KiB);
    await writeFile(join(dir, 'base.raw'), base);
    const sock = join(dir, 'q.sock');
    start('qemu-nbd', ['-r', '-f', 'raw', '-k', sock, '-t', join(dir, 'base.raw')]);
    await waitFor(() => existsSync(sock), 'qemu-nbd to listen');
    const uri = `nbd+unix:///?socket=${sock}`;
    await Qcow2Node.create(join(dir, 'top.qcow2'), { size: 3 * MiB, backing: uri, backingFormat: 'raw' });
    const top = await openImage(join(dir, 'top.qcow2'));
    const data = pattern(5000, 9);
    await top.write(300 * KiB + 11, data); // copy-on-write from the NBD export
    const expected = Buffer.alloc(3 * MiB);
    base.copy(expected);
    data.copy(expected, 300 * KiB + 11);
    expect((await top.read(0, 3 * MiB)).equals(expected)).toBe(true);
    const extents = await top.extents!(0, 3 * MiB);
    expect(extents[0]).toMatchObject({ depth: 2, hole: false });
    expect(extents.find((e) => e.depth === 1)).toBeDefined();
    expect(extents[extents.length - 1]).toMatchObject({ depth: 0, hole: true, zero: true });
    await top.close();
  });

  it('a missing backing file, an unsupported backing format and a loop are clean errors', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'base.raw'), Buffer.alloc(MiB));
    await Qcow2Node.create(join(dir, 'top.qcow2'), { backing: 'base.raw', backingFormat: 'raw' });
    await tool('rm', [join(dir, 'base.raw')]);
    let err = await rejection(openImage(join(dir, 'top.qcow2')));
    expect(err.code).toBe('ERR_BACKING');
    expect(err.message).toContain('"base.raw"');

    await tool('qemu-img', ['create', '-q', '-f', 'vmdk', join(dir, 'base.vmdk'), '1M']);
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.vmdk', '-F', 'vmdk', join(dir, 'vm.qcow2')]);
    err = await rejection(openImage(join(dir, 'vm.qcow2')));
    expect(err.message).toMatch(/backing format "vmdk" is not supported/);

    // a.qcow2 → b.qcow2 → a.qcow2
    await Qcow2Node.create(join(dir, 'a.qcow2'), { size: MiB });
    await Qcow2Node.create(join(dir, 'b.qcow2'), { size: MiB, backing: 'a.qcow2', backingFormat: 'qcow2' });
    await tool('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, 'a.qcow2')]);
    err = await rejection(openImage(join(dir, 'a.qcow2'), { readOnly: true }));
    expect(err.message).toContain(`deeper than ${MAX_CHAIN_DEPTH}`);
  });
});
