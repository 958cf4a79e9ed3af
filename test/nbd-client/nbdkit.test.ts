/**
 * NbdNode against nbdkit as reference server and fault injector (checklist items 38–41):
 * plain memory plugin; --no-sr (simple replies only); --mask-handshake=0 (EXPORT_NAME only);
 * blocksize-policy with blocksize-error-policy=error (any misaligned or oversize request would
 * fail with EINVAL); the error filter (injected EIO/ENOSPC are typed errors and the connection
 * stays); the delay filter (slow replies, pipelining, abort); nozero and log (emulation, and what
 * actually goes on the wire).
 */
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isAbortError } from '../../src/api/errors.js';
import { NbdNode } from '../../src/block/nbd.js';
import { TF } from '../../src/nbd/constants.js';
import { hasTool, makeTempDir } from '../support/spawn.js';
import { pattern, rejection, startNbdkit } from './helpers.js';

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

/** xorshift */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** Unaligned random writes, zeroes and trims against a model; a full compare at the end. */
async function workload(node: NbdNode, seed: number, ops: number, maxLen: number): Promise<void> {
  const model = Buffer.alloc(node.size);
  const r = rng(seed);
  const pending: Array<Promise<void>> = [];
  for (let i = 0; i < ops; i++) {
    const len = 1 + Math.floor(r() * maxLen);
    // disjoint slots so that concurrent operations never overlap
    const slot = node.size / ops;
    const off = Math.floor(i * slot + r() * Math.max(1, slot - len));
    const l = Math.min(len, Math.floor((i + 1) * slot) - off);
    const kind = r();
    if (kind < 0.6) {
      const data = pattern(l, seed * 7919 + i);
      data.copy(model, off);
      pending.push(node.write(off, data, { fua: r() < 0.1 }));
    } else if (kind < 0.85) {
      model.fill(0, off, off + l);
      pending.push(node.writeZeroes(off, l));
    } else {
      model.fill(0, off, off + l); // memory plugin: trimmed bytes read as zeros
      pending.push(node.trim(off, l));
    }
  }
  await Promise.all(pending);
  await node.flush();
  const got = await node.read(0, node.size);
  for (let at = 0; at < node.size; at += 64 * KiB) {
    if (!got.subarray(at, at + 64 * KiB).equals(model.subarray(at, at + 64 * KiB))) {
      throw new Error(`contents differ from the model in the 64 KiB at ${at}`);
    }
  }
}

