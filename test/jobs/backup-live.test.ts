/**
 * The live backup on serve-nbd (job type backup): clients write the export over NBD while the
 * job runs; the target holds the export as it was at the start; image fleecing (a read-only NBD
 * export of the point-in-time view — on a socket of its own, or an export of the daemon itself on
 * its Unix and TCP listeners — read by qemu-img while the export is overwritten); an
 * incremental backup from an export bitmap into a qcow2 overlay; the CLI with --control.
 */
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { control, emptyImage, eventLog, MiB, qemuCompare, rawImage, Writer } from './live-helpers.js';

const SIZE = 32 * MiB;

interface Q {
  id: string;
  status: string;
  offset: number;
  length: number;
  export: string;
  error?: { code: string; errno: string };
  cancelled: boolean;
  copiedBytes: number;
  cbwCopies: number;
  fleecing?: { export: string; socket?: string; uri: string; uris?: string[] };
}

async function setup(seed: number): Promise<{ dir: string; src: string; dst: string; ctl: string; uri: string; content: Buffer }> {
  const dir = await makeTempDir();
  const src = join(dir, 'src.img');
  const dst = join(dir, 'dst.img');
  const content = await rawImage(src, SIZE, seed);
  await emptyImage(dst, SIZE);
  return { dir, src, dst, ctl: join(dir, 'ctl'), uri: unixUri(join(dir, 'nbd'), 'disk'), content };
}

async function concluded(ctl: string, id: string, timeoutMs = 60_000): Promise<Q> {
  let q: Q | undefined;
  await waitFor(
    async () => {
      q = await control<Q>(ctl, 'job-query', { id });
      return q.status === 'concluded';
    },
    `job ${id} to conclude`,
    { timeoutMs, intervalMs: 50 },
  );
  return q!;
}

