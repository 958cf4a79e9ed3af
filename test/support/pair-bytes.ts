/**
 * Bytes for the pair's tests: a seeded pattern, a stamped block, a digest, a whole export read over
 * NBD, a write made durable, a file comparison and a salvage overlay's check (test/pair/*.test.ts).
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { seededRandom as rng } from '../../src/block/filters/error.js';
import { NbdClient } from '../../src/nbd/client.js';
import { run, unixUri } from './spawn.js';

export function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** `length` seeded pseudo-random bytes (the same seed, the same bytes) */
export function pattern(seed: number, length: number): Buffer {
  const r = rng(seed);
  const b = Buffer.alloc(Math.ceil(length / 4) * 4);
  for (let i = 0; i < b.length; i += 4) b.writeUInt32LE(Math.floor(r() * 0x100000000) >>> 0, i);
  return b.subarray(0, length);
}

/** the first `size` bytes of the export at `uri`, read in `chunk`-sized requests */
export async function readExport(uri: string, size: number, chunk: number): Promise<Buffer> {
  const c = await NbdClient.connect({ uri, reconnect: false, closeTimeoutMs: 2000 });
  try {
    const b = Buffer.alloc(size);
    for (let at = 0; at < size; at += chunk) await c.read(at, b.subarray(at, Math.min(size, at + chunk)));
    return b;
  } finally {
    await c.close();
  }
}

/** `length` bytes of `byte` written at `offset` through the NBD server on `socket`, then a FLUSH */
export async function writeFlushed(socket: string, offset: number, byte: number, length: number): Promise<void> {
  const c = await NbdClient.connect({ uri: unixUri(socket), reconnect: false, closeTimeoutMs: 2000 });
  try {
    await c.write(offset, Buffer.alloc(length, byte));
    await c.flush();
  } finally {
    await c.close().catch(() => {});
  }
}

/**
 * A `block`-byte block stamped with (offset, version) every 16 bytes (the random-writer tests'
 * pattern: each block says where it belongs and which write put it there); version 0 is zeros.
 */
export function stamp(offset: number, version: number, block = 4096): Buffer {
  const b = Buffer.alloc(block);
  if (version === 0) return b;
  for (let i = 0; i < block; i += 16) {
    b.writeBigUInt64BE(BigInt(offset), i);
    b.writeUInt32BE(version, i + 8);
    b.writeUInt32BE(0x5eed5eed, i + 12);
  }
  return b;
}

/** `cmp`'s exit code for two files (0: equal) */
export async function cmp(x: string, y: string): Promise<number> {
  return (await run('cmp', [x, y])).code ?? -1;
}

/**
 * A split brain's salvage overlay maps exactly the clusters `union` (offsets, `cluster` bytes each)
 * and holds the loser's bytes there: `before` is a copy of the loser's disk taken before the resync.
 * The overlay is converted to raw in `dir` (qemu-img map, convert, cmp).
 */
export async function expectSalvage(overlay: string, union: number[], cluster: number, before: string, dir: string): Promise<void> {
  const map = JSON.parse((await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', overlay])).stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>;
  const mapped: number[] = [];
  for (const e of map) if (e.depth === 0 && e.data) for (let o = e.start; o < e.start + e.length; o += cluster) mapped.push(o);
  expect(mapped).toEqual(union);
  const raw = join(dir, 'salvaged.raw');
  expect((await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay, raw])).code).toBe(0);
  expect(await cmp(raw, before)).toBe(0);
  // the overlay's own clusters are the loser's bytes (not the winner's through the backing file)
  const ov = await readFile(raw);
  const old = await readFile(before);
  for (const o of union) expect(ov.subarray(o, o + cluster).equals(old.subarray(o, o + cluster))).toBe(true);
}

/** The secondary's view export (`view` on its Unix socket), read whole with nbdcopy into DIR/view-TAG.raw. */
export async function readView(dir: string, socket: string, tag: string): Promise<Buffer> {
  const out = join(dir, `view-${tag}.raw`);
  const r = await run('nbdcopy', [`nbd+unix:///view?socket=${socket}`, out]);
  expect(r.code, r.stderr).toBe(0);
  return readFile(out);
}
