/**
 * Bytes for the pair's attack tests: a seeded pattern, a digest, and a whole export read over NBD
 * (test/pair/attack-*.test.ts).
 */
import { createHash } from 'node:crypto';
import { seededRandom as rng } from '../../src/block/filters/error.js';
import { NbdClient } from '../../src/nbd/client.js';

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
