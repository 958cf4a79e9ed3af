/**
 * util/safe-file.ts and util/names.ts: files blkrep creates never follow a symlink or reuse a
 * planted file, have the mode asked for whatever the umask; job ids and export names that could
 * leave the image's directory (or hide in a log line) are refused with their own codes.
 */
import { lstat, mkdir, readFile, readdir, readlink, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { jobStateBase, jobStatePath, saveJobState, type SavedJobState } from '../../src/jobs/daemon-jobs.js';
import { checkExportName, checkJobId } from '../../src/util/names.js';
import { createNewFile, replaceFile, tempPathBeside } from '../../src/util/safe-file.js';
import { makeTempDir } from '../support/spawn.js';

function caught(fn: () => unknown): BlkrepError {
  try {
    fn();
  } catch (err) {
    return err as BlkrepError;
  }
  throw new Error('did not throw');
}

async function withUmask<T>(mask: number, fn: () => Promise<T>): Promise<T> {
  const previous = process.umask(mask);
  try {
    return await fn();
  } finally {
    process.umask(previous);
  }
}

const state: SavedJobState = { version: 1, id: 'm0', type: 'mirror', export: 'disk', status: 'running', generation: 1, savedAt: '2026-01-01T00:00:00.000Z', options: {} };

describe('safe files', () => {
  it('replaceFile: a symlink planted at the path is replaced, its victim keeps its bytes; the file is 0600 under umask 000', async () => {
    const dir = await makeTempDir();
    const victim = join(dir, 'victim');
    await writeFile(victim, 'precious\n');
    const path = join(dir, 'serve.pid');
    await symlink(victim, path);
    await withUmask(0, () => replaceFile(path, '1234\n', { mode: 0o600, what: 'pid file' }));
    expect(await readFile(victim, 'utf8')).toBe('precious\n');
    const st = await lstat(path);
    expect(st.isFile()).toBe(true);
    expect(st.mode & 0o7777).toBe(0o600);
    expect(await readFile(path, 'utf8')).toBe('1234\n');
    // nothing else left behind (the temporary file was renamed)
    expect((await readdir(dir)).sort()).toEqual(['serve.pid', 'victim']);
  });

  it('temporary names are random: two for the same path differ, and they are hidden beside it', () => {
    const a = tempPathBeside('/run/x/IMAGE.job-m0.json');
    const b = tempPathBeside('/run/x/IMAGE.job-m0.json');
    expect(a).not.toBe(b);
    expect(a).toMatch(new RegExp(`^/run/x/\\.IMAGE\\.job-m0\\.json\\.tmp-${process.pid}-[0-9a-f]{16}$`));
  });

  it('createNewFile never opens through a symlink nor an existing file (ELOOP/EEXIST), and the victim is untouched', async () => {
    const dir = await makeTempDir();
    const victim = join(dir, 'victim');
    await writeFile(victim, 'precious\n');
    await symlink(victim, join(dir, 'link'));
    await expect(createNewFile(join(dir, 'link'), 0o600)).rejects.toMatchObject({ code: 'EEXIST' });
    await expect(createNewFile(victim, 0o600)).rejects.toMatchObject({ code: 'EEXIST' });
    expect(await readFile(victim, 'utf8')).toBe('precious\n');
    const fh = await withUmask(0o077, () => createNewFile(join(dir, 'new'), 0o644));
    await fh.close();
    expect((await lstat(join(dir, 'new'))).mode & 0o7777).toBe(0o644);
  });

  it('replaceFile into a directory that cannot take it: ERR_FILE_CREATE naming the file', async () => {
    const dir = await makeTempDir();
    const err = await replaceFile(join(dir, 'missing', 'serve.pid'), '1\n', { mode: 0o600, what: 'pid file' }).catch((e: unknown) => e as BlkrepError);
    expect(err).toBeInstanceOf(BlkrepError);
    expect(err).toMatchObject({ code: 'ERR_FILE_CREATE', details: { path: join(dir, 'missing', 'serve.pid'), syscode: 'ENOENT' } });
    expect((err as Error).message).toContain(`cannot create pid file "${join(dir, 'missing', 'serve.pid')}"`);
  });

  it('saveJobState: a symlink planted at IMAGE.job-ID.json is replaced, the victim unchanged; the state file is 0600 under umask 000', async () => {
    const dir = await makeTempDir();
    const victim = join(dir, 'victim');
    await writeFile(victim, 'precious\n');
    const path = jobStatePath(jobStateBase(join(dir, 'disk.img'), 'm0'));
    await symlink(victim, path);
    await withUmask(0, () => saveJobState(path, state));
    expect(await readFile(victim, 'utf8')).toBe('precious\n');
    expect((await lstat(path)).mode & 0o7777).toBe(0o600);
    expect(JSON.parse(await readFile(path, 'utf8'))).toEqual(state);
    // a directory planted at the name is not written through either
    const sub = join(dir, 'sub');
    await mkdir(sub);
    await symlink(sub, join(dir, 'other.json'));
    await saveJobState(join(dir, 'other.json'), state);
    expect(await readdir(sub)).toEqual([]);
    expect((await lstat(join(dir, 'other.json'))).isFile()).toBe(true);
    await expect(readlink(join(dir, 'other.json'))).rejects.toMatchObject({ code: 'EINVAL' });
  });
});

describe('names', () => {
  it.each([
    ['', 'a job id cannot be empty'],
    ['../../etc/passwd', 'contains "/", "\\" or a NUL byte'],
    ['a/b', 'contains "/"'],
    ['..', 'contains ".."'],
    ['a..b', 'contains ".."'],
    ['x\u0000y', 'NUL byte'],
    ['.hidden', 'not starting with "." or "-"'],
    ['-rf', 'not starting with "." or "-"'],
    ['a b', 'is not 1 to 64 of the characters'],
    ['x'.repeat(65), 'job id of 65 bytes is longer than 64'],
  ])('job id %j is refused: ERR_JOB_ID, %s', (id, why) => {
    const err = caught(() => checkJobId(id));
    expect(err).toMatchObject({ code: 'ERR_JOB_ID', errno: 'EINVAL', details: { id } });
    expect(err.message).toContain(why);
  });

  it('good job ids pass', () => {
    for (const id of ['mirror0', 'backup-2026.12.05', 'A_b-9', 'x'.repeat(64)]) expect(checkJobId(id)).toBe(id);
  });

  it.each([
    ['../disk', '".." as a path component'],
    ['a/../b', '".." as a path component'],
    ['/abs', 'starts with "/"'],
    ['a\u0000b', 'NUL byte or another control character'],
    ['line\nbreak', 'control character'],
    ['x'.repeat(4097), 'export name of 4097 bytes is longer than the protocol\'s 4096'],
  ])('export name %j is refused: ERR_EXPORT_NAME, %s', (name, why) => {
    const err = caught(() => checkExportName(name));
    expect(err).toMatchObject({ code: 'ERR_EXPORT_NAME', errno: 'EINVAL', details: { export: name } });
    expect(err.message).toContain(why);
  });

  it('good export names pass, the default export "" and names with "/" inside included (NBD allows them)', () => {
    for (const name of ['', 'disk', 'vm/disk0', 'a..b', 'é', 'x'.repeat(4096)]) expect(checkExportName(name)).toBe(name);
  });
});
