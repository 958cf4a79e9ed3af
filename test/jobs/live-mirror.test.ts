/**
 * The live mirror on serve-nbd (job type mirror): an export written by a client over NBD during
 * the whole job, mirrored onto a raw file; pivot, complete without pivot, cancel before and
 * after ready; the job's files beside the image; kill -9 mid-mirror, restart, resume.
 */
import { existsSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, serve, start, unixUri, waitFor } from '../support/spawn.js';
import { control, emptyImage, eventLog, MiB, qemuCompare, rawImage, Writer } from './live-helpers.js';

const SIZE = 64 * MiB;

interface Q {
  id: string;
  status: string;
  ready: boolean;
  offset: number;
  length: number;
  export: string;
  dirtyBytes: number;
}

async function setup(): Promise<{ dir: string; src: string; dst: string; ctl: string; uri: string; content: Buffer }> {
  const dir = await makeTempDir();
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const content = await rawImage(src, SIZE, 3);
  await emptyImage(dst, SIZE);
  return { dir, src, dst, ctl: join(dir, 'ctl'), uri: unixUri(join(dir, 'nbd'), 'disk'), content };
}

const jobEvents = (events: Array<{ event: string }>) =>
  events
    .filter((e) => e.event.startsWith('job-'))
    .map((e) => {
      const { time: _t, ...rest } = e as Record<string, unknown>;
      return rest;
    });

