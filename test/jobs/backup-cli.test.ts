// blkrep backup (offline): a sparse raw file onto a qemu-nbd target (qemu-img compare), an
// incremental chain into qcow2 overlays that qemu-img reads through their backing files,
// bitmap by name beside the image, --json, exit codes.
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

/** Writes to the raw file (as a guest would, offline) and records them in its bitmap file. */
async function guestWrites(file: string, bitmapPath: string, seed: number, n: number): Promise<number> {
  const r = rng(seed);
  const fh = await openFile(file, 'r+');
  const { bitmap } = await PersistentBitmap.open(bitmapPath);
  const size = (await fh.stat()).size;
  try {
    for (let i = 0; i < n; i++) {
      const len = 1 + Math.floor(r() * 200_000);
      const off = Math.floor(r() * (size - len));
      const data = r() < 0.2 ? Buffer.alloc(len) : randomBytes(r, len);
      await fh.write(data, 0, len, off);
      bitmap.fill(off, len);
    }
  } finally {
    await fh.close();
  }
  const dirty = bitmap.info().dirtyBytes;
  await bitmap.close();
  return dirty;
}

async function compare(a: string, b: string, fa = 'raw', fb = 'raw'): Promise<void> {
  const cmp = await run('qemu-img', ['compare', '-f', fa, '-F', fb, a, b]);
  expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
  expect(cmp.code).toBe(0);
}

