/**
 * nbdcopy (libnbd) against `blkrep serve-nbd`: -C 4 -T 4 uses four connections because the export
 * advertises CAN_MULTI_CONN; copies in both directions must be byte-exact, also with large
 * requests (--request-size 32M) and many of them in flight (--requests 64).
 *
 * The transport is a parameter: in clear, and TLS with a PSK (nbds+unix://alice@/?tls-psk-file=,
 * which nbdcopy passes to libnbd; x509 is covered with fio in test-fio-verify.test.ts). Over TLS
 * the fast subset: the two multi-connection copies, one in each direction.
 */
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, runCli, serve, unixUri } from '../support/spawn.js';
import { makePki, type Pki } from '../support/tls-pki.js';

type Transport = 'plain' | 'psk';
const TRANSPORTS: Transport[] = ['plain', 'psk'];
let pki: Pki;

beforeAll(async () => {
  pki = makePki(await makeTempDir('file'));
});

const MiB = 1024 * 1024;
const SIZE = 48 * MiB;

function content(): Buffer {
  const b = randomBytes(SIZE);
  b.fill(0, 8 * MiB, 16 * MiB);
  return b;
}

interface Status {
  exports: Array<{ name: string; totalConnections: number; bytesRead: number; bytesWritten: number; requests: Record<string, number> }>;
}

async function status(control: string): Promise<Status> {
  const r = await runCli(['status', '--control', control, '--json'], { timeoutMs: 15_000 });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Status;
}

async function nbdcopy(...args: string[]) {
  return run('nbdcopy', args, { timeoutMs: 60_000 });
}

async function setup(initial: Buffer, transport: Transport) {
  const dir = await makeTempDir();
  const image = join(dir, 'disk.raw');
  await writeFile(image, initial);
  const sock = join(dir, 's.sock');
  const control = join(dir, 'ctl.sock');
  await serve([image, '--socket', sock, '--control', control, ...(transport === 'psk' ? ['--tls-psk', pki.psk] : [])]);
  const uri = transport === 'psk' ? `nbds+unix://alice@/?socket=${sock}&tls-psk-file=${pki.psk}` : unixUri(sock);
  return { dir, image, uri, control };
}

for (const transport of TRANSPORTS) describe.skipIf(!hasTool('nbdcopy'))(`nbdcopy against serve-nbd (${transport})`, () => {
  it('-C 4 from an export to a file: byte-exact, over four connections', async () => {
    const data = content();
    const { dir, uri, control } = await setup(data, transport);
    const out = join(dir, 'out.raw');
    await writeFile(out, '');
    const before = (await status(control)).exports[0]!.totalConnections;
    const r = await nbdcopy('-C', '4', '-T', '4', uri, out);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect((await readFile(out)).equals(data)).toBe(true);
    const after = (await status(control)).exports[0]!;
    expect(after.totalConnections - before).toBe(4);
    // the zero run is skipped thanks to block status; everything else was read
    expect(after.bytesRead).toBeGreaterThanOrEqual(SIZE - 8 * MiB);
  });

  it('-C 4 --flush from a file to an export: byte-exact in the served file', async () => {
    const { dir, image, uri, control } = await setup(Buffer.alloc(SIZE, 0x77), transport);
    const src = join(dir, 'src.raw');
    const data = content();
    await writeFile(src, data);
    const r = await nbdcopy('-C', '4', '-T', '4', '--flush', src, uri);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect((await readFile(image)).equals(data)).toBe(true);
    const s = (await status(control)).exports[0]!;
    expect(s.totalConnections).toBe(4);
    expect(s.requests.flush).toBeGreaterThanOrEqual(1);
  });

  if (transport === 'plain') it('--request-size 32M --requests 64 in both directions', async () => {
    const data = content();
    const { dir, image, uri } = await setup(Buffer.alloc(SIZE), transport);
    const src = join(dir, 'src.raw');
    await writeFile(src, data);
    const w = await nbdcopy('-C', '4', '-T', '4', '--request-size=33554432', '--requests=64', '--flush', src, uri);
    expect(w.code, w.stdout + w.stderr).toBe(0);
    expect((await readFile(image)).equals(data)).toBe(true);
    const out = join(dir, 'out.raw');
    await writeFile(out, '');
    const rd = await nbdcopy('-C', '4', '-T', '4', '--request-size=33554432', '--requests=64', uri, out);
    expect(rd.code, rd.stdout + rd.stderr).toBe(0);
    expect((await readFile(out)).equals(data)).toBe(true);
  });

  if (transport === 'plain') it('--synchronous and --no-extents still copy exactly', async () => {
    const data = content();
    const { dir, uri } = await setup(data, transport);
    const out = join(dir, 'out.raw');
    await writeFile(out, '');
    const r = await nbdcopy('--synchronous', '--no-extents', uri, out);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect((await readFile(out)).equals(data)).toBe(true);
  });
});
