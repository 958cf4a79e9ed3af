/**
 * Image locks between blkrep and QEMU, both directions, with the real tools: qemu-nbd / qemu-io
 * holding an image keep blkrep serve-nbd, commit and mirror out; blkrep serve-nbd keeps qemu-io
 * writes and qemu-img (without -U) out, on the image and on its backing file; -U / --force-share
 * reads anyway; readers coexist; the lock goes with serve-nbd.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadNative } from '../../src/block/native.js';
import { hasTool, makeTempDir, run, runCli, serve, start, waitFor } from '../support/spawn.js';
import { startQemuNbd, type QemuNbd } from '../support/qemu-nbd.js';

const hasPeers = loadNative() !== null && hasTool('qemu-nbd') && hasTool('qemu-io') && hasTool('qemu-img');
// every test runs a dozen CLI commands and peers: bounded, but not by the 60 s default on a loaded machine

async function qemuImg(args: string[]): Promise<void> {
  const r = await run('qemu-img', args, { timeoutMs: 20_000 });
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`);
}

/** qemu-nbd with its image open and locked (it listens before it opens: test/support/qemu-nbd.ts) */
const qemuNbd = (dir: string, args: string[]): Promise<QemuNbd> => startQemuNbd(dir, args, { name: 'q' });

/** blkrep ARGS --json fails with exit code `exit` (compare: 2, as qemu-img compare): the error object */
async function refused(args: string[], exit = 1): Promise<{ code: string; message: string }> {
  const r = await runCli([...args, '--json'], { timeoutMs: 30_000 });
  expect(r.code, r.stdout + r.stderr).toBe(exit);
  return (JSON.parse(r.stdout.trim().split('\n').pop()!) as { error: { code: string; message: string } }).error;
}

async function qemuIoWrite(image: string, format: string): Promise<{ code: number | null; stderr: string }> {
  const r = await run('qemu-io', ['-f', format, image, '-c', 'write -P 7 0 4k'], { timeoutMs: 20_000 });
  return { code: r.code, stderr: r.stderr + r.stdout };
}

async function setup(): Promise<{ dir: string; base: string; top: string; raw: string }> {
  const dir = await makeTempDir();
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  const raw = join(dir, 'disk.raw');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '8M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  await writeFile(raw, Buffer.alloc(8 << 20));
  return { dir, base, top, raw };
}

describe.skipIf(!hasPeers)('image locks: QEMU holds, blkrep refuses', { timeout: 180_000 }, () => {
  it('qemu-nbd serving a qcow2 image: serve-nbd, info, map, compare, bitmap list refuse with ERR_IMAGE_LOCKED naming qemu-nbd; -U reads', async () => {
    const s = await setup();
    const q = await qemuNbd(s.dir, ['-f', 'qcow2', s.top]);
    const served = await runCli(['serve-nbd', s.top, '--socket', join(s.dir, 'b.sock')], { timeoutMs: 30_000 });
    expect(served.code).toBe(1);
    expect(served.stderr).toContain(`blkrep: image "${s.top}" is in use: failed to get "write" lock: pid ${q.pid} (qemu-nbd -k`);
    expect(served.stderr).toContain('has it open and does not share "write"');
    for (const args of [['info', s.top], ['map', s.top], ['compare', s.top, s.raw], ['bitmap', 'list', s.top]]) {
      const e = await refused(args, args[0] === 'compare' ? 2 : 1);
      expect(e.code).toBe('ERR_IMAGE_LOCKED');
      expect(e.message).toContain(`image "${s.top}" is in use: failed to get shared "write" lock: pid ${q.pid} (qemu-nbd`);
      expect(e.message).toContain('(--force-share reads it anyway, as qemu-img -U does)');
    }
    const info = await runCli(['info', '-U', s.top, '--json'], { timeoutMs: 30_000 });
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': 8 << 20, 'backing-chain': [{ filename: s.base, format: 'qcow2' }] });
    for (const args of [['map', '--force-share', s.top], ['compare', '-U', s.top, s.raw], ['bitmap', 'list', '-U', s.top]]) {
      const r = await runCli([...args, '--json'], { timeoutMs: 30_000 });
      expect(r.code, r.stderr).toBe(0);
    }
    // the backing file is only read by qemu-nbd: blkrep may read it too, but not write it
    expect((await runCli(['info', s.base, '--json'], { timeoutMs: 30_000 })).code).toBe(0);
    const e = await refused(['serve-nbd', s.base, '--socket', join(s.dir, 'c.sock')]);
    expect(e).toMatchObject({ code: 'ERR_IMAGE_LOCKED' });
    expect(e.message).toContain(`image "${s.base}" is in use: failed to get "write" lock: pid ${q.pid}`);
    await q.stop();
  });

  it('qemu-io holding the overlay: blkrep commit refuses and changes nothing; mirror onto a target qemu-nbd serves refuses', async () => {
    const s = await setup();
    // qemu-io holds top.qcow2 read-write while it sleeps
    const io = start('qemu-io', ['-f', 'qcow2', s.top, '-c', 'sleep 60000']);
    await waitFor(async () => (await run('qemu-img', ['info', s.top], { timeoutMs: 10_000 })).code === 1 || undefined, 'qemu-io to hold the image', { timeoutMs: 15_000 });
    const e = await refused(['commit', s.top]);
    expect(e.code).toBe('ERR_IMAGE_LOCKED');
    expect(e.message).toContain(`image "${s.top}" is in use`);
    expect(e.message).toContain(`pid ${io.pid} (qemu-io -f qcow2 ${s.top} -c sleep 60000)`);
    await io.stop('SIGKILL');

    const target = join(s.dir, 'target.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', target, '8M']);
    const q = await qemuNbd(s.dir, ['-f', 'qcow2', target]);
    const m = await refused(['mirror', s.raw, target, '--no-progress']);
    expect(m.code).toBe('ERR_IMAGE_LOCKED');
    // refused at the first open of the target: the read-only look at whether it holds data (mirror --existing)
    expect(m.message).toContain(`image "${target}" is in use: failed to get`);
    expect(m.message).toContain(`pid ${q.pid}`);
    await q.stop();
    // released: the same mirror now runs
    const ok = await runCli(['mirror', s.raw, target, '--no-progress', '--json'], { timeoutMs: 60_000 });
    expect(ok.code, ok.stderr).toBe(0);
  });
});

