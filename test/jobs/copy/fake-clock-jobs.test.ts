/**
 * The jobs take their time from the injected clock (src/jobs/copy/clock.ts): driven by a fake
 * clock, the speed limit holds in fake time and no real time is waited for.
 */
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../../src/block/memory.js';
import { BackupJob } from '../../../src/jobs/backup.js';
import { MirrorJob } from '../../../src/jobs/mirror.js';
import type { Job } from '../../../src/jobs/job.js';
import { FakeClock } from '../../support/fake-clock.js';
import { MiB, randomBytes, rng } from '../helpers.js';

const SIZE = 4 * MiB;

async function source(): Promise<MemoryNode> {
  const node = new MemoryNode(SIZE);
  await node.write(0, randomBytes(rng(3), SIZE));
  return node;
}

/** Advance the fake clock 10 ms at a time, letting the I/O settle in between, until `done()` or `limitMs`. */
async function runUntil(clock: FakeClock, done: () => boolean, limitMs: number): Promise<void> {
  while (!done() && clock.now() < limitMs) {
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    clock.advance(10);
  }
}

async function timeToCopy(job: Job, clock: FakeClock, isDone: () => boolean): Promise<number> {
  job.start();
  await runUntil(clock, isDone, 60_000);
  return clock.now();
}

describe('jobs on a fake clock', () => {
  it('a backup at 1 MiB/s copies 4 MiB in 4 s of fake time', async () => {
    const clock = new FakeClock();
    const src = await source();
    const dst = new MemoryNode(SIZE);
    const job = new BackupJob({ source: src, target: dst, speed: MiB, bufSize: 64 * 1024, clock });
    const t = await timeToCopy(job, clock, () => job.status === 'concluded');
    expect(job.status).toBe('concluded');
    expect(job.error).toBeUndefined();
    expect(t).toBeGreaterThanOrEqual(3800);
    expect(t).toBeLessThanOrEqual(4200);
    expect((await dst.read(0, SIZE)).equals(await src.read(0, SIZE))).toBe(true);
  });

  it('a mirror at 2 MiB/s is ready after 2 s of fake time and completes', async () => {
    const clock = new FakeClock();
    const src = await source();
    const dst = new MemoryNode(SIZE);
    const job = new MirrorJob({ source: src, target: dst, speed: 2 * MiB, bufSize: 64 * 1024, clock });
    const t = await timeToCopy(job, clock, () => job.status === 'ready');
    expect(job.status).toBe('ready');
    expect(t).toBeGreaterThanOrEqual(1800);
    expect(t).toBeLessThanOrEqual(2200);
    const completed = job.complete({ pivot: false });
    await runUntil(clock, () => job.status === 'concluded', 70_000);
    await completed;
    expect((await dst.read(0, SIZE)).equals(await src.read(0, SIZE))).toBe(true);
  });
});
