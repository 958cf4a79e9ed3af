/**
 * A qcow2 image's own persistent bitmaps while blkrep serve-nbd serves it (src/bitmap/qcow2-live.ts),
 * against QEMU, as QEMU keeps them while qemu-nbd or a VM has the image open (reference C.4):
 *   - read-write: each enabled bitmap is marked in use in the image before any write (qemu-img
 *     info -U sees the flag), records every write, write-zeroes and trim, is offered as
 *     qemu:dirty-bitmap:NAME (nbdinfo --map) and stored with in_use cleared at SIGTERM, after
 *     which qemu-img check is clean and qemu-nbd -B exports exactly the same bits;
 *   - a disabled bitmap is offered and unchanged by writes; enabled through the control socket,
 *     it is marked in use and tracks from then on;
 *   - after kill -9 the bitmap stays in use: blkrep never trusts it (all-dirty, fault "in-use",
 *     the reason in the listening line), refuses to change it (ERR_BITMAP_IN_USE), removes it;
 *   - read-only: offered as stored, nothing in the image changes.
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { IN_USE_REASON } from '../../src/bitmap/qcow2-live.js';
import { Qcow2Node } from '../../src/block/qcow2/node.js';
import { hasTool, makeTempDir, run, serve, start, waitFor } from '../support/spawn.js';
import { entriesOf, fails, model, nbdinfoMapText, ok, qemuIo, type NbdinfoEntry } from '../bitmap-cli/helpers.js';
import { expectClean, KiB, MiB, qemuCheck, qemuInfo, tool } from './helpers.js';

const hasPeers = hasTool('qemu-img') && hasTool('qemu-io') && hasTool('qemu-nbd') && hasTool('nbdinfo');
const SIZE = 16 * MiB;
type Run = { offset: number; length: number };

async function image(dir: string, name = 'd.qcow2'): Promise<string> {
  const path = join(dir, name);
  await tool('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(SIZE)]);
  return path;
}

/** The bitmaps qemu-img info -U lists (it shares the image with a running server). */
async function qemuBitmaps(path: string): Promise<Array<{ name: string; granularity: number; flags: string[] }>> {
  const info = (await qemuInfo(path)) as { 'format-specific': { data: { bitmaps?: Array<{ name: string; granularity: number; flags: string[] }> } } };
  return info['format-specific'].data.bitmaps ?? [];
}

/** nbdinfo --map=qemu:dirty-bitmap:NAME --json */
async function mapOf(uri: string, name: string): Promise<NbdinfoEntry[]> {
  return JSON.parse(await nbdinfoMapText(uri, `qemu:dirty-bitmap:${name}`)) as NbdinfoEntry[];
}

/** Each bitmap as qemu-nbd -r -B NAME exports it, qemu-nbd stopped after. */
async function qemuMaps(path: string, names: string[]): Promise<Record<string, NbdinfoEntry[]>> {
  const sock = join(dirname(path), 'q.sock');
  const nbd = start('qemu-nbd', ['-r', '-f', 'qcow2', '-k', sock, '-t', ...names.flatMap((n) => ['-B', n]), path]);
  try {
    await waitFor(() => existsSync(sock) || nbd.child.exitCode !== null, 'qemu-nbd to listen', { timeoutMs: 10_000 });
    if (!existsSync(sock)) throw new Error(`qemu-nbd exited: ${nbd.stderr()}`);
    const out: Record<string, NbdinfoEntry[]> = {};
    for (const n of names) out[n] = await mapOf(`nbd+unix:///?socket=${sock}`, n);
    return out;
  } finally {
    await nbd.stop();
  }
}

interface Load {
  export: string;
  name: string;
  file: string | null;
  state: string;
  created: boolean;
  reason?: string;
  fault?: string;
}
function loadsOf(listeningLine: string): Load[] {
  return (JSON.parse(listeningLine) as { bitmaps?: Load[] }).bitmaps ?? [];
}

interface Listed {
  name: string;
  export?: string;
  persistent: boolean;
  file: string | null;
  granularity: number;
  enabled: boolean;
  dirtyBytes: number;
  loadState: { state: string; fault?: string; reason?: string };
  qcow2?: { image: string; name: string };
}

