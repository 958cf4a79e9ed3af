/**
 * The hidden disk's cluster size is the copy-before-write granularity: a new hidden disk has
 * 16 KiB clusters (HIDDEN_CLUSTER), so a 4 KiB write copies 16 KiB, not 64; a hidden disk made
 * before with 64 KiB clusters still opens and keeps copying 64 KiB. In both, the view reads the
 * checkpoint exactly, a write spanning many uncopied clusters copies them (one run), and
 * `qemu-img check` finds the hidden disk clean after a kill -9.
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, serve } from '../support/spawn.js';
import { openLink, writerClient } from './scripted-primary.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;

async function readView(dir: string, socket: string, tag: string): Promise<Buffer> {
  const out = join(dir, `view-${tag}.raw`);
  const r = await run('nbdcopy', [`nbd+unix:///view?socket=${socket}`, out]);
  expect(r.code, r.stderr).toBe(0);
  return readFile(out);
}

/** bytes the hidden disk maps itself (qemu-img map: depth 0 = data in that file) */
async function hiddenDataBytes(hidden: string): Promise<number> {
  const r = await run('qemu-img', ['map', '-U', '--output=json', hidden]);
  expect(r.code, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as Array<{ depth: number; length: number; data: boolean }>).filter((e) => e.depth === 0 && e.data).reduce((s, e) => s + e.length, 0);
}

async function clusterSize(image: string): Promise<number> {
  const r = await run('qemu-img', ['info', '-U', '--output=json', image]);
  expect(r.code, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as { 'cluster-size': number })['cluster-size'];
}

describe('the hidden disk cluster size (copy-before-write granularity)', () => {
  it.each([
    ['new hidden disk: 16 KiB clusters', undefined, 16 * KiB],
    ['hidden disk made with 64 KiB clusters: opens, copies 64 KiB', 64 * KiB, 64 * KiB],
  ] as const)('%s', async (_name, existing, cluster) => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    const hidden = `${disk}.hidden.qcow2`;
    const cp0 = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i += 4096) cp0.fill(i / 4096, i, i + 4096);
    await writeFile(disk, cp0);
    if (existing) {
      const c = await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${existing}`, '-b', 'disk.img', '-F', 'raw', hidden]);
      expect(c.code, c.stderr).toBe(0);
    }
    const socket = join(dir, 'nbd.sock');
    const args = [disk, '--secondary', '--socket', socket, '--view-export', 'view', '--view-read-only'];
    const p = await serve(args);
    expect(await clusterSize(hidden)).toBe(cluster);
    expect(await clusterSize(`${disk}.active.qcow2`)).toBe(64 * KiB);
    const link = await openLink(socket, { size: SIZE });
    const c = await writerClient(socket, link);
    // one 4 KiB write inside a cluster: that cluster is copied whole, nothing more
    await c.write(MiB + 4096, Buffer.alloc(4096, 0xee));
    await c.flush();
    expect(await hiddenDataBytes(hidden)).toBe(cluster);
    // 200 KiB from an unaligned offset: every cluster it touches (one run), the one copied before kept
    const start = MiB + 8192 + 512;
    await c.write(start, Buffer.alloc(200 * KiB, 0xdd));
    await c.flush();
    const first = Math.floor(MiB / cluster);
    const last = Math.floor((start + 200 * KiB - 1) / cluster);
    expect(await hiddenDataBytes(hidden)).toBe((last - first + 1) * cluster);
    expect((await readView(dir, socket, 'before')).equals(cp0)).toBe(true);
    // kill -9: the hidden disk is a clean qcow2 and the view is still the checkpoint
    await p.stop('SIGKILL');
    await c.close().catch(() => {});
    link.close();
    const check = await run('qemu-img', ['check', hidden]);
    expect(check.code, check.stdout + check.stderr).toBe(0);
    const again = await serve(args);
    expect((await readView(dir, socket, 'after')).equals(cp0)).toBe(true);
    await again.stop();
  });
});