describe.skipIf(!hasPeers)('image locks: reading a held image on purpose', { timeout: 180_000 }, () => {
  it('mirror and backup copy a source qemu-nbd writes only with -U; create -b reads a held backing file as qemu-img create does; -U with --control is a usage error', async () => {
    const s = await setup();
    const copy = join(s.dir, 'copy.raw');
    await writeFile(copy, Buffer.alloc(8 << 20));
    const q = await qemuNbd(s.dir, ['-f', 'qcow2', s.top]);
    for (const cmd of ['mirror', 'backup']) {
      // copy.raw holds (zero) data: a mirror overwrites it only with --existing
      const existing = cmd === 'mirror' ? ['--existing'] : [];
      const e = await refused([cmd, s.top, copy, '--no-progress', ...existing]);
      expect(e.code).toBe('ERR_IMAGE_LOCKED');
      expect(e.message).toContain(`image "${s.top}" is in use: failed to get shared "write" lock: pid ${q.pid}`);
      const r = await runCli([cmd, '-U', s.top, copy, '--no-progress', '--json', ...existing], { timeoutMs: 60_000 });
      expect(r.code, r.stderr).toBe(0);
    }
    const created = await runCli(['create', '-f', 'qcow2', '-b', s.top, '-F', 'qcow2', join(s.dir, 'next.qcow2'), '--json'], { timeoutMs: 30_000 });
    expect(created.code, created.stderr).toBe(0);
    await q.stop();
    for (const cmd of ['mirror', 'backup']) {
      const u = await runCli([cmd, '-U', '--control', join(s.dir, 'ctl'), copy, '--json'], { timeoutMs: 30_000 });
      expect(u.code).toBe(2);
      expect(u.stdout).toContain(`--force-share is for an offline ${cmd}`);
    }
  });
});

