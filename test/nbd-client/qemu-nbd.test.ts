/**
 * copy-nbd-to-file, as libnbd would name it: NbdNode against qemu-nbd serving a raw file. Data
 * written through the client is compared with the file itself; extents with `nbdinfo --map`;
 * multi-conn with `-e 4`; allocation depth with `-A`; read-only with `-r`; reconnect after a
 * restart of qemu-nbd (held requests succeed), and the typed error when it stays down.
 */
import { open as openFile, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdNode } from '../../src/block/nbd.js';
import { TF } from '../../src/nbd/constants.js';
import { hasTool, makeTempDir, run } from '../support/spawn.js';
import { nextEvent, pattern, rejection, startQemuNbd } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const nodes: NbdNode[] = [];

afterEach(async () => {
  for (const n of nodes.splice(0)) await n.close();
});

async function open(uri: string, options: Parameters<typeof NbdNode.open>[1] = {}): Promise<NbdNode> {
  const n = await NbdNode.open(uri, { closeTimeoutMs: 5000, ...options });
  nodes.push(n);
  return n;
}

/** A sparse raw file with data at the given [offset, length, byte] runs. */
async function sparseFile(size: number, runs: Array<[number, number, number]>): Promise<string> {
  const file = join(await makeTempDir(), 'disk.raw');
  await writeFile(file, '');
  await truncate(file, size);
  const fh = await openFile(file, 'r+');
  try {
    for (const [off, len, fill] of runs) await fh.write(Buffer.alloc(len, fill), 0, len, off);
  } finally {
    await fh.close();
  }
  return file;
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

/** Per 4 KiB block, the type of the run covering it. */
function perBlock(runs: Array<{ offset: number; length: number; type: number }>, size: number): number[] {
  const out = new Array<number>(size / 4096).fill(-1);
  for (const r of runs) for (let b = r.offset / 4096; b < (r.offset + r.length) / 4096 && b < out.length; b++) out[b] = r.type;
  return out;
}

async function allExtents(node: NbdNode): Promise<Array<{ offset: number; length: number; type: number; depth?: number }>> {
  const out: Array<{ offset: number; length: number; type: number; depth?: number }> = [];
  for (let at = 0; at < node.size; ) {
    const runs = await node.extents(at, node.size - at);
    for (const r of runs) {
      out.push({ offset: at, length: r.length, type: (r.hole ? 1 : 0) | (r.zero ? 2 : 0), ...(r.depth !== undefined ? { depth: r.depth } : {}) });
      at += r.length;
    }
  }
  return out;
}

describe.skipIf(!hasTool('qemu-nbd') || !hasTool('nbdinfo'))('NbdNode against qemu-nbd', () => {
  it('read/write/zero/trim/flush round trips match the file byte for byte', async () => {
    const size = 4 * MiB;
    const file = await sparseFile(size, []);
    const q = await startQemuNbd(file, ['--discard=unmap', '--cache=writeback']);
    const node = await open(q.uri);
    expect(node.size).toBe(size);
    expect(node.client.info.structured).toBe(true);
    expect(node.caps).toMatchObject({ canWrite: true, canFlush: true, canFua: true, canTrim: true, canZero: true, canExtents: true });
    const model = Buffer.alloc(size);
    const a = pattern(300 * KiB + 7, 1);
    await node.write(12345, a);
    a.copy(model, 12345);
    const b = pattern(64 * KiB, 2);
    await node.write(2 * MiB, b, { fua: true });
    b.copy(model, 2 * MiB);
    await node.writeZeroes(100 * KiB, 50 * KiB);
    model.fill(0, 100 * KiB, 150 * KiB);
    await node.writeZeroes(2 * MiB + 4 * KiB, 8 * KiB, { noHole: true });
    model.fill(0, 2 * MiB + 4 * KiB, 2 * MiB + 12 * KiB);
    await node.trim(3 * MiB, 512 * KiB); // nothing was written there: reads back as zeros either way
    await node.flush();
    expect((await node.read(0, size)).equals(model)).toBe(true);
    expect((await readFile(file)).equals(model)).toBe(true);
  });

  it('extents equal nbdinfo --map', async () => {
    const size = 8 * MiB;
    const file = await sparseFile(size, [[1 * MiB, 64 * KiB, 0xa1], [4 * MiB, 192 * KiB, 0xb2], [size - 64 * KiB, 64 * KiB, 0xc3]]);
    const q = await startQemuNbd(file);
    const node = await open(q.uri);
    const r = await run('nbdinfo', ['--map', '--json', q.uri], { timeoutMs: 15_000 });
    expect(r.code, r.stderr).toBe(0);
    const theirs = JSON.parse(r.stdout) as MapEntry[];
    const ours = await allExtents(node);
    expect(perBlock(ours, size)).toEqual(perBlock(theirs, size));
    expect(ours.some((e) => e.type === 3)).toBe(true);
    expect(ours.some((e) => e.type === 0)).toBe(true);
  });

  it('qemu:allocation-depth (-A) equals nbdinfo --map=qemu:allocation-depth', async () => {
    const size = 4 * MiB;
    const file = await sparseFile(size, [[1 * MiB, 128 * KiB, 1]]);
    const q = await startQemuNbd(file, ['-A']);
    const node = await open(q.uri, { allocationDepth: true });
    expect([...node.client.info.contexts.values()].sort()).toEqual(['base:allocation', 'qemu:allocation-depth']);
    const r = await run('nbdinfo', ['--map=qemu:allocation-depth', '--json', q.uri], { timeoutMs: 15_000 });
    expect(r.code, r.stderr).toBe(0);
    const theirs = (JSON.parse(r.stdout) as MapEntry[]).map((e) => ({ ...e, type: e.type }));
    const ours = (await allExtents(node)).map((e) => ({ offset: e.offset, length: e.length, type: e.depth! }));
    expect(ours.every((e) => e.type !== undefined)).toBe(true);
    expect(perBlock(ours, size)).toEqual(perBlock(theirs, size));
    const raw = await node.metaContextStatus('qemu:allocation-depth', 1 * MiB, 4096);
    expect(raw[0]!.flags).toBe(perBlock(theirs, size)[256]);
  });

  it('qemu:dirty-bitmap:NAME (-B) through metaContextStatus', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'b.qcow2');
    for (const args of [['create', '-q', '-f', 'qcow2', image, '4M'], ['bitmap', '--add', image, 'b0']]) {
      const r = await run('qemu-img', args);
      expect(r.code, r.stderr).toBe(0);
    }
    const w = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 1M 64k', image]);
    expect(w.code, w.stderr).toBe(0);
    const q = await startQemuNbd(image, ['-B', 'b0'], { format: 'qcow2' });
    const node = await open(q.uri, { metaContexts: ['base:allocation', 'qemu:dirty-bitmap:b0'] });
    const runs = await node.metaContextStatus('qemu:dirty-bitmap:b0', 0, node.size);
    expect(runs).toEqual([
      { length: 1 * MiB, flags: 0 },
      { length: 64 * KiB, flags: 1 },
      { length: 4 * MiB - 1 * MiB - 64 * KiB, flags: 0 },
    ]);
    const inside = await node.metaContextStatus('qemu:dirty-bitmap:b0', 1 * MiB + 100, 10);
    expect(inside[0]!.flags).toBe(1);
    expect(inside[0]!.length).toBeGreaterThanOrEqual(10); // from the offset asked, not the block start
    expect(inside[0]!.length).toBeLessThanOrEqual(64 * KiB - 100);
    expect((await rejection(node.metaContextStatus('qemu:dirty-bitmap:nope', 0, 512))).code).toBe('ERR_NBD_UNSUPPORTED');
  });

  it('multi-conn (-e 4): four connections, many requests in flight, out-of-order completion', async () => {
    const size = 16 * MiB;
    const file = await sparseFile(size, []);
    const q = await startQemuNbd(file, ['-e', '4']); // the last -e wins
    const node = await open(q.uri, { connections: 4 });
    expect(node.client.info.flags & TF.CAN_MULTI_CONN).toBeTruthy();
    expect(node.client.connectedCount).toBe(4);
    const n = 512;
    await Promise.all(Array.from({ length: n }, (_, i) => node.write(i * 8 * KiB, pattern(8 * KiB, i))));
    await node.flush();
    const bufs = await Promise.all(Array.from({ length: n }, (_, i) => node.read(i * 8 * KiB, 8 * KiB)));
    bufs.forEach((b, i) => expect(b.equals(pattern(8 * KiB, i))).toBe(true));
    const onDisk = await readFile(file);
    for (let i = 0; i < n; i += 51) expect(onDisk.subarray(i * 8 * KiB, (i + 1) * 8 * KiB).equals(pattern(8 * KiB, i))).toBe(true);
  });

  it('read-only export (-r): caps say so and writes are refused without being sent', async () => {
    const file = await sparseFile(MiB, [[0, 4096, 7]]);
    const q = await startQemuNbd(file, ['-r']);
    const node = await open(q.uri);
    expect(node.caps.canWrite).toBe(false);
    expect((await rejection(node.write(0, Buffer.alloc(1)))).code).toBe('ERR_READ_ONLY');
    expect((await node.read(0, 4096)).every((b) => b === 7)).toBe(true);
  });

  it('a named export (-x) and the URI export name', async () => {
    const file = await sparseFile(MiB, []);
    const q = await startQemuNbd(file, [], { exportName: 'my disk' });
    const node = await open(q.uri);
    expect(node.client.info.name).toBe('my disk');
    const err = await rejection(NbdNode.open(q.uri.replace('my%20disk', 'other')));
    expect(err.code).toBe('ERR_NBD_NO_EXPORT');
  });

  it('qemu-nbd restarted within holdMs: held requests succeed; not restarted: a typed error', async () => {
    const file = await sparseFile(MiB, []);
    let q = await startQemuNbd(file);
    const node = await open(q.uri, { holdMs: 8000, backoff: { initialMs: 20, maxMs: 200 } });
    await node.write(0, Buffer.alloc(4096, 5), { fua: true });
    const disconnected = nextEvent(node.client, 'disconnected');
    await q.proc.stop('SIGTERM');
    await disconnected;
    const held = node.write(4096, Buffer.alloc(4096, 6), { fua: true });
    const heldRead = node.read(0, 4096);
    await nextEvent(node.client, 'retrying');
    const back = nextEvent(node.client, 'reconnected'); // before the restart: it may come back at once
    q = await startQemuNbd(file, [], { socket: q.socket });
    await back;
    await held;
    expect((await heldRead).every((b) => b === 5)).toBe(true);
    const onDisk = await readFile(file);
    expect(onDisk.subarray(4096, 8192).every((b) => b === 6)).toBe(true);

    // now it stays down
    const node2 = await open(q.uri, { holdMs: 300, backoff: { initialMs: 20, maxMs: 100 } });
    const down = nextEvent(node2.client, 'disconnected');
    await q.proc.stop('SIGTERM');
    await down;
    const err = await rejection(node2.read(0, 512));
    expect(err).toMatchObject({ code: 'ERR_NBD_DISCONNECTED', errno: 'EIO' });
  });
});
