// test-map-chain: blkrep map on qcow2 images and chains matches qemu-img map --output=json in
// start, length, depth, present, zero and data (qemu splits runs by host offset; we merge those).
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli } from '../support/spawn.js';
import { io, mergeQemuMap, qcow2, sh } from './image-helpers.js';

const chains: Array<{ name: string; build: string[][] }> = [
  {
    name: 'qcow2 without a backing file (data, plain and allocated zero clusters, unallocated)',
    build: [qcow2('top.qcow2', '8M'), io('qcow2', 'top.qcow2', 'write -P 1 0 64k', 'write -z 1M 128k', 'write -P 2 3M 64k', 'write -z 3M 64k', 'write -P 3 5M 10k')],
  },
  {
    name: 'qcow2 over raw (raw data and holes show at depth 1, present)',
    build: [
      ['qemu-img', 'create', '-f', 'raw', 'base.raw', '8M'],
      io('raw', 'base.raw', 'write -P 9 0 1M', 'write -P 8 6M 64k'),
      qcow2('top.qcow2', '', ['base.raw', 'raw']),
      io('qcow2', 'top.qcow2', 'write -P 1 64k 64k', 'write -z 512k 64k', 'write -P 2 2M 1k'),
    ],
  },
  {
    name: 'qcow2 over qcow2 (unallocated in both: depth 1, not present)',
    build: [
      qcow2('base.qcow2', '8M'),
      io('qcow2', 'base.qcow2', 'write -P 9 0 256k', 'write -z 4M 64k'),
      qcow2('top.qcow2', '', ['base.qcow2', 'qcow2']),
      io('qcow2', 'top.qcow2', 'write -P 1 64k 64k', 'write -z 1M 64k', 'write -P 2 7M 64k'),
    ],
  },
  {
    name: 'three qcow2 layers with different cluster sizes',
    build: [
      qcow2('base.qcow2', '8M', undefined, '4K'),
      io('qcow2', 'base.qcow2', 'write -P 9 0 12k', 'write -z 100k 4k'),
      qcow2('mid.qcow2', '', ['base.qcow2', 'qcow2']),
      io('qcow2', 'mid.qcow2', 'write -P 8 1M 64k', 'write -z 2M 64k'),
      qcow2('top.qcow2', '', ['mid.qcow2', 'qcow2'], '16K'),
      io('qcow2', 'top.qcow2', 'write -P 1 4k 4k', 'write -P 2 2M 16k', 'write -z 6M 32k'),
    ],
  },
  {
    name: 'backing files shorter than the overlay (raw, then qcow2 under qcow2)',
    build: [
      ['qemu-img', 'create', '-f', 'raw', 'base.raw', '1M'],
      io('raw', 'base.raw', 'write -P 9 0 64k'),
      qcow2('mid.qcow2', '4M', ['base.raw', 'raw']),
      io('qcow2', 'mid.qcow2', 'write -P 8 2M 64k'),
      qcow2('top.qcow2', '8M', ['mid.qcow2', 'qcow2']),
      io('qcow2', 'top.qcow2', 'write -P 1 6M 64k'),
    ],
  },
];

describe('blkrep map on qcow2 chains', () => {
  for (const c of chains) {
    it(`${c.name}: same runs as qemu-img map`, async () => {
      const dir = await makeTempDir();
      await sh(dir, ...c.build);
      const q = await run('qemu-img', ['map', '--output=json', 'top.qcow2'], { cwd: dir });
      expect(q.code, q.stderr).toBe(0);
      const r = await runCli(['map', 'top.qcow2', '--json'], { cwd: dir });
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toEqual(mergeQemuMap(q.stdout));
    });
  }

  it('--start/--length inside a chain agree with qemu-img map --start-offset/--max-length', async () => {
    const dir = await makeTempDir();
    await sh(dir, ...chains[3]!.build);
    const q = await run('qemu-img', ['map', '--output=json', '--start-offset=1000000', '--max-length=3000000', 'top.qcow2'], { cwd: dir });
    const r = await runCli(['map', 'top.qcow2', '--json', '--start', '1000000', '--length', '3000000'], { cwd: dir });
    expect(JSON.parse(r.stdout)).toEqual(mergeQemuMap(q.stdout));
  });

  it('an image opened from another directory resolves its chain the same', async () => {
    const dir = await makeTempDir();
    await sh(dir, ...chains[2]!.build);
    const q = await run('qemu-img', ['map', '--output=json', join(dir, 'top.qcow2')]);
    const r = await runCli(['map', join(dir, 'top.qcow2'), '--json']);
    expect(JSON.parse(r.stdout)).toEqual(mergeQemuMap(q.stdout));
  });
});
