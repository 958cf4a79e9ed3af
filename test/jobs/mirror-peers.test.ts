// The mirror job against real peers: the error policies against a target served by nbdkit with
// its error filter (errors switched on and off with the filter's error-file), errors while
// completing, and a target NBD server killed for a second in the middle of a copy.
import { existsSync, statSync } from 'node:fs';
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdNode } from '../../src/block/nbd.js';
import type { JobEvent } from '../../src/jobs/job.js';
import { DEFAULT_BUF_SIZE, DEFAULT_MAX_OPS, MirrorJob, type MirrorOptions } from '../../src/jobs/mirror.js';
import { startNbdkit, startQemuNbd } from '../nbd-client/helpers.js';
import { BIN, hasTool, makeTempDir, run, start, waitFor, withTimeout } from '../support/spawn.js';
import { MiB, firstDifference, readAll, rng, randomBytes, seededSource } from './helpers.js';

const SIZE = 64 * MiB;

function events(job: MirrorJob): JobEvent[] {
  const out: JobEvent[] = [];
  job.on('event', (e: JobEvent) => out.push(e));
  return out;
}

function summary(evs: JobEvent[]): string[] {
  return evs.map((e) => {
    switch (e.event) {
      case 'status-change':
        return e.status;
      case 'ready':
        return `ready(${e.synced})`;
      case 'error':
        return `error(${e.side} ${e.operation === 'write-zeroes' ? 'write' : e.operation} ${e.errno} ${e.action})`;
      case 'completed':
        return e.error ? `completed(${e.error.code})` : 'completed';
      case 'cancelled':
        return `cancelled(${e.consistent})`;
      case 'copy-mode':
        return `copy-mode(${e.to} ${e.reason})`;
    }
  });
}

/** consecutive repeats collapsed (several copies in flight fail at once) */
function collapse(xs: string[]): string[] {
  return xs.filter((x, i) => i === 0 || xs[i - 1] !== x);
}

function whenStatus(job: MirrorJob, status: string, timeoutMs = 20_000): Promise<void> {
  return waitFor(() => job.status === status, `job status ${status} (now ${job.status}: ${JSON.stringify(job.query())})`, { timeoutMs, intervalMs: 5 }).then(() => {});
}

/**
 * nbdkit memory 64M behind the error filter: every request but flush fails with `errno` while
 * the error file exists (it does at the start when `on`).
 */
async function faultyTarget(errno: 'EIO' | 'ENOSPC', on: boolean) {
  const dir = await makeTempDir();
  const errorFile = join(dir, 'inject');
  if (on) await writeFile(errorFile, '');
  const server = await startNbdkit(['--filter=error', 'memory', String(SIZE), `error=${errno}`, 'error-rate=100%', `error-file=${errorFile}`], { dir });
  const target = await NbdNode.open(server.uri);
  return {
    server,
    target,
    errorsOn: () => writeFile(errorFile, ''),
    errorsOff: () => rm(errorFile, { force: true }),
    /** the export's content over a second connection (errors must be off) */
    content: async (): Promise<Buffer> => {
      const check = await NbdNode.open(server.uri);
      try {
        return await readAll(check);
      } finally {
        await check.close();
      }
    },
    close: () => target.close(),
  };
}

async function setup(errno: 'EIO' | 'ENOSPC', on: boolean, options: Partial<MirrorOptions>, seed: number) {
  const t = await faultyTarget(errno, on);
  const source = await seededSource(SIZE, seed);
  const job = new MirrorJob({ source, target: t.target, ...options });
  return { ...t, source, job, evs: events(job) };
}

