// No silent corruption: with nbdkit's error filter failing 10% of the requests on the source or on
// the target, over many seeded runs, a mirror never reports success while the images differ;
// when it fails, it says so with the errno (an error event and the job's error in-process, exit 1
// and a JSON error naming EIO from the CLI).
import { createCipheriv } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { BlockNode } from '../../src/api/block.js';
import { MemoryNode } from '../../src/block/memory.js';
import { NbdNode } from '../../src/block/nbd.js';
import type { JobEvent } from '../../src/jobs/job.js';
import { MirrorJob } from '../../src/jobs/mirror.js';
import { startNbdkit } from '../nbd-client/helpers.js';
import { hasTool, makeTempDir, run, runCli, withTimeout } from '../support/spawn.js';
import { MiB, readAll, rng } from './helpers.js';

const SIZE = 8 * MiB;
/** in-process runs per side and policy */
const RUNS = Number(process.env.BLKREP_CORRUPTION_RUNS ?? 25);
/** CLI runs per side and policy */
const CLI_RUNS = Number(process.env.BLKREP_CORRUPTION_CLI_RUNS ?? 3);
const POLICIES = ['report', 'ignore'] as const;
type Policy = (typeof POLICIES)[number];
type Side = 'source' | 'target';

/** A raw image: data (AES-CTR from the seed), written zeros and holes, in runs of 64 KiB..2 MiB plus a few bytes. */
function image(seed: number): Buffer {
  const r = rng(seed);
  const key = Buffer.alloc(16);
  key.writeUInt32LE(seed >>> 0, 0);
  const stream = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  const out = Buffer.alloc(SIZE);
  for (let off = 0; off < SIZE; ) {
    const len = Math.min(SIZE - off, (1 + Math.floor(r() * 32)) * 64 * 1024 + Math.floor(r() * 3000));
    if (r() < 0.6) stream.update(Buffer.alloc(len)).copy(out, off);
    off += len;
  }
  return out;
}

/** Write `data` as a sparse file: zero 64 KiB blocks become holes, except every third (written zeros). */
async function sparseFile(path: string, data: Buffer): Promise<void> {
  await writeFile(path, Buffer.alloc(0));
  await run('truncate', ['-s', String(data.length), path]);
  const { open } = await import('node:fs/promises');
  const fh = await open(path, 'r+');
  try {
    const zero = Buffer.alloc(65536);
    for (let off = 0, i = 0; off < data.length; off += 65536, i++) {
      const block = data.subarray(off, off + 65536);
      if (!block.equals(zero.subarray(0, block.length)) || i % 3 === 0) await fh.write(block, 0, block.length, off);
    }
  } finally {
    await fh.close();
  }
}

/** nbdkit file FILE behind the error filter: 10% of reads, writes, zeroes and block status fail with EIO. */
async function faulty(dir: string, file: string, readOnly: boolean) {
  return startNbdkit([...(readOnly ? ['-r'] : []), '--filter=error', 'file', file, 'error=EIO', 'error-rate=10%'], { dir });
}

interface Outcome {
  ok: boolean;
  errorEvents: Array<Extract<JobEvent, { event: 'error' }>>;
  completedError?: string;
  error?: { code: string; errno?: string };
}

async function mirrorInProcess(source: BlockNode, target: BlockNode, side: Side, policy: Policy): Promise<Outcome> {
  const job = new MirrorJob({ source, target, ...(side === 'source' ? { onSourceError: policy } : { onTargetError: policy }) });
  const errorEvents: Outcome['errorEvents'] = [];
  let completedError: string | undefined;
  job.on('event', (e: JobEvent) => {
    if (e.event === 'error') errorEvents.push(e);
    if (e.event === 'completed' && e.error) completedError = e.error.code;
  });
  // offline use: complete as soon as ready (as blkrep mirror does)
  job.on('status-change', (e: Extract<JobEvent, { event: 'status-change' }>) => {
    if (e.status === 'ready') setImmediate(() => void job.complete({ pivot: false }).catch(() => {}));
  });
  job.start();
  await withTimeout(job.whenConcluded().catch(() => {}), 30_000, `the ${side}-side ${policy} mirror to end`);
  expect(job.status).toBe('concluded');
  return { ok: !job.error, errorEvents, ...(completedError ? { completedError } : {}), ...(job.error ? { error: { code: job.error.code, errno: job.error.errno } } : {}) };
}

