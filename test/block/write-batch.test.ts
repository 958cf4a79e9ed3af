import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadNative, type SparseOps } from '../../src/block/native.js';
import { WriteBatcher } from '../../src/block/write-batch.js';
import { HostFile } from '../../src/block/qcow2/file.js';

let dir: string;
let counter = 0;
const fds: number[] = [];
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'blkrep-write-batch-'));
});
afterAll(() => {
  for (const fd of fds) closeSync(fd);
  rmSync(dir, { recursive: true, force: true });
});

function file(flags: 'r' | 'r+'): { fd: number; path: string } {
  const path = join(dir, `f-${++counter}`);
  writeFileSync(path, Buffer.alloc(0));
  const fd = openSync(path, flags);
  fds.push(fd);
  return { fd, path };
}

/** the addon with its pwriteBatch counted: the items of each job */
function counted(native: SparseOps): { ops: SparseOps; jobs: number[] } {
  const jobs: number[] = [];
  const ops: SparseOps = {
    ...native,
    pwriteBatch: (fd, buffers, positions) => {
      jobs.push(buffers.length);
      return native.pwriteBatch!(fd, buffers, positions);
    },
  };
  return { ops, jobs };
}

describe.runIf(typeof loadNative()?.pwriteBatch === 'function')('WriteBatcher (small writes of one turn on one thread-pool job)', () => {
  it('writes issued in one turn go in jobs of at most 64, each at its position', async () => {
    const { ops, jobs } = counted(loadNative()!);
    const { fd, path } = file('r+');
    const b = WriteBatcher.for(fd, ops)!;
    const n = 100;
    const results = await Promise.all(Array.from({ length: n }, (_, i) => b.write(Buffer.alloc(512, i + 1), i * 512)));
    expect(results).toEqual(Array.from({ length: n }, () => 512));
    expect(jobs).toEqual([64, 36]);
    const got = readFileSync(path);
    expect(got.length).toBe(n * 512);
    for (let i = 0; i < n; i++) expect(got.subarray(i * 512, (i + 1) * 512).equals(Buffer.alloc(512, i + 1))).toBe(true);
  });

  it('a failing pwrite rejects its write with the errno name as code', async () => {
    const { fd } = file('r');
    const b = WriteBatcher.for(fd, loadNative())!;
    await expect(b.write(Buffer.alloc(16), 0)).rejects.toMatchObject({ code: 'EBADF', syscall: 'pwrite' });
  });

  it('a job the addon refuses rejects every write in it', async () => {
    const b = WriteBatcher.for(-1, loadNative())!;
    const all = await Promise.allSettled([b.write(Buffer.alloc(16), 0), b.write(Buffer.alloc(16), 16)]);
    expect(all.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(all.map((r) => (r as PromiseRejectedResult).reason.code)).toEqual(['ERR_INVALID_ARG_TYPE', 'ERR_INVALID_ARG_TYPE']);
  });

  it('close() submits the writes gathered this turn and waits for them before closing the fd', async () => {
    const { path } = file('r+');
    const f = await HostFile.open(path, { lock: null });
    const written = f.write(4096, Buffer.alloc(4096, 5));
    await f.close();
    await expect(written).resolves.toBeUndefined();
    expect(readFileSync(path).subarray(4096).equals(Buffer.alloc(4096, 5))).toBe(true);
  });

  it('without pwriteBatch there is no batcher', () => {
    expect(WriteBatcher.for(3, null)).toBeNull();
    expect(WriteBatcher.for(3, { ...loadNative()!, pwriteBatch: undefined })).toBeNull();
  });

  it("a qcow2 container's small writes are batched and its large ones are not; the file grows", async () => {
    const { ops, jobs } = counted(loadNative()!);
    const { path } = file('r+');
    const f = await HostFile.open(path, { native: ops, lock: null });
    try {
      await Promise.all([f.write(0, Buffer.alloc(64 * 1024, 7)), f.write(64 * 1024, Buffer.alloc(4096, 8)), f.write(1 << 20, Buffer.alloc(128 * 1024, 9))]);
      expect(jobs).toEqual([2]);
      expect(f.length).toBe((1 << 20) + 128 * 1024);
      const got = readFileSync(path);
      expect(got.subarray(0, 64 * 1024).equals(Buffer.alloc(64 * 1024, 7))).toBe(true);
      expect(got.subarray(64 * 1024, 68 * 1024).equals(Buffer.alloc(4096, 8))).toBe(true);
      expect(got.subarray(1 << 20).equals(Buffer.alloc(128 * 1024, 9))).toBe(true);
    } finally {
      await f.close();
    }
  });
});
