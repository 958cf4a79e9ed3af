/**
 * fio's nbd engine (libnbd) against `blkrep serve-nbd`: deep queues of random writes verified by
 * crc32c, and a mixed random read/write job with flushes. fio's own verification and its JSON
 * "error" field are the oracle; the served file is checked afterwards for the written span.
 */
import { stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, serve, unixUri } from '../support/spawn.js';

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
  const r = await run('fio', ['--ioengine=nbd', `--uri=${uri}`, '--output-format=json', ...args], { timeoutMs: 90_000 });
  // fio may print notes before the JSON document
  const start = r.stdout.indexOf('{');
  expect(r.code, `fio exit ${r.code}\n${r.stdout}\n${r.stderr}`).toBe(0);
  expect(start, r.stdout).toBeGreaterThanOrEqual(0);
  const doc = JSON.parse(r.stdout.slice(start)) as { jobs: FioJob[] };
  return { jobs: doc.jobs, raw: r.stdout };
}

async function servedFile() {
  const dir = await makeTempDir();
  const image = join(dir, 'disk.raw');
  await writeFile(image, '');
  await truncate(image, SIZE);
  const sock = join(dir, 's.sock');
  await serve([image, '--socket', sock]);
  return { image, uri: unixUri(sock) };
}

describe.skipIf(!hasTool('fio'))('fio nbd engine against serve-nbd', () => {
  it('randwrite, iodepth 32, 64 MiB, verify=crc32c', async () => {
    const { image, uri } = await servedFile();
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

  it('randrw (30% reads) with block sizes 512..256k and fsync every 32 writes, iodepth 16', async () => {
    const { uri } = await servedFile();
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
    const { uri } = await servedFile();
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
