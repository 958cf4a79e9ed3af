import { closeSync, fstatSync, mkdtempSync, openSync, readFileSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { findNativeAddon, loadNative, nativeDisabled, nativeStatus } from '../../src/block/native.js';
import { RawNode } from '../../src/block/raw.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

let dir: string;
let counter = 0;
const fds: number[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'blkrep-native-'));
});
afterAll(() => {
  for (const fd of fds) closeSync(fd);
  rmSync(dir, { recursive: true, force: true });
});

/** fd of a fresh sparse file of `size` bytes */
function sparseFd(size: number): { fd: number; path: string } {
  const path = join(dir, `f-${++counter}`);
  writeFileSync(path, '');
  truncateSync(path, size);
  const fd = openSync(path, 'r+');
  fds.push(fd);
  return { fd, path };
}

function withEnv<T>(value: string | undefined, fn: () => T): T {
  const saved = process.env.BLKREP_NO_NATIVE;
  if (value === undefined) delete process.env.BLKREP_NO_NATIVE;
  else process.env.BLKREP_NO_NATIVE = value;
  try {
    return fn();
  } finally {
    if (saved === undefined) delete process.env.BLKREP_NO_NATIVE;
    else process.env.BLKREP_NO_NATIVE = saved;
  }
}

describe('loading the addon', () => {
  it('looks upward for native/build from src/ and from dist/', () => {
    const addon = join(repo, 'native', 'build', 'Release', 'blkrep_native.node');
    const found = findNativeAddon(join(repo, 'src', 'block'));
    if (found === undefined) {
      expect(nativeStatus().loaded).toBe(false);
      return;
    }
    expect(found).toBe(addon);
    expect(findNativeAddon(join(repo, 'dist', 'src', 'block'))).toBe(addon);
    expect(findNativeAddon('/')).toBeUndefined();
  });

  it('BLKREP_NO_NATIVE=1 forces the portable fallback', async () => {
    withEnv('1', () => {
      expect(nativeDisabled()).toBe(true);
      expect(loadNative()).toBeNull();
      expect(nativeStatus()).toEqual({ loaded: false, reason: 'disabled by BLKREP_NO_NATIVE' });
    });
    const { path } = sparseFd(64 * KiB);
    const node = await withEnv('1', () => RawNode.open(path));
    expect(node.sparse).toBe(false);
    expect(node.caps.canFastZero).toBe(false);
    await node.close();
    withEnv('0', () => expect(nativeDisabled()).toBe(false));
  });

  it('loads once and reports its status', () => {
    withEnv(undefined, () => {
      const a = loadNative();
      expect(loadNative()).toBe(a);
      const status = nativeStatus();
      expect(status.loaded).toBe(a !== null);
      if (a === null) expect(status.reason).toBeTruthy();
    });
  });
});

const ops = withEnv(undefined, () => loadNative());

