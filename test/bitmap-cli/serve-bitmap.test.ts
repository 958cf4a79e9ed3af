/**
 * serve-nbd --bitmap as a process: writes through the export (qemu-io) show in
 * qemu:dirty-bitmap:NAME exactly (nbdinfo, QEMU's own NBD client, blkrep bitmap dump), a clean
 * restart keeps the bitmap as it was, kill -9 then a restart loses no written region and says
 * "recovered"; several exports, in-memory images, bitmap files found beside the image, the
 * errors a user can hit, and the control socket's bitmap events.
 */
import { existsSync } from 'node:fs';
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent } from '../../src/control/protocol.js';
import { hasTool, makeTempDir, run, runCli, serve, unixUri, waitFor, type Served } from '../support/spawn.js';
import { blk, control, dirtyOf, entriesOf, KiB, MiB, model, nbdinfoMapText, ok, qemuIo, qemuIoSession, zeroFile, type NbdinfoEntry } from './helpers.js';

const hasPeers = hasTool('qemu-io') && hasTool('nbdinfo') && hasTool('qemu-img');
const SIZE = 64 * MiB;

interface Load {
  export: string;
  name: string;
  file: string | null;
  state: string;
  created: boolean;
  reason?: string;
}

function loads(s: Served): Load[] {
  return (JSON.parse(s.listeningLine) as { bitmaps?: Load[] }).bitmaps ?? [];
}

async function setup(): Promise<{ dir: string; image: string; sock: string; ctl: string; uri: string }> {
  const dir = await makeTempDir();
  const image = join(dir, 'disk.img');
  await zeroFile(image, SIZE);
  const sock = join(dir, 's.sock');
  return { dir, image, sock, ctl: join(dir, 'c.sock'), uri: unixUri(sock) };
}

// Writes that start and end inside granules, straddle a boundary, start at 0's granule, end at
// the disk's end; write-zeroes and trim count as writes.
const WRITES: Array<[string, number, number]> = [
  ['write -P 1 1M 64k', MiB, 64 * KiB],
  ['write -P 2 10M 4k', 10 * MiB, 4 * KiB],
  ['write -P 3 65535 2', 65535, 2],
  ['write -z 20M 128k', 20 * MiB, 128 * KiB],
  ['discard 30M 64k', 30 * MiB, 64 * KiB],
  [`write -P 4 ${SIZE - 4096} 4096`, SIZE - 4096, 4096],
];

