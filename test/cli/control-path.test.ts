/**
 * Finding the daemon without --control: a bare NAME is RUNDIR/NAME.ctl, $BLKREP_CONTROL, the only
 * socket in RUNDIR; the errors when there is none or several. SIGHUP reloads and keeps serving.
 */
import { existsSync, statSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/block/open.js';
import { BIN, makeTempDir, runCli, serve, start, waitFor } from '../support/spawn.js';

async function statusJson(args: string[], env: NodeJS.ProcessEnv) {
  const r = await runCli(['status', ...args, '--json'], { env });
  return { code: r.code, out: JSON.parse(r.stdout || 'null') as Record<string, unknown>, stderr: r.stderr };
}

describe('control socket by name, from the environment, or the only one', () => {
  it('--control NAME puts the socket in RUNDIR (created 0700); status finds it by NAME, by $BLKREP_CONTROL, and as the only one', async () => {
    const dir = await makeTempDir();
    const run = join(dir, 'run');
    const env: NodeJS.ProcessEnv = { ...process.env, BLKREP_RUN_DIR: run };
    delete env['BLKREP_CONTROL'];
    // the runtime directory is created for a --socket directly in it too (and only RUNDIR itself)
    const d = await serve(['memory:1M', '--socket', join(run, 'nbd.sock'), '--control', 'disk1'], { env });
    expect(statSync(run).mode & 0o777).toBe(0o700);
    expect(statSync(join(run, 'nbd.sock')).isSocket()).toBe(true);
    expect(statSync(join(run, 'disk1.ctl')).isSocket()).toBe(true);
    const byName = await statusJson(['--control', 'disk1'], env);
    expect(byName.code).toBe(0);
    expect(byName.out['control']).toBe(join(run, 'disk1.ctl'));
    expect((await statusJson([], { ...env, BLKREP_CONTROL: 'disk1' })).out['control']).toBe(join(run, 'disk1.ctl'));
    expect((await statusJson([], env)).out['control']).toBe(join(run, 'disk1.ctl'));
    const bitmaps = await runCli(['bitmap', 'list', '--control', 'disk1', '--json'], { env });
    expect(bitmaps.code).toBe(0);
    expect(JSON.parse(bitmaps.stdout)).toEqual([]);
    // a second daemon: without --control the command cannot choose
    const d2 = await serve(['memory:1M', '--socket', join(dir, 'nbd2.sock'), '--control', 'disk2'], { env });
    const two = await statusJson([], env);
    expect(two.code).toBe(2);
    expect(two.out).toEqual({ error: { code: 'ERR_USAGE', message: `no --control given and 2 daemons have a control socket in ${run} (disk1, disk2): say which with --control NAME` } });
    await d2.stop();
    await d.stop();
    const none = await statusJson([], env);
    expect(none.code).toBe(2);
    expect(none.out).toEqual({ error: { code: 'ERR_USAGE', message: expect.stringContaining(`no daemon's control socket is in ${run}`) } });
  });

  // CI runs as root; for another user RUNDIR is $XDG_RUNTIME_DIR/blkrep (the test above covers the lookup)
  it.runIf(process.getuid?.() === 0)('as root without BLKREP_RUN_DIR, NAME is /run/blkrep/NAME.ctl', async () => {
    const dir = await makeTempDir();
    const name = `test-${process.pid}-${Date.now()}`;
    const env = { ...process.env };
    delete env['BLKREP_RUN_DIR'];
    const d = await serve(['memory:1M', '--socket', join(dir, 'nbd.sock'), '--control', name], { env });
    try {
      expect(existsSync(`/run/blkrep/${name}.ctl`)).toBe(true);
      expect((await statusJson(['--control', name], env)).out['control']).toBe(`/run/blkrep/${name}.ctl`);
    } finally {
      await d.stop();
      await rm(`/run/blkrep/${name}.ctl`, { force: true });
    }
  });
});

describe('SIGHUP', () => {
  it('reloads without stopping: a reload event, the export keeps serving, data written before survives', async () => {
    const dir = await makeTempDir();
    const ctl = join(dir, 'ctl');
    const img = join(dir, 'disk.img');
    await runCli(['create', img, '1M']);
    const d = await serve([img, '--socket', join(dir, 'nbd.sock'), '--control', ctl]);
    const ev = start(process.execPath, [BIN, 'events', '--control', ctl, '--until', 'reload', '--timeout', '30']);
    const uri = `nbd+unix:///?socket=${join(dir, 'nbd.sock')}`;
    const n = await openImage(uri);
    await n.write(0, Buffer.alloc(4096, 0x5a));
    await n.flush?.();
    // subscribed once it printed the event of our connection? it prints only --until's event: poll with HUP
    await waitFor(() => {
      if (ev.child.exitCode !== null) return true;
      d.child.kill('SIGHUP');
      return false;
    }, 'the reload event', { timeoutMs: 20_000, intervalMs: 300 });
    expect(await ev.waitExit()).toEqual({ code: 0, signal: null });
    expect(JSON.parse(ev.stdout().trim())).toMatchObject({ event: 'reload', what: [], failed: [] });
    expect(d.child.exitCode).toBe(null);
    expect(d.stderr()).toContain('SIGHUP: reloading');
    expect((await n.read(0, 4096)).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    await n.write(4096, Buffer.alloc(4096, 0xa5));
    await n.close();
    expect(await d.stop()).toBe(0);
  });
});