describe.skipIf(ops === null)('the addon', () => {
  const n = ops!;

  it('finds data and holes with SEEK_DATA / SEEK_HOLE', () => {
    const { fd } = sparseFd(1 * MiB);
    writeSync(fd, Buffer.alloc(8 * KiB, 0xaa), 0, 8 * KiB, 512 * KiB);
    expect(n.seekData(fd, 0)).toBe(512 * KiB);
    expect(n.seekData(fd, 513 * KiB)).toBe(513 * KiB);
    expect(n.seekHole(fd, 512 * KiB)).toBe(520 * KiB);
    expect(n.seekHole(fd, 0)).toBe(0);
    expect(n.seekData(fd, 520 * KiB)).toBe(-1); // no data after: ENXIO
    expect(n.seekHole(fd, 1 * MiB)).toBe(-1); // at EOF: ENXIO
    expect(n.seekHole(fd, 600 * KiB)).toBe(600 * KiB);
  });

  it('punches holes off the event loop (returns a promise)', async () => {
    const { fd } = sparseFd(256 * KiB);
    writeSync(fd, Buffer.alloc(256 * KiB, 1), 0, 256 * KiB, 0);
    const before = fstatSync(fd).blocks;
    const p = n.punchHole(fd, 64 * KiB, 64 * KiB);
    expect(p).toBeInstanceOf(Promise);
    await expect(p).resolves.toBeUndefined();
    expect(fstatSync(fd).blocks).toBeLessThan(before);
    expect(n.seekHole(fd, 0)).toBe(64 * KiB);
    expect(n.seekData(fd, 64 * KiB)).toBe(128 * KiB);
    expect(fstatSync(fd).size).toBe(256 * KiB); // KEEP_SIZE
    await n.punchHole(fd, 0, 0); // zero length: no-op
  });

  it('allocates and zeroes ranges keeping the size', async () => {
    const { fd } = sparseFd(256 * KiB);
    expect(fstatSync(fd).blocks).toBe(0);
    await n.allocate(fd, 0, 128 * KiB);
    expect(fstatSync(fd).blocks * 512).toBeGreaterThanOrEqual(128 * KiB);
    expect(fstatSync(fd).size).toBe(256 * KiB);
    writeSync(fd, Buffer.alloc(4 * KiB, 7), 0, 4 * KiB, 200 * KiB);
    try {
      await n.zeroRange(fd, 200 * KiB, 4 * KiB);
    } catch (err) {
      expect((err as NodeJS.ErrnoException).code).toBe('ENOTSUP'); // e.g. tmpfs
      return;
    }
    const b = Buffer.alloc(4 * KiB, 1);
    const { readSync } = await import('node:fs');
    readSync(fd, b, 0, b.length, 200 * KiB);
    expect(b.every((x) => x === 0)).toBe(true);
  });

  it('reports errors with the errno name as code', async () => {
    const { fd } = sparseFd(4096);
    const closed = 1_000_000; // no such descriptor
    await expect(n.punchHole(closed, 0, 4096)).rejects.toMatchObject({ code: 'EBADF', syscall: 'fallocate(PUNCH_HOLE)', errno: -9 });
    expect(() => n.seekData(closed, 0)).toThrow(expect.objectContaining({ code: 'EBADF' }));
    // block-device ioctls on a regular file
    await expect(n.discard(fd, 0, 4096)).rejects.toMatchObject({ code: 'ENOTTY' });
    await expect(n.zeroOut(fd, 0, 4096)).rejects.toMatchObject({ code: 'ENOTTY' });
    // a read-only fd
    const ro = openSync(join(dir, `f-${counter}`), 'r');
    fds.push(ro);
    await expect(n.punchHole(ro, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
  });

  it('validates its arguments', () => {
    const { fd } = sparseFd(4096);
    expect(() => n.seekData(fd, -1)).toThrow(TypeError);
    expect(() => n.seekData(fd, 1.5)).toThrow(TypeError);
    expect(() => n.punchHole(fd, 0, Number.NaN)).toThrow(TypeError);
    expect(() => n.punchHole(-1, 0, 1)).toThrow(TypeError);
    expect(() => (n.punchHole as unknown as (fd: number) => Promise<void>)(fd)).toThrow(/expects 3 arguments/);
  });

  it('reports the size of a file through blockDeviceSize (lseek fallback) and accepts willNeed', async () => {
    const { fd } = sparseFd(3 * MiB + 5);
    await expect(n.blockDeviceSize(fd)).resolves.toBe(3 * MiB + 5);
    await expect(n.willNeed(fd, 0, 4096)).resolves.toBeUndefined();
  });

  it('runs many operations concurrently', async () => {
    const { fd } = sparseFd(4 * MiB);
    writeSync(fd, Buffer.alloc(4 * MiB, 3), 0, 4 * MiB, 0);
    await Promise.all(Array.from({ length: 64 }, (_, i) => n.punchHole(fd, i * 64 * KiB, 32 * KiB)));
    for (let i = 0; i < 64; i++) {
      expect(n.seekData(fd, i * 64 * KiB)).toBe(i * 64 * KiB + 32 * KiB);
    }
  });
});

describe.runIf(loadNative() !== null)('preadNowait / pwriteNowait (RWF_NOWAIT on the event loop)', () => {
  it('preadNowait reads cached bytes into the buffer at bufOffset, and 0 at EOF', () => {
    const n = loadNative()!;
    const { fd, path } = sparseFd(0);
    const data = Buffer.from('0123456789abcdef');
    writeFileSync(path, data); // just written: in the page cache
    const into = Buffer.alloc(20, 0xee);
    expect(n.preadNowait!(fd, into, 2, 10, 3)).toBe(10);
    expect(into.subarray(2, 12).toString()).toBe('3456789abc');
    expect(into[0]).toBe(0xee);
    expect(into[12]).toBe(0xee);
    expect(n.preadNowait!(fd, into, 0, 4, 16)).toBe(0);
  });

  it('pwriteNowait writes the bytes, or answers -2 where the file system has no RWF_NOWAIT for buffered writes (ext4)', () => {
    const n = loadNative()!;
    const { fd, path } = sparseFd(8);
    const r = n.pwriteNowait!(fd, Buffer.from('xxABCDxx'), 2, 4, 1);
    expect([4, -2]).toContain(r);
    const after = readFileSync(path);
    expect(after.subarray(1, 5).toString()).toBe(r === 4 ? 'ABCD' : '\0\0\0\0');
  });

  it('bad arguments are TypeErrors or RangeErrors with codes; a bad fd is the errno error', () => {
    const n = loadNative()!;
    const { fd } = sparseFd(4096);
    const b = Buffer.alloc(16);
    expect(() => n.preadNowait!(fd, b, 0, 17, 0)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => n.preadNowait!(fd, b, 8, 9, 0)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => n.preadNowait!(fd, 'nope' as unknown as Buffer, 0, 1, 0)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => n.preadNowait!(fd, b, 0, 1, -1)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    const closed = openSync(join(dir, 'closed'), 'w');
    closeSync(closed);
    expect(() => n.preadNowait!(closed, b, 0, 1, 0)).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'preadv2(RWF_NOWAIT)' }));
  });
});