describe.skipIf(!hasTool('qemu-img'))('live backup', () => {
  it('clients overwrite the export during a full backup: the target is the export at the start, byte for byte; the events', async () => {
    const s = await setup(5);
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const log = await eventLog(s.ctl);
    const started = await control<Q>(s.ctl, 'job-start', { type: 'backup', export: 'disk', target: s.dst, speed: 16 * MiB, bufSize: 256 * 1024 });
    expect(started).toMatchObject({ id: 'backup0', type: 'backup', export: 'disk', status: 'running' });
    // paused while the clients write, so that their writes meet clusters not yet copied however
    // slowly the writer starts on a loaded machine (a 2 s job could otherwise end first)
    expect(await control<Q>(s.ctl, 'job-pause', { id: 'backup0' })).toMatchObject({ status: 'paused' });
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { workers: 4 });
    await writer.waitWrites(300);
    expect(await control<Q>(s.ctl, 'job-resume', { id: 'backup0' })).toMatchObject({ status: 'running' });
    const q = await concluded(s.ctl, 'backup0');
    await writer.stop();
    expect(q.error).toBeUndefined();
    expect(q.cbwCopies).toBeGreaterThan(0);
    await writeFile(join(s.dir, 'start.img'), s.content);
    expect(await qemuCompare(join(s.dir, 'start.img'), s.dst)).toMatchObject({ code: 0 });
    // the export has every write
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.src)).toMatchObject({ code: 0 });
    const names = log.events.filter((e) => e.event.startsWith('job-')).map((e) => `${e.event}${'status' in e ? `:${String(e.status)}` : ''}`);
    expect(names).toEqual(['job-status-change:running', 'job-status-change:paused', 'job-status-change:running', 'job-status-change:waiting', 'job-status-change:pending', 'job-completed', 'job-status-change:concluded']);
    await log.close();
  });

  it('image fleecing: sync none onto a scratch image, the view served read-only and copied by qemu-img while clients overwrite the export; cancel ends it', async () => {
    const s = await setup(6);
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const snapSock = join(s.dir, 'snap.sock');
    const started = await control<Q>(s.ctl, 'job-start', { type: 'backup', export: 'disk', target: s.dst, sync: 'none', fleecingExport: 'snap', fleecingSocket: snapSock });
    expect(started.fleecing).toEqual({ export: 'snap', socket: snapSock, uri: unixUri(snapSock, 'snap') });
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { workers: 4 });
    await writer.waitWrites(100);
    const out = join(s.dir, 'fleeced.img');
    const conv = await run('qemu-img', ['convert', '-O', 'raw', unixUri(snapSock, 'snap'), out], { timeoutMs: 60_000 });
    expect(conv.code, conv.stderr).toBe(0);
    await writer.waitWrites(100);
    await writer.stop();
    expect((await readFile(out)).equals(s.content)).toBe(true);
    // the view refuses writes
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', unixUri(snapSock, 'snap')]);
    expect(w.stdout + w.stderr).toMatch(/read-only|Operation not permitted|Permission denied/i);
    const q = await control<Q>(s.ctl, 'job-query', { id: 'backup0' });
    expect(q).toMatchObject({ status: 'running', offset: q.copiedBytes });
    expect(q.copiedBytes).toBeGreaterThan(0);
    await control(s.ctl, 'job-cancel', { id: 'backup0' });
    await waitFor(() => !existsSync(snapSock), 'the fleecing socket to go');
    // the export has every write
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.src)).toMatchObject({ code: 0 });
  });

  it('image fleecing on the daemon itself: --fleecing-export without a socket serves the view on the daemon\'s Unix and TCP listeners; read-only; gone after cancel', async () => {
    const s = await setup(9);
    const nbdSock = join(s.dir, 'nbd');
    const d = await serve(['--export', `disk=${s.src}`, '--export', 'other=memory:1M', '--socket', nbdSock, '--port', '0', '--control', s.ctl]);
    const tcpBase = d.uris.find((u) => u.startsWith('nbd://') && u.endsWith('/disk'));
    expect(tcpBase, d.listeningLine).toBeDefined();
    const tcpSnap = tcpBase!.replace(/\/disk$/, '/snap');
    const unixSnap = unixUri(nbdSock, 'snap');
    const r = await runCli(['backup', '--control', s.ctl, '--export', 'disk', s.dst, '--sync', 'none', '--fleecing-export', 'snap', '--json'], { timeoutMs: 30_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const out1 = JSON.parse(r.stdout) as { job: Q; fleecing: Q['fleecing'] };
    expect(out1.fleecing).toEqual({ export: 'snap', uri: unixSnap, uris: [unixSnap, tcpSnap] });
    expect(out1.job).toMatchObject({ id: 'backup0', status: 'running', fleecing: out1.fleecing });
    // no socket of its own
    expect(existsSync(`${s.src}.job-backup0.sock`)).toBe(false);
    const listed = await run('nbdinfo', ['--list', '--json', unixUri(nbdSock)]);
    expect(listed.code, listed.stderr).toBe(0);
    const exports = (JSON.parse(listed.stdout) as { exports: Array<{ 'export-name': string; 'is_read_only': boolean }> }).exports;
    expect(exports.map((e) => e['export-name']).sort()).toEqual(['disk', 'other', 'snap']);
    expect(exports.find((e) => e['export-name'] === 'snap')!.is_read_only).toBe(true);

    const writer = await Writer.start(s.uri, Buffer.from(s.content), { workers: 4 });
    await writer.waitWrites(100);
    const viaUnix = join(s.dir, 'fleeced-unix.img');
    const viaTcp = join(s.dir, 'fleeced-tcp.img');
    const conv = await run('qemu-img', ['convert', '-O', 'raw', unixSnap, viaUnix], { timeoutMs: 60_000 });
    expect(conv.code, conv.stderr).toBe(0);
    await writer.waitWrites(100);
    const conv2 = await run('qemu-img', ['convert', '-O', 'raw', tcpSnap, viaTcp], { timeoutMs: 60_000 });
    expect(conv2.code, conv2.stderr).toBe(0);
    await writer.waitWrites(50);
    await writer.stop();
    expect((await readFile(viaUnix)).equals(s.content)).toBe(true);
    expect((await readFile(viaTcp)).equals(s.content)).toBe(true);
    // the view refuses writes
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', unixSnap]);
    expect(w.stdout + w.stderr).toMatch(/read-only|Operation not permitted|Permission denied/i);
    const status = await control<{ exports: Array<{ name: string; readOnly: boolean }> }>(s.ctl, 'status');
    expect(status.exports.find((e) => e.name === 'snap')).toMatchObject({ readOnly: true });
    // a job of the other export cannot take a name in use
    const clash = await control<Q>(s.ctl, 'job-start', { type: 'backup', export: 'other', target: 'memory:1M', sync: 'none', fleecingExport: 'snap' }).catch((e: unknown) => e);
    expect(clash).toMatchObject({ code: 'ERR_EXPORT_EXISTS' });
    expect((await control<Q[]>(s.ctl, 'job-list', { export: 'other' })).length).toBe(0);

    await control(s.ctl, 'job-cancel', { id: 'backup0' });
    await concluded(s.ctl, 'backup0');
    await waitFor(async () => {
      const l = await run('nbdinfo', ['--list', '--json', unixUri(nbdSock)]);
      return l.code === 0 && !(JSON.parse(l.stdout) as { exports: Array<{ 'export-name': string }> }).exports.some((e) => e['export-name'] === 'snap');
    }, 'snap to be gone from the export list');
    expect((await control<{ exports: Array<{ name: string }> }>(s.ctl, 'status')).exports.map((e) => e.name).sort()).toEqual(['disk', 'other']);
    const after = await run('nbdinfo', ['--size', unixSnap]);
    expect(after.code).not.toBe(0);
    // the export has every write
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.src)).toMatchObject({ code: 0 });
  });

  it('the COLO hidden disk: sync none into a qcow2 overlay of the export\'s own image; read through its backing it is the export at the start', async () => {
    const s = await setup(8);
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl]);
    const hidden = join(s.dir, 'hidden.qcow2');
    expect((await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', s.src, '-F', 'raw', hidden])).code).toBe(0);
    const started = await runCli(['backup', '--control', s.ctl, hidden, '--sync', 'none', '--json'], { timeoutMs: 30_000 });
    expect(started.code, started.stdout + started.stderr).toBe(0);
    expect(JSON.parse(started.stdout)).toMatchObject({ live: true, export: 'disk', job: { id: 'backup0', sync: 'none', status: 'running' } });
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { workers: 4 });
    await writer.waitWrites(60);
    await writer.stop();
    const q = await control<Q>(s.ctl, 'job-query', { id: 'backup0' });
    expect(q.copiedBytes).toBeGreaterThan(0);
    // only what was overwritten went into the hidden disk
    expect(q.copiedBytes).toBeLessThan(SIZE);
    await control(s.ctl, 'job-cancel', { id: 'backup0' });
    await writeFile(join(s.dir, 'start.img'), s.content);
    // the job closes the overlay once concluded; then qemu-img reads it through its backing, the
    // export's image, which the daemon still holds for writing: -U, as QEMU needs for any reader of it
    await waitFor(async () => (await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'qcow2', join(s.dir, 'start.img'), hidden])).code === 0, 'the hidden disk to read as the start', { timeoutMs: 20_000 });
    expect((await run('qemu-img', ['check', '-U', '-q', hidden])).code).toBe(0);
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    expect(await qemuCompare(join(s.dir, 'expected.img'), s.src)).toMatchObject({ code: 0 });
  });

  it('blkrep backup --control: full with the export bitmap (clears it), then incremental into a qcow2 overlay of it: the overlay reads as the export', async () => {
    const s = await setup(7);
    await serve(['--export', `disk=${s.src}`, '--socket', join(s.dir, 'nbd'), '--control', s.ctl, '--bitmap', 'daily']);
    // a new bitmap starts clean: mark everything, as for a disk never backed up
    await control(s.ctl, 'bitmap-fill', { export: 'disk', name: 'daily', all: true });
    const full = await runCli(['backup', '--control', s.ctl, '--export', 'disk', s.dst, '--bitmap', 'daily', '--wait', '--json'], { timeoutMs: 60_000 });
    expect(full.code, full.stdout + full.stderr).toBe(0);
    expect(JSON.parse(full.stdout)).toMatchObject({ live: true, export: 'disk', job: { status: 'concluded', type: 'backup', sync: 'full', offset: SIZE } });
    const dump = await control<{ dirtyBytes: number }>(s.ctl, 'bitmap-dump', { export: 'disk', name: 'daily' });
    expect(dump.dirtyBytes).toBe(0);
    // clients write; the bitmap records it
    const writer = await Writer.start(s.uri, Buffer.from(s.content), { workers: 2 });
    await writer.waitWrites(60);
    await writer.stop();
    const dirty = (await control<{ dirtyBytes: number }>(s.ctl, 'bitmap-dump', { export: 'disk', name: 'daily' })).dirtyBytes;
    expect(dirty).toBeGreaterThan(0);
    const inc = join(s.dir, 'inc1.qcow2');
    expect((await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', s.dst, '-F', 'raw', inc])).code).toBe(0);
    const r = await runCli(['backup', '--control', s.ctl, inc, '--sync', 'incremental', '--bitmap', 'daily', '--wait', '--json'], { timeoutMs: 60_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ job: { status: 'concluded', sync: 'incremental', offset: dirty } });
    await writeFile(join(s.dir, 'expected.img'), writer.expected);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', join(s.dir, 'expected.img'), inc]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect((await control<{ dirtyBytes: number }>(s.ctl, 'bitmap-dump', { export: 'disk', name: 'daily' })).dirtyBytes).toBe(0);
    // usage: with --control only TARGET
    const usage = await runCli(['backup', '--control', s.ctl, s.src, s.dst, '--json']);
    expect(usage.code).toBe(2);
    const badType = await runCli(['backup', '--control', s.ctl, s.dst, '--sync', 'incremental', '--bitmap', 'nope', '--json']);
    expect(badType.code).toBe(1);
  });
});
