/**
 * qcow2's own persistent bitmaps (reference part C) through `blkrep bitmap …`, against QEMU in
 * both directions:
 *   - bitmaps QEMU made and filled (qemu-img bitmap, writes through qemu-io, which records them
 *     in enabled bitmaps and stores them at close) read by blkrep exactly as qemu-nbd -B exports
 *     them (nbdinfo --map=qemu:dirty-bitmap:NAME), at 512 B … 1 MiB granularity, over several
 *     data clusters;
 *   - bitmaps blkrep made and changed seen by qemu-img info (names, granularities, flags), clean
 *     for qemu-img check, exported by qemu-nbd with exactly blkrep's bits, and changed further
 *     by qemu-img bitmap and qemu-io;
 *   - idempotence, in-use bitmaps (only removable, as with QEMU), limits and a corrupt directory
 *     (clean errors), and the autoclear rule when blkrep writes guest data.
 */
import { existsSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DirtyBitmap } from '../../src/bitmap/dirty-bitmap.js';
import { openBitmapStore, type BitmapStore } from '../../src/bitmap/store.js';
import { inUse, Qcow2BitmapDirectory, type NextEntry } from '../../src/block/qcow2/bitmaps.js';
import { BME_AUTO } from '../../src/block/qcow2/format.js';
import { Qcow2Node } from '../../src/block/qcow2/node.js';
import { CrashContainer } from './crash-container.js';
import { hasTool, makeTempDir, run, serve, start, waitFor } from '../support/spawn.js';
import { entriesOf, fails, model, nbdinfoMapText, ok, zeroFile, type NbdinfoEntry } from '../bitmap-cli/helpers.js';
import { expectClean, KiB, MiB, qemuCheck, qemuInfo, tool } from './helpers.js';

const hasPeers = hasTool('qemu-img') && hasTool('qemu-io') && hasTool('qemu-nbd') && hasTool('nbdinfo');
const SIZE = 16 * MiB;

interface Change {
  name: string;
  changed: boolean;
  bitmap: { name: string; granularity: number; enabled: boolean; dirtyBytes: number } | null;
}
interface Listed {
  name: string;
  granularity: number;
  enabled: boolean;
  dirtyBytes: number;
  size: number;
  loadState: { state: string; fault?: string };
}
type Run = { offset: number; length: number };

async function image(dir: string, options: string[] = [], name = 'd.qcow2'): Promise<string> {
  const path = join(dir, name);
  await tool('qemu-img', ['create', '-q', '-f', 'qcow2', ...options, path, String(SIZE)]);
  return path;
}

/** The bitmaps qemu-img info lists. */
async function qemuBitmaps(path: string): Promise<Array<{ name: string; granularity: number; flags: string[] }>> {
  const info = (await qemuInfo(path)) as { 'format-specific': { data: { bitmaps?: Array<{ name: string; granularity: number; flags: string[] }> } } };
  return info['format-specific'].data.bitmaps ?? [];
}

/** Each bitmap as qemu-nbd -r -B NAME exports it (nbdinfo --map --json), qemu-nbd stopped after. */
async function qemuMaps(path: string, names: string[]): Promise<Record<string, NbdinfoEntry[]>> {
  const sock = join(dirname(path), `q${Math.floor(Math.random() * 1e6)}.sock`);
  const nbd = start('qemu-nbd', ['-r', '-f', 'qcow2', '-k', sock, '-t', ...names.flatMap((n) => ['-B', n]), path]);
  try {
    await waitFor(() => existsSync(sock) || nbd.child.exitCode !== null, 'qemu-nbd to listen', { timeoutMs: 10_000 });
    if (!existsSync(sock)) throw new Error(`qemu-nbd exited: ${nbd.stderr()}`);
    const out: Record<string, NbdinfoEntry[]> = {};
    for (const n of names) out[n] = JSON.parse(await nbdinfoMapText(`nbd+unix:///?socket=${sock}`, `qemu:dirty-bitmap:${n}`)) as NbdinfoEntry[];
    return out;
  } finally {
    await nbd.stop();
  }
}

async function dump(path: string, name: string): Promise<NbdinfoEntry[]> {
  return ok<NbdinfoEntry[]>(['bitmap', 'dump', path, '--name', name]);
}

/**
 * The same store the commands use, in this process (the command line itself is covered by the
 * tests above; spawning it for every step would make this file slow on a loaded machine).
 */
