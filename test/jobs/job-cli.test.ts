/**
 * The live commands: blkrep mirror --control, blkrep job list|show|pause|resume|complete|cancel|
 * set-speed and blkrep events, as processes against serve-nbd, with a client writing the export.
 */
import { join } from 'node:path';
import { writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { BIN, makeTempDir, runCli, serve, start, unixUri, waitFor } from '../support/spawn.js';
import { emptyImage, MiB, qemuCompare, rawImage, Writer } from './live-helpers.js';
import { openImage } from '../../src/block/open.js';

const SIZE = 32 * MiB;

async function setup(): Promise<{ dir: string; src: string; dst: string; ctl: string; uri: string; content: Buffer }> {
  const dir = await makeTempDir();
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const content = await rawImage(src, SIZE, 5);
  await emptyImage(dst, SIZE);
  return { dir, src, dst, ctl: join(dir, 'ctl'), uri: unixUri(join(dir, 'nbd'), 'disk'), content };
}

/** runCli with --json: exit code and the parsed stdout. */
async function cliJson(args: string[]): Promise<{ code: number | null; out: any; stderr: string }> {
  const r = await runCli([...args, '--json']);
  let out: unknown;
  try {
    out = JSON.parse(r.stdout);
  } catch {
    out = r.stdout;
  }
  return { code: r.code, out, stderr: r.stderr };
}

/** `blkrep events` as a process, known to be subscribed (it has printed a connection event). */
async function eventsProcess(ctl: string, uri: string, args: string[]) {
  const p = start('node', [BIN, 'events', '--control', ctl, ...args]);
  await waitFor(async () => {
    const n = await openImage(uri);
    await n.close();
    return p.stdout().includes('"event":"connection"') || p.child.exitCode !== null;
  }, 'blkrep events to be subscribed', { timeoutMs: 20_000, intervalMs: 100 });
  return p;
}

const lines = (out: string) =>
  out
    .trim()
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>);

