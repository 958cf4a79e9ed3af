/**
 * Images written by QEMU (qemu-img create/convert, qemu-io) read through our driver exactly as
 * `qemu-img convert -O raw` reads them, and our extents (with allocation depth) agree with
 * `qemu-img map --output=json`: every feature of B.12 item 2–3 (zero clusters plain and
 * preallocated, compressed clusters, refcount widths 1–64, cluster sizes 512 B … 2 MiB, partial
 * clusters, ranges across L2 tables, version 2 images, backing chains of raw and qcow2 images,
 * backing files shorter than the overlay).
 */
import { join } from 'node:path';
import { open, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import type { BlockNode, Extent } from '../../src/api/block.js';
import { openImage } from '../../src/block/open.js';
import { makeTempDir } from '../support/spawn.js';
import { expectClean, expectSame, pattern, qemuContents, qemuMap, tool, type MapEntry, KiB, MiB } from './helpers.js';

async function qemuIo(path: string, fmt: string, commands: string[]): Promise<void> {
  await tool('qemu-io', ['-f', fmt, ...commands.flatMap((c) => ['-c', c]), path]);
}

/** Our view of an image: its whole contents and its extents. */
async function ours(path: string): Promise<{ data: Buffer; extents: Extent[]; node: BlockNode }> {
  const node = await openImage(path, { readOnly: true });
  try {
    const data = await node.read(0, node.size);
    const extents: Extent[] = [];
    for (let at = 0; at < node.size; ) {
      const runs = await node.extents!(at, node.size - at);
      for (const r of runs) {
        extents.push(r);
        at += r.length;
      }
    }
    return { data, extents, node };
  } finally {
    await node.close();
  }
}

/**
 * Our extents say what qemu-img map says at every byte: present ⇔ depth > 0 (and the same layer:
 * QEMU counts from 0), zero ⇔ zero, data ⇔ not a hole.
 */
function expectSameMap(extents: Extent[], map: MapEntry[], what: string): void {
  const cuts = new Set<number>();
  let at = 0;
  for (const e of extents) cuts.add((at += e.length));
  for (const m of map) cuts.add(m.start + m.length);
  const points = [0, ...[...cuts].sort((a, b) => a - b)];
  const find = <T extends { s: number; e: number }>(list: T[], x: number): T => list.find((r) => x >= r.s && x < r.e)!;
  let s = 0;
  const ourRanges = extents.map((e) => ({ s, e: (s += e.length), x: e }));
  const theirRanges = map.map((m) => ({ s: m.start, e: m.start + m.length, x: m }));
  for (let i = 0; i + 1 < points.length; i++) {
    const x = points[i]!;
    const o = find(ourRanges, x)?.x;
    const t = find(theirRanges, x)?.x;
    expect(o, `${what}: our extents do not cover ${x}`).toBeDefined();
    expect(t, `${what}: qemu-img map does not cover ${x}`).toBeDefined();
    const oursSays = { present: (o!.depth ?? 1) > 0, depth: (o!.depth ?? 1) > 0 ? o!.depth! - 1 : 'none', zero: o!.zero, data: !o!.hole };
    const qemuSays = { present: t!.present, depth: t!.present ? t!.depth : 'none', zero: t!.zero, data: t!.data };
    expect(oursSays, `${what}: at offset ${x}`).toEqual(qemuSays);
  }
}

async function expectReadsLikeQemu(dir: string, path: string, what: string): Promise<void> {
  const expected = await qemuContents(path, join(dir, 'expected.raw'));
  const got = await ours(path);
  expectSame(got.data, expected, what);
  expectSameMap(got.extents, await qemuMap(path), what);
}

/** qemu-io commands exercising every kind of cluster for a given cluster size and image size. */
function workload(cs: number, size: number): string[] {
  const c = (n: number): number => Math.min(size - cs, n * cs);
  return [
    `write -P 0x11 0 ${cs * 3}`, // whole clusters
    `write -P 0x22 ${c(5) + 17} ${cs + 100}`, // partial clusters on both ends
    `write -P 0x33 ${c(8)} ${cs * 2}`,
    `write -z ${c(8)} ${cs}`, // ZERO flag over allocated data: preallocated zero cluster
    `write -z -u ${c(9)} ${cs}`, // ZERO flag, cluster freed
    `write -z -u ${c(12)} ${cs}`, // ZERO flag on a never-allocated cluster
    `discard ${c(1)} ${cs}`,
    `write -P 0x44 ${size - cs - 7} ${cs + 7}`, // the last cluster
  ];
}

describe('qcow2 images made by qemu-img and qemu-io', () => {
  it('cluster sizes 512 B … 2 MiB, ranges across L2 tables', async () => {
    const dir = await makeTempDir();
    for (const cs of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
      // with 512-byte clusters an L2 table maps only 32 KiB: the workload crosses many of them
      const size = cs === 2 * MiB ? 32 * MiB : Math.max(64 * cs, 1 * MiB);
      const path = join(dir, `c${cs}.qcow2`);
      await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, path, String(size)]);
      await qemuIo(path, 'qcow2', workload(cs, size));
      await expectReadsLikeQemu(dir, path, `cluster size ${cs}`);
    }
  }, 60_000);

  it('refcount widths 1 … 64 bits', async () => {
    const dir = await makeTempDir();
    for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
      const path = join(dir, `r${bits}.qcow2`);
      await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits},cluster_size=4096`, path, '4M']);
      await qemuIo(path, 'qcow2', workload(4096, 4 * MiB));
      await expectReadsLikeQemu(dir, path, `refcount_bits=${bits}`);
    }
  }, 60_000);

  it('compressed clusters (qemu-img convert -c), with partial reads', async () => {
    const dir = await makeTempDir();
    const raw = Buffer.alloc(6 * MiB);
    // compressible text, random (incompressible, stored uncompressed by QEMU) and zeros
    for (let at = 0; at < raw.length; at += 256 * KiB) {
      if ((at / (256 * KiB)) % 3 === 0) raw.write(`cluster at ${at} `.repeat(20000), at, 256 * KiB, 'latin1');
      else if ((at / (256 * KiB)) % 3 === 1) pattern(256 * KiB, at).copy(raw, at);
    }
    await writeFile(join(dir, 'src.raw'), raw);
    for (const cs of [4 * KiB, 64 * KiB, 2 * MiB]) {
      const path = join(dir, `z${cs}.qcow2`);
      await tool('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, join(dir, 'src.raw'), path]);
      await expectReadsLikeQemu(dir, path, `compressed, cluster size ${cs}`);
      // reads that start and end inside compressed clusters
      const node = await openImage(path, { readOnly: true });
      try {
        for (const [at, want] of [[cs / 2 + 3, cs], [7, 100], [raw.length - cs - 5, cs + 3]] as const) {
          const n = Math.min(want, raw.length - at);
          expectSame(await node.read(at, n), raw.subarray(at, at + n), `compressed read at ${at}+${n}`);
        }
      } finally {
        await node.close();
      }
    }
  }, 60_000);

  it('our writes into qemu-made images (compressed, preallocated, zero clusters) match the same writes by qemu-io', async () => {
    const dir = await makeTempDir();
    const raw = Buffer.alloc(4 * MiB);
    for (let at = 0; at < raw.length; at += 64 * KiB) raw.write(`block ${at} `.repeat(5000), at, 64 * KiB, 'latin1');
    await writeFile(join(dir, 'src.raw'), raw);
    const images: Array<[string, string[]]> = [
      ['compressed', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', join(dir, 'src.raw')]],
      ['metadata-prealloc', ['create', '-f', 'qcow2', '-o', 'preallocation=metadata']],
      ['zero-clusters', ['create', '-f', 'qcow2']],
    ];
    const ops: Array<[string, number, number]> = [
      ['write', 100, 5000], // partial, inside the first cluster
      ['write', 64 * KiB - 10, 128 * KiB + 20], // across three clusters
      ['zero', 256 * KiB + 512, 4096],
      ['zero', 512 * KiB, 128 * KiB],
      ['discard', 1024 * KiB, 192 * KiB],
      ['write', 1024 * KiB + 4096, 8192],
      ['write', 3 * MiB - 7, 9],
    ];
    for (const [name, make] of images) {
      const ours = join(dir, `${name}-ours.qcow2`);
      const theirs = join(dir, `${name}-theirs.qcow2`);
      for (const path of [ours, theirs]) {
        await tool('qemu-img', [...make, '-q', path, ...(make[0] === 'create' ? ['4M'] : [])]);
        if (name === 'zero-clusters') await qemuIo(path, 'qcow2', ['write -P 0x5c 0 2M', 'write -z 0 1M', 'write -z -u 1M 512k']);
      }
      const node = await openImage(ours);
      const qemuCommands: string[] = [];
      for (const [op, at, n] of ops) {
        const data = Buffer.alloc(n, 0x40 + at % 50);
        if (op === 'write') await node.write(at, data);
        else if (op === 'zero') await node.writeZeroes!(at, n);
        else await node.trim!(at, n);
        qemuCommands.push(op === 'write' ? `write -P ${0x40 + at % 50} ${at} ${n}` : op === 'zero' ? `write -z ${at} ${n}` : `discard ${at} ${n}`);
      }
      await node.close();
      await qemuIo(theirs, 'qcow2', qemuCommands);
      await expectClean(ours);
      expectSame(await qemuContents(ours, join(dir, 'a.raw')), await qemuContents(theirs, join(dir, 'b.raw')), name);
    }
  }, 60_000);

  it('version 2 (compat=0.10) images read-only', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'v2.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', path, '2M']);
    await qemuIo(path, 'qcow2', ['write -P 0x55 4096 70000', 'write -z 1M 64k']);
    await expectReadsLikeQemu(dir, path, 'compat=0.10');
  });

  it('backing chains: raw and qcow2 backings, a shorter backing, three levels', async () => {
    const dir = await makeTempDir();
    const base = pattern(3 * MiB, 1);
    base.fill(0, MiB, 2 * MiB); // a zero run in the base
    await writeFile(join(dir, 'base.raw'), base);
    // raw ← qcow2, the overlay longer than the base
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'top1.qcow2'), '4M']);
    await qemuIo(join(dir, 'top1.qcow2'), 'qcow2', ['write -P 0x61 100000 5000', 'write -z 2M 64k', 'discard 128k 64k', `write -P 0x62 ${3 * MiB - 1000} 70000`]);
    await expectReadsLikeQemu(dir, join(dir, 'top1.qcow2'), 'raw backing');

    // qcow2 base ← qcow2 mid ← qcow2 top, with a 512-byte cluster layer in the middle
    await tool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'base.raw'), join(dir, 'base.qcow2')]);
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'mid.qcow2'), '3M']);
    await qemuIo(join(dir, 'mid.qcow2'), 'qcow2', ['write -P 0x71 1000 300000', 'write -z -u 600k 32k']);
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', join(dir, 'top2.qcow2'), '3M']);
    await qemuIo(join(dir, 'top2.qcow2'), 'qcow2', ['write -P 0x72 200000 100000', 'discard 1M 128k']);
    await expectReadsLikeQemu(dir, join(dir, 'top2.qcow2'), 'three-level qcow2 chain');

    // a backing file named by an absolute path, without its format (probed): the backing format
    // extension is renamed to an unknown type, which must be skipped
    const abs = join(dir, 'abs.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(dir, 'base.qcow2'), '-F', 'qcow2', abs]);
    const handle = await open(abs, 'r+');
    try {
      const ext = Buffer.alloc(4);
      await handle.read(ext, 0, 4, 112);
      expect(ext.readUInt32BE(0)).toBe(0xe2792aca);
      ext.writeUInt32BE(0x0badf00d);
      await handle.write(ext, 0, 4, 112);
    } finally {
      await handle.close();
    }
    await expectReadsLikeQemu(dir, abs, 'probed backing format');
  }, 60_000);
});
