/**
 * The live commit on serve-nbd (job type commit, blkrep commit --control): a qcow2 overlay over a
 * qcow2 base, exported and written by a client over NBD while its data is committed into the
 * base; pause and resume, complete (the overlay made empty), cancel before ready, --wait, errors.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/block/open.js';
import { makeTempDir, run, runCli, serve, unixUri } from '../support/spawn.js';
import { io, qcow2, qemuCheckClean, qemuMap, sh } from '../cli/image-helpers.js';
import { control, eventLog, MiB, Writer } from './live-helpers.js';
import { readAll } from './helpers.js';

const SIZE = 32 * MiB;

interface Q {
  id: string;
  type: string;
  status: string;
  ready: boolean;
  paused: boolean;
  offset: number;
  length: number;
  export: string;
  active: boolean;
  top: string;
  base: string;
}

/** base.qcow2 (data) ← top.qcow2 (data, zero clusters), exported as "disk"; the chain's content as a buffer. */
async function setup(): Promise<{ dir: string; ctl: string; uri: string; content: Buffer }> {
  const dir = await makeTempDir();
  await sh(
    dir,
    qcow2('base.qcow2', `${SIZE}`),
    io('qcow2', 'base.qcow2', 'write -P 170 0 8M', 'write -P 171 20M 4M'),
    qcow2('top.qcow2', '', ['base.qcow2', 'qcow2']),
    io('qcow2', 'top.qcow2', 'write -P 1 1M 3M', 'write -z 21M 1M', 'write -P 2 30M 100k'),
    ['qemu-img', 'convert', '-O', 'raw', 'top.qcow2', 'view.raw'],
  );
  const view = await openImage(join(dir, 'view.raw'), { readOnly: true, format: 'raw' });
  const content = await readAll(view);
  await view.close();
  return { dir, ctl: join(dir, 'ctl'), uri: unixUri(join(dir, 'nbd'), 'disk'), content };
}

async function ownRanges(image: string, dir: string) {
  return (await qemuMap(image, dir)).filter((e) => e.depth === 0 && e.present);
}

