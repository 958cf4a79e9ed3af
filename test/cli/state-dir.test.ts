/**
 * The pair files of a disk that is a block device go to the state directory, not to /dev (a
 * devtmpfs, empty after a boot): a pair on two loop devices (root and losetup), the secondary's
 * state directory from BLKREP_STATE_DIR, the primary's from --state-dir; the escaping of device
 * paths; a state directory that cannot be made (ERR_STATE_DIR). A file disk keeps them beside it
 * (the pair tests). Loop devices are detached and their files removed at the end.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { open, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { escapePath } from '../../src/util/state-dir.js';
import { hasTool, makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';

const MiB = 1024 * 1024;

describe('escapePath: systemd-escape --path', () => {
  it('turns "/" into "-" and escapes the rest as \\xNN', () => {
    expect(escapePath('/dev/vdb')).toBe('dev-vdb');
    expect(escapePath('/dev/disk/by-id/wwn-0x5000c5')).toBe('dev-disk-by\\x2did-wwn\\x2d0x5000c5');
    expect(escapePath('/dev/mapper/vg0-lv_data')).toBe('dev-mapper-vg0\\x2dlv_data');
    expect(escapePath('//dev//sda/')).toBe('dev-sda');
    expect(escapePath('/.hidden/a b')).toBe('\\x2ehidden-a\\x20b');
    expect(escapePath('/')).toBe('-');
  });
  it.runIf(hasTool('systemd-escape'))('agrees with systemd-escape', () => {
    for (const p of ['/dev/disk/by-id/wwn-0x5000c5', '/dev/mapper/vg0-lv_data', '/dev/nvme0n1p2', '/x/é.ü']) {
      expect(escapePath(p), p).toBe(execFileSync('systemd-escape', ['--path', p], { encoding: 'utf8' }).trim());
    }
  });
});

const loops: string[] = [];
afterAll(() => {
  for (const l of loops) spawnSync('losetup', ['-d', l]);
});

async function loopDevice(dir: string, name: string, size: number): Promise<string> {
  const file = join(dir, name);
  await writeFile(file, '');
  spawnSync('truncate', ['-s', String(size), file]);
  const dev = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
  loops.push(dev);
  return dev;
}

async function readDevice(dev: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(dev, 'r');
  try {
    const b = Buffer.alloc(length);
    await fh.read(b, 0, length, offset);
    return b;
  } finally {
    await fh.close();
  }
}

const canLoop = process.getuid?.() === 0 && hasTool('losetup') && spawnSync('losetup', ['-f']).status === 0;

describe.runIf(canLoop && hasTool('qemu-io'))('pair files of a block device', () => {
  it('a pair on two loop devices keeps its state, peer bitmap and overlays in the state directories, nothing in /dev', async () => {
    const dir = await makeTempDir();
    const a = await loopDevice(dir, 'a.raw', 8 * MiB);
    const b = await loopDevice(dir, 'b.raw', 8 * MiB);
    const stateA = join(dir, 'state-a'); // made by the daemon
    const stateB = join(dir, 'state-b');
    const devBefore = new Set(await readdir('/dev'));
    const sSock = join(dir, 's.sock');
    const s = await serve([b, '--secondary', '--socket', sSock, '--control', join(dir, 's.ctl')], { env: { ...process.env, BLKREP_STATE_DIR: stateB } });
    const pSock = join(dir, 'p.sock');
    const p = await serve([a, '--socket', pSock, '--control', join(dir, 'p.ctl'), '--replicate-to', unixUri(sSock), '--state-dir', stateA]);
    try {
      await waitFor(async () => {
        const st = await runCli(['status', '--control', join(dir, 'p.ctl'), '--json']);
        return /"link":\s*"connected"/.test(st.stdout) ? true : undefined;
      }, 'the pair link', { timeoutMs: 30_000, intervalMs: 200 });
      const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 1M 64k', `nbd+unix:///?socket=${pSock}`]);
      expect(w.code, w.stderr).toBe(0);
      const c = await runCli(['checkpoint', '--control', join(dir, 'p.ctl'), '--json']);
      expect(c.code, c.stdout + c.stderr).toBe(0);
      expect((await readDevice(b, MiB, 65536)).every((x) => x === 0x3c)).toBe(true);
    } finally {
      expect(await p.stop()).toBe(0);
      expect(await s.stop()).toBe(0);
    }
    const nameA = escapePath(a);
    const nameB = escapePath(b);
    expect(nameA).toMatch(/^dev-loop\d+$/);
    expect((await readdir(stateA)).filter((f) => !f.startsWith('.')).sort()).toEqual([`${nameA}.pair.dirty`, `${nameA}.pair.json`].sort());
    expect((await readdir(stateB)).filter((f) => !f.startsWith('.')).sort()).toEqual([`${nameB}.active.qcow2`, `${nameB}.hidden.qcow2`, `${nameB}.pair.json`]);
    const stateOfB = JSON.parse((await readDevice(join(stateB, `${nameB}.pair.json`), 0, 4096)).toString('utf8').replace(/\0+$/, '')) as { role: string; epoch: number };
    expect(stateOfB.role).toBe('secondary');
    expect(stateOfB.epoch).toBeGreaterThanOrEqual(1);
    // /dev got nothing new beside the devices
    for (const dev of [a, b]) for (const suffix of ['.pair.json', '.pair.dirty', '.hidden.qcow2', '.active.qcow2']) expect(existsSync(dev + suffix), dev + suffix).toBe(false);
    expect([...(await readdir('/dev'))].filter((f) => !devBefore.has(f) && f.includes('.'))).toEqual([]);
  });

  it('the heartbeat term file of a block-device export goes to the state directory too', async () => {
    const dir = await makeTempDir();
    const a = await loopDevice(dir, 'j.raw', 8 * MiB);
    const state = join(dir, 'state');
    const ctl = join(dir, 'ctl');
    const d = await serve([a, '--socket', join(dir, 'nbd.sock'), '--control', ctl, '--state-dir', state, '--heartbeat', 'udp://127.0.0.1:9', '--node-id', 'a', '--peer-id', 'b']);
    try {
      const st = JSON.parse((await runCli(['status', '--control', ctl, '--json'])).stdout) as { heartbeat: { termFile: string | null } };
      expect(st.heartbeat.termFile).toBe(join(state, `${escapePath(a)}.term.json`));
    } finally {
      expect(await d.stop()).toBe(0);
    }
    expect(existsSync(`${a}.term.json`)).toBe(false);
  });

  it('a state directory that cannot be made: ERR_STATE_DIR naming the disk and the directory (exit 1)', async () => {
    const dir = await makeTempDir();
    const b = await loopDevice(dir, 'b.raw', MiB);
    const file = join(dir, 'not-a-dir');
    await writeFile(file, 'x');
    const r = await runCli(['serve-nbd', b, '--secondary', '--socket', join(dir, 's.sock'), '--state-dir', join(file, 'state'), '--json']);
    expect(r.code).toBe(1);
    const err = (JSON.parse(r.stdout.trim().split('\n')[0]!) as { error: { code: string; message: string } }).error;
    expect(err.code).toBe('ERR_STATE_DIR');
    expect(err.message).toContain(`${b} is a block device, so its pair state goes to the state directory ${join(file, 'state')}, which cannot be created: ENOTDIR`);
  });
});
