// test-commit-make-empty: blkrep commit and blkrep make-empty give the same result as qemu-img
// commit on copies of the same chain (qemu-img compare on the bases and on the overlays read
// through their chains, the same allocation map of the overlays, qemu-img check clean).
import { cpSync, existsSync, statSync } from 'node:fs';
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BIN, hasTool, makeTempDir, run, runCli, start, waitFor } from '../support/spawn.js';
import { io, qcow2, qemuCheckClean, qemuMap, qemuSame, sh } from './image-helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** The runs the image itself allocates (qemu-img map depth 0, present). */
async function topLayer(image: string, cwd: string) {
  return (await qemuMap(image, cwd)).filter((e) => e.depth === 0 && e.present);
}

interface Chain {
  name: string;
  build: string[][];
  /** every image, top first, with its format; the base is the last unless `base` says */
  images: Array<[string, string]>;
  /** -b BASE for both tools */
  base?: string;
  keep?: boolean;
}

/** Writes of every kind: whole clusters, partial and unaligned ones, zero clusters (whole and partial), discards, runs across clusters. */
const TOP_WRITES = [
  'write -P 1 0 64k',
  'write -P 2 100k 3k',
  'write -z 1M 192k',
  'write -z 2100k 10k',
  'write -P 3 4095k 2k',
  'discard 3M 64k',
  'write -P 4 7M 1M',
  'write -P 5 5000000 123',
];