describe.skipIf(!hasTool('qemu-nbd') || !hasTool('qemu-img'))('blkrep backup', () => {
  it('a full backup of a sparse raw file onto qemu-nbd: qemu-img compare finds them identical; --json result', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 32 * MiB, 1);
    const dst = await blankRaw(dir, 'dst.raw', 32 * MiB, 0xa5); // garbage that must be overwritten
    const sock = join(dir, 'dst.sock');
    start('qemu-nbd', ['-f', 'raw', '-k', sock, '-x', 'disk', '-t', '-e', '4', '--cache=writeback', dst]);
    await waitFor(() => existsSync(sock), 'qemu-nbd socket');
    const uri = unixUri(sock, 'disk');
    const r = await runCli(['backup', src, uri, '--json'], { timeoutMs: 60_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    const result = JSON.parse(r.stdout);
    expect(result).toMatchObject({ source: src, target: uri, sync: 'full', granularity: 65536, size: 32 * MiB, bytes: 32 * MiB, errors: [] });
    expect(result.dataBytes).toBeLessThan(32 * MiB);
    await compare(src, dst);
  });

  it('an incremental chain: full (clears the bitmap named beside the image), then incrementals into qcow2 overlays; each overlay reads as the source; full at t2 equals the chain', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 16 * MiB, 2);
    const bm = join(dir, 'src.raw.daily.bitmap');
    const pb = await PersistentBitmap.create(bm, { size: 16 * MiB });
    pb.setAll();
    await pb.close();
    const full = await blankRaw(dir, 'full.raw', 16 * MiB);
    const r0 = await runCli(['backup', src, full, '--sync', 'full', '--bitmap', 'daily', '--target-is-zero', '--json'], { timeoutMs: 60_000 });
    expect(r0.code, r0.stdout + r0.stderr).toBe(0);
    expect(JSON.parse(r0.stdout)).toMatchObject({ sync: 'full', bitmap: bm, bitmapLoad: 'clean' });
    await compare(src, full);
    {
      const { bitmap } = await PersistentBitmap.open(bm, { readOnly: true });
      expect(bitmap.info().dirtyBytes).toBe(0);
      await bitmap.close();
    }
    let backing = full;
    let backingFormat = 'raw';
    for (const t of [1, 2]) {
      const dirty = await guestWrites(src, bm, 100 + t, 25);
      expect(dirty).toBeGreaterThan(0);
      const inc = join(dir, `inc${t}.qcow2`);
      const created = await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', backingFormat, inc]);
      expect(created.code, created.stderr).toBe(0);
      const r = await runCli(['backup', src, inc, '--sync', 'incremental', '--bitmap', bm, '--json'], { timeoutMs: 60_000 });
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ sync: 'incremental', bytes: dirty, bitmap: bm });
      const check = await run('qemu-img', ['check', '-q', inc]);
      expect(check.code, check.stdout + check.stderr).toBe(0);
      await compare(src, inc, 'raw', 'qcow2');
      backing = inc;
      backingFormat = 'qcow2';
    }
    // a full backup at t2 equals full+inc1+inc2
    const full2 = await blankRaw(dir, 'full2.raw', 16 * MiB);
    const r2 = await runCli(['backup', src, full2, '--json'], { timeoutMs: 60_000 });
    expect(r2.code, r2.stdout + r2.stderr).toBe(0);
    await compare(full2, backing, 'raw', 'qcow2');
    // and committed down into the full backup, too
    for (const t of [2, 1]) {
      const c = await run('qemu-img', ['commit', '-q', join(dir, `inc${t}.qcow2`)]);
      expect(c.code, c.stderr).toBe(0);
    }
    await compare(full2, full);
  });

  it('--sync top of a qcow2 overlay copies only what the overlay holds: onto an overlay of the same base it reads the same', async () => {
    const dir = await makeTempDir();
    const base = await sparseFile(dir, 'base.raw', 16 * MiB, 6);
    const top = join(dir, 'top.qcow2');
    const copy = join(dir, 'copy.qcow2');
    for (const f of [top, copy]) expect((await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', f])).code).toBe(0);
    const io = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 1M 300K', '-c', 'write -P 0x62 9M 64K', '-c', 'write -z 12M 128K', top]);
    expect(io.code, io.stderr).toBe(0);
    const r = await runCli(['backup', top, copy, '--sync', 'top', '--json'], { timeoutMs: 60_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const result = JSON.parse(r.stdout);
    // 300K at 1M covers granules 16..20 (5 × 64K); 64K at 9M one; 128K of zeros two
    expect(result).toMatchObject({ sync: 'top', bytes: 8 * 65536 });
    await compare(top, copy, 'qcow2', 'qcow2');
    expect((await run('qemu-img', ['check', '-q', copy])).code).toBe(0);
  });

  it('text output, small granularity and buffers, speed; sync none does nothing offline', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 8 * MiB, 3);
    const dst = await blankRaw(dir, 'dst.raw', 8 * MiB);
    const r = await runCli(['backup', src, dst, '--granularity', '4K', '--buf-size', '128K', '--max-ops', '2', '--speed', '1G', '--no-progress'], { timeoutMs: 60_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^Backed up 8(\.0)? MiB of 8(\.0)? MiB/);
    await compare(src, dst);
    const other = await blankRaw(dir, 'other.raw', 8 * MiB);
    const none = await runCli(['backup', src, other, '--sync', 'none', '--json']);
    expect(none.code, none.stdout + none.stderr).toBe(0);
    expect(JSON.parse(none.stdout)).toMatchObject({ sync: 'none', bytes: 0, dataBytes: 0 });
  });

  it('exit codes: 2 on usage errors, 1 when an image or bitmap cannot be found or sizes differ (JSON error on stdout)', async () => {
    const dir = await makeTempDir();
    const a = await blankRaw(dir, 'a.raw', MiB);
    const b = await blankRaw(dir, 'b.raw', 2 * MiB);
    const c = await blankRaw(dir, 'c.raw', MiB);
    const usage = await runCli(['backup', a, c, '--sync', 'sideways', '--json']);
    expect(usage.code).toBe(2);
    expect(JSON.parse(usage.stdout).error.code).toBe('ERR_USAGE');
    const noBitmap = await runCli(['backup', a, c, '--sync', 'incremental', '--json']);
    expect(noBitmap.code).toBe(2);
    expect(JSON.parse(noBitmap.stdout).error.message).toContain('--bitmap');
    expect((await runCli(['backup', a, c, '--sync', 'top', '--bitmap', 'x'])).code).toBe(2);
    expect((await runCli(['backup', a, c, '--on-cbw-error', 'shrug'])).code).toBe(2);
    const size = await runCli(['backup', a, b, '--json']);
    expect(size.code).toBe(1);
    expect(JSON.parse(size.stdout).error.code).toBe('ERR_SIZE_MISMATCH');
    const missing = await runCli(['backup', a, c, '--sync', 'incremental', '--bitmap', 'nightly', '--json']);
    expect(missing.code).toBe(1);
    expect(JSON.parse(missing.stdout).error).toMatchObject({ code: 'ERR_BITMAP_NOT_FOUND' });
    expect(JSON.parse(missing.stdout).error.message).toContain(`${a}.nightly.bitmap`);
    const gone = await runCli(['backup', join(dir, 'nope.raw'), c, '--json']);
    expect(gone.code).toBe(1);
    expect(JSON.parse(gone.stdout).error.message).toContain('nope.raw');
  });

  it('a target that refuses writes fails with exit 1', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 4 * MiB, 4);
    const dst = await blankRaw(dir, 'dst.raw', 4 * MiB);
    const sock = join(dir, 'ro.sock');
    start('qemu-nbd', ['-f', 'raw', '-k', sock, '-x', 'disk', '-t', '-r', dst]);
    await waitFor(() => existsSync(sock), 'qemu-nbd socket');
    const r = await runCli(['backup', src, unixUri(sock, 'disk'), '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout).error.code).toBe('ERR_READ_ONLY');
  });
});

describe.skipIf(!hasTool('nbdkit') || !hasTool('qemu-img'))('blkrep backup onto a faulty target (nbdkit error filter, 30% EIO)', () => {
  async function faultyTarget(dir: string, file: string): Promise<string> {
    const sock = join(dir, `${Math.random().toString(36).slice(2, 8)}.sock`);
    start('nbdkit', ['-f', '-U', sock, '--filter=error', 'file', file, 'error=EIO', 'error-rate=30%']);
    await waitFor(() => existsSync(sock), 'nbdkit socket');
    return unixUri(sock, '');
  }

  it('ignore: every error is retried and reported, the backup is identical; report and stop: exit 1 with the error', async () => {
    const dir = await makeTempDir();
    const src = await sparseFile(dir, 'src.raw', 8 * MiB, 5);
    const dst = await blankRaw(dir, 'dst.raw', 8 * MiB, 0x11);
    const ignore = await runCli(['backup', src, await faultyTarget(dir, dst), '--on-target-error', 'ignore', '--max-ops', '4', '--buf-size', '64K', '--json'], { timeoutMs: 90_000 });
    expect(ignore.code, ignore.stdout + ignore.stderr).toBe(0);
    const result = JSON.parse(ignore.stdout);
    expect(result.errors.length).toBeGreaterThan(0);
    for (const e of result.errors) expect(e).toMatchObject({ side: 'target', errno: 'EIO', action: 'ignore' });
    await compare(src, dst);

    const report = await runCli(['backup', src, await faultyTarget(dir, dst), '--buf-size', '64K', '--json'], { timeoutMs: 60_000 });
    expect(report.code, report.stdout).toBe(1);
    expect(JSON.parse(report.stdout).error.message).toMatch(/EIO|Input\/output error/i);

    const stop = await runCli(['backup', src, await faultyTarget(dir, dst), '--on-target-error', 'stop', '--buf-size', '64K'], { timeoutMs: 60_000 });
    expect(stop.code, stop.stdout + stop.stderr).toBe(1);
    expect(stop.stderr).toMatch(/stopping/);
    expect(stop.stderr).toMatch(/backup stopped before the target was complete/);
  });
});
