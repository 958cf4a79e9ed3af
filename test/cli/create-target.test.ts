/**
 * mirror/backup --create (offline): the target is made (size and format from the source, or
 * --target-format) and the copy equals the source (qemu-img compare); an existing target is never
 * replaced; --create with an NBD target, with --existing or with --control is refused.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli } from '../support/spawn.js';

const MiB = 1024 * 1024;

async function json(args: string[]): Promise<{ code: number | null; out: any }> {
  const r = await runCli([...args, '--json']);
  return { code: r.code, out: JSON.parse(r.stdout) };
}

async function qemuInfo(path: string): Promise<{ format: string; 'virtual-size': number }> {
  const r = await run('qemu-img', ['info', '--output=json', '-U', path]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

describe('mirror/backup --create', () => {
  it('creates the target (source format by default, or --target-format) and copies; qemu-img agrees', async () => {
    const dir = await makeTempDir();
    const src = join(dir, 'src.qcow2');
    expect((await run('qemu-img', ['create', '-f', 'qcow2', src, '6M'])).code).toBe(0);
    expect((await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x3c 1M 512k', '-c', 'write -P 0x3d 5M 64k', src])).code).toBe(0);

    const m = await json(['mirror', src, join(dir, 'm.qcow2'), '--create']);
    expect(m.code).toBe(0);
    expect(await qemuInfo(join(dir, 'm.qcow2'))).toMatchObject({ format: 'qcow2', 'virtual-size': 6 * MiB });
    const b = await json(['backup', src, join(dir, 'b.raw'), '--create', '--target-format', 'raw']);
    expect(b.code).toBe(0);
    expect(await qemuInfo(join(dir, 'b.raw'))).toMatchObject({ format: 'raw', 'virtual-size': 6 * MiB });
    for (const [target, fmt] of [['m.qcow2', 'qcow2'], ['b.raw', 'raw']] as const) {
      const c = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', fmt, src, join(dir, target)]);
      expect(c.code, `${target}: ${c.stdout}${c.stderr}`).toBe(0);
    }
  });

  it('never replaces an existing target (ERR_EXISTS, exit 1, the file unchanged); refuses NBD targets, --existing, --control (exit 2)', async () => {
    const dir = await makeTempDir();
    const src = join(dir, 'src.raw');
    const old = join(dir, 'old.raw');
    writeFileSync(src, Buffer.alloc(MiB, 1));
    writeFileSync(old, Buffer.alloc(4096, 9));
    for (const cmd of ['mirror', 'backup']) {
      const r = await json([cmd, src, old, '--create']);
      expect(r.code, cmd).toBe(1);
      expect(r.out.error.code).toBe('ERR_EXISTS');
      expect(r.out.error.message).toContain(`"${old}" exists (4096 bytes)`);
      expect(readFileSync(old)).toEqual(Buffer.alloc(4096, 9));
    }
    const nbd = await json(['mirror', src, 'nbd://127.0.0.1:1/x', '--create']);
    expect([nbd.code, nbd.out.error.code]).toEqual([2, 'ERR_USAGE']);
    expect(nbd.out.error.message).toContain('--create makes a file');
    const both = await json(['mirror', src, join(dir, 'n.raw'), '--create', '--existing']);
    expect([both.code, both.out.error.code]).toEqual([2, 'ERR_USAGE']);
    const live = await json(['backup', '--control', join(dir, 'ctl'), join(dir, 'n.raw'), '--create']);
    expect([live.code, live.out.error.code]).toEqual([2, 'ERR_USAGE']);
    expect(live.out.error.message).toContain('--create is for an offline backup');
  });
});