const chains: Chain[] = [
  {
    name: 'qcow2 over raw (zero clusters over backing data)',
    build: [['qemu-img', 'create', '-f', 'raw', 'base.raw', '8M'], io('raw', 'base.raw', 'write -P 170 0 8M'), qcow2('top.qcow2', '', ['base.raw', 'raw']), io('qcow2', 'top.qcow2', ...TOP_WRITES)],
    images: [['top.qcow2', 'qcow2'], ['base.raw', 'raw']],
  },
  {
    name: 'qcow2 over qcow2 (the base has data, zero clusters and holes)',
    build: [
      qcow2('base.qcow2', '8M'),
      io('qcow2', 'base.qcow2', 'write -P 170 0 3M', 'write -z 3M 1M', 'write -P 171 6M 2M'),
      qcow2('top.qcow2', '', ['base.qcow2', 'qcow2']),
      io('qcow2', 'top.qcow2', ...TOP_WRITES),
    ],
    images: [['top.qcow2', 'qcow2'], ['base.qcow2', 'qcow2']],
  },
  {
    name: 'small overlay clusters over a base with large ones, base over its own raw backing',
    build: [
      ['qemu-img', 'create', '-f', 'raw', 'bottom.raw', '8M'],
      io('raw', 'bottom.raw', 'write -P 160 0 8M'),
      qcow2('base.qcow2', '', ['bottom.raw', 'raw'], '256K'),
      io('qcow2', 'base.qcow2', 'write -P 170 0 1M', 'write -z 4M 1M'),
      qcow2('top.qcow2', '', ['base.qcow2', 'qcow2'], '4K'),
      io('qcow2', 'top.qcow2', ...TOP_WRITES),
    ],
    images: [['top.qcow2', 'qcow2'], ['base.qcow2', 'qcow2'], ['bottom.raw', 'raw']],
    base: undefined,
  },
  {
    name: 'the overlay is larger than its raw backing (the base grows)',
    build: [['qemu-img', 'create', '-f', 'raw', 'base.raw', '3M'], io('raw', 'base.raw', 'write -P 170 0 3M'), qcow2('top.qcow2', '8M', ['base.raw', 'raw']), io('qcow2', 'top.qcow2', ...TOP_WRITES)],
    images: [['top.qcow2', 'qcow2'], ['base.raw', 'raw']],
  },
  {
    name: 'the overlay is larger than its qcow2 backing (the base grows)',
    build: [qcow2('base.qcow2', '3M'), io('qcow2', 'base.qcow2', 'write -P 170 0 3M'), qcow2('top.qcow2', '8M', ['base.qcow2', 'qcow2']), io('qcow2', 'top.qcow2', ...TOP_WRITES)],
    images: [['top.qcow2', 'qcow2'], ['base.qcow2', 'qcow2']],
  },
  {
    name: 'the overlay is larger than its qcow2 backing, which has a longer backing of its own (zeros must go into the grown base)',
    build: [
      ['qemu-img', 'create', '-f', 'raw', 'bottom.raw', '8M'],
      io('raw', 'bottom.raw', 'write -P 160 0 8M'),
      qcow2('base.qcow2', '3M', ['bottom.raw', 'raw']),
      io('qcow2', 'base.qcow2', 'write -P 170 1M 1M'),
      qcow2('top.qcow2', '8M', ['base.qcow2', 'qcow2']),
      io('qcow2', 'top.qcow2', 'write -P 1 0 64k', 'write -P 4 7M 64k'),
    ],
    images: [['top.qcow2', 'qcow2'], ['base.qcow2', 'qcow2'], ['bottom.raw', 'raw']],
  },
  {
    name: '--keep (qemu-img commit -d)',
    build: [['qemu-img', 'create', '-f', 'raw', 'base.raw', '8M'], io('raw', 'base.raw', 'write -P 170 0 8M'), qcow2('top.qcow2', '', ['base.raw', 'raw']), io('qcow2', 'top.qcow2', ...TOP_WRITES)],
    images: [['top.qcow2', 'qcow2'], ['base.raw', 'raw']],
    keep: true,
  },
  {
    name: 'three layers, -b the bottom (everything above it is committed; the overlay is kept)',
    build: [
      ['qemu-img', 'create', '-f', 'raw', 'base.raw', '8M'],
      io('raw', 'base.raw', 'write -P 170 0 8M'),
      qcow2('mid.qcow2', '', ['base.raw', 'raw']),
      io('qcow2', 'mid.qcow2', 'write -P 180 0 2M', 'write -z 6M 1M', 'write -P 181 3M 5k'),
      qcow2('top.qcow2', '', ['mid.qcow2', 'qcow2']),
      io('qcow2', 'top.qcow2', ...TOP_WRITES),
    ],
    images: [['top.qcow2', 'qcow2'], ['mid.qcow2', 'qcow2'], ['base.raw', 'raw']],
    base: 'base.raw',
  },
  {
    name: 'three layers, a middle layer shorter than the overlay, -b the bottom',
    build: [
      ['qemu-img', 'create', '-f', 'raw', 'base.raw', '8M'],
      io('raw', 'base.raw', 'write -P 170 0 8M'),
      qcow2('mid.qcow2', '4M', ['base.raw', 'raw']),
      io('qcow2', 'mid.qcow2', 'write -P 180 1M 1M'),
      qcow2('top.qcow2', '8M', ['mid.qcow2', 'qcow2']),
      io('qcow2', 'top.qcow2', 'write -P 1 0 64k', 'write -P 4 7M 64k'),
    ],
    images: [['top.qcow2', 'qcow2'], ['mid.qcow2', 'qcow2'], ['base.raw', 'raw']],
    base: 'base.raw',
  },
  {
    name: 'three layers, -b the immediate backing (qemu-img keeps the overlay then too)',
    build: [
      ['qemu-img', 'create', '-f', 'raw', 'base.raw', '8M'],
      io('raw', 'base.raw', 'write -P 170 0 8M'),
      qcow2('mid.qcow2', '', ['base.raw', 'raw']),
      io('qcow2', 'mid.qcow2', 'write -P 180 0 2M'),
      qcow2('top.qcow2', '', ['mid.qcow2', 'qcow2']),
      io('qcow2', 'top.qcow2', ...TOP_WRITES),
    ],
    images: [['top.qcow2', 'qcow2'], ['mid.qcow2', 'qcow2'], ['base.raw', 'raw']],
    base: 'mid.qcow2',
  },
];

