// test-compare-map: blkrep compare and blkrep map against qemu-img as the oracle.
import { openSync, writeSync, closeSync, truncateSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli } from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function makeSparse(path: string, size: number, writes: Array<[number, Buffer]>): void {
  truncateSync(openAndClose(path), size);
  const fd = openSync(path, 'r+');
  try {
    for (const [off, data] of writes) writeSync(fd, data, 0, data.length, off);
  } finally {
    closeSync(fd);
  }
}

function openAndClose(path: string): string {
  closeSync(openSync(path, 'w'));
  return path;
}

describe('blkrep compare', () => {
  const cases: Array<{ name: string; a: [number, Array<[number, Buffer]>]; b: [number, Array<[number, Buffer]>]; strict?: boolean; same: boolean; offset?: number }> = [
    { name: 'identical sparse files', a: [4 * MiB, [[MiB, Buffer.alloc(4096, 7)]]], b: [4 * MiB, [[MiB, Buffer.alloc(4096, 7)]]], same: true },
    { name: 'one byte differs in the middle of a block', a: [4 * MiB, []], b: [4 * MiB, [[1000, Buffer.from([1])]]], same: false, offset: 1000 },
    { name: 'last byte differs', a: [4 * MiB, [[4 * MiB - 1, Buffer.from([9])]]], b: [4 * MiB, []], same: false, offset: 4 * MiB - 1 },
    { name: 'data written as explicit zeros equals a hole', a: [4 * MiB, [[0, Buffer.alloc(MiB)]]], b: [4 * MiB, []], same: true },
    { name: 'longer image with a zero tail', a: [4 * MiB, []], b: [6 * MiB, []], same: true },
    { name: 'longer image with data in its tail', a: [4 * MiB, []], b: [6 * MiB, [[5 * MiB + 3, Buffer.from([1])]]], same: false, offset: 5 * MiB + 3 },
    { name: 'size mismatch with --strict', a: [4 * MiB, []], b: [6 * MiB, []], strict: true, same: false },
  ];

  for (const c of cases) {
    it(`${c.name}: exit code and offset, agreeing with qemu-img compare`, async () => {
      const dir = await makeTempDir();
      const a = join(dir, 'a.raw');
      const b = join(dir, 'b.raw');
      makeSparse(a, c.a[0], c.a[1]);
      makeSparse(b, c.b[0], c.b[1]);
      const args = ['compare', a, b, '--json', ...(c.strict ? ['--strict'] : [])];
      const r = await runCli(args);
      expect(r.code, r.stderr).toBe(c.same ? 0 : 1);
      const result = JSON.parse(r.stdout);
      expect(result.identical).toBe(c.same);
      if (c.offset !== undefined) expect(result.offset).toBe(c.offset);
      const q = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ...(c.strict ? ['-s'] : []), a, b]);
      expect(q.code).toBe(c.same ? 0 : 1);
      const text = await runCli(args.filter((x) => x !== '--json'));
      expect(text.code).toBe(c.same ? 0 : 1);
      expect(text.stdout).toContain(c.same ? 'Images are identical.' : 'Images differ');
      if (c.offset !== undefined) expect(text.stdout).toContain(`offset ${c.offset}`);
    });
  }

  it('exits 2 with the path named when an image is missing; --json gives the error object', async () => {
    const dir = await makeTempDir();
    const a = join(dir, 'a.raw');
    makeSparse(a, MiB, []);
    const r = await runCli(['compare', a, join(dir, 'missing.raw')]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('missing.raw');
    const j = await runCli(['compare', a, join(dir, 'missing.raw'), '--json']);
    expect(j.code).toBe(2);
    const err = JSON.parse(j.stdout).error;
    expect(err.message).toContain('missing.raw');
    expect(typeof err.code).toBe('string');
  });

  it('exits 2 on a usage error', async () => {
    const r = await runCli(['compare', 'only-one']);
    expect(r.code).toBe(2);
  });
});

describe('blkrep map', () => {
  it('matches qemu-img map --output=json on a sparse raw file (start, length, depth, present, zero, data)', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'sparse.raw');
    makeSparse(img, 8 * MiB, [
      [256 * KiB, Buffer.alloc(128 * KiB, 1)],
      [4 * MiB, Buffer.alloc(64 * KiB, 2)],
      [8 * MiB - 4096, Buffer.alloc(4096, 3)],
    ]);
    const r = await runCli(['map', img, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const ours = JSON.parse(r.stdout);
    const q = await run('qemu-img', ['map', '--output=json', '-f', 'raw', img]);
    const theirs = JSON.parse(q.stdout).map(({ start, length, depth, present, zero, data }: Record<string, unknown>) => ({ start, length, depth, present, zero, data }));
    expect(ours).toEqual(theirs);
    expect(ours.reduce((s: number, e: { length: number }) => s + e.length, 0)).toBe(8 * MiB);
    // The data runs hold exactly the bytes written.
    const file = readFileSync(img);
    for (const e of ours) if (e.data) expect(file.subarray(e.start, e.start + e.length).some((x) => x !== 0)).toBe(true);
  });

  it('--start and --length restrict the map; text output lists the runs', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'd.raw');
    makeSparse(img, 4 * MiB, [[MiB, Buffer.alloc(MiB, 5)]]);
    const r = await runCli(['map', img, '--start', '512K', '--length', '1M', '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual([
      { start: 512 * KiB, length: 512 * KiB, depth: 0, present: true, zero: true, data: false },
      { start: MiB, length: 512 * KiB, depth: 0, present: true, zero: false, data: true },
    ]);
    const t = await runCli(['map', img]);
    expect(t.stdout).toMatch(/1048576\s+1048576\s+0\s+data/);
  });

  it('a start beyond the end is a usage error (exit 2)', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'd.raw');
    makeSparse(img, MiB, []);
    const r = await runCli(['map', img, '--start', '2M']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('beyond the end');
  });
});