describe.skipIf(!hasTool('nbdkit'))('NbdNode against nbdkit', () => {
  it('memory plugin: structured replies, base:allocation, a concurrent unaligned workload', async () => {
    const k = await startNbdkit(['memory', '16M']);
    const node = await open(k.uri);
    expect(node.client.info).toMatchObject({ structured: true, viaExportName: false });
    expect([...node.client.info.contexts.values()]).toEqual(['base:allocation']);
    await workload(node, 1, 200, 100 * KiB);
    const ext = await node.extents(0, node.size);
    expect(ext.reduce((n, e) => n + e.length, 0)).toBe(node.size);
  });

  it('--no-sr: simple replies only, no block status, extents say "data"', async () => {
    const k = await startNbdkit(['--no-sr', 'memory', '8M']);
    const node = await open(k.uri);
    expect(node.client.info.structured).toBe(false);
    expect(node.caps.canExtents).toBe(false);
    expect(await node.extents(0, node.size)).toEqual([{ length: node.size, hole: false, zero: false }]);
    await workload(node, 2, 100, 100 * KiB);
  });

  it('--mask-handshake=0: plain newstyle, EXPORT_NAME, no NO_ZEROES (item 38)', async () => {
    const k = await startNbdkit(['--mask-handshake=0', 'memory', '8M']);
    const node = await open(k.uri);
    expect(node.client.info).toMatchObject({ fixedNewstyle: false, noZeroes: false, viaExportName: true, structured: false });
    expect(node.client.info.blockSize).toBeUndefined();
    await workload(node, 3, 100, 100 * KiB);
  });

  it('blocksize-policy with error policy: minimum 4096, maximum 64K obeyed (item 39)', async () => {
    const k = await startNbdkit([
      '--filter=blocksize-policy', 'memory', '8M',
      'blocksize-error-policy=error', 'blocksize-minimum=4096', 'blocksize-preferred=16384', 'blocksize-maximum=65536',
    ]);
    const node = await open(k.uri);
    expect(node.limits).toEqual({ minimum: 4096, preferred: 16384, maximum: 65536 });
    await workload(node, 4, 150, 200 * KiB);
    // one big unaligned read and write, far over the maximum payload
    const data = pattern(MiB + 333, 9);
    await node.write(12345, data);
    expect((await node.read(12345, data.length)).equals(data)).toBe(true);
    const ext = await node.extents(5, 100);
    expect(ext.length).toBeGreaterThan(0);
    await node.cache(1, 10);
  });

  it('error filter: injected EIO and ENOSPC fail only their request, typed; the connection stays (item 41)', async () => {
    const dir = await makeTempDir();
    const preadFile = join(dir, 'pread');
    const pwriteFile = join(dir, 'pwrite');
    const k = await startNbdkit([
      '--filter=error', 'memory', '8M',
      'error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${preadFile}`,
      'error-pwrite=ENOSPC', 'error-pwrite-rate=100%', `error-pwrite-file=${pwriteFile}`,
    ]);
    const node = await open(k.uri);
    let disconnects = 0;
    node.client.on('disconnected', () => disconnects++);
    await node.write(0, Buffer.alloc(4096, 1));
    await writeFile(preadFile, '');
    const e1 = await rejection(node.read(0, 4096));
    expect(e1).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'EIO' });
    expect(e1.message).toMatch(/read of 4096 bytes at offset 0 failed on the server: EIO \(5\)/);
    await rm(preadFile);
    expect((await node.read(0, 4096)).every((b) => b === 1)).toBe(true);
    await writeFile(pwriteFile, '');
    const e2 = await rejection(node.write(8192, Buffer.alloc(4096, 2)));
    expect(e2).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'ENOSPC' });
    await rm(pwriteFile);
    await node.write(8192, Buffer.alloc(4096, 2));
    expect(disconnects).toBe(0);
    expect(node.client.state).toBe('READY');
  });

  it('error filter with --no-sr: the errno comes in a simple reply', async () => {
    const k = await startNbdkit(['--no-sr', '--filter=error', 'memory', '1M', 'error=EIO', 'error-pread-rate=100%']);
    const node = await open(k.uri);
    const err = await rejection(node.read(0, 512));
    expect(err).toMatchObject({ code: 'ERR_NBD_SERVER_ERROR', errno: 'EIO' });
    await node.write(0, Buffer.alloc(512, 3));
  });

  it('delay filter: slow replies are pipelined, and an abort leaves the connection usable', async () => {
    const k = await startNbdkit(['--filter=delay', 'memory', '8M', 'delay-read=300ms']);
    const node = await open(k.uri);
    const t0 = Date.now();
    await Promise.all(Array.from({ length: 16 }, (_, i) => node.read(i * 4096, 4096)));
    const elapsed = Date.now() - t0;
    expect(elapsed).toBeGreaterThanOrEqual(290);
    expect(elapsed).toBeLessThan(16 * 300 / 2); // in flight together, not one after another
    const ac = new AbortController();
    const slow = node.read(0, 4096, { signal: ac.signal });
    setTimeout(() => ac.abort(), 50);
    const t1 = Date.now();
    expect(isAbortError(await rejection(slow))).toBe(true);
    expect(Date.now() - t1).toBeLessThan(250);
    await node.write(0, Buffer.alloc(4096, 4));
    expect((await node.read(0, 4096)).every((b) => b === 4)).toBe(true);
    expect(node.client.state).toBe('READY');
  });

  it('nozero filter: write-zeroes is emulated by writes, never sent; the log shows the wire', async () => {
    const dir = await makeTempDir();
    const log = join(dir, 'log.txt');
    const k = await startNbdkit(['--filter=log', '--filter=nozero', 'memory', '1M', 'zeromode=none', `logfile=${log}`]);
    const node = await open(k.uri);
    expect(node.client.info.flags & TF.SEND_WRITE_ZEROES).toBe(0);
    expect(node.caps.canFastZero).toBe(false);
    await node.write(0, Buffer.alloc(64 * KiB, 9));
    await node.writeZeroes(4096, 8192);
    expect((await rejection(node.writeZeroes(0, 4096, { fast: true }))).errno).toBe('ENOTSUP');
    const got = await node.read(0, 16384);
    expect(got.subarray(4096, 12288).every((b) => b === 0)).toBe(true);
    expect(got.subarray(12288).every((b) => b === 9)).toBe(true);
    await node.close();
    nodes.length = 0;
    const text = await readFile(log, 'utf8');
    expect(text).not.toMatch(/ Zero /);
    expect(text).toMatch(/Write id=\d+ offset=0x1000 count=0x2000/);
  });

  it('multi-conn: nbdkit sees four connections', async () => {
    const dir = await makeTempDir();
    const log = join(dir, 'log.txt');
    const k = await startNbdkit(['--filter=log', 'memory', '8M', `logfile=${log}`]);
    const node = await open(k.uri, { connections: 4 });
    expect(node.caps.canMultiConn).toBe(true);
    await Promise.all(Array.from({ length: 64 }, (_, i) => node.write(i * 4096, pattern(4096, i))));
    await node.flush();
    await node.close();
    nodes.length = 0;
    const text = await readFile(log, 'utf8');
    const connections = new Set([...text.matchAll(/connection=(\d+) Write/g)].map((m) => m[1]));
    expect(connections.size).toBe(4);
    expect(text.match(/ Flush /g)?.length).toBe(1);
  });
});