function checkOutcome(o: Outcome, equal: boolean, side: Side, policy: Policy): void {
  if (o.ok) {
    expect(equal, 'the job succeeded: the images must be equal').toBe(true);
    for (const e of o.errorEvents) expect({ side: e.side, errno: e.errno, action: e.action }).toEqual({ side, errno: 'EIO', action: 'ignore' });
    return;
  }
  // a failure says so, with the errno: an error event, then completed with the error
  expect(policy).toBe('report');
  expect(o.error?.errno).toBe('EIO');
  expect(o.completedError).toBe(o.error?.code);
  expect(o.errorEvents.at(-1)).toMatchObject({ side, errno: 'EIO', action: 'report' });
}

describe.skipIf(!hasTool('nbdkit'))('no silent corruption: nbdkit error-rate=10%, in-process MirrorJob', () => {
  for (const side of ['source', 'target'] as const) {
    for (const policy of POLICIES) {
      it(`errors on the ${side}, policy ${policy}: ${RUNS} seeded runs, success ⇒ equal, failure ⇒ EIO`, async () => {
        const tally = { ok: 0, failed: 0 };
        for (let i = 0; i < RUNS; i++) {
          const seed = 500 + i * 101 + (side === 'source' ? 0 : 7) + (policy === 'report' ? 0 : 3);
          const dir = await makeTempDir();
          const data = image(seed);
          const file = join(dir, 'image.raw');
          let o: Outcome;
          let equal: boolean;
          if (side === 'source') {
            await sparseFile(file, data);
            const server = await faulty(dir, file, true);
            const source = await NbdNode.open(server.uri, { readOnly: true });
            const target = new MemoryNode(SIZE);
            try {
              o = await mirrorInProcess(source, target, side, policy);
            } finally {
              await source.close();
              await server.proc.stop();
            }
            equal = (await readAll(target)).equals(data);
          } else {
            await sparseFile(file, image(seed + 1)); // the target starts with other content
            const server = await faulty(dir, file, false);
            const source = new MemoryNode(SIZE);
            await source.write(0, data);
            const target = await NbdNode.open(server.uri);
            try {
              o = await mirrorInProcess(source, target, side, policy);
            } finally {
              await target.close();
              await server.proc.stop();
            }
            equal = (await readFile(file)).equals(data);
          }
          checkOutcome(o, equal, side, policy);
          tally[o.ok ? 'ok' : 'failed']++;
        }
        // ignore retries until the copy is done
        if (policy === 'ignore') expect(tally).toEqual({ ok: RUNS, failed: 0 });
        if (policy === 'report') expect(tally.failed).toBeGreaterThan(0);
        console.log(`${side} ${policy}: ${tally.ok} succeeded, ${tally.failed} failed`);
      }, 120_000);
    }
  }
});

describe.skipIf(!hasTool('nbdkit') || !hasTool('qemu-img'))('no silent corruption: nbdkit error-rate=10%, blkrep mirror', () => {
  for (const side of ['source', 'target'] as const) {
    for (const policy of POLICIES) {
      it(`errors on the ${side}, --on-${side}-error ${policy}: ${CLI_RUNS} runs, exit 0 ⇒ qemu-img compare identical, exit 1 ⇒ JSON error with EIO`, async () => {
        for (let i = 0; i < CLI_RUNS; i++) {
          const seed = 900 + i * 13 + (side === 'source' ? 0 : 5) + (policy === 'report' ? 0 : 2);
          const dir = await makeTempDir();
          const src = join(dir, 'src.raw');
          const tgt = join(dir, 'tgt.raw');
          await sparseFile(src, image(seed));
          await sparseFile(tgt, image(seed + 1));
          const server = await faulty(dir, side === 'source' ? src : tgt, side === 'source');
          const res = await runCli(['mirror', side === 'source' ? server.uri : src, side === 'source' ? tgt : server.uri, '--json', '--no-progress', '--existing', `--on-${side}-error`, policy]);
          await server.proc.stop();
          const cmp = await run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, tgt]);
          if (res.code === 0) {
            expect(cmp.code, `exit 0 but the images differ\n${res.stdout}`).toBe(0);
            const out = JSON.parse(res.stdout) as { errors: Array<{ side: string; errno: string; action: string }> };
            for (const e of out.errors) expect(e).toMatchObject({ side, errno: 'EIO', action: 'ignore' });
          } else {
            expect({ code: res.code, stderr: res.stderr }).toEqual({ code: 1, stderr: '' });
            const out = JSON.parse(res.stdout) as { error: { code: string; message: string } };
            expect(out.error.code).toBe('ERR_NBD_SERVER_ERROR');
            expect(out.error.message).toMatch(/EIO \(5\)/);
          }
        }
      }, 120_000);
    }
  }
});
