/**
 * Mirroring onto a target that already holds data needs --existing (job-start "existing": true),
 * as QEMU's drive-mirror mode=existing; otherwise ERR_TARGET_NOT_EMPTY names the target and
 * where its data starts, and the target is left as it was. "Holds data": an allocated extent
 * that is not known to read as zeros (SEEK_DATA for a raw file, the qcow2 allocation, NBD block
 * status through qemu-nbd), not merely the right size.
 */
import { existsSync } from 'node:fs';
import { open, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, start, unixUri, waitFor } from '../support/spawn.js';
import { startNbdkit } from '../nbd-client/helpers.js';
import { control, emptyImage, MiB } from './live-helpers.js';

const SIZE = 8 * MiB;

async function images(dir: string): Promise<{ src: string; dst: string; srcBytes: Buffer; dstBytes: Buffer }> {
  const src = join(dir, 'src.raw');
  const dst = join(dir, 'dst.raw');
  const srcBytes = Buffer.alloc(SIZE, 0);
  srcBytes.fill(0x5a, MiB, 2 * MiB);
  await writeFile(src, srcBytes);
  await emptyImage(dst, SIZE);
  // one 64 KiB piece of data at 3 MiB in an otherwise sparse target
  const dstBytes = Buffer.alloc(SIZE, 0);
  dstBytes.fill(0xc3, 3 * MiB, 3 * MiB + 65536);
  const fh = await open(dst, 'r+');
  await fh.write(dstBytes, 3 * MiB, 65536, 3 * MiB);
  await fh.close();
  return { src, dst, srcBytes, dstBytes };
}

const errorOf = (stdout: string): { code: string; message: string } => (JSON.parse(stdout) as { error: { code: string; message: string } }).error;

