/**
 * fio's nbd engine (libnbd) against `blkrep serve-nbd`: deep queues of random writes verified by
 * crc32c, and a mixed random read/write job with flushes. fio's own verification and its JSON
 * "error" field are the oracle; the served file is checked afterwards for the written span.
 *
 * The transport is a parameter: in clear, and TLS with x509 (nbds+unix://; fio cannot pass libnbd
 * a tls-certificates= file, so the CA goes where libnbd looks by default, $HOME/.pki/libnbd, with
 * HOME a temp dir). PSK has no such default: nbdcopy covers it (test-nbdcopy-multiconn.test.ts).
 */
import { copyFile, mkdir, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, serve, unixUri } from '../support/spawn.js';
import { makePki, type Pki } from '../support/tls-pki.js';

type Transport = 'plain' | 'x509';
const TRANSPORTS: Transport[] = ['plain', 'x509'];
let pki: Pki;
let home: string;

beforeAll(async () => {
  pki = makePki(await makeTempDir('file'));
  home = await makeTempDir('file');
  await mkdir(join(home, '.pki', 'libnbd'), { recursive: true });
  await copyFile(join(pki.server, 'ca-cert.pem'), join(home, '.pki', 'libnbd', 'ca-cert.pem'));
});

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number; total_ios: number };
  write: { io_bytes: number; total_ios: number };
  trim: { io_bytes: number; total_ios: number };
  sync?: { total_ios: number };
}

async function fio(uri: string, args: string[]): Promise<{ jobs: FioJob[]; raw: string }> {
  const env = uri.startsWith('nbds') ? { ...process.env, HOME: home } : undefined;
  const r = await run('fio', ['--ioengine=nbd', `--uri=${uri}`, '--output-format=json', ...args], { timeoutMs: 90_000, ...(env ? { env } : {}) });
  // fio may print notes before the JSON document
  const start = r.stdout.indexOf('{');
  expect(r.code, `fio exit ${r.code}\n${r.stdout}\n${r.stderr}`).toBe(0);
  expect(start, r.stdout).toBeGreaterThanOrEqual(0);
  const doc = JSON.parse(r.stdout.slice(start)) as { jobs: FioJob[] };
  return { jobs: doc.jobs, raw: r.stdout };
}

async function servedFile(transport: Transport) {
  const dir = await makeTempDir();
  const image = join(dir, 'disk.raw');
  await writeFile(image, '');
  await truncate(image, SIZE);
  const sock = join(dir, 's.sock');
  const s = await serve([image, '--socket', sock, ...(transport === 'x509' ? ['--tls-certificates', pki.server] : [])]);
  if (transport === 'plain') return { image, uri: unixUri(sock) };
  const uri = (JSON.parse(s.listeningLine) as { uris: string[] }).uris[0]!;
  expect(uri).toBe(`nbds+unix:///?socket=${sock}`);
  return { image, uri };
}

for (const transport of TRANSPORTS) describe.skipIf(!hasTool('fio'))(`fio nbd engine against serve-nbd (${transport})`, () => {
  it('randwrite, iodepth 32, 64 MiB, verify=crc32c', async () => {
    const { image, uri } = await servedFile(transport);
    const { jobs, raw } = await fio(uri, [
      '--name=randwrite-verify',
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=32',
      `--size=${SIZE}`,
      '--verify=crc32c',
      '--do_verify=1',
      '--verify_fatal=1',
    ]);
    expect(raw).toMatch(/"error"\s*:\s*0/);
    expect(jobs).toHaveLength(1);
    const job = jobs[0]!;
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBe(SIZE);
    // the verify pass read back everything that was written
    expect(job.read.io_bytes).toBe(SIZE);
    expect((await stat(image)).size).toBe(SIZE);
  });

  // over TLS the fast subset: the verified random writes on one and on two connections
  if (transport === 'plain') it('randrw (30% reads) with block sizes 512..256k and fsync every 32 writes, iodepth 16', async () => {
    const { uri } = await servedFile(transport);
    const { jobs, raw } = await fio(uri, [
      '--name=randrw',
      '--rw=randrw',
      '--rwmixread=30',
      '--bsrange=512-256k',
      '--iodepth=16',
      `--size=${SIZE}`,
      `--io_size=${SIZE}`,
      '--fsync=32',
    ]);
    expect(raw).toMatch(/"error"\s*:\s*0/);
    const job = jobs[0]!;
    expect(job.error).toBe(0);
    expect(job.read.total_ios).toBeGreaterThan(0);
    expect(job.write.total_ios).toBeGreaterThan(0);
    expect(job.read.io_bytes + job.write.io_bytes).toBeGreaterThanOrEqual(SIZE - 256 * 1024);
  });

  it('two jobs on separate connections, each writing and verifying its own half', async () => {
    const { uri } = await servedFile(transport);
    const { jobs } = await fio(uri, [
      '--rw=randwrite',
      '--bs=64k',
      '--iodepth=16',
      '--verify=crc32c',
      '--do_verify=1',
      '--verify_fatal=1',
      '--name=low',
      '--offset=0',
      `--size=${SIZE / 2}`,
      '--name=high',
      `--offset=${SIZE / 2}`,
      `--size=${SIZE / 2}`,
    ]);
    expect(jobs).toHaveLength(2);
    for (const job of jobs) {
      expect(job.error, job.jobname).toBe(0);
      expect(job.write.io_bytes, job.jobname).toBe(SIZE / 2);
    }
  });
});