describe.skipIf(!hasTool('nbdkit'))('mirror error policies against nbdkit --filter=error memory 64M', () => {
  it('report: the first target error ends the job in error (EIO)', async () => {
    const s = await setup('EIO', true, { onTargetError: 'report' }, 21);
    try {
      s.job.start();
      await withTimeout(s.job.whenConcluded().catch(() => {}), 10_000, 'the job to end');
      expect(summary(s.evs)).toEqual(['running', 'error(target write EIO report)', 'aborting', 'completed(ERR_NBD_SERVER_ERROR)', 'concluded']);
      expect(s.job.error).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'EIO' });
    } finally {
      await s.close();
    }
  });

  it('ignore: each error is an event; once errors stop, the copy ends equal', async () => {
    const s = await setup('EIO', true, { onTargetError: 'ignore' }, 22);
    try {
      s.job.once('io-error', () => void s.errorsOff());
      s.job.start();
      await whenStatus(s.job, 'ready');
      await withTimeout(s.job.complete({ pivot: false }), 10_000, 'complete');
      const sum = summary(s.evs);
      const errs = sum.filter((x) => x.startsWith('error'));
      expect(errs.length).toBeGreaterThan(0);
      expect(new Set(errs)).toEqual(new Set(['error(target write EIO ignore)']));
      expect(sum.filter((x) => !x.startsWith('error'))).toEqual(['running', 'ready(true)', 'ready', 'waiting', 'pending', 'completed', 'concluded']);
      expect(firstDifference(await readAll(s.source), await s.content())).toBe(-1);
    } finally {
      await s.close();
    }
  });

  it('stop: paused with io-status failed and no more requests; resume once the errors are gone; the copy ends equal', async () => {
    const s = await setup('EIO', true, { onTargetError: 'stop' }, 23);
    try {
      s.job.start();
      await whenStatus(s.job, 'paused');
      expect(s.job.query()).toMatchObject({ status: 'paused', paused: true, ioStatus: 'failed', opsInFlight: 0 });
      await s.errorsOff();
      s.job.resume();
      expect(s.job.query().ioStatus).toBe('ok');
      await whenStatus(s.job, 'ready');
      await withTimeout(s.job.complete({ pivot: false }), 10_000, 'complete');
      expect(collapse(summary(s.evs))).toEqual(['running', 'error(target write EIO stop)', 'paused', 'running', 'ready(true)', 'ready', 'waiting', 'pending', 'completed', 'concluded']);
      expect(firstDifference(await readAll(s.source), await s.content())).toBe(-1);
    } finally {
      await s.close();
    }
  });

  it('enospc: ENOSPC stops (io-status nospace) and the job resumes; EIO is reported', async () => {
    const s = await setup('ENOSPC', true, { onTargetError: 'enospc' }, 24);
    try {
      s.job.start();
      await whenStatus(s.job, 'paused');
      expect(s.job.query()).toMatchObject({ status: 'paused', ioStatus: 'nospace' });
      await s.errorsOff();
      s.job.resume();
      await whenStatus(s.job, 'ready');
      await withTimeout(s.job.complete({ pivot: false }), 10_000, 'complete');
      expect(collapse(summary(s.evs))).toEqual(['running', 'error(target write ENOSPC stop)', 'paused', 'running', 'ready(true)', 'ready', 'waiting', 'pending', 'completed', 'concluded']);
      expect(firstDifference(await readAll(s.source), await s.content())).toBe(-1);
    } finally {
      await s.close();
    }
    const e = await setup('EIO', true, { onTargetError: 'enospc' }, 25);
    try {
      e.job.start();
      await withTimeout(e.job.whenConcluded().catch(() => {}), 10_000, 'the job to end');
      expect(summary(e.evs)).toEqual(['running', 'error(target write EIO report)', 'aborting', 'completed(ERR_NBD_SERVER_ERROR)', 'concluded']);
      expect(e.job.error).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'EIO' });
    } finally {
      await e.close();
    }
  });

  for (const policy of ['report', 'enospc'] as const) {
    it(`an error while completing (policy ${policy}, EIO) ends the job within 10 s`, async () => {
      const s = await setup('EIO', false, { onTargetError: policy }, 26);
      try {
        s.job.start();
        await whenStatus(s.job, 'ready');
        await s.errorsOn();
        await s.job.node.write(3 * MiB + 1, Buffer.from('dirty again'));
        const completing = s.job.complete().then(
          () => 'resolved',
          (err: { code?: string }) => err.code,
        );
        expect(await withTimeout(completing, 10_000, 'complete to end')).toBe('ERR_NBD_SERVER_ERROR');
        expect(s.job.status).toBe('concluded');
        expect(summary(s.evs).slice(-4)).toEqual(['error(target write EIO report)', 'aborting', 'completed(ERR_NBD_SERVER_ERROR)', 'concluded']);
      } finally {
        await s.close();
      }
    });
  }

  it('an error while completing with policy stop pauses; after the errors are gone, resume completes it, equal', async () => {
    const s = await setup('EIO', false, { onTargetError: 'stop' }, 27);
    try {
      s.job.start();
      await whenStatus(s.job, 'ready');
      await s.errorsOn();
      await s.job.node.write(5 * MiB + 3, Buffer.alloc(70_000, 9));
      const completing = s.job.complete({ pivot: false }).then(
        () => 'resolved',
        (err: { code?: string }) => err.code ?? 'error',
      );
      await whenStatus(s.job, 'paused', 10_000);
      expect(s.job.query().ioStatus).toBe('failed');
      await s.errorsOff();
      s.job.resume();
      expect(await withTimeout(completing, 10_000, 'complete to end')).toBe('resolved');
      expect(s.job.status).toBe('concluded');
      expect(firstDifference(await readAll(s.source), await s.content())).toBe(-1);
    } finally {
      await s.close();
    }
  });

  it('an error while completing with policy stop, then a forced cancel: concluded within 10 s', async () => {
    const s = await setup('EIO', false, { onTargetError: 'stop' }, 28);
    try {
      s.job.start();
      await whenStatus(s.job, 'ready');
      await s.errorsOn();
      await s.job.node.write(7, Buffer.alloc(100_000, 4));
      const completing = s.job.complete().catch((e: unknown) => e);
      await whenStatus(s.job, 'paused', 10_000);
      await withTimeout(s.job.cancel({ force: true }), 10_000, 'cancel');
      expect(await completing).toMatchObject({ code: 'ERR_JOB_CANCELLED' });
      expect(s.job.status).toBe('concluded');
      expect(summary(s.evs).slice(-3)).toEqual(['aborting', 'cancelled(false)', 'concluded']);
    } finally {
      await s.close();
    }
  });
});