describe('live mirror', () => {
  it('a client writes during the whole job; complete pivots the export onto the target, which then holds every write byte for byte', async () => {
    const s = await setup();
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const log = await eventLog(s.ctl);
    const writer = await Writer.start(s.uri, Buffer.from(s.content));
    await writer.waitWrites(20);
    const started = await control<Q>(s.ctl, 'job-start', { type: 'mirror', export: 'disk', target: s.dst });
    expect(started).toMatchObject({ id: 'mirror0', type: 'mirror', export: 'disk', target: s.dst, pivoted: false, stateFile: `${s.src}.job-mirror0.json`, dirtyFile: `${s.src}.job-mirror0.dirty` });
    // the job's files beside the image while it runs
    expect(existsSync(`${s.src}.job-mirror0.json`)).toBe(true);
    expect(existsSync(`${s.src}.job-mirror0.dirty`)).toBe(true);
    await log.waitFor('job-ready');
    const before = writer.writes;
    await writer.waitWrites(50);
    const done = await control<Q>(s.ctl, 'job-complete', { id: 'mirror0' });
    expect(done).toMatchObject({ id: 'mirror0', status: 'concluded', pivoted: true });
    expect((await control<{ exports: Array<{ name: string; image: string }> }>(s.ctl, 'status')).exports).toEqual([expect.objectContaining({ name: 'disk', image: expect.stringContaining('dst.img') })]);
    // writes after the pivot go to the target
    await writer.waitWrites(50);
    await writer.stop();
    expect(writer.writes - before).toBeGreaterThanOrEqual(100);
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.dst)).toMatchObject({ code: 0 });
    // the source stopped at the pivot: it differs from what the client wrote since
    expect((await readFile(s.src)).equals(writer.expected)).toBe(false);
    expect(jobEvents(log.events)).toEqual([
      { event: 'job-status-change', id: 'mirror0', type: 'mirror', export: 'disk', status: 'running', previous: 'created' },
      { event: 'job-ready', id: 'mirror0', type: 'mirror', export: 'disk', synced: true },
      { event: 'job-status-change', id: 'mirror0', type: 'mirror', export: 'disk', status: 'ready', previous: 'running' },
      { event: 'job-status-change', id: 'mirror0', type: 'mirror', export: 'disk', status: 'waiting', previous: 'ready' },
      { event: 'job-status-change', id: 'mirror0', type: 'mirror', export: 'disk', status: 'pending', previous: 'waiting' },
      expect.objectContaining({ event: 'job-completed', id: 'mirror0', type: 'mirror', export: 'disk' }),
      { event: 'job-status-change', id: 'mirror0', type: 'mirror', export: 'disk', status: 'concluded', previous: 'pending' },
    ]);
    expect((jobEvents(log.events)[5] as { error?: unknown }).error).toBeUndefined();
    // files removed once concluded
    await waitFor(() => !existsSync(`${s.src}.job-mirror0.json`) && !existsSync(`${s.src}.job-mirror0.dirty`), 'the job files to go');
    expect(await control(s.ctl, 'job-list')).toEqual([]);
    await log.close();
  });

  it('complete with pivot false: the target is the source as of the complete; the export stays on the source', async () => {
    const s = await setup();
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const log = await eventLog(s.ctl);
    const writer = await Writer.start(s.uri, Buffer.from(s.content));
    await control<Q>(s.ctl, 'job-start', { type: 'mirror', export: 'disk', target: s.dst });
    await log.waitFor('job-ready');
    await writer.waitWrites(30);
    await writer.stop();
    const done = await control<Q>(s.ctl, 'job-complete', { id: 'mirror0', pivot: false });
    expect(done.status).toBe('concluded');
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.dst)).toMatchObject({ code: 0 });
    // the export still writes the source, not the target
    const w2 = await Writer.start(s.uri, Buffer.from(writer.expected), { seed: 9 });
    await w2.waitWrites(20);
    await w2.stop();
    await writeFile(join(s.dir, 'expected2.img'), w2.expected);
    expect(await qemuCompare(join(s.dir, 'expected2.img'), s.src)).toMatchObject({ code: 0 });
    expect((await qemuCompare(join(s.dir, 'expected2.img'), s.dst)).code).toBe(1);
    await log.close();
  });

  it('before ready: complete (with or without pivot) fails ERR_JOB_STATE and keeps the job; cancel ends it, target not consistent', async () => {
    const s = await setup();
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const log = await eventLog(s.ctl);
    await control<Q>(s.ctl, 'job-start', { type: 'mirror', export: 'disk', target: s.dst, speed: 1 * MiB });
    for (const pivot of [false, true]) {
      await expect(control(s.ctl, 'job-complete', { id: 'mirror0', pivot })).rejects.toMatchObject({ code: 'ERR_JOB_STATE', message: 'job mirror0 is running: complete needs it to be ready' });
    }
    expect(await control<Q>(s.ctl, 'job-query', { id: 'mirror0' })).toMatchObject({ status: 'running', ready: false });
    await expect(control(s.ctl, 'job-resume', { id: 'mirror0' })).rejects.toMatchObject({ code: 'ERR_JOB_STATE', message: 'job mirror0 is not paused' });
    expect(await control<Q>(s.ctl, 'job-pause', { id: 'mirror0' })).toMatchObject({ status: 'paused' });
    await expect(control(s.ctl, 'job-pause', { id: 'mirror0' })).rejects.toMatchObject({ code: 'ERR_JOB_STATE', message: 'job mirror0 is paused: pause needs it to be created or running or ready' });
    expect(await control<Q>(s.ctl, 'job-resume', { id: 'mirror0' })).toMatchObject({ status: 'running' });
    expect(await control<Q>(s.ctl, 'job-set-speed', { id: 'mirror0', speed: 2 * MiB })).toMatchObject({ speed: 2 * MiB });
    await expect(control(s.ctl, 'job-set-speed', { id: 'mirror0', speed: -1 })).rejects.toMatchObject({ code: 'ERR_JOB_INVALID' });
    expect(await control<Q>(s.ctl, 'job-cancel', { id: 'mirror0' })).toMatchObject({ status: 'concluded' });
    expect(jobEvents(log.events).filter((e) => e.event === 'job-cancelled')).toEqual([expect.objectContaining({ id: 'mirror0', consistent: false })]);
    // a concluded job: verbs fail ERR_JOB_STATE, query answers
    await expect(control(s.ctl, 'job-cancel', { id: 'mirror0' })).rejects.toMatchObject({ code: 'ERR_JOB_STATE', message: 'job mirror0 is concluded: cancel needs it to be created or running or paused or ready or waiting or pending' });
    await waitFor(() => !existsSync(`${s.src}.job-mirror0.json`), 'the state file to go');
    // the export is back on its image
    const w = await Writer.start(s.uri, Buffer.from(s.content));
    await w.waitWrites(10);
    await w.stop();
    await writeFile(join(s.dir, 'expected.img'), w.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.src)).toMatchObject({ code: 0 });
    await log.close();
  });

  it('cancel after ready: the target is a consistent copy as of the cancel', async () => {
    const s = await setup();
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const log = await eventLog(s.ctl);
    const writer = await Writer.start(s.uri, Buffer.from(s.content));
    await control<Q>(s.ctl, 'job-start', { type: 'mirror', export: 'disk', target: s.dst });
    await log.waitFor('job-ready');
    await writer.waitWrites(30);
    await writer.stop();
    await control<Q>(s.ctl, 'job-cancel', { id: 'mirror0' });
    expect(jobEvents(log.events).filter((e) => e.event === 'job-cancelled')).toEqual([expect.objectContaining({ id: 'mirror0', consistent: true })]);
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.dst)).toMatchObject({ code: 0 });
    await log.close();
  });
});