async function withStore<T>(path: string, fn: (s: BitmapStore) => Promise<T>): Promise<T> {
  const s = await openBitmapStore(path);
  try {
    return await fn(s);
  } finally {
    await s.close();
  }
}

async function bitsOf(path: string, name: string): Promise<NbdinfoEntry[]> {
  return withStore(path, async (s) => entriesOf((await s.read(name)).bitmap));
}

async function qemuIo(path: string, commands: string[]): Promise<void> {
  await tool('qemu-io', ['-f', 'qcow2', path, ...commands.flatMap((c) => ['-c', c])]);
}

/** The bits blkrep and qemu-nbd see are both exactly `expected`. */
async function expectBits(path: string, expected: Record<string, NbdinfoEntry[]>): Promise<void> {
  // both only read the image (qemu-nbd -r shares it): run at once
  const names = Object.keys(expected);
  const [qemu, ...ours] = await Promise.all([qemuMaps(path, names), ...names.map((n) => dump(path, n))]);
  names.forEach((name, i) => {
    expect(ours[i], `blkrep's view of ${name}`).toEqual(expected[name]);
    expect(qemu[name], `qemu-nbd's view of ${name}`).toEqual(expected[name]);
  });
}

describe.skipIf(!hasPeers)('qcow2 persistent bitmaps', () => {
  it('reads what QEMU wrote: qemu-io writes recorded at 512 B, 64 KiB and 1 MiB granularity over many data clusters; disabled and merged bitmaps', async () => {
    const dir = await makeTempDir();
    const img = await image(dir, ['-o', 'cluster_size=512']);
    await tool('qemu-img', ['bitmap', '--add', '-g', '512', img, 'b512']);
    await tool('qemu-img', ['bitmap', '--add', '-g', '64K', img, 'b64k']);
    await tool('qemu-img', ['bitmap', '--add', '-g', '1M', img, 'b1m']);
    await tool('qemu-img', ['bitmap', '--add', '--disable', '-g', '64K', img, 'off']);
    const writes: Run[] = [
      { offset: 0, length: 512 },
      { offset: MiB, length: 4 * KiB },
      { offset: 7 * MiB - 512, length: 1536 },
      { offset: 12 * MiB, length: 64 * KiB },
      { offset: 15 * MiB + 3 * 512, length: 512 },
      { offset: SIZE - 512, length: 512 },
    ];
    await qemuIo(img, [...writes.slice(0, 3).map((w) => `write ${w.offset} ${w.length}`), `write -z ${writes[3]!.offset} ${writes[3]!.length}`, ...writes.slice(4).map((w) => `write ${w.offset} ${w.length}`)]);
    const want = {
      b512: entriesOf(model(SIZE, 512, writes)),
      b64k: entriesOf(model(SIZE, 64 * KiB, writes)),
      b1m: entriesOf(model(SIZE, MiB, writes)),
      off: entriesOf(model(SIZE, 64 * KiB)),
    };
    await expectBits(img, want);

    const list = await ok<Listed[]>(['bitmap', 'list', img]);
    expect(list.map((b) => [b.name, b.granularity, b.enabled, b.dirtyBytes, b.loadState.state])).toEqual([
      ['b512', 512, true, model(SIZE, 512, writes).dirtyBytes, 'clean'],
      ['b64k', 64 * KiB, true, model(SIZE, 64 * KiB, writes).dirtyBytes, 'clean'],
      ['b1m', MiB, true, model(SIZE, MiB, writes).dirtyBytes, 'clean'],
      ['off', 64 * KiB, false, 0, 'clean'],
    ]);
    // blkrep info lists the bitmaps as qemu-img info does
    const info = await ok<{ 'format-specific': { data: { bitmaps: unknown[] } } }>(['info', img]);
    expect(info['format-specific'].data.bitmaps).toEqual(await qemuBitmaps(img));

    // QEMU merges a finer bitmap into the disabled one
    await tool('qemu-img', ['bitmap', '--merge', 'b512', img, 'off']);
    expect(await dump(img, 'off')).toEqual(want.b64k);
  });

  it('the bitmap commands on a qcow2 image: exact ranges, idempotent, and what QEMU sees after each step', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    const t = [img, '--name', 'b0'];
    expect(await ok<Change>(['bitmap', 'add', ...t])).toMatchObject({ name: 'b0', changed: true, bitmap: { granularity: 64 * KiB, enabled: true, dirtyBytes: 0 } });
    // one after the other: each opens the image read-write, and holds its lock (as qemu-img bitmap does)
    const again = await ok<Change>(['bitmap', 'add', ...t]);
    const same = await ok<Change>(['bitmap', 'add', ...t, '--granularity', '64K']);
    await fails(['bitmap', 'add', ...t, '--granularity', '4K'], 1, 'ERR_BITMAP_EXISTS', /granularity/);
    await fails(['bitmap', 'add', ...t, '--disabled'], 1, 'ERR_BITMAP_EXISTS', /enabled/);
    expect([again, same]).toMatchObject([{ changed: false }, { changed: false }]);
    expect(await qemuBitmaps(img)).toEqual([{ name: 'b0', granularity: 64 * KiB, flags: ['auto'] }]);

    expect(await ok<Change>(['bitmap', 'fill', ...t, '--range', '1M:1', '--range', '3M:128K'])).toMatchObject({ changed: true });
    expect(await ok<Change>(['bitmap', 'fill', ...t, '--range', '3M:64K'])).toMatchObject({ changed: false });
    expect(await dump(img, 'b0')).toEqual(entriesOf(model(SIZE, 64 * KiB, [{ offset: MiB, length: 1 }, { offset: 3 * MiB, length: 128 * KiB }])));
    expect(await ok<Change>(['bitmap', 'clear', ...t, '--range', `${3 * MiB + 32 * KiB}:96K`])).toMatchObject({ changed: true });
    expect(await ok<Change>(['bitmap', 'clear', ...t, '--range', `${3 * MiB + 32 * KiB}:96K`])).toMatchObject({ changed: false });

    expect(await ok<Change>(['bitmap', 'disable', ...t])).toMatchObject({ changed: true, bitmap: { enabled: false } });
    expect(await ok<Change>(['bitmap', 'disable', ...t])).toMatchObject({ changed: false });
    expect(await qemuBitmaps(img)).toEqual([{ name: 'b0', granularity: 64 * KiB, flags: [] }]);
    expect(await ok<Change>(['bitmap', 'enable', ...t])).toMatchObject({ changed: true, bitmap: { enabled: true } });
    expect(await ok<Change>(['bitmap', 'enable', ...t])).toMatchObject({ changed: false });

    // merge a bitmap file of another granularity, then a bitmap of the same image
    const src = join(dir, 'src.bitmap');
    await withStore(src, async (s) => {
      await s.add('src', { size: SIZE, granularity: 4 * KiB });
      await s.fill('src', { ranges: [{ offset: 8 * MiB, length: 4 * KiB }] });
    });
    expect(await ok<Change>(['bitmap', 'merge', ...t, '--source-file', src])).toMatchObject({ changed: true });
    expect(await ok<Change>(['bitmap', 'merge', ...t, '--source-file', src])).toMatchObject({ changed: false });
    await withStore(img, (s) => s.add('b1', { granularity: MiB, enabled: false }));
    expect(await ok<Change>(['bitmap', 'merge', img, '--name', 'b1', '--source', 'b0'])).toMatchObject({ changed: true, bitmap: { dirtyBytes: 3 * MiB } });
    const b0 = model(SIZE, 64 * KiB, [{ offset: MiB, length: 1 }, { offset: 3 * MiB, length: 1 }, { offset: 8 * MiB, length: 1 }]);
    const b1 = model(SIZE, MiB, [{ offset: MiB, length: 1 }, { offset: 3 * MiB, length: 1 }, { offset: 8 * MiB, length: 1 }]);
    await expectBits(img, { b0: entriesOf(b0), b1: entriesOf(b1) });
    // and the other way: a qcow2 bitmap merged into a bitmap file
    const dst = join(dir, 'dst.bitmap');
    await withStore(dst, (s) => s.add('dst', { size: SIZE, granularity: 4 * KiB }));
    expect(await ok<Change>(['bitmap', 'merge', dst, '--source-file', img, '--source', 'b0'])).toMatchObject({ changed: true, bitmap: { dirtyBytes: 3 * 64 * KiB } });

    const list = await ok<Listed[]>(['bitmap', 'list', img]);
    expect(list.map((b) => [b.name, b.dirtyBytes, b.size, b.enabled])).toEqual([
      ['b0', 3 * 64 * KiB, SIZE, true],
      ['b1', 3 * MiB, SIZE, false],
    ]);
    expect(await qemuBitmaps(img)).toEqual([
      { name: 'b0', granularity: 64 * KiB, flags: ['auto'] },
      { name: 'b1', granularity: MiB, flags: [] },
    ]);
    await expectClean(img);

    expect(await ok<Change>(['bitmap', 'clear', ...t])).toMatchObject({ changed: true, bitmap: { dirtyBytes: 0 } });
    expect(await ok<Change>(['bitmap', 'clear', ...t])).toMatchObject({ changed: false });
    expect(await ok<Change>(['bitmap', 'fill', ...t, '--all'])).toMatchObject({ changed: true, bitmap: { dirtyBytes: SIZE } });
    await expectBits(img, { b0: [{ offset: 0, length: SIZE, type: 1, description: 'dirty' }] });
    expect(await ok<Change>(['bitmap', 'remove', ...t])).toEqual({ name: 'b0', changed: true, bitmap: null });
    // one after the other: two writers of one image at once are refused by its lock (ERR_IMAGE_LOCKED)
    await fails(['bitmap', 'remove', ...t], 1, 'ERR_BITMAP_NOT_FOUND');
    const gone = await ok<Change>(['bitmap', 'remove', ...t, '--if-exists']);
    expect(gone).toEqual({ name: 'b0', changed: false, bitmap: null });
    expect(await withStore(img, (s) => s.remove('b1', {}))).toMatchObject({ changed: true });
    expect(await qemuBitmaps(img)).toEqual([]);
    expect(await ok<Listed[]>(['bitmap', 'list', img])).toEqual([]);
    await expectClean(img);
  }, 180_000); // one CLI run after the other (each holds the image lock)

  it('QEMU works on what blkrep wrote: qemu-io records into it, qemu-img bitmap merges, clears, enables, removes; names of 1 and 1023 bytes', async () => {
    const dir = await makeTempDir();
    const img = await image(dir, ['-o', 'cluster_size=4K']);
    const long = 'n'.repeat(1023);
    await withStore(img, async (s) => {
      await s.add('x', { granularity: 4 * KiB });
      await s.add(long, { granularity: 512, enabled: false });
      await s.add('y', { granularity: MiB, enabled: false });
      await s.fill('x', { ranges: [{ offset: 100 * KiB, length: 1 }, { offset: 10 * MiB, length: 300 * KiB }] });
      await s.fill(long, { ranges: [{ offset: SIZE - 1, length: 1 }] });
    });
    expect(await qemuBitmaps(img)).toEqual([
      { name: 'x', granularity: 4 * KiB, flags: ['auto'] },
      { name: long, granularity: 512, flags: [] },
      { name: 'y', granularity: MiB, flags: [] },
    ]);
    await expectClean(img);
    await expectBits(img, { [long]: entriesOf(model(SIZE, 512, [{ offset: SIZE - 1, length: 1 }])) });

    await qemuIo(img, ['write 5M 8K']);
    const x = model(SIZE, 4 * KiB, [{ offset: 100 * KiB, length: 1 }, { offset: 10 * MiB, length: 300 * KiB }, { offset: 5 * MiB, length: 8 * KiB }]);
    expect(await bitsOf(img, 'x')).toEqual(entriesOf(x));
    expect(await bitsOf(img, 'y')).toEqual(entriesOf(model(SIZE, MiB)));
    await tool('qemu-img', ['bitmap', '--merge', 'x', '--enable', img, 'y']);
    const y = model(SIZE, MiB, [{ offset: 0, length: 1 }, { offset: 5 * MiB, length: 1 }, { offset: 10 * MiB, length: 1 }]);
    expect(await bitsOf(img, 'y')).toEqual(entriesOf(y));
    expect((await withStore(img, (s) => s.list())).map((b) => [b.name.length, b.enabled])).toEqual([
      [1, true],
      [1023, false],
      [1, true],
    ]);
    await tool('qemu-img', ['bitmap', '--clear', img, 'x']);
    await tool('qemu-img', ['bitmap', '--remove', img, long]);
    expect(await bitsOf(img, 'x')).toEqual(entriesOf(model(SIZE, 4 * KiB)));
    expect((await withStore(img, (s) => s.list())).map((b) => b.name)).toEqual(['x', 'y']);
    await withStore(img, (s) => s.fill('x', { ranges: [{ offset: 2 * MiB, length: 4 * KiB }] }));
    await expectBits(img, { x: entriesOf(model(SIZE, 4 * KiB, [{ offset: 2 * MiB, length: 1 }])), y: entriesOf(y) });
    await expectClean(img);
  });

  it('an overlay: the backing file name moves behind the new extension and back; a header without room is a clean error that leaks nothing', async () => {
    const dir = await makeTempDir();
    await tool('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'base.raw'), String(SIZE)]);
    const top = join(dir, 'top.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.raw', '-F', 'raw', top]);
    await qemuIo(top, ['write 1M 4K']);
    const backing = async (p: string): Promise<unknown> => (await qemuInfo(p))['backing-filename'];
    await withStore(top, async (s) => {
      await s.add('b', { granularity: 64 * KiB });
      await s.fill('b', { ranges: [{ offset: 5 * MiB, length: 1 }] });
    });
    expect(await backing(top)).toBe('base.raw');
    expect(await qemuBitmaps(top)).toEqual([{ name: 'b', granularity: 64 * KiB, flags: ['auto'] }]);
    await expectClean(top);
    await expectBits(top, { b: entriesOf(model(SIZE, 64 * KiB, [{ offset: 5 * MiB, length: 1 }])) });
    await withStore(top, (s) => s.remove('b', {}));
    expect(await backing(top)).toBe('base.raw');
    expect(await qemuBitmaps(top)).toEqual([]);
    await expectClean(top);

    // 512-byte clusters and a backing name of 351 bytes: no room left for the extension
    const sub = join(dir, 'd'.repeat(150));
    await tool('mkdir', [sub]);
    const longName = `${'d'.repeat(150)}/${'f'.repeat(200)}`;
    await tool('qemu-img', ['create', '-q', '-f', 'raw', join(dir, longName), String(SIZE)]);
    const tight = join(dir, 'tight.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', longName, '-F', 'raw', tight]);
    const before = await readFile(tight);
    await expect(withStore(tight, (s) => s.add('b', {}))).rejects.toMatchObject({ code: 'ERR_QCOW2_UNSUPPORTED', message: expect.stringMatching(/would not fit in the 512-byte header cluster/) });
    expect((await readFile(tight)).equals(before)).toBe(true);
    expect(await backing(tight)).toBe(longName);
  });

  it('bitmap table entries: "all ones" clusters read as QEMU reads them; reserved bits are a clean error', async () => {
    const dir = await makeTempDir();
    const img = await image(dir, ['-o', 'cluster_size=512']);
    await tool('qemu-img', ['bitmap', '--add', '-g', '512', img, 'b']);
    // 16 MiB at 512 B: 4 KiB of bits, a table of 8 entries for 512-byte clusters, all zero
    const h = await open(img, 'r+');
    const entryAt = async (i: number): Promise<number> => {
      const head = Buffer.alloc(512);
      await h.read(head, 0, 512, 0);
      let at = head.readUInt32BE(100);
      while (head.readUInt32BE(at) !== 0x23852875) at += 8 + Math.ceil(head.readUInt32BE(at + 4) / 8) * 8;
      const dirent = Buffer.alloc(24);
      await h.read(dirent, 0, 24, Number(head.readBigUInt64BE(at + 8 + 16)));
      expect(dirent.readUInt32BE(8)).toBe(8);
      return Number(dirent.readBigUInt64BE(0)) + i * 8;
    };
    const set = async (i: number, v: bigint): Promise<void> => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(v);
      await h.write(b, 0, 8, await entryAt(i));
      await h.sync();
    };
    try {
      // cluster 2 of the bits: bytes 1024 … 1535, granules 8192 … 12287, guest 4 MiB … 6 MiB
      await set(2, 1n);
      const want = entriesOf(model(SIZE, 512, [{ offset: 4 * MiB, length: 2 * MiB }]));
      await expectBits(img, { b: want });
      await set(2, 1n << 60n);
      await expect(bitsOf(img, 'b')).rejects.toMatchObject({ code: 'ERR_QCOW2_CORRUPT', message: expect.stringMatching(/entry 2 of the bitmap table of "b" .* has reserved bits set/) });
      await set(2, 0n);
    } finally {
      await h.close();
    }
    expect(await bitsOf(img, 'b')).toEqual(entriesOf(model(SIZE, 512)));
    await expectClean(img);
  });

  it('an in-use bitmap (its writer was killed) is listed as all-dirty and can only be removed, as with qemu-img', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    await tool('qemu-img', ['bitmap', '--add', img, 'bm']);
    await run('qemu-io', ['-f', 'qcow2', img, '-c', 'write 0 64k', '-c', 'abort'], { timeoutMs: 20_000 });
    // a bitmap added beside it (the directory is rewritten with the in-use entry as it was)
    await ok(['bitmap', 'add', img, '--name', 'ok', '--disabled']);
    expect(await qemuBitmaps(img)).toEqual([
      { name: 'bm', granularity: 64 * KiB, flags: ['in-use', 'auto'] },
      { name: 'ok', granularity: 64 * KiB, flags: [] },
    ]);
    const list = await ok<Listed[]>(['bitmap', 'list', img]);
    expect(list[0]).toMatchObject({ name: 'bm', dirtyBytes: SIZE, loadState: { state: 'all-dirty', fault: 'in-use' } });
    expect(list[1]).toMatchObject({ name: 'ok', dirtyBytes: 0, loadState: { state: 'clean' } });
    const t = [img, '--name', 'bm'];
    // one after the other: the refusals that open the image read-write hold its lock (as qemu-img bitmap does)
    for (const args of [
      ['dump', ...t],
      ['clear', ...t],
      ['fill', ...t, '--range', '0:1'],
      ['enable', ...t],
      ['disable', ...t],
      ['add', ...t],
      ['merge', ...t, '--source', 'ok'],
      ['merge', img, '--name', 'ok', '--source', 'bm'],
    ]) {
      await fails(['bitmap', ...args], 1, 'ERR_BITMAP_IN_USE', /inconsistent.*only be removed/);
    }
    // qemu-img refuses the same
    const q = await run('qemu-img', ['bitmap', '--clear', img, 'bm'], { timeoutMs: 20_000 });
    expect(q.code).toBe(1);
    expect(q.stderr).toMatch(/inconsistent/);
    expect(await ok<Change>(['bitmap', 'remove', ...t])).toEqual({ name: 'bm', changed: true, bitmap: null });
    expect(await qemuBitmaps(img)).toEqual([{ name: 'ok', granularity: 64 * KiB, flags: [] }]);
    await expectClean(img);
  }, 180_000); // one CLI run after the other (each holds the image lock)

  it('limits, checkpoints and a corrupt directory are clean errors', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    // refusals write nothing, but some are found only after the image is open read-write (and locked): one after the other
    await fails(['bitmap', 'add', img, '--name', 'n'.repeat(1024)], 1, 'ERR_BITMAP_NAME', /1023/);
    await fails(['bitmap', 'add', img, '--name', 'a', '--size', '8M'], 2, 'ERR_USAGE', /differs from the image's size/);
    await fails(['bitmap', 'add', img, '--name', 'a', '--granularity', '256'], 2, 'ERR_USAGE', /granularity/);
    await fails(['bitmap', 'dump', img], 1, 'ERR_BITMAP_NOT_FOUND', /has no bitmaps/);
    await ok(['bitmap', 'add', img, '--name', 'a']);
    await ok(['bitmap', 'add', img, '--name', 'b']);
    await fails(['bitmap', 'dump', img], 2, 'ERR_USAGE', /2 bitmaps: say which/);
    await fails(['bitmap', 'dump', img, '--name', 'c'], 1, 'ERR_BITMAP_NOT_FOUND', /no bitmap "c"/);
    await fails(['bitmap', 'checkpoint', img, '--name', 'a'], 1, 'ERR_NOT_SUPPORTED', /no checkpoints.*merge/);
    await fails(['bitmap', 'checkpoints', img, '--name', 'a'], 1, 'ERR_NOT_SUPPORTED', /no checkpoints/);

    // the directory's place, from the bitmaps extension
    const h = await open(img, 'r+');
    try {
      const head = Buffer.alloc(4096);
      await h.read(head, 0, head.length, 0);
      let at = head.readUInt32BE(100);
      while (head.readUInt32BE(at) !== 0x23852875) at += 8 + Math.ceil(head.readUInt32BE(at + 4) / 8) * 8;
      const dirAt = Number(head.readBigUInt64BE(at + 8 + 16));
      const poke = async (offset: number, bytes: Buffer, re: RegExp): Promise<void> => {
        const old = Buffer.alloc(bytes.length);
        await h.read(old, 0, old.length, offset);
        await h.write(bytes, 0, bytes.length, offset);
        await h.sync();
        await expect(withStore(img, (s) => s.list())).rejects.toMatchObject({ code: 'ERR_QCOW2_CORRUPT', message: expect.stringMatching(re) });
        await h.write(old, 0, old.length, offset);
        await h.sync();
      };
      await poke(dirAt + 16, Buffer.from([2]), /type 2/);
      await poke(dirAt + 12, Buffer.from([0, 0, 0, 6]), /reserved flags/);
      await poke(dirAt + 17, Buffer.from([40]), /granularity_bits 40/);
      await poke(dirAt + 8, Buffer.from([0, 0, 0, 2]), /needs 1/);
      await poke(dirAt + 18, Buffer.from([0x10, 0]), /past the end of the directory/);
      await poke(dirAt + 32 + 24, Buffer.from('a'), /repeats the name "a"/);
      const size = Buffer.alloc(8);
      size.writeBigUInt64BE(72n);
      await poke(at + 8 + 8, size, /holds 64 bytes of 2 entries, but the bitmaps extension says 72/);
    } finally {
      await h.close();
    }
    expect((await ok<Listed[]>(['bitmap', 'list', img])).map((b) => b.name)).toEqual(['a', 'b']);
    await expectClean(img);

    // QEMU allows granularities up to 2 GiB, blkrep's bitmaps up to 64 MiB: listed, not loaded
    await tool('qemu-img', ['bitmap', '--add', '-g', '128M', img, 'huge']);
    await qemuIo(img, ['write 15M 4K']);
    await withStore(img, async (s) => {
      expect((await s.list()).find((b) => b.name === 'huge')).toMatchObject({ granularity: 128 * MiB, dirtyGranules: 1, dirtyBytes: SIZE, loadState: { state: 'clean' } });
      await expect(s.read('huge')).rejects.toMatchObject({ code: 'ERR_NOT_SUPPORTED', message: expect.stringMatching(/granularity of 134217728 bytes/) });
      await expect(s.merge('a', { name: 'huge' })).rejects.toMatchObject({ code: 'ERR_NOT_SUPPORTED' });
      expect(await s.remove('huge', {})).toMatchObject({ changed: true });
    });
    await expectClean(img);
  }, 180_000); // CLI runs one after the other

  it("a live export takes bitmap files to merge: a qcow2 image's bitmap is refused, naming the way round", async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    await withStore(img, (s) => s.add('q', {}));
    const raw = join(dir, 'disk.img');
    await zeroFile(raw, SIZE);
    const ctl = join(dir, 'c.sock');
    const served = await serve([raw, '--socket', join(dir, 's.sock'), '--control', ctl]);
    await ok(['bitmap', 'add', '--control', ctl, '--name', 'b0']);
    await fails(['bitmap', 'merge', '--control', ctl, '--name', 'b0', '--source-file', img, '--source', 'q'], 1, 'ERR_NOT_SUPPORTED', /copy bitmap "q" into a bitmap file first/);
    expect(await served.stop()).toBe(0);
  });

  it('blkrep writing guest data keeps the autoclear rule: enabled bitmaps it does not update are dropped for QEMU, disabled ones stay', async () => {
    const dir = await makeTempDir();
    const a = await image(dir, [], 'a.qcow2');
    await withStore(a, async (s) => {
      await s.add('on', {});
      await s.add('off', { enabled: false });
    });
    const b = await image(dir, [], 'b.qcow2');
    await withStore(b, async (s) => {
      await s.add('off', { enabled: false });
      await s.fill('off', { ranges: [{ offset: MiB, length: 1 }] });
    });
    for (const path of [a, b]) {
      const node = await Qcow2Node.open(path);
      await node.write(4 * MiB, Buffer.alloc(64 * KiB, 0x5a));
      await node.close();
    }
    // a: an enabled bitmap missed the write, so autoclear bit 0 went and QEMU trusts none of them
    expect(await qemuBitmaps(a)).toEqual([]);
    expect(await withStore(a, (s) => s.list())).toEqual([]);
    // b: a disabled bitmap misses nothing
    expect(await qemuBitmaps(b)).toEqual([{ name: 'off', granularity: 64 * KiB, flags: [] }]);
    await expectBits(b, { off: entriesOf(model(SIZE, 64 * KiB, [{ offset: MiB, length: 1 }])) });
    await expectClean(b);
    // a new bitmap on a: the stale extension is replaced (its clusters stay leaked, as with QEMU)
    await withStore(a, (s) => s.add('new', { granularity: 4 * KiB }));
    expect(await qemuBitmaps(a)).toEqual([{ name: 'new', granularity: 4 * KiB, flags: ['auto'] }]);
    const check = await qemuCheck(a);
    expect({ corruptions: check.corruptions, checkErrors: check.checkErrors }).toEqual({ corruptions: 0, checkErrors: 0 });
    await qemuIo(a, ['write 6M 4K']);
    expect(await bitsOf(a, 'new')).toEqual(entriesOf(model(SIZE, 4 * KiB, [{ offset: 6 * MiB, length: 4 * KiB }])));
  });
});