describe.skipIf(!hasPeers)('qcow2 persistent bitmaps served live', () => {
  it('enabled bitmaps are marked in use, track writes, zeroes and trims, and are stored at SIGTERM exactly as qemu-nbd -B then exports them; a disabled one is offered unchanged until enabled', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    // "off": bits written by QEMU, then disabled; b0 and b4 empty and enabled
    await tool('qemu-img', ['bitmap', '--add', img, 'off']);
    await tool('qemu-io', ['-f', 'qcow2', img, '-c', 'write 2M 4k']);
    await tool('qemu-img', ['bitmap', '--disable', img, 'off']);
    await tool('qemu-img', ['bitmap', '--add', img, 'b0']);
    await tool('qemu-img', ['bitmap', '--add', '-g', '4K', img, 'b4']);
    const offBits: Run[] = [{ offset: 2 * MiB, length: 4 * KiB }];

    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'c.sock');
    const served = await serve([img, '--socket', sock, '--control', ctl]);
    const uri = `nbd+unix:///?socket=${sock}`;
    expect(loadsOf(served.listeningLine)).toEqual(
      ['off', 'b0', 'b4'].map((name) => ({ export: '', name, file: img, state: 'clean', created: false })),
    );
    // in use while served (durably before the listening line), the disabled one left alone
    expect(await qemuBitmaps(img)).toEqual([
      { name: 'off', granularity: 64 * KiB, flags: [] },
      { name: 'b0', granularity: 64 * KiB, flags: ['in-use', 'auto'] },
      { name: 'b4', granularity: 4 * KiB, flags: ['in-use', 'auto'] },
    ]);

    const writes: Run[] = [
      { offset: MiB, length: 4 * KiB },
      { offset: 5 * MiB, length: 128 * KiB }, // write zeroes
      { offset: 9 * MiB, length: 64 * KiB }, // trim
      { offset: 12 * MiB - 512, length: 1024 }, // across a 4 KiB and a 64 KiB boundary
      { offset: SIZE - 512, length: 512 }, // the last sector
    ];
    await qemuIo(uri, ['write -P 1 1M 4k', 'write -z 5M 128k', 'discard 9M 64k', `write -P 2 ${12 * MiB - 512} 1024`, `write -P 3 ${SIZE - 512} 512`]);
    expect(await mapOf(uri, 'b0')).toEqual(entriesOf(model(SIZE, 64 * KiB, writes)));
    expect(await mapOf(uri, 'b4')).toEqual(entriesOf(model(SIZE, 4 * KiB, writes)));
    expect(await mapOf(uri, 'off')).toEqual(entriesOf(model(SIZE, 64 * KiB, offBits)));

    // the control socket lists them as bitmaps of the image
    const listed = await ok<Listed[]>(['bitmap', 'list', '--control', ctl]);
    expect(listed.map((b) => [b.name, b.persistent, b.file, b.qcow2, b.granularity, b.enabled, b.dirtyBytes, b.loadState])).toEqual([
      ['off', true, img, { image: img, name: 'off' }, 64 * KiB, false, 64 * KiB, { state: 'clean' }],
      ['b0', true, img, { image: img, name: 'b0' }, 64 * KiB, true, 5 * 64 * KiB + 2 * 64 * KiB, { state: 'clean' }],
      ['b4', true, img, { image: img, name: 'b4' }, 4 * KiB, true, 4 * KiB + 128 * KiB + 64 * KiB + 2 * 4 * KiB + 4 * KiB, { state: 'clean' }],
    ]);
    const status = await ok<{ bitmaps: Listed[] }>(['status', '--control', ctl]);
    expect(status.bitmaps.map((b) => [b.name, b.file, b.dirtyBytes])).toEqual(listed.map((b) => [b.name, b.file, b.dirtyBytes]));

    // enabling the disabled one marks it in use; it tracks from then on (as with QEMU, the image
    // says "auto" once it is stored)
    expect(await ok<{ changed: boolean }>(['bitmap', 'enable', '--control', ctl, '--name', 'off'])).toMatchObject({ changed: true });
    expect((await qemuBitmaps(img))[0]).toEqual({ name: 'off', granularity: 64 * KiB, flags: ['in-use'] });
    await qemuIo(uri, ['write -P 4 14M 4k']);
    const later: Run = { offset: 14 * MiB, length: 4 * KiB };
    expect(await mapOf(uri, 'off')).toEqual(entriesOf(model(SIZE, 64 * KiB, [...offBits, later])));

    expect(await served.stop('SIGTERM')).toBe(0);
    expect(await qemuBitmaps(img)).toEqual([
      { name: 'off', granularity: 64 * KiB, flags: ['auto'] },
      { name: 'b0', granularity: 64 * KiB, flags: ['auto'] },
      { name: 'b4', granularity: 4 * KiB, flags: ['auto'] },
    ]);
    await expectClean(img);
    // QEMU trusts what blkrep stored, bit for bit
    expect(await qemuMaps(img, ['off', 'b0', 'b4'])).toEqual({
      off: entriesOf(model(SIZE, 64 * KiB, [...offBits, later])),
      b0: entriesOf(model(SIZE, 64 * KiB, [...writes, later])),
      b4: entriesOf(model(SIZE, 4 * KiB, [...writes, later])),
    });
    // and records its own writes on top of them
    await tool('qemu-io', ['-f', 'qcow2', img, '-c', 'write 3M 4k']);
    expect((await qemuMaps(img, ['b0'])).b0).toEqual(entriesOf(model(SIZE, 64 * KiB, [...writes, later, { offset: 3 * MiB, length: 4 * KiB }])));
  });

  it('after kill -9 the bitmap stays in use: blkrep loads it all-dirty and says so, refuses to change it, and removes it', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    await tool('qemu-img', ['bitmap', '--add', img, 'b0']);
    await tool('qemu-img', ['bitmap', '--add', '--disable', img, 'off']);
    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'c.sock');
    const uri = `nbd+unix:///?socket=${sock}`;
    let served = await serve([img, '--socket', sock, '--control', ctl]);
    await qemuIo(uri, ['write -P 1 1M 4k']);
    expect(await served.stop('SIGKILL')).toBe(null);
    expect(await qemuBitmaps(img)).toEqual([
      { name: 'b0', granularity: 64 * KiB, flags: ['in-use', 'auto'] },
      { name: 'off', granularity: 64 * KiB, flags: [] },
    ]);
    // offline: listed all-dirty, only removable
    const offline = await ok<Listed[]>(['bitmap', 'list', img]);
    expect(offline[0]).toMatchObject({ name: 'b0', dirtyBytes: SIZE, loadState: { state: 'all-dirty', fault: 'in-use' } });

    served = await serve([img, '--socket', sock, '--control', ctl]);
    expect(loadsOf(served.listeningLine)).toEqual([
      { export: '', name: 'b0', file: img, state: 'all-dirty', created: false, reason: IN_USE_REASON, fault: 'in-use' },
      { export: '', name: 'off', file: img, state: 'clean', created: false },
    ]);
    expect(served.stderr()).toContain('dirty bitmap "b0"');
    expect(await mapOf(uri, 'b0')).toEqual([{ offset: 0, length: SIZE, type: 1, description: 'dirty' }]);
    // still in use in the image (blkrep does not make it consistent again), and not changeable
    expect((await qemuBitmaps(img))[0]).toEqual({ name: 'b0', granularity: 64 * KiB, flags: ['in-use', 'auto'] });
    for (const verb of [['clear'], ['fill', '--all'], ['disable']]) {
      await fails(['bitmap', ...verb, '--control', ctl, '--name', 'b0'], 1, 'ERR_BITMAP_IN_USE', /bitmap "b0" of qcow2 image .* is inconsistent \(flag in-use/);
    }
    expect(await ok<{ changed: boolean }>(['bitmap', 'remove', '--control', ctl, '--name', 'b0'])).toMatchObject({ changed: true });
    expect(await qemuBitmaps(img)).toEqual([{ name: 'off', granularity: 64 * KiB, flags: [] }]);
    await fails(['bitmap', 'dump', '--control', ctl, '--name', 'b0'], 1, 'ERR_BITMAP_NOT_FOUND');
    expect(await served.stop('SIGTERM')).toBe(0);
    expect(await qemuBitmaps(img)).toEqual([{ name: 'off', granularity: 64 * KiB, flags: [] }]);
    const check = await qemuCheck(img);
    expect({ corruptions: check.corruptions, checkErrors: check.checkErrors }).toEqual({ corruptions: 0, checkErrors: 0 });
  });

  it('a bitmap file of the same name as a qcow2 bitmap is refused at start, and the image is left as it was (not in use)', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    await tool('qemu-img', ['bitmap', '--add', img, 'b0']);
    await fails(['serve-nbd', img, '--socket', join(dir, 's.sock'), '--bitmap', `b0=${join(dir, 'b0.bitmap')}`], 1, 'ERR_BITMAP_EXISTS', /bitmap "b0" of export "" is a bitmap of the qcow2 image .* and the bitmap file .*b0\.bitmap too/);
    expect(await qemuBitmaps(img)).toEqual([{ name: 'b0', granularity: 64 * KiB, flags: ['auto'] }]);
    expect(existsSync(join(dir, 'b0.bitmap'))).toBe(false);
    await expectClean(img);
  });

  it('bitmaps changed behind its back (qemu-img bitmap while served): nothing is written over them, its own stay in use and it says why', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    await tool('qemu-img', ['bitmap', '--add', img, 'b0']);
    const sock = join(dir, 's.sock');
    const served = await serve([img, '--socket', sock]);
    await qemuIo(`nbd+unix:///?socket=${sock}`, ['write -P 1 1M 4k']);
    // the image lock keeps qemu-img out (as qemu-nbd's would) ...
    const refused = await run('qemu-img', ['bitmap', '--add', img, 'other'], { timeoutMs: 20_000 });
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain('Failed to get "write" lock');
    // ... unless told to ignore locks: then it changes the directory meanwhile
    await tool('qemu-img', ['bitmap', '--add', '--image-opts', `driver=qcow2,file.driver=file,file.filename=${img},file.locking=off`, 'other']);
    expect(await served.stop('SIGTERM')).toBe(0);
    expect(served.stderr()).toContain(
      `qcow2 image ${img}: storing its bitmaps failed (the bitmaps of qcow2 image ${img} were changed by another program while blkrep serves it (qemu-img bitmap or an offline blkrep bitmap command; use --control while it is served): blkrep leaves them as they are, its own stay in use); they stay in use, so they load all-dirty next time`,
    );
    expect(await qemuBitmaps(img)).toEqual([
      { name: 'b0', granularity: 64 * KiB, flags: ['in-use', 'auto'] },
      { name: 'other', granularity: 64 * KiB, flags: ['auto'] },
    ]);
    expect((await qemuCheck(img)).corruptions).toBe(0);
  });

  it('a read-write open drops autoclear bit 0 before its first request (not at open), unless the bitmaps were adopted first', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    await tool('qemu-img', ['bitmap', '--add', img, 'b0']);
    const bit0 = async (): Promise<bigint> => (await readFile(img)).readBigUInt64BE(88) & 1n;
    // opened and closed without a request: nothing was written, QEMU may keep trusting b0
    let node = await Qcow2Node.open(img);
    expect(await bit0()).toBe(1n);
    await node.close();
    expect(await bit0()).toBe(1n);
    // a first request (even a read) by a writer that does not track the bitmaps: the bit goes first
    node = await Qcow2Node.open(img);
    await node.read(0, 512);
    expect(await bit0()).toBe(0n);
    expect(node.image.adoptBitmaps()).toBe(false);
    await node.close();
    expect(await qemuBitmaps(img)).toEqual([]);
    // adopted before any request: kept (the caller, qcow2-live.ts, then marks the bitmaps in use and tracks them)
    const img2 = await image(dir, 'e.qcow2');
    await tool('qemu-img', ['bitmap', '--add', img2, 'b0']);
    node = await Qcow2Node.open(img2);
    expect(node.image.adoptBitmaps()).toBe(true);
    await node.write(0, Buffer.alloc(4096, 1));
    await node.close();
    expect((await readFile(img2)).readBigUInt64BE(88) & 1n).toBe(1n);
  });

  it('read-only: the bitmaps are offered as stored and nothing in the image changes', async () => {
    const dir = await makeTempDir();
    const img = await image(dir);
    await tool('qemu-img', ['bitmap', '--add', '-g', '4K', img, 'b0']);
    await tool('qemu-io', ['-f', 'qcow2', img, '-c', 'write 1M 4k', '-c', 'write 8M 8k']);
    const before = await readFile(img);
    const sock = join(dir, 's.sock');
    const served = await serve([img, '--read-only', '--socket', sock]);
    expect(loadsOf(served.listeningLine)).toEqual([{ export: '', name: 'b0', file: img, state: 'clean', created: false }]);
    expect(await qemuBitmaps(img)).toEqual([{ name: 'b0', granularity: 4 * KiB, flags: ['auto'] }]);
    expect(await mapOf(`nbd+unix:///?socket=${sock}`, 'b0')).toEqual(
      entriesOf(model(SIZE, 4 * KiB, [{ offset: MiB, length: 4 * KiB }, { offset: 8 * MiB, length: 8 * KiB }])),
    );
    expect(await served.stop('SIGTERM')).toBe(0);
    expect((await readFile(img)).equals(before)).toBe(true);
  });
});