describe.skipIf(!hasTool('qemu-nbd') || !hasTool('qemu-img'))('mirror with the target\'s NBD server killed for a second', () => {
  it('blkrep mirror reconnects, copies again what may have been lost, and exits 0 with the images identical', async () => {
    const dir = await makeTempDir();
    const src = join(dir, 'src.raw');
    const tgt = join(dir, 'tgt.raw');
    const sock = join(dir, 't.sock');
    const r = rng(31);
    await writeFile(src, randomBytes(r, SIZE));
    await writeFile(tgt, Buffer.alloc(0));
    await run('truncate', ['-s', String(SIZE), tgt]);
    let server = await startQemuNbd(tgt, [], { socket: sock });
    // 32 MiB/s: the copy takes about 2 s, long enough to kill the server in the middle of it
    const mirror = start(process.execPath, [BIN, 'mirror', src, `nbd+unix:///?socket=${sock}`, '--json', '--no-progress', '--speed', '32M']);
    // Mid-copy, with writes the client saw complete and that are not flushed. Data in the file
    // alone does not prove that: a write the server performed but whose reply the client had not
    // read yet is sent again after the reconnect, so nothing is lost and nothing is copied again
    // (with 256 KiB × 64 the kill could come that early, and the job rightly copied SIZE bytes). At
    // most DEFAULT_BUF_SIZE × DEFAULT_MAX_OPS bytes are in flight, so more than that in the file
    // means some writes completed at the client; no flush comes before everything is copied.
    const inFlight = DEFAULT_BUF_SIZE * DEFAULT_MAX_OPS;
    const killAt = inFlight + 4 * MiB;
    expect(killAt).toBeLessThan(SIZE / 2);
    await waitFor(() => statSync(tgt).blocks * 512 >= killAt, `${killAt} bytes in the target`, { timeoutMs: 20_000, intervalMs: 10 });
    expect(mirror.child.exitCode).toBe(null);
    await server.proc.stop('SIGKILL');
    // the kill came before the copy ended (and so before any flush)
    expect(statSync(tgt).blocks * 512).toBeLessThan(SIZE);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    expect(existsSync(sock)).toBe(true); // a stale socket: qemu-nbd binds it again
    server = await startQemuNbd(tgt, [], { socket: sock });
    const exit = await mirror.waitExit(30_000);
    expect({ code: exit.code, stderr: mirror.stderr() }).toEqual({ code: 0, stderr: '' });
    const result = JSON.parse(mirror.stdout()) as { bytes: number; size: number; errors: unknown[] };
    expect(result.errors).toEqual([]);
    expect(result.size).toBe(SIZE);
    // what the client saw written before the kill was not flushed: the flush after the reconnect
    // failed with ERR_NBD_WRITES_LOST and all of it was copied again
    expect(result.bytes).toBeGreaterThan(SIZE);
    await server.proc.stop();
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, tgt]);
    expect({ code: cmp.code, stdout: cmp.stdout.trim() }).toEqual({ code: 0, stdout: 'Images are identical.' });
  });

  it('a MirrorJob, the target killed for a second while a source write comes: completes with no error event, target equal to the source', async () => {
    const dir = await makeTempDir();
    const tgt = join(dir, 'tgt.raw');
    const sock = join(dir, 't.sock');
    await writeFile(tgt, Buffer.alloc(0));
    await run('truncate', ['-s', String(16 * MiB), tgt]);
    let server = await startQemuNbd(tgt, [], { socket: sock });
    const target = await NbdNode.open(`nbd+unix:///?socket=${sock}`);
    try {
      const source = await seededSource(16 * MiB, 32);
      const job = new MirrorJob({ source, target, speed: 8 * MiB });
      const evs = events(job);
      job.start();
      await waitFor(() => job.query().offset > 0, 'the copy to start', { timeoutMs: 10_000, intervalMs: 5 });
      await server.proc.stop('SIGKILL');
      // a write to the source while the target is away
      await job.node.write(MiB + 17, Buffer.from('written while the target was away'));
      await new Promise((resolve) => setTimeout(resolve, 1000));
      server = await startQemuNbd(tgt, [], { socket: sock });
      await whenStatus(job, 'ready', 30_000);
      job.setSpeed(0);
      await withTimeout(job.complete({ pivot: false }), 20_000, 'complete');
      expect(summary(evs).filter((x) => x.startsWith('error'))).toEqual([]);
      expect(firstDifference(await readAll(source), await readAll(target))).toBe(-1);
    } finally {
      await target.close();
    }
  });
  it('ready, a copied write not yet flushed, the target killed and back: complete copies it again (ready false, no error event), equal', async () => {
    const dir = await makeTempDir();
    const tgt = join(dir, 'tgt.raw');
    const sock = join(dir, 't.sock');
    await writeFile(tgt, Buffer.alloc(0));
    await run('truncate', ['-s', String(8 * MiB), tgt]);
    let server = await startQemuNbd(tgt, [], { socket: sock });
    const target = await NbdNode.open(`nbd+unix:///?socket=${sock}`);
    try {
      const source = await seededSource(8 * MiB, 33);
      // no flush while ready and not draining: the write below stays unflushed on the target
      const job = new MirrorJob({ source, target, flushIntervalMs: 3_600_000 });
      const evs = events(job);
      job.start();
      await whenStatus(job, 'ready');
      await job.node.write(2 * MiB + 5, Buffer.alloc(100_000, 0x5a));
      await waitFor(() => job.query().dirtyBytes === 0 && Number(job.query().unstableBytes) > 0, 'the write copied, not flushed', { timeoutMs: 10_000, intervalMs: 5 });
      await server.proc.stop('SIGKILL');
      await new Promise((resolve) => setTimeout(resolve, 1000));
      server = await startQemuNbd(tgt, [], { socket: sock });
      await withTimeout(job.complete({ pivot: false }), 20_000, 'complete');
      const s = summary(evs);
      expect(s.filter((x) => x.startsWith('error'))).toEqual([]);
      expect(s).toContain('ready(false)');
      expect(s.slice(-4)).toEqual(['waiting', 'pending', 'completed', 'concluded']);
      expect(firstDifference(await readAll(source), await readAll(target))).toBe(-1);
    } finally {
      await target.close();
    }
  });
});