describe.skipIf(!hasPeers)('image locks: blkrep holds, QEMU refuses', { timeout: 180_000 }, () => {
  it('serve-nbd on an overlay: qemu-io writes and qemu-img (no -U) are refused on it and its backing file, -U reads; a second serve-nbd is refused; after stop qemu-io writes', async () => {
    const s = await setup();
    const d = await serve([s.top, '--socket', join(s.dir, 'b.sock')]);
    const w = await qemuIoWrite(s.top, 'qcow2');
    expect(w.code).toBe(1);
    expect(w.stderr).toContain('Failed to get "write" lock');
    const info = await run('qemu-img', ['info', s.top], { timeoutMs: 20_000 });
    expect(info.code).toBe(1);
    expect(info.stderr).toContain('Failed to get shared "write" lock');
    const infoU = await run('qemu-img', ['info', '-U', '--output=json', s.top], { timeoutMs: 20_000 });
    expect(infoU.code).toBe(0);
    expect(JSON.parse(infoU.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': 8 << 20 });
    // the backing file: read by blkrep (not shared for writing), readable by qemu-img
    const wb = await qemuIoWrite(s.base, 'qcow2');
    expect(wb.code).toBe(1);
    expect(wb.stderr).toContain('Failed to get "write" lock');
    expect((await run('qemu-img', ['info', s.base], { timeoutMs: 20_000 })).code).toBe(0);
    // blkrep against blkrep
    const second = await refused(['serve-nbd', s.top, '--socket', join(s.dir, 'c.sock')]);
    expect(second.code).toBe('ERR_IMAGE_LOCKED');
    expect(second.message).toContain(`image "${s.top}" is in use: failed to get "write" lock: pid ${d.pid} (`);
    expect(second.message).toContain('serve-nbd');
    expect(await d.stop('SIGTERM')).toBe(0);
    // the lock went with the daemon
    expect((await qemuIoWrite(s.top, 'qcow2')).code).toBe(0);
    expect((await qemuIoWrite(s.base, 'qcow2')).code).toBe(0);
  });

  it('readers coexist: serve-nbd --read-only with qemu-nbd -r and qemu-img info; a writer is refused by both', async () => {
    const s = await setup();
    const d = await serve([s.top, '--read-only', '--socket', join(s.dir, 'b.sock')]);
    const q = await qemuNbd(s.dir, ['-r', '-f', 'qcow2', s.top]);
    expect((await run('qemu-img', ['info', s.top], { timeoutMs: 20_000 })).code).toBe(0);
    expect((await runCli(['info', s.top, '--json'], { timeoutMs: 30_000 })).code).toBe(0);
    expect((await qemuIoWrite(s.top, 'qcow2')).stderr).toContain('Failed to get "write" lock');
    expect((await refused(['serve-nbd', s.top, '--socket', join(s.dir, 'c.sock')])).code).toBe('ERR_IMAGE_LOCKED');
    await q.stop();
    expect(await d.stop('SIGTERM')).toBe(0);
  });

  it('a raw image shares writing as QEMU raw does: serve-nbd and qemu-nbd both serve it read-write; resizing is refused', async () => {
    const s = await setup();
    const d = await serve([s.raw, '--socket', join(s.dir, 'b.sock')]);
    const q = await qemuNbd(s.dir, ['-f', 'raw', s.raw]);
    const second = await serve([s.raw, '--socket', join(s.dir, 'c.sock')]);
    const resize = await run('qemu-img', ['resize', '-f', 'raw', s.raw, '16M'], { timeoutMs: 20_000 });
    expect(resize.code).toBe(1);
    expect(resize.stderr).toContain('Failed to get "resize" lock');
    await q.stop();
    expect(await second.stop('SIGTERM')).toBe(0);
    expect(await d.stop('SIGTERM')).toBe(0);
  });
});

describe.skipIf(!hasPeers)('image locks through live jobs', { timeout: 180_000 }, () => {
  it('live commit reopens the base read-write: its lock is upgraded (qemu-img info on it is then refused); released at stop', async () => {
    const s = await setup();
    const io = await run('qemu-io', ['-f', 'qcow2', s.top, '-c', 'write -P 5 0 1M'], { timeoutMs: 20_000 });
    expect(io.code).toBe(0);
    const ctl = join(s.dir, 'ctl');
    const d = await serve(['--export', `disk=${s.top}`, '--socket', join(s.dir, 'b.sock'), '--control', ctl]);
    // served: the backing file is only read, qemu-img may read it too
    expect((await run('qemu-img', ['info', s.base], { timeoutMs: 20_000 })).code).toBe(0);
    const c = await runCli(['commit', '--control', ctl, '--export', 'disk', '--wait', '--json'], { timeoutMs: 60_000 });
    expect(c.code, c.stderr).toBe(0);
    // the base is now held for writing by the daemon: a reader that does not share writing is refused
    const info = await run('qemu-img', ['info', s.base], { timeoutMs: 20_000 });
    expect(info.code).toBe(1);
    expect(info.stderr).toContain('Failed to get shared "write" lock');
    expect(await d.stop('SIGTERM')).toBe(0);
    expect((await run('qemu-img', ['info', s.base], { timeoutMs: 20_000 })).code).toBe(0);
    const check = await run('qemu-io', ['-f', 'qcow2', '-r', s.base, '-c', 'read -P 5 0 1M'], { timeoutMs: 20_000 });
    expect(check.code).toBe(0);
    expect(check.stdout).not.toContain('Pattern verification failed');
  });

  it('live mirror: the target is held from the start of the job and, after the pivot, by the export; released at stop', async () => {
    const s = await setup();
    const target = join(s.dir, 'target.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', target, '8M']);
    const ctl = join(s.dir, 'ctl');
    const d = await serve(['--export', `disk=${s.raw}`, '--socket', join(s.dir, 'b.sock'), '--control', ctl]);
    const m = await runCli(['mirror', '--control', ctl, '--export', 'disk', target, '--wait', 'ready', '--json'], { timeoutMs: 60_000 });
    expect(m.code, m.stderr).toBe(0);
    const during = await run('qemu-img', ['info', target], { timeoutMs: 20_000 });
    expect(during.code).toBe(1);
    expect(during.stderr).toContain('Failed to get shared "write" lock');
    const done = await runCli(['job', 'complete', 'mirror0', '--control', ctl, '--json'], { timeoutMs: 60_000 });
    expect(done.code, done.stderr).toBe(0);
    const after = await run('qemu-io', ['-f', 'qcow2', target, '-c', 'write 0 4k'], { timeoutMs: 20_000 });
    expect(after.code).toBe(1);
    expect(after.stderr).toContain('Failed to get "write" lock');
    expect(await d.stop('SIGTERM')).toBe(0);
    expect((await run('qemu-img', ['info', target], { timeoutMs: 20_000 })).code).toBe(0);
  });
});