describe.runIf(loadNative() !== null)('pwriteBatch (several writes on one thread-pool job)', () => {
  it('writes every buffer at its position and answers the bytes written of each', async () => {
    const n = loadNative()!;
    const { fd, path } = sparseFd(64 * KiB);
    const bufs = [Buffer.alloc(4096, 1), Buffer.alloc(100, 2), Buffer.alloc(8192, 3)];
    await expect(n.pwriteBatch!(fd, bufs, [0, 60 * KiB, 8192])).resolves.toEqual([4096, 100, 8192]);
    const after = readFileSync(path);
    expect(after.subarray(0, 4096).equals(bufs[0]!)).toBe(true);
    expect(after.subarray(4096, 8192).equals(Buffer.alloc(4096))).toBe(true);
    expect(after.subarray(8192, 16384).equals(bufs[2]!)).toBe(true);
    expect(after.subarray(60 * KiB, 60 * KiB + 100).equals(bufs[1]!)).toBe(true);
  });

  it('a failing write is an Error with the errno name as code in its place', async () => {
    const n = loadNative()!;
    const ro = openSync(sparseFd(4096).path, 'r');
    fds.push(ro);
    const [r] = await n.pwriteBatch!(ro, [Buffer.alloc(16)], [0]);
    expect(r).toBeInstanceOf(Error);
    expect(r).toMatchObject({ code: 'EBADF', syscall: 'pwrite' });
  });

  it('bad arguments are TypeErrors or RangeErrors with codes', () => {
    const n = loadNative()!;
    const { fd } = sparseFd(4096);
    const b = Buffer.alloc(16);
    expect(() => n.pwriteBatch!(fd, [b, b], [0])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => n.pwriteBatch!(fd, [], [])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => n.pwriteBatch!(fd, [b], 0 as unknown as number[])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => n.pwriteBatch!(fd, ['nope' as unknown as Buffer], [0])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => n.pwriteBatch!(fd, [b], [-1])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => n.pwriteBatch!(-1, [b], [0])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
  });
});

/** execv (bin/run.js runs node again with --max-semi-space-size=2 for the commands that move data) */
describe.skipIf(ops === null)('execv', () => {
  const addonPath = join(repo, 'native', 'build', 'Release', 'blkrep_native.node');
  const execv = (createRequire(import.meta.url)(addonPath) as { execv: (path: string, argv: unknown[]) => never }).execv;

  it('fails with the errno of execv and type errors for bad arguments, leaving this process as it was', () => {
    expect(() => execv(join(dir, 'no-such-program'), ['x'])).toThrow(expect.objectContaining({ code: 'ENOENT', errno: -2, syscall: 'execv' }));
    expect(() => execv('/bin/true', [])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => execv('/bin/true', ['true', 3])).toThrow(/execv: argv\[i\] must be a string/);
  });

  it('replaces the program in the same process, with stdout and stderr still open (node marks them close-on-exec)', () => {
    const script = `require(${JSON.stringify(addonPath)}).execv('/bin/sh', ['sh', '-c', 'echo "$$ out"; echo "$$ err" >&2'])`;
    const r = spawnSync(process.execPath, ['-e', `process.stdout.write(process.pid + " node\\n"); ${script}`], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    const [pid] = r.stdout.split(' ');
    expect(r.stdout).toBe(`${pid} node\n${pid} out\n`);
    expect(r.stderr).toBe(`${pid} err\n`);
  });
});