describe('live mirror: persisted state', () => {
  it('kill -9 of serve-nbd mid-mirror with a writer running; restart loads the job paused; resume copies only what was dirty; 0 bytes differ', async () => {
    const s = await setup();
    const args = ['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl];
    const first = await serve(args);
    const log = await eventLog(s.ctl);
    // the client writes the first 4 MiB of the 64 MiB disk (6.25%)
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { region: [0, 4 * MiB], pauseMs: 1 });
    await writer.waitWrites(10);
    await control<Q>(s.ctl, 'job-start', { type: 'mirror', export: 'disk', target: s.dst });
    await log.waitFor('job-ready');
    await writer.waitWrites(200);
    first.child.kill('SIGKILL');
    await new Promise((resolve) => first.child.once('exit', resolve));
    await writer.stop({ ignoreErrors: true, flush: false });
    await log.close().catch(() => {});
    expect(existsSync(`${s.src}.job-mirror0.json`)).toBe(true);
    const state = JSON.parse(await readFile(`${s.src}.job-mirror0.json`, 'utf8')) as Record<string, unknown>;
    expect(state).toMatchObject({ version: 1, id: 'mirror0', type: 'mirror', export: 'disk', status: 'ready', options: { target: s.dst, sync: 'full' } });

    const second = await serve(args);
    expect(second.stderr()).toContain('job mirror0 (mirror of export "disk") loaded from');
    const loaded = await control<Q[]>(s.ctl, 'job-list');
    expect(loaded).toEqual([expect.objectContaining({ id: 'mirror0', type: 'mirror', status: 'paused', ioStatus: 'ok', export: 'disk', offset: 0 })]);
    const dirty = loaded[0]!.dirtyBytes;
    expect(dirty).toBeGreaterThan(0);
    expect(dirty).toBeLessThanOrEqual(SIZE / 10);
    const log2 = await eventLog(s.ctl);
    const w2 = await Writer.start(s.uri, Buffer.alloc(SIZE), { region: [8 * MiB, 9 * MiB], seed: 11, workers: 2, pauseMs: 5 });
    expect(await control<Q>(s.ctl, 'job-resume', { id: 'mirror0' })).toMatchObject({ status: 'running' });
    await log2.waitFor('job-ready');
    await w2.waitWrites(20);
    await w2.stop();
    const end = await control<Q>(s.ctl, 'job-complete', { id: 'mirror0', pivot: false });
    expect(end.status).toBe('concluded');
    const copied = end.offset;
    console.log(`kill -9 + resume: dirty after restart ${dirty} bytes (${((dirty / SIZE) * 100).toFixed(2)}% of ${SIZE}), copied after restart ${copied} bytes (${((copied / SIZE) * 100).toFixed(2)}%), writer wrote ${w2.bytes} bytes meanwhile`);
    expect(copied).toBeGreaterThan(0);
    expect(copied).toBeLessThan(SIZE / 4);
    expect(await qemuCompare(s.src, s.dst)).toMatchObject({ code: 0 });
    await waitFor(() => !existsSync(`${s.src}.job-mirror0.json`) && !existsSync(`${s.src}.job-mirror0.dirty`), 'the job files to go');
    await log2.close();
  });
});

describe('live mirror: daemon stop', () => {
  it('SIGTERM pauses the job and keeps its files; the next start loads it paused; resume and complete with pivot', async () => {
    const s = await setup();
    const args = ['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl];
    const first = await serve(args);
    const log = await eventLog(s.ctl);
    await control<Q>(s.ctl, 'job-start', { type: 'mirror', export: 'disk', target: s.dst, id: 'm1' });
    await log.waitFor('job-ready');
    const writer = await Writer.start(s.uri, Buffer.from(s.content));
    await writer.waitWrites(30);
    await writer.stop();
    await log.close();
    expect(await first.stop('SIGTERM')).toBe(0);
    const state = JSON.parse(await readFile(`${s.src}.job-m1.json`, 'utf8')) as Record<string, unknown>;
    expect(state).toMatchObject({ id: 'm1', type: 'mirror', export: 'disk', status: 'paused' });
    expect(existsSync(`${s.src}.job-m1.dirty`)).toBe(true);

    const second = await serve(args);
    expect(JSON.parse(second.listeningLine).jobs).toEqual([{ id: 'm1', type: 'mirror', export: 'disk', status: 'paused' }]);
    expect(await control<Q[]>(s.ctl, 'job-list')).toEqual([expect.objectContaining({ id: 'm1', status: 'paused', ioStatus: 'ok' })]);
    const log2 = await eventLog(s.ctl);
    await control(s.ctl, 'job-resume', { id: 'm1' });
    await log2.waitFor('job-ready');
    expect(await control<Q>(s.ctl, 'job-complete', { id: 'm1' })).toMatchObject({ status: 'concluded' });
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.dst)).toMatchObject({ code: 0 });
    // the export serves the target now
    const w2 = await Writer.start(s.uri, Buffer.from(writer.expected), { seed: 21 });
    await w2.waitWrites(10);
    await w2.stop();
    await writeFile(join(s.dir, 'expected2.img'), w2.expected);
    expect(await qemuCompare(join(s.dir, 'expected2.img'), s.dst)).toMatchObject({ code: 0 });
    await waitFor(() => !existsSync(`${s.src}.job-m1.json`) && !existsSync(`${s.src}.job-m1.dirty`), 'the job files to go');
    await log2.close();
  });
});

