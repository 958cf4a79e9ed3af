/**
 * serve-nbd's files in shared directories (issue 14, defect 3): under umask 000 the NBD socket,
 * the control socket and the pid file are still 0600 (--socket-mode widens the socket's on
 * purpose); a symlink planted at the pid file's path leaves its victim alone; export names and
 * job ids that could leave the image's directory are refused (CLI and control verb).
 */
import { lstat, readFile, readdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli, serve, type Served } from '../support/spawn.js';
import { control, emptyImage, MiB } from '../jobs/live-helpers.js';

/** serve-nbd started under `mask` (the child inherits the umask). */
async function serveUnder(mask: number, args: string[]): Promise<Served> {
  const previous = process.umask(mask);
  try {
    return await serve(args);
  } finally {
    process.umask(previous);
  }
}

const mode = async (path: string): Promise<number> => (await lstat(path)).mode & 0o7777;

describe('serve-nbd files under umask 000', () => {
  it('the NBD socket, the control socket and the pid file are 0600; the pid file holds the pid and is removed at exit', async () => {
    const dir = await makeTempDir();
    const [sock, ctl, pid] = [join(dir, 'nbd.sock'), join(dir, 'ctl.sock'), join(dir, 'serve.pid')];
    const s = await serveUnder(0, ['memory:1M', '--socket', sock, '--control', ctl, '--pid-file', pid]);
    expect(await mode(sock)).toBe(0o600);
    expect(await mode(ctl)).toBe(0o600);
    expect(await mode(pid)).toBe(0o600);
    expect(await readFile(pid, 'utf8')).toBe(`${s.pid}\n`);
    expect(await s.stop()).toBe(0);
    expect(await readdir(dir)).toEqual([]);
  });

  it('a backup\'s --fleecing-socket is 0600 too', async () => {
    const dir = await makeTempDir();
    const [src, dst, ctl, snap] = [join(dir, 'src.img'), join(dir, 'dst.img'), join(dir, 'ctl.sock'), join(dir, 'snap.sock')];
    await emptyImage(src, MiB);
    await emptyImage(dst, MiB);
    const s = await serveUnder(0, ['--export', `disk=${src}`, '--socket', join(dir, 'nbd.sock'), '--control', ctl]);
    const previous = process.umask(0);
    try {
      await control(ctl, 'job-start', { type: 'backup', target: dst, sync: 'none', fleecingExport: 'snap', fleecingSocket: snap });
    } finally {
      process.umask(previous);
    }
    expect(await mode(snap)).toBe(0o600);
    await control(ctl, 'job-cancel', { id: 'backup0' });
    expect(await s.stop()).toBe(0);
  });

  it('--socket-mode 0660 widens the NBD socket on purpose (the control socket stays 0600)', async () => {
    const dir = await makeTempDir();
    const [sock, ctl] = [join(dir, 'nbd.sock'), join(dir, 'ctl.sock')];
    const s = await serveUnder(0o077, ['memory:1M', '--socket', sock, '--socket-mode', '0660', '--control', ctl]);
    expect(await mode(sock)).toBe(0o660);
    expect(await mode(ctl)).toBe(0o600);
    expect(await s.stop()).toBe(0);
  });

  it.each([
    ['rw', 'is not an octal mode such as 0600 or 0660'],
    ['0999', 'is not an octal mode'],
    ['4660', 'sets the setuid, setgid or sticky bit'],
    ['0400', "does not let the daemon's own user connect"],
  ])('--socket-mode %s: exit 2, ERR_USAGE, %s', async (m, why) => {
    const dir = await makeTempDir();
    const r = await runCli(['serve-nbd', 'memory:1M', '--socket', join(dir, 's'), '--socket-mode', m, '--json']);
    expect(r.code).toBe(2);
    const err = JSON.parse(r.stdout.trim() || r.stderr.trim()) as { error: { code: string; message: string } };
    expect(err.error.code).toBe('ERR_USAGE');
    expect(err.error.message).toContain(why);
    expect(await readdir(dir)).toEqual([]);
  });

  it('a symlink planted at the pid file path: the victim keeps its bytes; the pid file is a file of our own, removed at exit', async () => {
    const dir = await makeTempDir();
    const victim = join(dir, 'victim');
    await writeFile(victim, 'precious\n');
    const pid = join(dir, 'serve.pid');
    await symlink(victim, pid);
    const s = await serve(['memory:1M', '--socket', join(dir, 'nbd.sock'), '--pid-file', pid]);
    expect((await lstat(pid)).isFile()).toBe(true);
    expect(await readFile(pid, 'utf8')).toBe(`${s.pid}\n`);
    expect(await readFile(victim, 'utf8')).toBe('precious\n');
    expect(await s.stop()).toBe(0);
    expect(await readdir(dir)).toEqual(['victim']);
    expect(await readFile(victim, 'utf8')).toBe('precious\n');
  });
});

describe('names the user gives', () => {
  it.each([
    [['--export', '../up=memory:1M'], '".." as a path component'],
    [['--export', 'a\u0001b=memory:1M'], 'control character'],
    [['memory:1M', '--name', '/abs'], 'starts with "/"'],
  ])('serve-nbd %j: exit 1, ERR_EXPORT_NAME, %s', async (args, why) => {
    const dir = await makeTempDir();
    const r = await runCli(['serve-nbd', ...args, '--socket', join(dir, 's'), '--json']);
    expect(r.code).toBe(1);
    const err = JSON.parse(r.stdout.trim() || r.stderr.trim()) as { error: { code: string; message: string } };
    expect(err.error.code).toBe('ERR_EXPORT_NAME');
    expect(err.error.message).toContain(why);
  });

  it('a job id with "/" or "..": job-start and blkrep mirror --job-id refuse it (ERR_JOB_ID), no file is created; a fleecing export name likewise (ERR_EXPORT_NAME)', async () => {
    const dir = await makeTempDir();
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    await emptyImage(src, MiB);
    await emptyImage(dst, MiB);
    const ctl = join(dir, 'ctl');
    const s = await serve(['--export', `disk=${src}`, '--socket', join(dir, 'nbd'), '--control', ctl]);
    const before = (await readdir(dir)).sort();
    await expect(control(ctl, 'job-start', { type: 'mirror', target: dst, id: '../../x' })).rejects.toMatchObject({ code: 'ERR_JOB_ID' });
    await expect(control(ctl, 'job-start', { type: 'backup', target: dst, fleecingExport: '../snap', sync: 'none' })).rejects.toMatchObject({ code: 'ERR_EXPORT_NAME' });
    const r = await runCli(['mirror', '--control', ctl, '--job-id', 'a/..', dst, '--json']);
    expect(r.code).toBe(1);
    expect((JSON.parse(r.stdout.trim() || r.stderr.trim()) as { error: { code: string } }).error.code).toBe('ERR_JOB_ID');
    expect((await readdir(dir)).sort()).toEqual(before);
    expect(await control(ctl, 'job-list')).toEqual([]);
    expect(await s.stop()).toBe(0);
  });
});
