// test-create-info: blkrep create and blkrep info against qemu-img as the oracle (qemu-img check
// on what we create, qemu-img info --output=json on the fields both print).
import { existsSync, mkdirSync, openSync, readdirSync, statSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, start, unixUri, waitFor } from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** The fields of qemu-img info --output=json that blkrep info prints with the same meaning. */
const SHARED = ['virtual-size', 'filename', 'format', 'actual-size', 'cluster-size', 'backing-filename', 'full-backing-filename', 'backing-filename-format', 'dirty-flag', 'format-specific'];

function shared(info: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const k of SHARED) if (info[k] !== undefined) out[k] = info[k];
  return out;
}

async function qemuInfo(image: string, options: { cwd?: string; chain?: boolean } = {}): Promise<unknown> {
  const r = await run('qemu-img', ['info', '--output=json', ...(options.chain ? ['--backing-chain'] : []), image], options.cwd ? { cwd: options.cwd } : {});
  expect(r.code, r.stderr).toBe(0);
  const v = JSON.parse(r.stdout);
  return Array.isArray(v) ? v.map(shared) : shared(v);
}

async function ourInfo(image: string, options: { cwd?: string; chain?: boolean } = {}): Promise<unknown> {
  const r = await runCli(['info', image, '--json', ...(options.chain ? ['--backing-chain'] : [])], options.cwd ? { cwd: options.cwd } : {});
  expect(r.code, r.stderr).toBe(0);
  const v = JSON.parse(r.stdout);
  return Array.isArray(v) ? v.map(shared) : shared(v);
}

async function qemuCheckClean(image: string, cwd?: string): Promise<void> {
  const r = await run('qemu-img', ['check', '--output=json', image], cwd ? { cwd } : {});
  expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
  const c = JSON.parse(r.stdout);
  expect(c['corruptions'] ?? 0).toBe(0);
  expect(c['leaks'] ?? 0).toBe(0);
}

async function cli(args: string[], cwd?: string) {
  return runCli(args, cwd ? { cwd } : {});
}