describe('live mirror: a state file that cannot be loaded', () => {
  it('is renamed IMAGE.job-ID.json.failed with a warning; the daemon serves the export without the job', async () => {
    const s = await setup();
    const state = { version: 1, id: 'm9', type: 'mirror', export: 'disk', status: 'paused', generation: 3, savedAt: '2026-01-01T00:00:00.000Z', options: { target: join(s.dir, 'gone.img'), sync: 'full' } };
    await writeFile(`${s.src}.job-m9.json`, JSON.stringify(state));
    const d = await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    expect(await control(s.ctl, 'job-list')).toEqual([]);
    expect(existsSync(`${s.src}.job-m9.json`)).toBe(false);
    expect(JSON.parse(await readFile(`${s.src}.job-m9.json.failed`, 'utf8'))).toEqual(state);
    expect(d.stderr()).toContain(`job state file ${s.src}.job-m9.json not loaded (`);
    expect(d.stderr()).toContain(`renamed ${s.src}.job-m9.json.failed: start the job anew`);
  });
});

describe('live mirror: sync bitmap', () => {
  it('copies only the regions dirty in a bitmap of the export onto a target that was a copy of the image before', async () => {
    const s = await setup();
    await writeFile(s.dst, await readFile(s.src));
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl, '--bitmap', 'b0']);
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { region: [16 * MiB, 20 * MiB] });
    await writer.waitWrites(40);
    await writer.stop();
    const log = await eventLog(s.ctl);
    // the target holds the image as it was: mirroring onto it needs "existing" (as QEMU mode=existing)
    await expect(control(s.ctl, 'job-start', { type: 'mirror', target: s.dst, sync: 'bitmap', bitmap: 'b0' })).rejects.toMatchObject({ code: 'ERR_TARGET_NOT_EMPTY' });
    const q = await control<Q>(s.ctl, 'job-start', { type: 'mirror', target: s.dst, sync: 'bitmap', bitmap: 'b0', existing: true });
    expect(q).toMatchObject({ sync: 'bitmap', export: 'disk' });
    expect(q.length).toBeLessThanOrEqual(4 * MiB);
    await log.waitFor('job-ready');
    const end = await control<Q>(s.ctl, 'job-complete', { id: q.id, pivot: false });
    expect(end.offset).toBeGreaterThan(0);
    expect(end.offset).toBeLessThanOrEqual(4 * MiB);
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.dst)).toMatchObject({ code: 0 });
    // bitmap mode on-success (the default): the export bitmap was cleared at the consistency point
    expect(await control(s.ctl, 'bitmap-list', { export: 'disk' })).toEqual([expect.objectContaining({ name: 'b0', dirtyBytes: 0 })]);
    await expect(control(s.ctl, 'job-start', { type: 'mirror', target: s.dst, sync: 'bitmap', bitmap: 'b0', bitmapMode: 'always' })).rejects.toMatchObject({ code: 'ERR_BAD_REQUEST' });
    await expect(control(s.ctl, 'job-start', { type: 'mirror', target: s.dst, bitmapMode: 'never' })).rejects.toMatchObject({ code: 'ERR_BAD_REQUEST', message: '"bitmapMode" is only used with sync bitmap, not full' });
    await expect(control(s.ctl, 'job-start', { type: 'mirror', target: s.dst, sync: 'bitmap', bitmap: 'nope', existing: true })).rejects.toMatchObject({ code: 'ERR_BITMAP_NOT_FOUND' });
    await expect(control(s.ctl, 'job-start', { type: 'mirror', target: s.dst, sync: 'bitmap' })).rejects.toMatchObject({ code: 'ERR_BAD_REQUEST', message: 'sync bitmap needs "bitmap": the name of a bitmap of the export' });
    await log.close();
  });
});