describe('blkrep mirror onto a target with data', () => {
  it('raw file: refused without --existing (exit 1, ERR_TARGET_NOT_EMPTY, the offset of its data), target unchanged; with --existing it is mirrored', async () => {
    const dir = await makeTempDir();
    const { src, dst, srcBytes, dstBytes } = await images(dir);
    const r = await runCli(['mirror', src, dst, '--json', '--no-progress']);
    expect(r.code).toBe(1);
    const err = errorOf(r.stdout);
    expect(err.code).toBe('ERR_TARGET_NOT_EMPTY');
    expect(err.message).toMatch(new RegExp(`^target ${dst} holds data \\(the first at offset ${3 * MiB}, \\d+ bytes\\): mirroring would overwrite it\\. Give --existing to mirror onto it anyway$`));
    expect((await readFile(dst)).equals(dstBytes)).toBe(true);
    const ok = await runCli(['mirror', src, dst, '--json', '--no-progress', '--existing']);
    expect(ok.code, ok.stderr).toBe(0);
    expect((await readFile(dst)).equals(srcBytes)).toBe(true);
  });

  it('a sparse target of the right size (no data, only its size) needs nothing', async () => {
    const dir = await makeTempDir();
    const { src, srcBytes } = await images(dir);
    const blank = join(dir, 'blank.raw');
    await emptyImage(blank, SIZE);
    const r = await runCli(['mirror', src, blank, '--json', '--no-progress']);
    expect(r.code, r.stdout).toBe(0);
    expect((await readFile(blank)).equals(srcBytes)).toBe(true);
  });

  it('qcow2 target with an allocated cluster (qemu-io): refused; a fresh qcow2 is not', async () => {
    const dir = await makeTempDir();
    const { src } = await images(dir);
    const used = join(dir, 'used.qcow2');
    const fresh = join(dir, 'fresh.qcow2');
    for (const f of [used, fresh]) expect((await run('qemu-img', ['create', '-q', '-f', 'qcow2', f, String(SIZE)])).code).toBe(0);
    expect((await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 7 ${5 * MiB} 4k`, used])).code).toBe(0);
    const r = await runCli(['mirror', src, used, '--json', '--no-progress']);
    expect(r.code).toBe(1);
    expect(errorOf(r.stdout)).toMatchObject({ code: 'ERR_TARGET_NOT_EMPTY' });
    expect(errorOf(r.stdout).message).toContain(`holds data (the first at offset ${5 * MiB},`);
    const ok = await runCli(['mirror', src, fresh, '--json', '--no-progress']);
    expect(ok.code, ok.stdout + ok.stderr).toBe(0);
    expect((await run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', src, fresh])).code).toBe(0);
  });

  it('NBD target (qemu-nbd, block status): refused without --existing, mirrored with it', async () => {
    const dir = await makeTempDir();
    const { src, dst, dstBytes } = await images(dir);
    const sock = join(dir, 't.sock');
    const q = start('qemu-nbd', ['-f', 'raw', '-k', sock, '-t', '--cache=writeback', dst]);
    await waitFor(() => existsSync(sock), 'qemu-nbd socket');
    const uri = unixUri(sock);
    const r = await runCli(['mirror', src, uri, '--json', '--no-progress']);
    expect(r.code).toBe(1);
    expect(errorOf(r.stdout).code).toBe('ERR_TARGET_NOT_EMPTY');
    expect(errorOf(r.stdout).message).toContain(`target ${uri} holds data (the first at offset ${3 * MiB},`);
    expect((await readFile(dst)).equals(dstBytes)).toBe(true);
    const ok = await runCli(['mirror', src, uri, '--json', '--no-progress', '--existing']);
    expect(ok.code, ok.stderr).toBe(0);
    await q.stop();
    expect((await run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, dst])).code).toBe(0);
  });

  it('NBD target (nbdkit, log filter): the emptiness check asks on one connection of its own, the copy runs on --connections 4; bytes exact', async () => {
    const dir = await makeTempDir();
    const { src, srcBytes } = await images(dir);
    const blank = join(dir, 'blank.raw');
    await emptyImage(blank, SIZE);
    const log = join(dir, 'log.txt');
    const k = await startNbdkit(['--filter=log', 'file', blank, `logfile=${log}`]);
    const r = await runCli(['mirror', src, k.uri, '--connections', '4', '--json', '--no-progress']);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    await k.proc.stop();
    expect((await readFile(blank)).equals(srcBytes)).toBe(true);
    const text = await readFile(log, 'utf8');
    // connection ids in the order nbdkit logged their Connect, and the requests each one carried
    const ids = [...text.matchAll(/connection=(\d+) Connect /g)].map((m) => m[1]!);
    const requests = (id: string): string[] => [...text.matchAll(new RegExp(`connection=${id} (\\w+) id=`, 'g'))].map((m) => m[1]!);
    expect(ids).toHaveLength(5);
    expect(new Set(requests(ids[0]!))).toEqual(new Set(['Extents']));
    expect(text).toMatch(new RegExp(`connection=${ids[0]} Disconnect`));
    // the probe was gone before the copy's connections came
    expect(text.indexOf(`connection=${ids[0]} Disconnect`)).toBeLessThan(text.indexOf(`connection=${ids[1]} Connect`));
    for (const id of ids.slice(1)) expect(requests(id)).toContain('Write');
  });

  it('live: job-start refuses it (no job, no job files), the CLI too (exit 1); "existing": true / --existing mirrors onto it', async () => {
    const dir = await makeTempDir();
    const { src, dst, dstBytes } = await images(dir);
    const ctl = join(dir, 'ctl');
    const s = await serve(['--export', `disk=${src}`, '--socket', join(dir, 'nbd'), '--control', ctl]);
    const before = (await readdir(dir)).sort();
    await expect(control(ctl, 'job-start', { type: 'mirror', target: dst })).rejects.toMatchObject({
      code: 'ERR_TARGET_NOT_EMPTY',
      message: expect.stringContaining(`target ${dst} holds data (the first at offset ${3 * MiB},`),
    });
    const cli = await runCli(['mirror', '--control', ctl, dst, '--json']);
    expect(cli.code).toBe(1);
    expect(errorOf(cli.stdout).code).toBe('ERR_TARGET_NOT_EMPTY');
    expect(errorOf(cli.stdout).message).toContain('Give --existing (job-start "existing": true) to mirror onto it anyway');
    expect(await control(ctl, 'job-list')).toEqual([]);
    expect((await readdir(dir)).sort()).toEqual(before);
    expect((await readFile(dst)).equals(dstBytes)).toBe(true);
    const started = await runCli(['mirror', '--control', ctl, dst, '--existing', '--wait', 'ready', '--json', '--no-progress']);
    expect(started.code, started.stdout + started.stderr).toBe(0);
    const { id } = JSON.parse(started.stdout) as { id: string };
    await control(ctl, 'job-complete', { id, pivot: false });
    expect((await run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, dst])).code).toBe(0);
    expect(await s.stop()).toBe(0);
  });
});
