// blkrep mirror (offline): a raw file onto an NBD target served by qemu-nbd, checked with
// qemu-img compare; --json, exit codes, sync bitmap, target-is-zero, error policies.
import { existsSync } from 'node:fs';
import { open as openFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { PersistentBitmap } from '../../src/bitmap/persistent.js';
import { hasTool, makeTempDir, run, runCli, start, waitFor, unixUri } from '../support/spawn.js';
import { rng, randomBytes } from './helpers.js';

const MiB = 1 << 20;

/** A sparse raw file: random data runs, zero-filled runs, holes. */
async function sparseFile(dir: string, name: string, size: number, seed: number): Promise<string> {
  const file = join(dir, name);
  await writeFile(file, '');
  await truncate(file, size);
  const r = rng(seed);
  const fh = await openFile(file, 'r+');
  try {
    for (let off = 0; off < size; ) {
      const len = Math.min(size - off, Math.floor(r() * 3 * MiB) + 1);
      const k = r();
      if (k < 0.4) await fh.write(randomBytes(r, len), 0, len, off);
      else if (k < 0.5) await fh.write(Buffer.alloc(len), 0, len, off);
      off += len + Math.floor(r() * MiB);
    }
  } finally {
    await fh.close();
  }
  return file;
}

async function qemuNbd(dir: string, image: string, name = 'disk'): Promise<{ uri: string; sock: string }> {
  const sock = join(dir, `${name}.sock`);
  start('qemu-nbd', ['-f', 'raw', '-k', sock, '-x', name, '-t', '-e', '4', '--cache=writeback', image]);
  await waitFor(() => existsSync(sock), `qemu-nbd socket ${sock}`);
  return { uri: unixUri(sock, name), sock };
}

async function blankRaw(dir: string, name: string, size: number, fill?: number): Promise<string> {
  const file = join(dir, name);
  await writeFile(file, '');
  await truncate(file, size);
  if (fill !== undefined) {
    const fh = await openFile(file, 'r+');
    await fh.write(Buffer.alloc(size, fill), 0, size, 0);
    await fh.close();
  }
  return file;
}

describe.skipIf(!hasTool('qemu-nbd') || !hasTool('qemu-img'))('blkrep mirror onto qemu-nbd', () => {
  it('mirrors a sparse raw file onto an NBD target: qemu-img compare finds them identical; --json result', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 48 * MiB, 1);
    const dst = await blankRaw(dir, 'dst.raw', 48 * MiB, 0xa5); // garbage that must be overwritten
    const { uri } = await qemuNbd(dir, dst);
    // a target with data: refused unless --existing (as QEMU mode=existing)
    const refused = await runCli(['mirror', src, uri, '--json'], { timeoutMs: 60_000 });
    expect(refused.code).toBe(1);
    expect(JSON.parse(refused.stdout)).toMatchObject({ error: { code: 'ERR_TARGET_NOT_EMPTY' } });
    const r = await runCli(['mirror', src, uri, '--json', '--existing'], { timeoutMs: 60_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    const result = JSON.parse(r.stdout);
    expect(result).toMatchObject({ source: src, target: uri, sync: 'full', granularity: 65536, size: 48 * MiB, errors: [] });
    expect(result.bytes).toBe(48 * MiB);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, dst]);
    expect(cmp.stdout).toContain('Images are identical');
    expect(cmp.code).toBe(0);
  });

  it('--target-is-zero onto a fresh target writes only data; small granularity and buffers, speed', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 16 * MiB, 2);
    const dst = await blankRaw(dir, 'dst.raw', 16 * MiB);
    const { uri } = await qemuNbd(dir, dst);
    const r = await runCli(['mirror', src, uri, '--json', '--target-is-zero', '--granularity', '4K', '--buf-size', '256K', '--max-ops', '4', '--speed', '1G'], { timeoutMs: 60_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const result = JSON.parse(r.stdout);
    expect(result.bytes).toBeLessThan(16 * MiB);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, dst]);
    expect(cmp.code, cmp.stdout).toBe(0);
  });

  it('BLKREP_BENCH_PHASES=1: one blkrep-phases line on stderr, its moments in order; the target exact', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 16 * MiB, 5);
    {
      const dst = await blankRaw(dir, 'dst.raw', 16 * MiB);
      const { uri } = await qemuNbd(dir, dst);
      const env = { ...process.env, BLKREP_BENCH_PHASES: '1' };
      const r = await runCli(['mirror', src, uri, '--json', '--buf-size', '64K', '--max-ops', '16'], { timeoutMs: 60_000, env });
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ bytes: 16 * MiB, size: 16 * MiB, errors: [] });
      const lines = r.stderr.split('\n').filter((l) => l !== '');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/^blkrep-phases \{/);
      const marks = JSON.parse(lines[0]!.slice('blkrep-phases '.length)) as Record<string, { ms: number; cpuMs: number }>;
      expect(Object.keys(marks)).toEqual(['run', 'job', 'copying', 'flush', 'ready', 'concluded', 'closed']);
      const at = Object.values(marks).map((m) => m.ms);
      expect(at).toEqual([...at].sort((a, b) => a - b));
      const cpu = Object.values(marks).map((m) => m.cpuMs);
      expect(cpu).toEqual([...cpu].sort((a, b) => a - b));
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, dst]);
      expect(cmp.code, cmp.stdout).toBe(0);
    }
  });

  it('--sync bitmap:PATH copies the dirty regions only and clears the bitmap', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 8 * MiB, 3);
    const dst = await blankRaw(dir, 'dst.raw', 8 * MiB);
    const bm = join(dir, 'src.bitmap');
    const pb = await PersistentBitmap.create(bm, { size: 8 * MiB });
    pb.fill(MiB, 100);
    pb.fill(5 * MiB, MiB);
    await pb.close();
    const { uri } = await qemuNbd(dir, dst);
    const r = await runCli(['mirror', src, uri, '--json', '--sync', `bitmap:${bm}`], { timeoutMs: 60_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const result = JSON.parse(r.stdout);
    expect(result).toMatchObject({ sync: `bitmap:${bm}`, bytes: 64 * 1024 + MiB, bitmapLoad: 'clean' });
    const { bitmap, loadState } = await PersistentBitmap.open(bm, { readOnly: true });
    expect(loadState.state).toBe('clean');
    expect(bitmap.info().dirtyBytes).toBe(0);
    await bitmap.close();
  });

  it('exit codes: 2 on usage errors, 1 when an image cannot be opened or sizes differ (JSON error on stdout)', async () => {
    const dir = await makeTempDir();
    const a = await blankRaw(dir, 'a.raw', MiB);
    const b = await blankRaw(dir, 'b.raw', 2 * MiB);
    const usage = await runCli(['mirror', a, b, '--sync', 'sideways', '--json']);
    expect(usage.code).toBe(2);
    expect(JSON.parse(usage.stdout).error.code).toBe('ERR_USAGE');
    expect((await runCli(['mirror', a, b, '--copy-mode', 'eager'])).code).toBe(2);
    const size = await runCli(['mirror', a, b, '--json']);
    expect(size.code).toBe(1);
    expect(JSON.parse(size.stdout).error.code).toBe('ERR_SIZE_MISMATCH');
    const missing = await runCli(['mirror', join(dir, 'nope.raw'), a, '--json']);
    expect(missing.code).toBe(1);
    expect(JSON.parse(missing.stdout).error.message).toContain('nope.raw');
    const noBitmap = await runCli(['mirror', a, a, '--sync', 'bitmap']);
    expect(noBitmap.code).toBe(2);
  });

  it('a target that refuses writes: report fails with exit 1 and the error; the text output names it', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 4 * MiB, 4);
    const dst = await blankRaw(dir, 'dst.raw', 4 * MiB);
    const sock = join(dir, 'ro.sock');
    start('qemu-nbd', ['-f', 'raw', '-k', sock, '-x', 'disk', '-t', '-r', dst]);
    await waitFor(() => existsSync(sock), 'qemu-nbd socket');
    const r = await runCli(['mirror', src, unixUri(sock, 'disk'), '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout).error.code).toBe('ERR_READ_ONLY');
  });
});