describe('live mirror: kill -9 in the copy phase', () => {
  it('the progress made before the kill is kept: resume copies about what was left, 0 bytes differ', async () => {
    const s = await setup();
    const args = ['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl];
    const first = await serve(args);
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { region: [0, 2 * MiB], pauseMs: 5, workers: 1 });
    await control<Q>(s.ctl, 'job-start', { type: 'mirror', export: 'disk', target: s.dst, speed: 4 * MiB });
    // half the disk copied; then two periodic target flushes (every second) make that progress stable
    const before = await waitFor(
      async () => {
        const q = await control<Q>(s.ctl, 'job-query', { id: 'mirror0' });
        return q.offset >= SIZE / 2 && q;
      },
      'half the disk copied',
      { timeoutMs: 30_000, intervalMs: 100 },
    );
    await new Promise((resolve) => setTimeout(resolve, 2200));
    expect((await control<Q>(s.ctl, 'job-query', { id: 'mirror0' })).ready).toBe(false);
    first.child.kill('SIGKILL');
    await new Promise((resolve) => first.child.once('exit', resolve));
    await writer.stop({ ignoreErrors: true, flush: false });

    await serve(args);
    const [loaded] = await control<Q[]>(s.ctl, 'job-list');
    expect(loaded).toMatchObject({ id: 'mirror0', status: 'paused' });
    const log = await eventLog(s.ctl);
    await control(s.ctl, 'job-set-speed', { id: 'mirror0', speed: 0 });
    await control(s.ctl, 'job-resume', { id: 'mirror0' });
    await log.waitFor('job-ready');
    const end = await control<Q>(s.ctl, 'job-complete', { id: 'mirror0', pivot: false });
    console.log(`kill -9 in the copy phase: ${before.offset} bytes copied 2.2 s before the kill (${((before.offset / SIZE) * 100).toFixed(1)}%), ${loaded!.dirtyBytes} dirty at restart, ${end.offset} copied after it (${((end.offset / SIZE) * 100).toFixed(1)}%)`);
    // what was left at `before`, plus the writer's activity-log extent (4 MiB) and its rewrites
    expect(loaded!.dirtyBytes).toBeLessThanOrEqual(SIZE - before.offset + 6 * MiB);
    expect(end.offset).toBeLessThanOrEqual(SIZE - before.offset + 8 * MiB);
    expect(await qemuCompare(s.src, s.dst)).toMatchObject({ code: 0 });
    await log.close();
  });
});

describe('live mirror: target errors', () => {
  it('with on-target-error stop, a failing target pauses the job (job-error, io-status failed); resume after the fault goes finishes the copy', async () => {
    const s = await setup();
    const inject = join(s.dir, 'inject');
    const tsock = join(s.dir, 'target.sock');
    const nbdkit = start('nbdkit', ['-f', '-U', tsock, '--filter=error', 'memory', String(SIZE), 'error-pwrite=EIO', 'error-pwrite-rate=100%', `error-pwrite-file=${inject}`, 'error-zero=EIO', 'error-zero-rate=100%', `error-zero-file=${inject}`]);
    await waitFor(() => existsSync(tsock), 'nbdkit to listen');
    await writeFile(inject, '');
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const log = await eventLog(s.ctl);
    const target = unixUri(tsock);
    await control<Q>(s.ctl, 'job-start', { type: 'mirror', export: 'disk', target, onTargetError: 'stop' });
    const err = await log.waitFor('job-error');
    expect(err).toMatchObject({ id: 'mirror0', type: 'mirror', export: 'disk', side: 'target', errno: 'EIO', action: 'stop' });
    expect(['write', 'write-zeroes']).toContain(err.operation);
    await log.waitFor('job-status-change', (e) => e.status === 'paused');
    expect(await control<Q>(s.ctl, 'job-query', { id: 'mirror0' })).toMatchObject({ status: 'paused', ioStatus: 'failed' });
    await rm(inject);
    expect(await control<Q>(s.ctl, 'job-resume', { id: 'mirror0' })).toMatchObject({ ioStatus: 'ok' });
    await log.waitFor('job-ready');
    await control<Q>(s.ctl, 'job-complete', { id: 'mirror0', pivot: false });
    expect(await qemuCompare(s.src, target)).toMatchObject({ code: 0 });
    await log.close();
    await nbdkit.stop();
  });
});