describe('blkrep mirror --control, blkrep job, blkrep events', () => {
  it('start, wait ready, list, show, set-speed, pause, resume, complete --no-pivot; events in order on blkrep events', async () => {
    const s = await setup();
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const ev = await eventsProcess(s.ctl, s.uri, ['--until', 'job-completed', '--timeout', '120']);
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { pauseMs: 2 });

    const started = await cliJson(['mirror', '--control', s.ctl, '--export', 'disk', s.dst, '--wait', 'ready']);
    expect(started.code).toBe(0);
    expect(started.out).toMatchObject({ id: 'mirror0', type: 'mirror', export: 'disk', ready: true, sync: 'full' });

    const list = await cliJson(['job', 'list', '--control', s.ctl]);
    expect(list.code).toBe(0);
    expect(list.out).toEqual([expect.objectContaining({ id: 'mirror0', type: 'mirror', export: 'disk' })]);
    const listText = await runCli(['job', 'list', '--control', s.ctl]);
    expect(listText.stdout).toMatch(/^ID +TYPE +EXPORT +STATUS +PROGRESS\nmirror0 +mirror +disk +(ready|running) /);

    const show = await runCli(['job', 'show', 'mirror0', '--control', s.ctl]);
    expect(show.code).toBe(0);
    expect(show.stdout).toMatch(/^Job mirror0 \(mirror of export "disk"\): (ready|running)/);
    expect(show.stdout).toMatch(/\n {2}progress +.* of .*\(\d+\.\d%\)\n {2}rate +.*\/s, ETA /);

    expect((await cliJson(['job', 'set-speed', 'mirror0', '64M', '--control', s.ctl])).out).toMatchObject({ id: 'mirror0', speed: 64 * MiB });
    expect((await cliJson(['job', 'set-copy-mode', 'mirror0', 'write-blocking', '--control', s.ctl])).out).toMatchObject({ id: 'mirror0', copyModeSetting: 'write-blocking', copyMode: 'write-blocking' });
    expect((await cliJson(['job', 'set-copy-mode', 'mirror0', 'background', '--control', s.ctl])).out).toMatchObject({ id: 'mirror0', copyModeSetting: 'background', copyMode: 'background' });
    expect((await cliJson(['job', 'pause', 'mirror0', '--control', s.ctl])).out).toMatchObject({ id: 'mirror0', status: 'paused', paused: true });
    const again = await cliJson(['job', 'pause', 'mirror0', '--control', s.ctl]);
    expect(again).toMatchObject({ code: 1, out: { error: { code: 'ERR_JOB_STATE', message: 'job mirror0 is paused: pause needs it to be created or running or ready' } } });
    expect((await cliJson(['job', 'resume', 'mirror0', '--control', s.ctl])).out).toMatchObject({ id: 'mirror0', paused: false });
    const resumeAgain = await runCli(['job', 'resume', 'mirror0', '--control', s.ctl]);
    expect(resumeAgain.code).toBe(1);
    expect(resumeAgain.stderr.trim()).toBe('blkrep: job mirror0 is not paused');

    await writer.waitWrites(20);
    await writer.stop();
    // wait until in step again after the resume, then complete without pivot
    await waitFor(async () => (await cliJson(['job', 'show', 'mirror0', '--control', s.ctl])).out.status === 'ready', 'mirror0 to be ready again', { timeoutMs: 30_000, intervalMs: 200 });
    // a job that is already ready: --until looks at the current state first; --now prints it
    const already = await runCli(['events', '--control', s.ctl, '--job-id', 'mirror0', '--until', 'job-ready', '--timeout', '5']);
    expect(already.code).toBe(0);
    expect(lines(already.stdout)).toEqual([expect.objectContaining({ event: 'job-ready', id: 'mirror0', type: 'mirror', export: 'disk', synced: true, now: true })]);
    const now = await runCli(['events', '--control', s.ctl, '--now', '--count', '2']);
    expect(now.code).toBe(0);
    expect(lines(now.stdout).map((e) => [e.event, e.id, e.status ?? e.synced, e.now])).toEqual([
      ['job-status-change', 'mirror0', 'ready', true],
      ['job-ready', 'mirror0', true, true],
    ]);
    const done = await cliJson(['job', 'complete', 'mirror0', '--no-pivot', '--control', s.ctl]);
    expect(done).toMatchObject({ code: 0, out: { id: 'mirror0', status: 'concluded' } });
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.dst)).toMatchObject({ code: 0 });

    expect(await ev.waitExit(30_000)).toEqual({ code: 0, signal: null });
    const got = lines(ev.stdout())
      .filter((e) => String(e.event).startsWith('job-'))
      .map(({ time: _t, ...rest }) => rest);
    expect(got.map((e) => [e.event, e.status ?? e.synced ?? null])).toEqual([
      ['job-status-change', 'running'],
      ['job-ready', true],
      ['job-status-change', 'ready'],
      ['job-copy-mode', null],
      ['job-copy-mode', null],
      ['job-status-change', 'paused'],
      ['job-status-change', 'ready'],
      ['job-status-change', 'waiting'],
      ['job-status-change', 'pending'],
      ['job-completed', null],
    ]);
    expect(got.every((e) => e.id === 'mirror0' && e.type === 'mirror' && e.export === 'disk')).toBe(true);
    expect(got.filter((e) => e.event === 'job-copy-mode')).toEqual([
      expect.objectContaining({ from: 'background', to: 'write-blocking', reason: 'user' }),
      expect.objectContaining({ from: 'write-blocking', to: 'background', reason: 'user' }),
    ]);

    // a concluded job: ERR_JOB_STATE; an unknown one: ERR_JOB_NOT_FOUND
    expect(await cliJson(['job', 'complete', 'mirror0', '--control', s.ctl])).toMatchObject({ code: 1, out: { error: { code: 'ERR_JOB_STATE', message: 'job mirror0 is concluded: complete needs it to be ready' } } });
    for (const verb of [['show'], ['pause'], ['resume'], ['complete'], ['cancel'], ['set-speed', '1M']]) {
      const r = await cliJson(['job', verb[0]!, 'nope', ...verb.slice(1), '--control', s.ctl]);
      expect(r).toMatchObject({ code: 1, out: { error: { code: 'ERR_JOB_NOT_FOUND', message: 'no job with id nope (jobs: none)' } } });
    }
    expect((await cliJson(['job', 'list', '--control', s.ctl])).out).toEqual([]);
  });

  it('mirror --wait done follows the job until it concludes (here: completed with pivot by job complete)', async () => {
    const s = await setup();
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const follower = start('node', [BIN, 'mirror', '--control', s.ctl, s.dst, '--wait', 'done', '--json']);
    await waitFor(async () => (await cliJson(['job', 'show', 'mirror0', '--control', s.ctl])).out.status === 'ready', 'mirror0 to be ready', { timeoutMs: 30_000, intervalMs: 200 });
    expect(await cliJson(['job', 'complete', 'mirror0', '--control', s.ctl])).toMatchObject({ code: 0, out: { status: 'concluded' } });
    expect(await follower.waitExit(30_000)).toEqual({ code: 0, signal: null });
    expect(JSON.parse(follower.stdout())).toMatchObject({ id: 'mirror0', status: 'concluded', export: 'disk' });
    expect(await qemuCompare(s.src, s.dst)).toMatchObject({ code: 0 });
  });

  it('complete before ready fails ERR_JOB_STATE and keeps the job; a second mirror of a busy export fails ERR_EXPORT_BUSY; cancel --force', async () => {
    const s = await setup();
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const started = await cliJson(['mirror', '--control', s.ctl, s.dst, '--speed', '1M', '--job-id', 'slow']);
    expect(started).toMatchObject({ code: 0, out: { id: 'slow', status: 'running', speed: MiB } });
    for (const extra of [['--no-pivot'], []]) {
      expect(await cliJson(['job', 'complete', 'slow', ...extra, '--control', s.ctl])).toMatchObject({ code: 1, out: { error: { code: 'ERR_JOB_STATE', message: 'job slow is running: complete needs it to be ready' } } });
    }
    expect((await cliJson(['job', 'show', 'slow', '--control', s.ctl])).out).toMatchObject({ id: 'slow', status: 'running' });
    // events --job keeps one job's events: pause/resume until it got one (it exits after --count 1)
    const ev = start('node', [BIN, 'events', '--control', s.ctl, '--job', 'slow', '--event', 'job-status-change', '--count', '1']);
    await waitFor(async () => {
      if (ev.child.exitCode !== null) return true;
      await cliJson(['job', 'pause', 'slow', '--control', s.ctl]);
      await cliJson(['job', 'resume', 'slow', '--control', s.ctl]);
      return ev.child.exitCode !== null;
    }, 'blkrep events --count 1 to exit', { timeoutMs: 30_000, intervalMs: 50 });
    expect(await ev.waitExit()).toEqual({ code: 0, signal: null });
    expect(lines(ev.stdout())).toEqual([expect.objectContaining({ event: 'job-status-change', id: 'slow', type: 'mirror', export: 'disk' })]);
    const busy = await cliJson(['mirror', '--control', s.ctl, join(s.dir, 'other.img')]);
    expect(busy).toMatchObject({ code: 1, out: { error: { code: 'ERR_EXPORT_BUSY', message: 'export "disk" is in use by job slow: one job per export at a time' } } });
    expect(await cliJson(['job', 'cancel', 'slow', '--force', '--control', s.ctl])).toMatchObject({ code: 0, out: { id: 'slow', status: 'concluded' } });
    expect((await cliJson(['job', 'list', '--control', s.ctl])).out).toEqual([]);
  });

  it('usage errors exit 2; events --until times out with exit 1, and exits 1 when the daemon goes away', async () => {
    const s = await setup();
    const daemon = await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    expect((await runCli(['job', 'show', '--control', s.ctl])).code).toBe(2);
    expect(await cliJson(['mirror', '--control', s.ctl])).toMatchObject({ code: 2, out: { error: { code: 'ERR_USAGE', message: 'TARGET is required: the image or NBD URI to mirror the export onto' } } });
    expect(await cliJson(['mirror', '--control', s.ctl, s.src, s.dst])).toMatchObject({ code: 2, out: { error: { code: 'ERR_USAGE', message: 'with --control, give only TARGET: the source is the export' } } });
    expect(await cliJson(['mirror', s.src, s.dst, '--wait', 'ready'])).toMatchObject({ code: 2, out: { error: { code: 'ERR_USAGE' } } });
    expect(await cliJson(['job', 'set-speed', 'x', 'fast', '--control', s.ctl])).toMatchObject({ code: 2, out: { error: { code: 'ERR_USAGE' } } });

    const timeout = await cliJson(['events', '--control', s.ctl, '--until', 'job-ready', '--timeout', '1']);
    expect(timeout).toMatchObject({ code: 1, out: { error: { code: 'ERR_TIMEOUT', message: 'no job-ready after 1 s' } } });

    const ev = await eventsProcess(s.ctl, s.uri, ['--until', 'job-ready']);
    await daemon.stop('SIGTERM');
    const exit = await ev.waitExit(20_000);
    expect(exit.code).toBe(1);
    expect(ev.stderr()).toContain(`blkrep: the daemon at ${s.ctl} went away`);
    expect(lines(ev.stdout()).map((e) => e.event)).toContain('shutdown');
  });
});