describe('blkrep commit', () => {
  for (const c of chains) {
    it(`${c.name}: the same bases and overlays as qemu-img commit, qemu-img check clean`, async () => {
      const dir = await makeTempDir();
      const ours = join(dir, 'ours');
      const theirs = join(dir, 'theirs');
      await sh(dir, ['mkdir', 'ours']);
      await sh(ours, ...c.build);
      cpSync(ours, theirs, { recursive: true });
      const before = await topLayer('top.qcow2', ours);

      const flags = [...(c.base ? ['-b', c.base] : []), ...(c.keep ? ['--keep'] : [])];
      const r = await runCli(['commit', 'top.qcow2', ...flags, '--json'], { cwd: ours });
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      const result = JSON.parse(r.stdout);
      const q = await run('qemu-img', ['commit', ...(c.base ? ['-b', c.base] : []), ...(c.keep ? ['-d'] : []), 'top.qcow2'], { cwd: theirs });
      expect(q.code, q.stderr).toBe(0);

      // Every image reads the same in both copies, through its chain (the base, the overlay, and
      // the intermediate layers, which both tools leave alone).
      for (const [name, fmt] of c.images) {
        expect(await qemuSame([join(ours, name), fmt], [join(theirs, name), fmt], dir), `${name} differs from qemu-img commit's`).toBe(true);
        if (fmt === 'qcow2') await qemuCheckClean(name, ours);
      }
      // The overlays allocate the same: nothing (emptied) or what they had (kept). (Below them the
      // bases may differ in which zeros are holes and which are written: not compared.)
      expect(await topLayer('top.qcow2', ours)).toEqual(await topLayer('top.qcow2', theirs));
      const kept = c.keep === true || c.base !== undefined;
      expect(result.emptied).toBe(!kept);
      expect(await topLayer('top.qcow2', ours)).toEqual(kept ? before : []);
      expect(result).toMatchObject({ changed: true, image: 'top.qcow2', base: c.base ?? c.images[1]![0], baseFormat: c.base ? c.images.find(([n]) => n === c.base)![1] : c.images[1]![1] });
      expect(result.dataBytes + result.zeroBytes).toBeGreaterThan(0);
      const baseIndex = c.images.findIndex(([n]) => n === (c.base ?? c.images[1]![0]));
      expect(result.intermediates).toEqual(c.images.slice(1, baseIndex).map(([n]) => n));

      // Again: an emptied overlay has nothing left to commit.
      if (!kept) {
        const again = await runCli(['commit', 'top.qcow2', '--json'], { cwd: ours });
        expect(again.code, again.stderr).toBe(0);
        expect(JSON.parse(again.stdout)).toMatchObject({ changed: false, dataBytes: 0, zeroBytes: 0, emptied: false });
      }
    });
  }

  it('only allocated data moves: 64 KiB scattered over a 1 GiB overlay commits 64 KiB', async () => {
    const dir = await makeTempDir();
    await sh(dir, ['qemu-img', 'create', '-f', 'raw', 'base.raw', '1G'], qcow2('top.qcow2', '', ['base.raw', 'raw']), io('qcow2', 'top.qcow2', 'write -P 1 0 16k', 'write -P 2 500M 16k', 'write -P 3 1000M 32k'));
    const r = await runCli(['commit', 'top.qcow2', '--json'], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ dataBytes: 3 * 64 * KiB, zeroBytes: 0, emptied: true });
    expect(statSync(join(dir, 'base.raw')).blocks * 512).toBeLessThanOrEqual(4 * 64 * KiB);
  });

  for (const flag of ['--rate', '--speed']) {
    it(`${flag} limits the data copied per second`, async () => {
      const dir = await makeTempDir();
      await sh(dir, ['qemu-img', 'create', '-f', 'raw', 'base.raw', '16M'], qcow2('top.qcow2', '', ['base.raw', 'raw']), io('qcow2', 'top.qcow2', 'write -P 1 0 6M'));
      const r = await runCli(['commit', 'top.qcow2', flag, '8M', '--json'], { cwd: dir });
      expect(r.code, r.stderr).toBe(0);
      const result = JSON.parse(r.stdout);
      expect(result.dataBytes).toBe(6 * MiB);
      // 6 MiB at 8 MiB/s: the last chunk may start after 5/8 s at the earliest
      expect(result.seconds).toBeGreaterThanOrEqual(0.6);
      expect(await qemuSame([join(dir, 'top.qcow2'), 'qcow2'], [join(dir, 'base.raw'), 'raw'], dir)).toBe(true);
    });
  }

  it('text output: what moved and where; no progress bar when stderr is not a terminal', async () => {
    const dir = await makeTempDir();
    await sh(dir, ['qemu-img', 'create', '-f', 'raw', 'base.raw', '4M'], qcow2('top.qcow2', '', ['base.raw', 'raw']), io('qcow2', 'top.qcow2', 'write -P 1 0 1M', 'write -z 2M 1M'));
    const r = await runCli(['commit', 'top.qcow2'], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('Committed top.qcow2 into base.raw (raw): 1 MiB of data and 1 MiB of zeros');
    expect(r.stdout).toContain('top.qcow2 is now empty');
    expect(r.stderr).toBe('');
  });

  const failures: Array<{ name: string; setup: string[][]; args: string[]; code: number; error: string; message: string }> = [
    { name: 'a qcow2 image without a backing file', setup: [qcow2('top.qcow2', '1M')], args: ['top.qcow2'], code: 1, error: 'ERR_NO_BACKING', message: 'no backing file' },
    { name: 'a raw image', setup: [['qemu-img', 'create', '-f', 'raw', 'disk.raw', '1M']], args: ['disk.raw'], code: 1, error: 'ERR_NO_BACKING', message: 'raw image' },
    { name: 'a missing image', setup: [], args: ['nope.qcow2'], code: 1, error: 'ERR_OPEN', message: 'nope.qcow2' },
    {
      name: 'a base that is not in the chain',
      setup: [['qemu-img', 'create', '-f', 'raw', 'base.raw', '1M'], ['qemu-img', 'create', '-f', 'raw', 'other.raw', '1M'], qcow2('top.qcow2', '', ['base.raw', 'raw'])],
      args: ['top.qcow2', '-b', 'other.raw'],
      code: 1,
      error: 'ERR_NOT_IN_CHAIN',
      message: 'not in the backing chain',
    },
    { name: 'the overlay as its own base', setup: [['qemu-img', 'create', '-f', 'raw', 'base.raw', '1M'], qcow2('top.qcow2', '', ['base.raw', 'raw'])], args: ['top.qcow2', '-b', 'top.qcow2'], code: 2, error: 'ERR_USAGE', message: 'overlay itself' },
    { name: 'a missing backing file', setup: [['qemu-img', 'create', '-f', 'raw', 'base.raw', '1M'], qcow2('top.qcow2', '', ['base.raw', 'raw']), ['rm', 'base.raw']], args: ['top.qcow2'], code: 1, error: 'ERR_OPEN', message: 'base.raw' },
    { name: 'a rate of zero', setup: [], args: ['top.qcow2', '--rate', '0'], code: 2, error: 'ERR_USAGE', message: '--rate' },
    { name: 'a rate that is not a size', setup: [], args: ['top.qcow2', '--rate', 'fast'], code: 2, error: 'ERR_BAD_SIZE', message: 'fast' },
    { name: 'no overlay and no --control', setup: [], args: [], code: 2, error: 'ERR_USAGE', message: 'the overlay to commit is missing' },
    { name: '--wait without --control', setup: [], args: ['top.qcow2', '--wait'], code: 2, error: 'ERR_USAGE', message: '--wait needs --control' },
    { name: '--top without --control', setup: [], args: ['top.qcow2', '--top', 'mid.qcow2'], code: 2, error: 'ERR_USAGE', message: '--top needs --control' },
    { name: '--keep with --control but not --wait', setup: [], args: ['--control', 'ctl.sock', '--keep'], code: 2, error: 'ERR_USAGE', message: '--keep with --control needs --wait' },
    { name: 'a daemon that is not there', setup: [], args: ['--control', 'ctl.sock'], code: 1, error: 'ERR_CONTROL_UNREACHABLE', message: 'ctl.sock' },
  ];
  for (const f of failures) {
    it(`${f.name}: exit ${f.code}, ${f.error}, message; the --json error object`, async () => {
      const dir = await makeTempDir();
      await sh(dir, ...f.setup);
      const r = await runCli(['commit', ...f.args], { cwd: dir });
      expect(r.code, r.stdout + r.stderr).toBe(f.code);
      expect(r.stderr).toContain(f.message);
      const j = await runCli(['commit', ...f.args, '--json'], { cwd: dir });
      expect(j.code).toBe(f.code);
      const err = JSON.parse(j.stdout).error;
      expect(err.code).toBe(f.error);
      expect(err.message).toContain(f.message);
    });
  }
});

