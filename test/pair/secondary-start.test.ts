/**
 * serve-nbd --secondary start errors, each with its code: lengths that differ (ERR_PAIR_SIZE with
 * the three sizes), a hidden disk that cannot be created (ERR_PAIR_OVERLAY), a disk that is not a
 * file (ERR_USAGE); and the overlays created beside the disk as a qcow2 chain qemu-img reads.
 */
import { join } from 'node:path';
import { writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { BIN, makeTempDir, run, runCli, serve, start, waitFor } from '../support/spawn.js';

const MiB = 1024 * 1024;

async function startError(args: string[]): Promise<{ code: number | null; error: { code: string; message: string } }> {
  const r = await runCli(['serve-nbd', ...args, '--json']);
  const line = r.stdout.trim().split('\n')[0] ?? '';
  return { code: r.code, error: (JSON.parse(line) as { error: { code: string; message: string } }).error };
}

describe('serve-nbd --secondary: start', () => {
  it('without --json, a secondary with no export yet says so (not "Try: nbdinfo \'undefined\'")', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(2 * MiB));
    const d = start(process.execPath, [BIN, 'serve-nbd', disk, '--secondary', '--socket', join(dir, 'nbd.sock')]);
    await waitFor(() => d.stdout().includes('Stop with Ctrl-C.'), 'the daemon to start', { timeoutMs: 20_000 });
    expect(d.stdout()).toContain('No export yet: the replica export appears when a primary connects');
    expect(d.stdout()).not.toContain('undefined');
    expect(await d.stop()).toBe(0);
  });

  it('creates hidden and active beside the disk: a qcow2 chain active → hidden → disk, 64 KiB clusters', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(2 * MiB, 0x11));
    const p = await serve([disk, '--secondary', '--socket', join(dir, 'nbd.sock')]);
    await p.stop();
    const info = await run('qemu-img', ['info', '--output=json', '--backing-chain', `${disk}.active.qcow2`]);
    expect(info.code, info.stderr).toBe(0);
    const chain = JSON.parse(info.stdout) as Array<{ filename: string; format: string; 'virtual-size': number; 'cluster-size'?: number }>;
    expect(chain.map((c) => [c.filename.split('/').pop(), c.format, c['virtual-size']])).toEqual([
      ['disk.img.active.qcow2', 'qcow2', 2 * MiB],
      ['disk.img.hidden.qcow2', 'qcow2', 2 * MiB],
      ['disk.img', 'raw', 2 * MiB],
    ]);
    expect(chain[0]!['cluster-size']).toBe(65536);
  });

  it('refuses overlays of another length: ERR_PAIR_SIZE naming the three sizes', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(2 * MiB));
    const hidden = join(dir, 'h.qcow2');
    expect((await run('qemu-img', ['create', '-f', 'qcow2', '-b', disk, '-F', 'raw', hidden, '4M'])).code).toBe(0);
    const r = await startError([disk, '--secondary', '--hidden', hidden, '--socket', join(dir, 'nbd.sock')]);
    expect(r.code).toBe(1);
    expect(r.error.code).toBe('ERR_PAIR_SIZE');
    expect(r.error.message).toContain(`disk ${disk} is ${2 * MiB} bytes, hidden ${hidden} ${4 * MiB}, active`);
  });

  it('refuses a hidden disk it cannot create: ERR_PAIR_OVERLAY naming the file', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(MiB));
    // a directory that cannot hold files (its "parent" is a regular file), unwritable even for root
    const hidden = join(disk, 'hidden.qcow2');
    const r = await startError([disk, '--secondary', '--hidden', hidden, '--socket', join(dir, 'nbd.sock')]);
    expect(r.code).toBe(1);
    expect(r.error.code).toBe('ERR_PAIR_OVERLAY');
    expect(r.error.message).toContain(`cannot create the hidden disk ${hidden}`);
  });

  it('refuses a disk that is not a file (ERR_USAGE), and a view export named as the replica export', async () => {
    const dir = await makeTempDir();
    const r = await startError(['memory:1M', '--secondary', '--socket', join(dir, 'nbd.sock')]);
    expect(r.code).toBe(2);
    expect(r.error.code).toBe('ERR_USAGE');
    expect(r.error.message).toContain('--secondary needs a disk file');
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(MiB));
    const v = await runCli(['serve-nbd', disk, '--secondary', '--view-export', '', '--socket', join(dir, 'nbd.sock')]);
    expect(v.code).toBe(2);
    expect(v.stderr).toContain('--view-export "" is the replica export\'s name too');
  });
});