describe('live commit (job type commit)', () => {
  it('a client writes during the job; pause holds the copy, resume goes on; complete empties the overlay and the base holds every byte', async () => {
    const s = await setup();
    const daemon = await serve(['--export', `disk=${join(s.dir, 'top.qcow2')}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const log = await eventLog(s.ctl);
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { pauseMs: 1 });
    await writer.waitWrites(20);
    // 256 KiB/s: the first 1 MiB copy puts the speed limit 4 s in debt, so the pause comes before ready
    const r = await runCli(['commit', '--control', s.ctl, '--export', 'disk', '--speed', '256K', '--json']);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const started = JSON.parse(r.stdout) as { live: true; export: string; job: Q };
    expect(started).toMatchObject({ live: true, export: 'disk', job: { id: 'commit0', type: 'commit', active: true, top: join(s.dir, 'top.qcow2'), base: join(s.dir, 'base.qcow2') } });
    const paused = await control<Q>(s.ctl, 'job-pause', { id: 'commit0' });
    expect(paused).toMatchObject({ status: 'paused', paused: true });
    const at = paused.offset;
    await writer.waitWrites(20);
    // writes go on while paused; the copy does not
    expect((await control<Q>(s.ctl, 'job-query', { id: 'commit0' })).offset).toBe(at);
    await control(s.ctl, 'job-set-speed', { id: 'commit0', speed: 0 });
    expect(await control<Q>(s.ctl, 'job-resume', { id: 'commit0' })).toMatchObject({ status: 'running', paused: false });
    await log.waitFor('job-ready', (e) => e['id'] === 'commit0');
    await writer.waitWrites(30);
    await writer.stop();
    const done = await control<Q>(s.ctl, 'job-complete', { id: 'commit0' });
    expect(done).toMatchObject({ id: 'commit0', status: 'concluded' });
    // the export reads what was written
    const reader = await openImage(s.uri);
    expect((await readAll(reader)).equals(writer.expected)).toBe(true);
    await reader.close();
    const statuses = log.events.filter((e) => e.event === 'job-status-change' && e['id'] === 'commit0').map((e) => e['status']);
    expect(statuses).toEqual(['running', 'paused', 'running', 'ready', 'waiting', 'pending', 'concluded']);
    expect(log.events.find((e) => e.event === 'job-completed')).toMatchObject({ id: 'commit0', type: 'commit', export: 'disk' });
    expect(log.events.find((e) => e.event === 'job-completed')!['error']).toBeUndefined();
    await log.close();
    await daemon.stop();
    // the base alone holds everything; the overlay is empty; both check clean
    await writeFile(join(s.dir, 'expected.raw'), writer.expected);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', 'expected.raw', 'base.qcow2'], { cwd: s.dir });
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect(await ownRanges('top.qcow2', s.dir)).toEqual([]);
    await qemuCheckClean('base.qcow2', s.dir);
    await qemuCheckClean('top.qcow2', s.dir);
  });

  it('blkrep commit --control --wait under a writer: completes once ready, writes flow on to the empty overlay; the export reads every byte', async () => {
    const s = await setup();
    const daemon = await serve(['--export', `disk=${join(s.dir, 'top.qcow2')}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { pauseMs: 1 });
    await writer.waitWrites(10);
    const r = await runCli(['commit', '--control', s.ctl, '--wait', '--json']);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ live: true, export: 'disk', emptied: true, job: { id: 'commit0', status: 'concluded' } });
    await writer.waitWrites(20);
    await writer.stop();
    const reader = await openImage(s.uri);
    expect((await readAll(reader)).equals(writer.expected)).toBe(true);
    await reader.close();
    await daemon.stop();
    await writeFile(join(s.dir, 'expected.raw'), writer.expected);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', 'expected.raw', 'top.qcow2'], { cwd: s.dir });
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    await qemuCheckClean('base.qcow2', s.dir);
    await qemuCheckClean('top.qcow2', s.dir);
  });

  it('cancel before ready: cancelled (not consistent), the overlay is kept and the export reads as before', async () => {
    const s = await setup();
    const daemon = await serve(['--export', `disk=${join(s.dir, 'top.qcow2')}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const log = await eventLog(s.ctl);
    const r = await runCli(['commit', '--control', s.ctl, '--export', 'disk', '--id', 'c9', '--speed', '64K', '--json']);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const cancelled = await control<Q>(s.ctl, 'job-cancel', { id: 'c9' });
    expect(cancelled).toMatchObject({ id: 'c9', status: 'concluded', ready: false });
    expect(log.events.find((e) => e.event === 'job-cancelled')).toMatchObject({ id: 'c9', type: 'commit', export: 'disk', consistent: false });
    const reader = await openImage(s.uri);
    expect((await readAll(reader)).equals(s.content)).toBe(true);
    await reader.close();
    // the export can be committed again afterwards (its backing is already read-write)
    const again = await runCli(['commit', '--control', s.ctl, '--wait', '--json']);
    expect(again.code, again.stdout + again.stderr).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject({ emptied: true });
    await log.close();
    await daemon.stop();
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', 'view.raw', 'base.qcow2'], { cwd: s.dir });
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect(await ownRanges('top.qcow2', s.dir)).toEqual([]);
    await qemuCheckClean('base.qcow2', s.dir);
    await qemuCheckClean('top.qcow2', s.dir);
  });

  it('refusals: a raw export (ERR_NO_BACKING), a base that is not the backing file (ERR_NOT_IN_CHAIN), an image with --control (usage)', async () => {
    const s = await setup();
    await sh(s.dir, ['qemu-img', 'create', '-f', 'raw', 'plain.raw', '4M']);
    const daemon = await serve(['--export', `disk=${join(s.dir, 'top.qcow2')}`, '--export', `plain=${join(s.dir, 'plain.raw')}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const raw = await runCli(['commit', '--control', s.ctl, '--export', 'plain', '--json']);
    expect(raw.code).toBe(1);
    expect(JSON.parse(raw.stdout)).toMatchObject({ error: { code: 'ERR_NO_BACKING' } });
    const wrong = await runCli(['commit', '--control', s.ctl, '--export', 'disk', '--base', join(s.dir, 'view.raw'), '--json']);
    expect(wrong.code).toBe(1);
    expect(JSON.parse(wrong.stdout)).toMatchObject({ error: { code: 'ERR_NOT_IN_CHAIN' } });
    const both = await runCli(['commit', 'top.qcow2', '--control', s.ctl, '--json'], { cwd: s.dir });
    expect(both.code).toBe(2);
    expect(await control(s.ctl, 'job-list')).toEqual([]);
    await daemon.stop();
    await qemuCheckClean('top.qcow2', s.dir);
  });

  it('failover (active over hidden over disk): --top hidden into disk while the client writes, then the active layer into disk through the empty hidden; disk alone holds every byte', async () => {
    const dir = await makeTempDir();
    await sh(
      dir,
      qcow2('disk.qcow2', `${SIZE}`),
      io('qcow2', 'disk.qcow2', 'write -P 170 0 8M', 'write -P 171 20M 4M'),
      qcow2('hidden.qcow2', '', ['disk.qcow2', 'qcow2']),
      io('qcow2', 'hidden.qcow2', 'write -P 3 2M 2M', 'write -z 22M 1M', 'write -P 4 27M 65k'),
      qcow2('active.qcow2', '', ['hidden.qcow2', 'qcow2']),
      io('qcow2', 'active.qcow2', 'write -P 5 3M 2M', 'write -P 6 28M 1M'),
      ['qemu-img', 'convert', '-O', 'raw', 'active.qcow2', 'view.raw'],
    );
    const view = await openImage(join(dir, 'view.raw'), { readOnly: true, format: 'raw' });
    const content = await readAll(view);
    await view.close();
    const ctl = join(dir, 'ctl');
    const daemon = await serve(['--export', `disk=${join(dir, 'active.qcow2')}`, '--socket', join(dir, 'nbd'), '--control', ctl]);
    const writer = await Writer.start(unixUri(join(dir, 'nbd'), 'disk'), Buffer.from(content), { pauseMs: 1 });
    await writer.waitWrites(10);
    // the active layer into disk while hidden still holds data: refused when the job starts
    const early = await runCli(['commit', '--control', ctl, '--base', join(dir, 'disk.qcow2'), '--wait', '--json']);
    expect(early.code, early.stdout + early.stderr).toBe(1);
    expect(JSON.parse(early.stdout)).toMatchObject({ error: { code: 'ERR_NOT_EMPTY' } });
    const hidden = await runCli(['commit', '--control', ctl, '--top', 'hidden.qcow2', '--wait', '--json'], { cwd: dir });
    expect(hidden.code, hidden.stdout + hidden.stderr).toBe(0);
    expect(JSON.parse(hidden.stdout)).toMatchObject({
      live: true,
      emptied: true,
      job: { status: 'concluded', active: false, top: join(dir, 'hidden.qcow2'), base: join(dir, 'disk.qcow2'), makeEmpty: [join(dir, 'hidden.qcow2')] },
    });
    await writer.waitWrites(20);
    await writer.stop();
    const active = await runCli(['commit', '--control', ctl, '--base', 'disk.qcow2', '--wait', '--json'], { cwd: dir });
    expect(active.code, active.stdout + active.stderr).toBe(0);
    expect(JSON.parse(active.stdout)).toMatchObject({ emptied: true, job: { active: true, layers: 2, base: join(dir, 'disk.qcow2') } });
    const reader = await openImage(unixUri(join(dir, 'nbd'), 'disk'));
    expect((await readAll(reader)).equals(writer.expected)).toBe(true);
    await reader.close();
    await daemon.stop();
    await writeFile(join(dir, 'expected.raw'), writer.expected);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', 'expected.raw', 'disk.qcow2'], { cwd: dir });
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect(await ownRanges('hidden.qcow2', dir)).toEqual([]);
    expect(await ownRanges('active.qcow2', dir)).toEqual([]);
    for (const f of ['disk.qcow2', 'hidden.qcow2', 'active.qcow2']) await qemuCheckClean(f, dir);
  });

  it('blkrep job pause, set-speed, resume, complete work on a commit job; blkrep job cancel on a second one after ready keeps the overlay', async () => {
    const s = await setup();
    const daemon = await serve(['--export', `disk=${join(s.dir, 'top.qcow2')}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const job = async (...a: string[]) => {
      const r = await runCli(['job', ...a, '--control', s.ctl, '--json']);
      expect(r.code, r.stdout + r.stderr).toBe(0);
      return JSON.parse(r.stdout) as Q;
    };
    const started = await runCli(['commit', '--control', s.ctl, '--speed', '256K', '--json']);
    expect(started.code, started.stdout + started.stderr).toBe(0);
    expect(await job('pause', 'commit0')).toMatchObject({ id: 'commit0', type: 'commit', status: 'paused' });
    expect(await job('set-speed', 'commit0', '0')).toMatchObject({ speed: 0, status: 'paused' });
    expect(await job('resume', 'commit0')).toMatchObject({ status: 'running', paused: false });
    const log = await eventLog(s.ctl);
    if ((await control<Q>(s.ctl, 'job-query', { id: 'commit0' })).status !== 'ready') await log.waitFor('job-ready', (e) => e['id'] === 'commit0');
    expect(await job('complete', 'commit0')).toMatchObject({ id: 'commit0', status: 'concluded' });
    // a second commit of the now empty overlay, after a client wrote it: cancel once ready
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { pauseMs: 1 });
    await writer.waitWrites(20);
    await writer.stop();
    const again = await runCli(['commit', '--control', s.ctl, '--id', 'again', '--json']);
    expect(again.code, again.stdout + again.stderr).toBe(0);
    if ((await control<Q>(s.ctl, 'job-query', { id: 'again' })).status !== 'ready') await log.waitFor('job-ready', (e) => e['id'] === 'again');
    expect(await job('cancel', 'again')).toMatchObject({ id: 'again', status: 'concluded' });
    expect(log.events.find((e) => e.event === 'job-cancelled')).toMatchObject({ id: 'again', consistent: true });
    const reader = await openImage(s.uri);
    expect((await readAll(reader)).equals(writer.expected)).toBe(true);
    await reader.close();
    await log.close();
    await daemon.stop();
    // the base is a consistent copy of what the client wrote; the overlay still holds its writes
    await writeFile(join(s.dir, 'expected.raw'), writer.expected);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', 'expected.raw', 'base.qcow2'], { cwd: s.dir });
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect((await ownRanges('top.qcow2', s.dir)).length).toBeGreaterThan(0);
    await qemuCheckClean('base.qcow2', s.dir);
    await qemuCheckClean('top.qcow2', s.dir);
  });
});