describe('blkrep make-empty', () => {
  it('leaves the overlay as qemu-img commit leaves it: every range from the backing file, check clean, the space given back', async () => {
    const dir = await makeTempDir();
    const ours = join(dir, 'ours');
    const theirs = join(dir, 'theirs');
    await sh(dir, ['mkdir', 'ours']);
    await sh(ours, ['qemu-img', 'create', '-f', 'raw', 'base.raw', '64M'], io('raw', 'base.raw', 'write -P 170 0 64M'), qcow2('top.qcow2', '', ['base.raw', 'raw']));
    // 16 MiB scattered in 64 KiB clusters, zero clusters and partial writes
    const writes = Array.from({ length: 256 }, (_, i) => `write -P ${i % 250} ${((i * 7919) % 1024) * 64}k 64k`);
    await sh(ours, io('qcow2', 'top.qcow2', ...writes, ...TOP_WRITES));
    cpSync(ours, theirs, { recursive: true });
    const sizeBefore = statSync(join(ours, 'top.qcow2')).blocks * 512;

    const r = await runCli(['make-empty', 'top.qcow2', '--json'], { cwd: ours });
    expect(r.code, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout);
    expect(result.changed).toBe(true);
    expect(result.images).toHaveLength(1);
    expect(result.images[0]).toMatchObject({ filename: 'top.qcow2', format: 'qcow2', changed: true, backingFilename: 'base.raw' });
    expect(result.images[0].freedBytes).toBeGreaterThan(15 * MiB);
    // qemu-img commit empties the overlay after writing into the base: compare the overlays' maps.
    expect((await run('qemu-img', ['commit', 'top.qcow2'], { cwd: theirs })).code).toBe(0);
    expect(await topLayer('top.qcow2', ours)).toEqual([]);
    expect(await topLayer('top.qcow2', theirs)).toEqual([]);
    expect((await qemuMap('top.qcow2', ours)).every((e) => e.depth === 1)).toBe(true);
    await qemuCheckClean('top.qcow2', ours);
    // our overlay reads the untouched base; size, backing file and format stay
    expect(await qemuSame([join(ours, 'top.qcow2'), 'qcow2'], [join(ours, 'base.raw'), 'raw'], dir)).toBe(true);
    const info = JSON.parse((await runCli(['info', 'top.qcow2', '--json'], { cwd: ours })).stdout);
    expect(info).toMatchObject({ 'virtual-size': 64 * MiB, 'backing-filename': 'base.raw', 'backing-filename-format': 'raw' });
    expect(statSync(join(ours, 'top.qcow2')).blocks * 512).toBeLessThan(sizeBefore / 8);
    // and it can be written again
    await sh(ours, io('qcow2', 'top.qcow2', 'write -P 3 1M 64k'));
    await qemuCheckClean('top.qcow2', ours);

    // a second run on an empty image changes nothing
    await sh(ours, io('qcow2', 'top.qcow2', 'discard 1M 64k'));
    const fresh = join(ours, 'fresh.qcow2');
    await sh(ours, qcow2('fresh.qcow2', '', ['base.raw', 'raw']));
    const again = await runCli(['make-empty', fresh, '--json']);
    expect(JSON.parse(again.stdout)).toMatchObject({ changed: false, images: [{ changed: false, freedBytes: 0 }] });
  });

  it('a qcow2 image with a persistent bitmap (the cluster-by-cluster path): empty, no corruption', async () => {
    const dir = await makeTempDir();
    await sh(
      dir,
      ['qemu-img', 'create', '-f', 'raw', 'base.raw', '16M'],
      qcow2('top.qcow2', '', ['base.raw', 'raw']),
      ['qemu-img', 'bitmap', '--add', 'top.qcow2', 'b0'],
      io('qcow2', 'top.qcow2', 'write -P 1 0 1M', 'write -z 4M 1M', 'write -P 2 9M 100k'),
    );
    const r = await runCli(['make-empty', 'top.qcow2', '--json'], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    expect(await topLayer('top.qcow2', dir)).toEqual([]);
    expect((await qemuMap('top.qcow2', dir)).every((e) => e.depth === 1)).toBe(true);
    // The qcow2 driver does not support bitmaps yet: opening the image read-write clears the
    // bitmaps autoclear bit, as a program without bitmap support must (B.11), so qemu-img no
    // longer trusts the bitmaps and counts their clusters as leaks. No corruption either way.
    await qemuCheckClean('top.qcow2', dir, { allowLeaks: true });
  });

  it('active and hidden disks in the order given (COLO): both empty, the active reads the secondary disk', async () => {
    const dir = await makeTempDir();
    await sh(
      dir,
      ['qemu-img', 'create', '-f', 'raw', 'secondary.raw', '16M'],
      io('raw', 'secondary.raw', 'write -P 7 0 16M'),
      qcow2('hidden.qcow2', '', ['secondary.raw', 'raw']),
      io('qcow2', 'hidden.qcow2', 'write -P 8 0 4M', 'write -z 8M 1M'),
      qcow2('active.qcow2', '', ['hidden.qcow2', 'qcow2']),
      io('qcow2', 'active.qcow2', 'write -P 9 2M 4M', 'write -z 12M 64k'),
    );
    const r = await runCli(['make-empty', 'active.qcow2', 'hidden.qcow2', '--json'], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    const result = JSON.parse(r.stdout);
    expect(result.images.map((m: { filename: string; changed: boolean }) => [m.filename, m.changed])).toEqual([
      ['active.qcow2', true],
      ['hidden.qcow2', true],
    ]);
    for (const img of ['active.qcow2', 'hidden.qcow2']) await qemuCheckClean(img, dir);
    expect(await qemuSame([join(dir, 'active.qcow2'), 'qcow2'], [join(dir, 'secondary.raw'), 'raw'], dir)).toBe(true);
    expect(await topLayer('active.qcow2', dir)).toEqual([]);
    expect(await topLayer('hidden.qcow2', dir)).toEqual([]);
    expect((await qemuMap('active.qcow2', dir)).every((e) => e.depth === 2)).toBe(true);
    // text output names each image
    const t = await runCli(['make-empty', 'active.qcow2', 'hidden.qcow2'], { cwd: dir });
    expect(t.stdout).toContain('active.qcow2: already empty');
    expect(t.stdout).toContain('hidden.qcow2: already empty');
  });

  it('an image without a backing file: refused without --force off a terminal (nothing changed); with --force it reads as zeros afterwards', async () => {
    const dir = await makeTempDir();
    await sh(dir, qcow2('solo.qcow2', '4M'), io('qcow2', 'solo.qcow2', 'write -P 1 0 1M'));
    const before = await qemuMap('solo.qcow2', dir);
    const refused = await runCli(['make-empty', 'solo.qcow2', '--json'], { cwd: dir });
    expect(refused.code).toBe(1);
    expect(JSON.parse(refused.stdout)).toEqual({
      error: { code: 'ERR_NOT_CONFIRMED', message: 'not emptied: solo.qcow2 has no backing file, so emptying would destroy the data (give --force to do it anyway)' },
    });
    expect(await qemuMap('solo.qcow2', dir)).toEqual(before);
    const r = await runCli(['make-empty', 'solo.qcow2', '--force'], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('reads as zeros');
    expect(await qemuMap('solo.qcow2', dir)).toEqual([{ start: 0, length: 4 * MiB, depth: 0, present: false, zero: true, data: false }]);
    await qemuCheckClean('solo.qcow2', dir);
  });

  it('a raw image is refused with the reason, and nothing is changed when it comes after a qcow2 image', async () => {
    const dir = await makeTempDir();
    await sh(dir, ['qemu-img', 'create', '-f', 'raw', 'disk.raw', '4M'], io('raw', 'disk.raw', 'write -P 1 0 1M'), qcow2('top.qcow2', '', ['disk.raw', 'raw']), io('qcow2', 'top.qcow2', 'write -P 2 0 64k'));
    const r = await runCli(['make-empty', 'disk.raw'], { cwd: dir });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('disk.raw is a raw image');
    expect(r.stderr).toContain('no allocation map and no backing file');
    const j = await runCli(['make-empty', 'top.qcow2', 'disk.raw', '--json'], { cwd: dir });
    expect(j.code).toBe(1);
    expect(JSON.parse(j.stdout).error).toMatchObject({ code: 'ERR_UNSUPPORTED_FORMAT' });
    expect((await qemuMap('top.qcow2', dir))[0]).toMatchObject({ start: 0, length: 64 * KiB, depth: 0 });
    expect(existsSync(join(dir, 'disk.raw'))).toBe(true);
  });

  it('usage and open errors: a missing image (1), the same image twice (2), no image (2), an NBD export (1)', async () => {
    const dir = await makeTempDir();
    await sh(dir, qcow2('a.qcow2', '1M'));
    const missing = await runCli(['make-empty', 'nope.qcow2', '--json'], { cwd: dir });
    expect(missing.code).toBe(1);
    expect(JSON.parse(missing.stdout).error.message).toContain('nope.qcow2');
    const twice = await runCli(['make-empty', 'a.qcow2', `./a.qcow2`, '--json'], { cwd: dir });
    expect(twice.code).toBe(2);
    expect(JSON.parse(twice.stdout).error).toMatchObject({ code: 'ERR_USAGE' });
    expect((await runCli(['make-empty'], { cwd: dir })).code).toBe(2);
    const nbd = await runCli(['make-empty', 'nbd://localhost:1/x', '--json'], { cwd: dir });
    expect(nbd.code).toBe(1);
    expect(JSON.parse(nbd.stdout).error).toMatchObject({ code: 'ERR_UNSUPPORTED_FORMAT' });
  });
});

describe.skipIf(!hasTool('nbdkit'))('blkrep commit: error policies against a base that fails writes (nbdkit --filter=error memory 8M)', () => {
  /** top.qcow2 over an nbdkit memory disk whose writes fail with EIO while the file "inject" exists */
  async function failingBase() {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'inject'), '');
    const socket = join(dir, 'k.sock');
    const uri = `nbd+unix:///?socket=${socket}`;
    const server = start('nbdkit', ['-f', '-U', socket, '--filter=error', 'memory', '8M', 'error-pwrite=EIO', 'error-pwrite-rate=100%', `error-pwrite-file=${join(dir, 'inject')}`]);
    await waitFor(() => existsSync(socket), 'nbdkit to listen');
    await sh(dir, ['qemu-img', 'create', '-f', 'qcow2', '-b', uri, '-F', 'raw', 'top.qcow2', '8M'], io('qcow2', 'top.qcow2', 'write -P 1 0 1M', 'write -z 2M 64k', 'write -P 2 5M 3k'), ['qemu-img', 'convert', '-O', 'raw', 'top.qcow2', 'view.raw']);
    return { dir, uri, server, errorsOff: () => rm(join(dir, 'inject'), { force: true }) };
  }

  it('report (the default): exit 1 with the write error; stop: exit 1, ERR_JOB_CANCELLED naming the policy; the overlay is kept', async () => {
    const b = await failingBase();
    const r = await runCli(['commit', 'top.qcow2', '--json'], { cwd: b.dir });
    expect(r.code).toBe(1);
    // the two data runs (1 MiB at 0, the 64 KiB cluster at 5 MiB) are written at once: the
    // error reported is the first to come back, either one
    const { error } = JSON.parse(r.stdout) as { error: { code: string; message: string } };
    expect(error.code).toBe('ERR_NBD_SERVER_ERROR');
    expect(['NBD write of 1048576 bytes at offset 0 failed on the server: EIO (5)', 'NBD write of 65536 bytes at offset 5242880 failed on the server: EIO (5)']).toContain(error.message);
    const s = await runCli(['commit', 'top.qcow2', '--on-target-error', 'stop', '--json'], { cwd: b.dir });
    expect(s.code).toBe(1);
    const err = JSON.parse(s.stdout).error;
    expect(err.code).toBe('ERR_JOB_CANCELLED');
    expect(err.message).toContain('base write error (EIO) with policy stop: NBD write of');
    expect(await qemuSame(['view.raw', 'raw'], ['top.qcow2', 'qcow2'], b.dir)).toBe(true);
    expect((await qemuMap('top.qcow2', b.dir)).some((e) => e.depth === 0 && e.present)).toBe(true);
    await b.server.stop();
  });

  it('ignore: the failed ranges are retried until the base takes them; the errors are in the JSON result; the base then holds the view', async () => {
    const b = await failingBase();
    const p = start('node', [BIN, 'commit', 'top.qcow2', '--on-target-error', 'ignore', '--speed', '0', '--json'], { cwd: b.dir });
    // the commit retries (backing off) until the base works again
    await waitFor(() => b.server.stderr().includes('injecting EIO error into pwrite'), 'a failed write');
    await b.errorsOff();
    const exit = await p.waitExit(30_000);
    expect(exit.code, p.stderr()).toBe(0);
    const result = JSON.parse(p.stdout());
    expect(result).toMatchObject({ emptied: true, dataBytes: MiB + 64 * KiB, zeroBytes: 64 * KiB });
    expect(result.errors.length).toBeGreaterThan(0);
    for (const e of result.errors) expect(e).toMatchObject({ side: 'target', operation: 'write', errno: 'EIO', action: 'ignore' });
    expect(await qemuSame(['view.raw', 'raw'], [b.uri, 'raw'], b.dir)).toBe(true);
    expect(await qemuSame(['view.raw', 'raw'], ['top.qcow2', 'qcow2'], b.dir)).toBe(true);
    await qemuCheckClean('top.qcow2', b.dir);
    await b.server.stop();
  });
});
