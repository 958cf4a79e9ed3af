// --filter on the command line (blkrep-filters(7)): serve-nbd with an error filter read and
// written by qemu-io, an offline mirror onto a target with an error filter under each
// --on-target-error policy, and the refusals of bad specs (exit 2, ERR_BAD_FILTER).
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, runCli, serve, unixUri } from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** a file of `size` bytes, every 64 KiB block filled with its index + 1 */
async function patterned(path: string, size: number): Promise<Buffer> {
  const content = Buffer.alloc(size);
  for (let b = 0; b < size / (64 * KiB); b++) content.fill((b % 250) + 1, b * 64 * KiB, (b + 1) * 64 * KiB);
  await writeFile(path, content);
  return content;
}

async function blank(path: string, size: number): Promise<void> {
  await writeFile(path, '');
  await truncate(path, size);
}

describe.skipIf(!hasTool('qemu-io') || !hasTool('qemu-img'))('--filter', () => {
  it('serve-nbd --filter error: qemu-io sees ENOSPC on writes into the range and nowhere else; the bytes are right on both sides', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.img');
    const before = await patterned(image, 4 * MiB);
    const sock = join(dir, 'nbd');
    await serve([image, '--socket', sock, '--filter', 'error:ops=write+zero,range=1M-2M,errno=ENOSPC', '--filter', 'delay:read=1']);
    const uri = unixUri(sock);
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 64k', '-c', 'write -P 0xcd 1M 64k', '-c', 'write -z 1984k 64k', '-c', 'write -P 0xef 3M 64k', uri]);
    // qemu-io exits 1 when a command failed
    expect(w.code, w.stdout + w.stderr).toBe(1);
    const failures = (w.stdout + w.stderr).split('\n').filter((l) => /failed/.test(l));
    expect(failures).toEqual(['write failed: No space left on device', 'write failed: No space left on device']);
    expect(w.stdout).toContain('wrote 65536/65536 bytes at offset 0');
    expect(w.stdout).toContain('wrote 65536/65536 bytes at offset 3145728');
    // reads pass (through the delay filter) and show the old bytes where the writes failed
    const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0xab 0 64k', '-c', `read -P ${(16 % 250) + 1} 1M 64k`, '-c', `read -P ${(31 % 250) + 1} 1984k 64k`, '-c', 'read -P 0xef 3M 64k', uri]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|failed/);
    const after = await readFile(image);
    const expected = Buffer.from(before);
    expected.fill(0xab, 0, 64 * KiB);
    expected.fill(0xef, 3 * MiB, 3 * MiB + 64 * KiB);
    expect(after.equals(expected)).toBe(true);
  });

  it('mirror --target-filter error: ignore retries the failed writes and ends equal; report fails with the injected error', async () => {
    const dir = await makeTempDir();
    const src = join(dir, 'src.img');
    await patterned(src, 8 * MiB);
    const dst = join(dir, 'dst.img');
    await blank(dst, 8 * MiB);
    const ignore = await runCli(['mirror', src, dst, '--target-filter', 'error:ops=write,every=4', '--on-target-error', 'ignore', '--buf-size', '256K', '--json'], { timeoutMs: 60_000 });
    expect(ignore.code, ignore.stdout + ignore.stderr).toBe(0);
    const result = JSON.parse(ignore.stdout) as { errors: Array<{ side: string; operation: string; errno: string; action: string; message: string }> };
    // 32 writes of 256 KiB and their retries: every 4th fails
    expect(result.errors.length).toBeGreaterThanOrEqual(8);
    for (const e of result.errors) expect(e).toMatchObject({ side: 'target', operation: 'write', errno: 'EIO', action: 'ignore' });
    expect(result.errors[0]!.message).toContain('injected EIO');
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, dst]);
    expect(cmp.code, cmp.stdout).toBe(0);

    await blank(dst, 8 * MiB);
    const report = await runCli(['mirror', src, dst, '--target-filter', 'error:ops=write,every=4', '--json'], { timeoutMs: 60_000 });
    expect(report.code).toBe(1);
    const err = JSON.parse(report.stdout).error as { code: string; message: string };
    expect(err.code).toBe('ERR_INJECTED');
    expect(err.message).toContain('injected EIO: write of');
  });

  it('bad specs: exit 2 with ERR_BAD_FILTER naming the key, the value and what was expected, before anything opens', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.img');
    await blank(image, MiB);
    const serveBad = await runCli(['serve-nbd', image, '--socket', join(dir, 's'), '--filter', 'error:rate=2', '--json']);
    expect(serveBad.code).toBe(2);
    expect(JSON.parse(serveBad.stdout).error).toEqual({ code: 'ERR_BAD_FILTER', message: 'invalid filter "error:rate=2": error: rate=2: expected a probability from 0 to 1 (e.g. 0.1)' });
    const mapBad = await runCli(['map', image, '--filter', 'slow:ms=1']);
    expect(mapBad.code).toBe(2);
    expect(mapBad.stderr).toContain('invalid filter "slow:ms=1": unknown filter "slow": expected one of error, delay');
    // the second image's filter is checked before the first image opens (it does not exist)
    const compareBad = await runCli(['compare', join(dir, 'missing.img'), image, '--filter-b', 'delay', '--json']);
    expect(compareBad.code).toBe(2);
    expect(JSON.parse(compareBad.stdout).error.code).toBe('ERR_BAD_FILTER');
    const backupBad = await runCli(['backup', image, image, '--target-filter', 'error:every=0', '--json']);
    expect(backupBad.code).toBe(2);
    expect(JSON.parse(backupBad.stdout).error.message).toContain('every=0: expected a whole number of requests from 1');
    const active = await runCli(['serve-nbd', image, '--socket', join(dir, 's'), '--filter', 'error:ops=write,at=active', '--json']);
    expect(active.code).toBe(2);
    expect(JSON.parse(active.stdout).error).toMatchObject({ code: 'ERR_USAGE', message: '--filter error:ops=write,at=active: at=active is the active disk of a secondary: it needs --secondary' });
    const live = await runCli(['mirror', '--control', join(dir, 'ctl'), image, '--filter', 'error', '--json']);
    expect(live.code).toBe(2);
    expect(JSON.parse(live.stdout).error.message).toContain('--filter is for an offline mirror');
  });

  it('compare and map through an error filter: the injected error is the command\'s error', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.img');
    await patterned(image, MiB);
    const cmp = await runCli(['compare', image, image, '--filter-a', 'error:ops=read,range=512K-513K', '--json']);
    expect(cmp.code).toBe(2);
    expect(JSON.parse(cmp.stdout).error).toMatchObject({ code: 'ERR_INJECTED' });
    const same = await runCli(['compare', image, image, '--filter-a', 'delay:read=1', '--json']);
    expect(same.code).toBe(0);
    const map = await runCli(['map', image, '--filter', 'error:ops=block-status', '--json']);
    expect(map.code).toBe(1);
    expect(JSON.parse(map.stdout).error.message).toContain('injected EIO: block-status of');
  });
});