describe('blkrep create', () => {
  const qcow2Cases: Array<{ name: string; size: string; bytes: number; options?: string[] }> = [
    { name: 'default clusters', size: '64M', bytes: 64 * MiB },
    { name: 'a size that is not a multiple of 512 is rounded up', size: '1000', bytes: 1024 },
    { name: '512-byte clusters, 1-bit refcounts', size: '8M', bytes: 8 * MiB, options: ['-o', 'cluster_size=512,refcount_bits=1'] },
    { name: '2 MiB clusters, 64-bit refcounts (two -o)', size: '3G', bytes: 3 * 1024 * MiB, options: ['-o', 'cluster_size=2M', '-o', 'refcount_bits=64'] },
    { name: '4 KiB clusters, large', size: '100G', bytes: 100 * 1024 * MiB, options: ['-o', 'cluster_size=4K'] },
  ];
  for (const c of qcow2Cases) {
    it(`qcow2, ${c.name}: qemu-img check is clean and qemu-img info agrees with blkrep info`, async () => {
      const dir = await makeTempDir();
      const img = join(dir, 'disk.qcow2');
      const r = await cli(['create', ...(c.options ?? []), img, c.size, '--json']);
      expect(r.code, r.stderr).toBe(0);
      const result = JSON.parse(r.stdout);
      expect(result.changed).toBe(true);
      expect(result['virtual-size']).toBe(c.bytes);
      expect(result.format).toBe('qcow2');
      await qemuCheckClean(img);
      expect(await ourInfo(img)).toEqual(await qemuInfo(img));
      expect(shared(result)).toEqual(await qemuInfo(img));
      // nothing left behind but the image
      expect(readdirSync(dir)).toEqual(['disk.qcow2']);
    });
  }

  it('raw: a sparse file of the size, rounded up to 512 as qemu-img does', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.img');
    const r = await cli(['create', '-f', 'raw', img, '1000', '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(statSync(img).size).toBe(1024);
    const q = join(dir, 'q.img');
    await run('qemu-img', ['create', '-f', 'raw', q, '1000']);
    expect(statSync(q).size).toBe(1024);
    const big = join(dir, 'big.img');
    expect((await cli(['create', '-f', 'raw', big, '1T'])).code).toBe(0);
    expect(statSync(big).size).toBe(1024 ** 4);
    expect(statSync(big).blocks).toBe(0);
    expect(await ourInfo(big)).toEqual(await qemuInfo(big));
  });

  const backings: Array<{ name: string; format: 'raw' | 'qcow2'; give: 'relative' | 'absolute' | 'subdir'; F: boolean }> = [
    { name: 'raw backing, relative name, -F raw', format: 'raw', give: 'relative', F: true },
    { name: 'raw backing, absolute name, format probed', format: 'raw', give: 'absolute', F: false },
    { name: 'qcow2 backing, relative name, -F qcow2', format: 'qcow2', give: 'relative', F: true },
    { name: 'qcow2 backing, absolute name, format probed', format: 'qcow2', give: 'absolute', F: false },
    { name: 'qcow2 backing, overlay in a subdirectory named from elsewhere', format: 'qcow2', give: 'subdir', F: true },
  ];
  for (const b of backings) {
    it(`with a backing file: ${b.name}; the size defaults to the backing file's`, async () => {
      const dir = await makeTempDir();
      const sub = b.give === 'subdir' ? join(dir, 'vm') : dir;
      mkdirSync(sub, { recursive: true });
      const base = join(sub, `base.${b.format}`);
      await run('qemu-img', ['create', '-f', b.format, base, '24M']);
      await run('qemu-io', ['-f', b.format, '-c', 'write -P 7 1M 64K', base]);
      const name = b.give === 'absolute' ? base : `base.${b.format}`;
      // The overlay is named relative to the cwd (dir), the backing relative to the overlay.
      const overlay = b.give === 'subdir' ? 'vm/top.qcow2' : 'top.qcow2';
      const r = await cli(['create', '-b', name, ...(b.F ? ['-F', b.format] : []), overlay, '--json'], dir);
      expect(r.code, r.stderr).toBe(0);
      const result = JSON.parse(r.stdout);
      expect(result['virtual-size']).toBe(24 * MiB);
      expect(result['backing-filename']).toBe(name);
      expect(result['backing-filename-format']).toBe(b.format);
      await qemuCheckClean(overlay, dir);
      expect(await ourInfo(overlay, { cwd: dir })).toEqual(await qemuInfo(overlay, { cwd: dir }));
      expect(await ourInfo(overlay, { cwd: dir, chain: true })).toEqual(await qemuInfo(overlay, { cwd: dir, chain: true }));
      // The overlay reads through to the backing file.
      const cmp = await run('qemu-img', ['compare', overlay, base.replace(`${dir}/`, '')], { cwd: dir });
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      // An explicit size larger than the backing file's
      const big = join(sub, 'big.qcow2');
      expect((await cli(['create', '-b', name, big, '48M'], b.give === 'absolute' ? dir : sub)).code).toBe(0);
      expect(await ourInfo(big)).toEqual(await qemuInfo(big));
    });
  }

  it('creating an identical existing image succeeds without touching it ("changed": false); a different one fails; --force replaces', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.qcow2');
    expect((await cli(['create', img, '16M'])).code).toBe(0);
    await run('qemu-io', ['-c', 'write -P 9 0 64K', img]);
    const again = await cli(['create', img, '16M', '--json']);
    expect(again.code, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout).changed).toBe(false);
    const text = await cli(['create', img, '16M']);
    expect(text.stdout).toContain('left unchanged');
    // the data is still there
    const map = JSON.parse((await cli(['map', img, '--json'])).stdout);
    expect(map[0]).toMatchObject({ start: 0, length: 64 * KiB, data: true });

    for (const [args, what] of [
      [['32M'], 'virtual size'],
      [['-o', 'cluster_size=4K', '16M'], 'cluster size'],
      [['-f', 'raw', '16M'], 'format'],
    ] as Array<[string[], string]>) {
      const differ = await cli(['create', img, ...args]);
      expect(differ.code).toBe(1);
      expect(differ.stderr).toContain(what);
      expect(differ.stderr).toContain('--force');
      const j = await cli(['create', img, ...args, '--json']);
      expect(j.code).toBe(1);
      expect(JSON.parse(j.stdout).error.code).toBe('ERR_EXISTS');
    }
    const forced = await cli(['create', img, '32M', '--force', '--json']);
    expect(forced.code, forced.stderr).toBe(0);
    expect(JSON.parse(forced.stdout)).toMatchObject({ changed: true, 'virtual-size': 32 * MiB });
    await qemuCheckClean(img);
    expect(JSON.parse((await cli(['map', img, '--json'])).stdout)).toEqual([{ start: 0, length: 32 * MiB, depth: 0, present: false, zero: true, data: false }]);
  });

  it('an overlay that exists with the same backing file is unchanged; with another backing file it differs', async () => {
    const dir = await makeTempDir();
    await run('qemu-img', ['create', '-f', 'raw', join(dir, 'a.raw'), '8M']);
    await run('qemu-img', ['create', '-f', 'raw', join(dir, 'b.raw'), '8M']);
    expect((await cli(['create', '-b', 'a.raw', '-F', 'raw', 'top.qcow2'], dir)).code).toBe(0);
    const same = await cli(['create', '-b', 'a.raw', 'top.qcow2', '--json'], dir);
    expect(same.code, same.stderr).toBe(0);
    expect(JSON.parse(same.stdout).changed).toBe(false);
    const other = await cli(['create', '-b', 'b.raw', 'top.qcow2', '--json'], dir);
    expect(other.code).toBe(1);
    expect(JSON.parse(other.stdout).error.message).toContain('backing file');
  });

  it('refuses to replace a directory, even with --force', async () => {
    const dir = await makeTempDir();
    mkdirSync(join(dir, 'd'));
    const r = await cli(['create', join(dir, 'd'), '1M', '--force', '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout).error).toMatchObject({ code: 'ERR_EXISTS' });
    expect(existsSync(join(dir, 'd'))).toBe(true);
  });

  const usage: Array<{ name: string; args: (dir: string) => string[]; message: string }> = [
    { name: 'no size and no backing file', args: (d) => ['create', join(d, 'x.qcow2')], message: 'size' },
    { name: 'an unknown -o option', args: (d) => ['create', '-o', 'preallocation=full', join(d, 'x.qcow2'), '1M'], message: 'unknown -o option "preallocation"' },
    { name: 'a bad cluster size', args: (d) => ['create', '-o', 'cluster_size=3K', join(d, 'x.qcow2'), '1M'], message: 'cluster_size' },
    { name: 'a bad refcount width', args: (d) => ['create', '-o', 'refcount_bits=3', join(d, 'x.qcow2'), '1M'], message: 'refcount_bits' },
    { name: 'a bad size', args: (d) => ['create', join(d, 'x.qcow2'), '12Q'], message: 'invalid size' },
    { name: 'a raw image with a backing file', args: (d) => ['create', '-f', 'raw', '-b', 'a.raw', join(d, 'x.img'), '1M'], message: 'raw image cannot have a backing file' },
    { name: 'qcow2 options on a raw image', args: (d) => ['create', '-f', 'raw', '-o', 'cluster_size=4K', join(d, 'x.img'), '1M'], message: 'qcow2 options' },
  ];
  for (const u of usage) {
    it(`usage error: ${u.name} (exit 2, message, --json error object, nothing created)`, async () => {
      const dir = await makeTempDir();
      const r = await cli(u.args(dir));
      expect(r.code).toBe(2);
      expect(r.stderr).toContain(u.message);
      const j = await cli([...u.args(dir), '--json']);
      expect(j.code).toBe(2);
      const err = JSON.parse(j.stdout).error;
      expect(err.code).toBe('ERR_USAGE');
      expect(err.message).toContain(u.message);
      expect(readdirSync(dir)).toEqual([]);
    });
  }

  it('a backing file that does not exist: exit 1 naming it, nothing created', async () => {
    const dir = await makeTempDir();
    const r = await cli(['create', '-b', 'missing.raw', join(dir, 'top.qcow2'), '--json']);
    expect(r.code).toBe(1);
    const err = JSON.parse(r.stdout).error;
    expect(err.code).toBe('ERR_BACKING');
    expect(err.message).toContain('missing.raw');
    expect(readdirSync(dir)).toEqual([]);
  });
});

describe('blkrep info', () => {
  it('a three-layer chain (qcow2 over qcow2 over raw): --backing-chain matches qemu-img; the text names every layer', async () => {
    const dir = await makeTempDir();
    await run('qemu-img', ['create', '-f', 'raw', 'base.raw', '16M'], { cwd: dir });
    await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=4K', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2'], { cwd: dir });
    await run('qemu-img', ['create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '32M'], { cwd: dir });
    await run('qemu-io', ['-c', 'write -P 1 0 1M', 'top.qcow2'], { cwd: dir });
    expect(await ourInfo('top.qcow2', { cwd: dir })).toEqual(await qemuInfo('top.qcow2', { cwd: dir }));
    expect(await ourInfo(join(dir, 'top.qcow2'))).toEqual(await qemuInfo(join(dir, 'top.qcow2')));
    expect(await ourInfo('top.qcow2', { cwd: dir, chain: true })).toEqual(await qemuInfo('top.qcow2', { cwd: dir, chain: true }));
    const j = JSON.parse((await cli(['info', 'top.qcow2', '--json'], dir)).stdout);
    expect(j['backing-chain']).toEqual([
      { filename: 'mid.qcow2', format: 'qcow2' },
      { filename: 'base.raw', format: 'raw' },
    ]);
    const t = await cli(['info', 'top.qcow2'], dir);
    expect(t.code).toBe(0);
    expect(t.stdout).toContain('virtual size: 32 MiB (33554432 bytes)');
    expect(t.stdout).toContain('backing chain: top.qcow2 (qcow2) -> mid.qcow2 (qcow2) -> base.raw (raw)');
    const all = await cli(['info', 'top.qcow2', '--backing-chain'], dir);
    expect(all.stdout.match(/^image: /gm)).toHaveLength(3);
  });

  it('the dirty flag (lazy refcounts, writer aborted) and the corrupt flag as qemu-img reports them', async () => {
    const dir = await makeTempDir();
    const dirty = join(dir, 'dirty.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', dirty, '8M']);
    await run('qemu-io', ['-c', 'write -P 1 0 64K', '-c', 'abort', dirty]);
    const q = (await qemuInfo(dirty)) as Record<string, unknown>;
    expect(q['dirty-flag']).toBe(true);
    expect(await ourInfo(dirty)).toEqual(q);
    expect((await cli(['info', dirty])).stdout).toContain('dirty flag: yes');

    const corrupt = join(dir, 'corrupt.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', corrupt, '8M']);
    const fd = openSync(corrupt, 'r+');
    writeSync(fd, Buffer.from([0x02]), 0, 1, 79); // incompatible_features bit 1: corrupt
    closeSync(fd);
    const qc = (await qemuInfo(corrupt)) as { 'format-specific': { data: { corrupt: boolean } } };
    expect(qc['format-specific'].data.corrupt).toBe(true);
    expect(await ourInfo(corrupt)).toEqual(qc);
  });

  it('an NBD export: format raw and the virtual size, as qemu-img info shows it', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-f', 'qcow2', img, '20M']);
    const sock = join(dir, 'q.sock');
    start('qemu-nbd', ['-f', 'qcow2', '-k', sock, '-t', img]);
    await waitFor(() => existsSync(sock), 'the qemu-nbd socket');
    const uri = unixUri(sock);
    const ours = JSON.parse((await cli(['info', uri, '--json'])).stdout);
    const theirs = JSON.parse((await run('qemu-img', ['info', '--output=json', uri])).stdout);
    expect(ours).toEqual({ 'virtual-size': theirs['virtual-size'], format: theirs.format, filename: uri });
    expect(theirs).not.toHaveProperty('actual-size');
    expect((await cli(['info', uri])).stdout).toContain('disk size: unavailable');
  });

  it('a missing backing file is a warning without --backing-chain, an error with it', async () => {
    const dir = await makeTempDir();
    await run('qemu-img', ['create', '-f', 'raw', 'base.raw', '4M'], { cwd: dir });
    await run('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'top.qcow2'], { cwd: dir });
    await run('rm', [join(dir, 'base.raw')]);
    const r = await cli(['info', 'top.qcow2', '--json'], dir);
    expect(r.code).toBe(0);
    expect(r.stderr).toContain('base.raw');
    expect(JSON.parse(r.stdout)['backing-filename']).toBe('base.raw');
    const c = await cli(['info', 'top.qcow2', '--backing-chain', '--json'], dir);
    expect(c.code).toBe(1);
    expect(JSON.parse(c.stdout).error).toMatchObject({ code: 'ERR_BACKING' });
  });

  it('a missing image: exit 1 naming it; --json gives the error object', async () => {
    const dir = await makeTempDir();
    const r = await cli(['info', join(dir, 'nope.qcow2')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('nope.qcow2');
    const j = await cli(['info', join(dir, 'nope.qcow2'), '--json']);
    expect(j.code).toBe(1);
    expect(j.stderr).toBe('');
    expect(JSON.parse(j.stdout).error).toMatchObject({ code: 'ERR_OPEN' });
    expect((await cli(['info'])).code).toBe(2);
  });
});