describe.skipIf(!hasPeers)('serve-nbd --bitmap', () => {
  it('records writes, write-zeroes and trims; nbdinfo, qemu-img and bitmap dump see exactly them; a clean restart keeps them', async () => {
    const { image, sock, ctl, uri } = await setup();
    const s = await serve([image, '--bitmap', 'b0', '--socket', sock, '--control', ctl]);
    expect(loads(s)).toEqual([{ export: '', name: 'b0', file: `${image}.b0.bitmap`, state: 'clean', created: true }]);
    expect(Object.keys(JSON.parse(s.listeningLine) as object)).toEqual(['event', 'uris', 'pid', 'bitmaps']);

    await qemuIo(uri, WRITES.map((w) => w[0]));
    const expected = model(SIZE, 64 * KiB, WRITES.map(([, offset, length]) => ({ offset, length })));

    const text = await nbdinfoMapText(uri, 'qemu:dirty-bitmap:b0');
    expect(JSON.parse(text)).toEqual(entriesOf(expected));
    // blkrep prints the map byte for byte as nbdinfo does
    const dump = await blk(['bitmap', 'dump', '--control', ctl, '--json']);
    expect(dump.code).toBe(0);
    expect(dump.stdout).toBe(text);

    // QEMU's NBD client reads the context through x-dirty-bitmap: dirty shows as not present
    const map = await run('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=qemu:dirty-bitmap:b0`]);
    expect(map.code).toBe(0);
    const qemuDirty = (JSON.parse(map.stdout) as Array<{ start: number; length: number; present: boolean }>)
      .filter((e) => !e.present)
      .map((e) => ({ offset: e.start, length: e.length }));
    expect(qemuDirty).toEqual([...expected.dirtyRuns()]);

    // clean stop; the bitmap file beside the image is found again without --bitmap
    expect(await s.stop()).toBe(0);
    const offline = await blk(['bitmap', 'dump', image, '--json']);
    expect(offline.stdout).toBe(text);
    const again = await serve([image, '--socket', sock, '--control', ctl]);
    expect(loads(again)).toEqual([{ export: '', name: 'b0', file: `${image}.b0.bitmap`, state: 'clean', created: false }]);
    expect(await nbdinfoMapText(uri, 'qemu:dirty-bitmap:b0')).toBe(text);
    expect(await again.stop()).toBe(0);
  });

  it('kill -9 during writes: after a restart every written region is dirty, and the load says recovered', async () => {
    const { image, sock, ctl, uri } = await setup();
    const s = await serve([image, '--bitmap', 'b0', '--socket', sock, '--control', ctl]);
    const q = qemuIoSession(uri);
    const written: Array<[number, number]> = [
      [5 * MiB, 4 * KiB],
      [40 * MiB, MiB],
      [63 * MiB + 12345, 777],
      [0, 512],
    ];
    for (const [offset, length] of written) expect(await q.command(`write -P 9 ${offset} ${length}`)).toContain(`wrote ${length}/${length} bytes`);
    // no flush: the activity log must cover what was acknowledged
    process.kill(s.pid, 'SIGKILL');
    expect((await s.waitExit(10_000)).signal).toBe('SIGKILL');
    await q.stop('SIGKILL').catch(() => {});

    const again = await serve([image, '--bitmap', 'b0', '--socket', sock, '--control', ctl]);
    const [load] = loads(again);
    expect(load).toMatchObject({ name: 'b0', state: 'recovered', created: false });
    expect(again.stderr()).toMatch(/dirty bitmap "b0" of export "" .* was not closed cleanly .*recovered/);
    const entries = JSON.parse((await blk(['bitmap', 'dump', '--control', ctl, '--json'])).stdout) as NbdinfoEntry[];
    const got = model(SIZE);
    for (const r of dirtyOf(entries)) got.fill(r.offset, r.length);
    for (const [offset, length] of written) expect(got.isDirty(offset, length) && got.nextClean(offset, offset + length) === -1, `${offset}+${length} dirty`).toBe(true);
    expect(await again.stop()).toBe(0);
    // closed cleanly now
    const summary = await ok<{ loadState: { state: string } }>(['bitmap', 'dump', image, '--summary']);
    expect(summary.loadState.state).toBe('clean');
  });

  it('several exports: --bitmap EXPORT:NAME[=FILE]; without EXPORT: a usage error', async () => {
    const dir = await makeTempDir();
    const a = join(dir, 'a.img');
    const b = join(dir, 'b.img');
    await zeroFile(a, 4 * MiB);
    await zeroFile(b, 8 * MiB);
    const sock = join(dir, 's.sock');
    const own = join(dir, 'b-own.bitmap');
    const bad = await runCli(['serve-nbd', '--export', `a=${a}`, '--export', `b=${b}`, '--bitmap', 'x', '--socket', sock]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/with several exports, say whose bitmap it is: EXPORT:NAME/);

    const s = await serve(['--export', `a=${a}`, '--export', `b=${b}`, '--bitmap', 'a:x', '--bitmap', `b:y=${own}`, '--socket', sock]);
    expect(loads(s).map((l) => [l.export, l.name, l.file])).toEqual([
      ['a', 'x', `${a}.x.bitmap`],
      ['b', 'y', own],
    ]);
    await qemuIo(unixUri(sock, 'b'), ['write 4M 1k']);
    const yMap = JSON.parse(await nbdinfoMapText(unixUri(sock, 'b'), 'qemu:dirty-bitmap:y')) as NbdinfoEntry[];
    expect(dirtyOf(yMap)).toEqual([{ offset: 4 * MiB, length: 64 * KiB }]);
    const xMap = JSON.parse(await nbdinfoMapText(unixUri(sock, 'a'), 'qemu:dirty-bitmap:x')) as NbdinfoEntry[];
    expect(dirtyOf(xMap)).toEqual([]);
    expect(await s.stop()).toBe(0);
    expect(existsSync(own)).toBe(true);
  });

  it('an in-memory image keeps its bitmap in memory, and still offers it', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 's.sock');
    const s = await serve(['memory:16M', '--bitmap', 'm', '--bitmap-granularity', '4K', '--socket', sock]);
    expect(loads(s)).toEqual([{ export: '', name: 'm', file: null, state: 'clean', created: true }]);
    await qemuIo(unixUri(sock), ['write 8K 1', 'write -z 1M 8k']);
    const map = JSON.parse(await nbdinfoMapText(unixUri(sock), 'qemu:dirty-bitmap:m')) as NbdinfoEntry[];
    expect(dirtyOf(map)).toEqual([
      { offset: 8 * KiB, length: 4 * KiB },
      { offset: MiB, length: 8 * KiB },
    ]);
    expect(await s.stop()).toBe(0);
  });

  it('bitmap files beside the image are loaded; --no-auto-bitmaps loads only those named', async () => {
    const { image, sock } = await setup();
    await ok(['bitmap', 'add', image, '--name', 'offline', '--granularity', '1M']);
    const s = await serve([image, '--socket', sock]);
    expect(loads(s)).toEqual([{ export: '', name: 'offline', file: `${image}.offline.bitmap`, state: 'clean', created: false }]);
    await qemuIo(unixUri(sock), ['write 3M 1']);
    expect(await s.stop()).toBe(0);
    const dumped = await ok<{ runs: number; dirtyBytes: number }>(['bitmap', 'dump', image, '--summary']);
    expect(dumped).toMatchObject({ runs: 1, dirtyBytes: MiB });

    const plain = await serve([image, '--socket', sock, '--no-auto-bitmaps']);
    expect(loads(plain)).toEqual([]);
    expect(Object.keys(JSON.parse(plain.listeningLine) as object)).toEqual(['event', 'uris', 'pid']);
    expect(await plain.stop()).toBe(0);
  });

  it('refuses a bitmap file of another size, one file for two bitmaps, and a bad granularity', async () => {
    const { dir, image, sock } = await setup();
    const other = join(dir, 'other.bitmap');
    await ok(['bitmap', 'add', other, '--size', '1M']);
    const r = await runCli(['serve-nbd', image, '--bitmap', `b0=${other}`, '--socket', sock, '--json']);
    expect(r.code).toBe(1);
    const err = (JSON.parse(r.stdout.trim().split('\n').pop()!) as { error: { code: string; message: string } }).error;
    expect(err.code).toBe('ERR_BITMAP_SIZE_MISMATCH');
    expect(err.message).toContain(`bitmap "b0" of export "" (image ${image}, ${SIZE} bytes)`);
    expect(err.message).toContain(`covers ${MiB} bytes, the disk has ${SIZE}`);
    expect(existsSync(sock)).toBe(false);

    const twice = await runCli(['serve-nbd', image, '--bitmap', `a=${join(dir, 'x.bitmap')}`, '--bitmap', `b=${join(dir, 'x.bitmap')}`, '--socket', sock]);
    expect(twice.code).toBe(1);
    expect(twice.stderr).toMatch(/is used twice by this daemon/);

    const gran = await runCli(['serve-nbd', image, '--bitmap', 'b0', '--bitmap-granularity', '3K', '--socket', sock]);
    expect(gran.code).toBe(2);
    expect(gran.stderr).toMatch(/--bitmap-granularity 3072 is not a power of two/);
  });

  it('a bitmap file that cannot be trusted loads all dirty, and says why', async () => {
    const { image, sock } = await setup();
    await ok(['bitmap', 'add', image, '--name', 'b0']);
    await truncate(`${image}.b0.bitmap`, 20000);
    const s = await serve([image, '--socket', sock]);
    const [load] = loads(s);
    expect(load).toMatchObject({ name: 'b0', state: 'all-dirty', created: false });
    expect(load!.reason).toMatch(/truncated/);
    expect(s.stderr()).toMatch(/dirty bitmap "b0" of export "" .* cannot be trusted \(.*truncated.*\): loaded as ALL DIRTY/);
    const map = JSON.parse(await nbdinfoMapText(unixUri(sock), 'qemu:dirty-bitmap:b0')) as NbdinfoEntry[];
    expect(map).toEqual([{ offset: 0, length: SIZE, type: 1, description: 'dirty' }]);
    expect(await s.stop()).toBe(0);
    // rewritten whole: trusted (and all dirty) from now on
    expect(await ok(['bitmap', 'dump', image, '--summary'])).toMatchObject({ loadState: { state: 'clean' }, dirtyBytes: SIZE });
  });

  it('many ranges go in several requests, and a dump comes in pages', async () => {
    const dir = await makeTempDir();
    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'c.sock');
    const size = 128 * MiB;
    const s = await serve(['memory:128M', '--bitmap', 'm', '--bitmap-granularity', '512', '--socket', sock, '--control', ctl]);
    // every other granule: 131072 runs
    const entries = Array.from({ length: size / 1024 }, (_, i) => ({ offset: i * 1024, length: 512, type: 1, description: 'dirty' }));
    await writeFile(join(dir, 'map.json'), JSON.stringify(entries));
    expect(await ok(['bitmap', 'fill', '--control', ctl, '--from-json', join(dir, 'map.json')])).toMatchObject({ changed: true, bitmap: { dirtyBytes: size / 2 } });
    const page = await control<{ runs: Array<[number, number]>; next: number | null; end: number }>(ctl, 'bitmap-dump', { name: 'm', start: 1024, limit: 3 });
    expect(page.runs).toEqual([[1024, 512], [2048, 512], [3072, 512]]);
    expect(page.next).toBe(4096);
    expect(page.end).toBe(4096);
    const dump = await blk(['bitmap', 'dump', '--control', ctl, '--json', '--dirty-only']);
    expect(dump.code).toBe(0);
    const got = JSON.parse(dump.stdout) as NbdinfoEntry[];
    expect(got.length).toBe(131072);
    expect(got).toEqual(entries);
    expect(await s.stop()).toBe(0);
  });

  it('publishes bitmap events on the control socket, only for changes', async () => {
    const { image, sock, ctl } = await setup();
    const s = await serve([image, '--socket', sock, '--control', ctl]);
    const events: ControlEvent[] = [];
    const c = await ControlClient.connect(ctl);
    await c.subscribe(undefined, (e) => events.push(e));
    expect(await control(ctl, 'bitmap-add', { name: 'e1', granularity: 4096 })).toMatchObject({ name: 'e1', changed: true });
    expect(await control(ctl, 'bitmap-add', { name: 'e1' })).toMatchObject({ changed: false });
    await control(ctl, 'bitmap-fill', { name: 'e1', ranges: [[0, 10]] });
    await control(ctl, 'bitmap-clear', { name: 'e1' });
    await control(ctl, 'bitmap-clear', { name: 'e1' });
    await control(ctl, 'bitmap-disable', { name: 'e1' });
    await control(ctl, 'bitmap-checkpoint', { name: 'e1' });
    await control(ctl, 'bitmap-remove', { name: 'e1' });
    await waitFor(() => events.some((e) => e.event === 'bitmap-removed'), 'the bitmap-removed event');
    expect(events.map((e) => e.event)).toEqual(['bitmap-added', 'bitmap-filled', 'bitmap-cleared', 'bitmap-disabled', 'bitmap-checkpoint', 'bitmap-removed']);
    expect(events[0]).toMatchObject({ export: '', name: 'e1', file: `${image}.e1.bitmap`, persistent: true, granularity: 4096, enabled: true });
    expect(existsSync(`${image}.e1.bitmap`)).toBe(false);
    expect(existsSync(`${image}.e1.bitmap.ckpt-1`)).toBe(false);
    await c.close();
    // status lists the bitmaps, and the image's own driver
    const status = await control<{ exports: Array<{ driver: string }>; bitmaps: unknown[] }>(ctl, 'status');
    expect(status.exports[0]!.driver).toBe('raw');
    expect(status.bitmaps).toEqual([]);
    expect(await s.stop()).toBe(0);
  });
});