/** A small seeded generator (xorshift32), as the crash-ordering tests use. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/** The bitmaps of a directory as one comparable string: names, flags, granularities, bits. */
async function stateOf(d: Qcow2BitmapDirectory): Promise<string> {
  const out: unknown[] = [];
  for (const e of d.entries) out.push([e.name, e.flags, e.granularityBits, inUse(e) ? null : (await d.readBytes(e)).toString('base64')]);
  return JSON.stringify(out);
}

describe.skipIf(!hasTool('qemu-img'))('qcow2 bitmap changes under a volatile write cache', () => {
  it('a crash at any write or sync leaves the bitmaps as before or after the change, and qemu-img check finds no corruption', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'c.qcow2');
    const size = 8 * MiB;
    await Qcow2Node.create(path, { size, clusterSize: 4096 });
    const random = rng(20261122);
    const container = new CrashContainer(path, await readFile(path));
    const d = await Qcow2BitmapDirectory.openContainer(container, { readOnly: false });
    const bits = (granularity: number, runs: Array<[number, number]>): DirtyBitmap => {
      const b = new DirtyBitmap(size, { granularity });
      for (const [o, l] of runs) b.fill(o, l);
      return b;
    };
    const keep = (): NextEntry[] => d.entries.map((entry) => ({ entry }));
    const entry = (name: string, granularityBits: number, flags = BME_AUTO) => ({ name, flags, granularityBits, extra: Buffer.alloc(0) });
    const changes: Array<() => NextEntry[]> = [
      () => [{ entry: entry('a', 12), bits: bits(4096, []) }],
      () => [{ entry: d.entries[0]!, bits: bits(4096, [[0, 1], [3 * MiB, 200 * KiB], [size - 1, 1]]) }],
      () => [...keep(), { entry: entry('b', 9, 0), bits: bits(512, [[5 * MiB, 512 * KiB]]) }],
      () => [{ entry: { ...d.entries[0]!, flags: 0 } }, { entry: d.entries[1]! }],
      () => [{ entry: d.entries[0]! }, { entry: d.entries[1]!, bits: bits(512, [[0, 1], [3 * MiB, 200 * KiB], [size - 1, 1], [5 * MiB, 512 * KiB]]) }],
      () => [{ entry: d.entries[1]! }],
      () => [{ entry: d.entries[0]!, bits: bits(512, [[5 * MiB, 4 * KiB]]) }],
      () => [],
    ];
    const states = [await stateOf(d)];
    const seen = new Set<string>();
    const snapshots: Array<{ image: Buffer; step: number }> = [];
    let step = 0;
    // every write and sync is a crash point; each keeps a random subset of the pending sectors
    container.onCrashPoint = () => void snapshots.push({ image: container.crashImage(random), step });
    for (; step < changes.length; step++) {
      await d.commit(changes[step]!());
      states.push(await stateOf(d));
    }
    container.onCrashPoint = undefined;
    await d.close();
    states.slice(1).forEach((st, i) => expect(st, `change ${i} changes something`).not.toBe(states[i]));
    expect(snapshots.length).toBeGreaterThan(changes.length);
    snapshots.push({ image: container.current(), step: changes.length });
    for (const [i, snap] of snapshots.entries()) {
      await writeFile(path, snap.image);
      const check = await qemuCheck(path);
      const last = i === snapshots.length - 1;
      // the clean end leaks nothing; a crash may leak the clusters of the change in progress
      expect({ corruptions: check.corruptions, checkErrors: check.checkErrors, ...(last ? { leaks: check.leaks } : {}) }, `crash image ${i} (change ${snap.step})\n${check.raw}`).toEqual({
        corruptions: 0,
        checkErrors: 0,
        ...(last ? { leaks: 0 } : {}),
      });
      const reopened = await Qcow2BitmapDirectory.open(path, { readOnly: true });
      const got = await stateOf(reopened);
      await reopened.close();
      expect([states[snap.step], states[snap.step + 1] ?? states[snap.step]], `crash image ${i} (change ${snap.step})`).toContain(got);
      seen.add(got);
    }
    // the crashes did land on both sides of the switches
    expect(seen.size).toBe(new Set(states).size);
  });
});
