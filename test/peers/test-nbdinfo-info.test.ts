/**
 * nbdinfo (libnbd) against `blkrep serve-nbd`: what the handshake advertises (GO + INFO_BLOCK_SIZE
 * + LIST_META_CONTEXT), NBD_OPT_LIST over several exports, the --can/--is probes, read-only.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, serve, unixUri } from '../support/spawn.js';

interface NbdinfoExport {
  'export-name': string;
  description?: string;
  uri: string;
  contexts: string[];
  is_read_only: boolean;
  is_rotational: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
  'export-size': number;
}

interface NbdinfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: NbdinfoExport[];
}

async function nbdinfo(...args: string[]) {
  return run('nbdinfo', args, { timeoutMs: 15_000 });
}

async function nbdinfoJson(...args: string[]): Promise<NbdinfoJson> {
  const r = await nbdinfo('--json', ...args);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as NbdinfoJson;
}

const CAN = ['flush', 'fua', 'trim', 'zero', 'multi-conn', 'df', 'cache', 'fast-zero'] as const;

describe.skipIf(!hasTool('nbdinfo'))('nbdinfo against serve-nbd', () => {
  let dir: string;
  let sock: string;
  const SIZE_A = 8 * 1024 * 1024;
  const SIZE_B = 3 * 1024 * 1024 + 512;

  beforeAll(async () => {
    dir = await makeTempDir('file');
    sock = join(dir, 's.sock');
    await writeFile(join(dir, 'a.raw'), Buffer.alloc(SIZE_A));
    await writeFile(join(dir, 'b.raw'), Buffer.alloc(SIZE_B, 0x11));
    await serve(
      [join(dir, 'a.raw'), '--socket', sock, '--export', `disk-b=${join(dir, 'b.raw')}`, '--export', 'mem=memory:64M', '-D', 'test description'],
      { scope: 'file' },
    );
  });

  it('--json: size, flags, block sizes, contexts and description of the default export', async () => {
    const info = await nbdinfoJson(unixUri(sock));
    expect(info.protocol).toBe('newstyle-fixed');
    expect(info.TLS).toBe(false);
    expect(info.structured).toBe(true);
    expect(info.exports).toHaveLength(1);
    const e = info.exports[0]!;
    expect(e['export-name']).toBe('');
    expect(e['export-size']).toBe(SIZE_A);
    expect(e.description).toBe('test description');
    expect(e.contexts).toContain('base:allocation');
    expect(e.is_read_only).toBe(false);
    expect(e.is_rotational).toBe(false);
    for (const flag of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero'] as const) {
      expect(e[flag], flag).toBe(true);
    }
    expect(e.block_size_minimum).toBe(1);
    expect(e.block_size_preferred).toBe(4096);
    expect(e.block_size_maximum).toBe(32 * 1024 * 1024);
  });

  it('--json on a named export selects that export', async () => {
    const info = await nbdinfoJson(unixUri(sock, 'disk-b'));
    const e = info.exports[0]!;
    expect(e['export-name']).toBe('disk-b');
    expect(e['export-size']).toBe(SIZE_B);
    const mem = (await nbdinfoJson(unixUri(sock, 'mem'))).exports[0]!;
    expect(mem['export-size']).toBe(64 * 1024 * 1024);
  });

  it('--size and an unknown export name', async () => {
    const size = await nbdinfo('--size', unixUri(sock, 'disk-b'));
    expect(size.code).toBe(0);
    expect(size.stdout.trim()).toBe(String(SIZE_B));
    const unknown = await nbdinfo(unixUri(sock, 'no-such-export'));
    expect(unknown.code).not.toBe(0);
    expect(unknown.stderr).toMatch(/no-such-export|unknown|not found|No such/i);
  });

  it('--list shows every export with its size and description', async () => {
    const info = await nbdinfoJson('--list', unixUri(sock));
    const byName = new Map(info.exports.map((e) => [e['export-name'], e]));
    expect([...byName.keys()].sort()).toEqual(['', 'disk-b', 'mem']);
    expect(byName.get('')!['export-size']).toBe(SIZE_A);
    expect(byName.get('disk-b')!['export-size']).toBe(SIZE_B);
    expect(byName.get('mem')!['export-size']).toBe(64 * 1024 * 1024);
    for (const e of info.exports) {
      expect(e.description).toBe('test description');
      expect(e.contexts).toContain('base:allocation');
      expect(e.uri).toContain(`socket=${sock}`);
    }
    // the human-readable listing names them too
    const text = await nbdinfo('--list', unixUri(sock));
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toContain('export="disk-b"');
    expect(text.stdout).toContain('export="mem"');
  });

  it('--can: every capability of a writable raw export is advertised (exit 0)', async () => {
    for (const what of CAN) {
      const r = await nbdinfo('--can', what, unixUri(sock));
      expect(r.code, `--can ${what}: ${r.stderr}`).toBe(0);
    }
    const structured = await nbdinfo('--can', 'structured-reply', unixUri(sock));
    expect(structured.code).toBe(0);
    const rw = await nbdinfo('--is', 'read-only', unixUri(sock));
    expect(rw.code).toBe(2);
    const tls = await nbdinfo('--is', 'tls', unixUri(sock));
    expect(tls.code).toBe(2);
  });

  it('--read-only: --is read-only, write capabilities withdrawn, writes refused and the file untouched', async () => {
    const rodir = await makeTempDir();
    const image = join(rodir, 'ro.raw');
    const content = Buffer.alloc(1024 * 1024, 0x3c);
    await writeFile(image, content);
    const rosock = join(rodir, 'ro.sock');
    await serve([image, '--socket', rosock, '--read-only']);
    const uri = unixUri(rosock);
    expect((await nbdinfo('--is', 'read-only', uri)).code).toBe(0);
    const expected: Record<string, number> = { flush: 0, fua: 2, trim: 2, zero: 2, 'fast-zero': 2, 'multi-conn': 0, df: 0, cache: 0, write: 2 };
    for (const [what, code] of Object.entries(expected)) {
      expect((await nbdinfo('--can', what, uri)).code, `--can ${what}`).toBe(code);
    }
    const info = (await nbdinfoJson(uri)).exports[0]!;
    expect(info.is_read_only).toBe(true);
    expect(info['export-size']).toBe(content.length);
    if (hasTool('qemu-io')) {
      // qemu refuses to open a read-only export for writing; forcing it through gives EPERM
      const w = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x99 0 4k'], { timeoutMs: 15_000 });
      expect(w.code).not.toBe(0);
      expect(w.stdout + w.stderr).toMatch(/Permission denied|read-only/i);
      const r = await run('qemu-io', ['-r', '-f', 'raw', uri, '-c', 'read -P 0x3c 0 1M'], { timeoutMs: 15_000 });
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(r.stdout).not.toMatch(/verification failed/);
    }
    const { readFile } = await import('node:fs/promises');
    expect((await readFile(image)).equals(content)).toBe(true);
  });

  it('--min-block-size 4K is advertised as block_size_minimum', async () => {
    const d = await makeTempDir();
    const s = join(d, 'm.sock');
    await serve(['memory:16M', '--socket', s, '--min-block-size', '4K']);
    const e = (await nbdinfoJson(unixUri(s))).exports[0]!;
    expect(e.block_size_minimum).toBe(4096);
    expect(e.block_size_preferred).toBeGreaterThanOrEqual(4096);
    expect(e.block_size_maximum).toBeGreaterThanOrEqual(e.block_size_preferred);
    expect(e['export-size']).toBe(16 * 1024 * 1024);
  });
});
