/**
 * The payload pool (src/nbd/buffer-pool.ts) keeps its bound and does not let one size starve
 * another: a pair's secondary received its initial copy in 256 KiB writes, kept 16 MiB of them,
 * and then allocated every 1 MiB payload afresh (a major GC every ~12 MiB received).
 */
import { describe, expect, it } from 'vitest';
import { BufferPool, IDLE_CHECK_EVERY, IDLE_TICKS } from '../../src/nbd/buffer-pool.js';
import { freeBufferNow } from '../../src/util/free-buffer.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('BufferPool', () => {
  it('reuses a 1 MiB buffer after a burst of 256 KiB buffers filled it', () => {
    const pool = new BufferPool(16 * MiB);
    const burst = Array.from({ length: 64 }, () => pool.acquire(256 * KiB));
    for (const b of burst) pool.release(b);
    expect(pool.pooledBytes).toBe(16 * MiB);
    expect(pool.freeCount(256 * KiB)).toBe(64);

    const first = pool.acquire(MiB);
    pool.release(first);
    expect(pool.freeCount(MiB)).toBe(1);
    expect(pool.freeCount(256 * KiB)).toBe(60); // four made room for it
    expect(pool.pooledBytes).toBe(16 * MiB);
    for (let i = 0; i < 10; i++) {
      const b = pool.acquire(MiB);
      expect(b).toBe(first);
      pool.release(b);
    }
    expect(pool.pooledBytes).toBe(16 * MiB);
  });

  it('keeps the bound: buffers of the same size never push each other out', () => {
    const pool = new BufferPool(4 * MiB);
    const bufs = Array.from({ length: 6 }, () => pool.acquire(MiB));
    for (const b of bufs) pool.release(b);
    expect(pool.freeCount(MiB)).toBe(4);
    expect(pool.pooledBytes).toBe(4 * MiB);
  });

  it('drops the least recently used size first', () => {
    const pool = new BufferPool(4 * MiB);
    const a = [pool.acquire(512 * KiB), pool.acquire(512 * KiB)]; // 1 MiB of 512 KiB
    const b = [pool.acquire(256 * KiB), pool.acquire(256 * KiB), pool.acquire(256 * KiB), pool.acquire(256 * KiB)]; // 1 MiB of 256 KiB
    const c = [pool.acquire(MiB), pool.acquire(MiB)];
    for (const x of [...a, ...b, ...c]) pool.release(x);
    expect(pool.pooledBytes).toBe(4 * MiB);
    pool.release(pool.acquire(256 * KiB)); // 256 KiB used last
    const big = pool.acquire(2 * MiB); // fresh: nothing of that size
    pool.release(big);
    // room for 2 MiB came from the 512 KiB buffers (least recently used), then the 1 MiB ones
    expect(pool.freeCount(2 * MiB)).toBe(1);
    expect(pool.freeCount(512 * KiB)).toBe(0);
    expect(pool.freeCount(256 * KiB)).toBe(4);
    expect(pool.freeCount(MiB)).toBe(1);
    expect(pool.pooledBytes).toBe(4 * MiB);
  });

  it('refuses a buffer larger than the bound', () => {
    const pool = new BufferPool(MiB);
    pool.release(pool.acquire(512 * KiB));
    pool.release(pool.acquire(2 * MiB));
    expect(pool.freeCount(2 * MiB)).toBe(0);
    expect(pool.freeCount(512 * KiB)).toBe(1);
  });

  it(`frees the buffers of a size not asked for in ${IDLE_TICKS} acquires and releases: a full copy's 256 KiB buffers do not stay for good`, () => {
    // bench/pair: a secondary kept 61 buffers of 256 KiB (15 MiB) from its full copy while it
    // received nothing but 4 KiB writes
    const pool = new BufferPool(16 * MiB);
    const burst = Array.from({ length: 64 }, () => pool.acquire(256 * KiB));
    for (const b of burst) pool.release(b);
    expect(pool.pooledBytes).toBe(16 * MiB);
    let small = 0;
    while (pool.freeCount(256 * KiB) > 0) {
      pool.release(pool.acquire(4 * KiB));
      small++;
      // an acquire and a release each: a tick each; the pool looks every IDLE_CHECK_EVERY acquires
      expect(small).toBeLessThanOrEqual(IDLE_TICKS / 2 + IDLE_CHECK_EVERY);
    }
    expect(small).toBeGreaterThan(IDLE_TICKS / 2 - 64);
    expect(pool.pooledBytes).toBe(4 * KiB);
    // freed at once, not left to a major GC: their memory was handed on (the buffers are empty)
    expect(burst.every((b) => b.length === 0)).toBe(true);
    // a size in use stays
    expect(pool.freeCount(4 * KiB)).toBe(1);
  });

  it('freeBufferNow empties a buffer that owns its memory, and leaves alone one cut from a shared slab', () => {
    const own = Buffer.allocUnsafeSlow(64 * KiB);
    const view = own.subarray(0, 10);
    expect(freeBufferNow(own)).toBe(true);
    expect(own.length).toBe(0);
    expect(view.length).toBe(0);
    // Node's 8 KiB pool: other buffers share its ArrayBuffer
    const a = Buffer.from('abc');
    const b = Buffer.from('def');
    expect(a.buffer.byteLength).toBeGreaterThan(a.length);
    expect(freeBufferNow(a)).toBe(false);
    expect(a.toString() + b.toString()).toBe('abcdef');
    expect(freeBufferNow(Buffer.allocUnsafeSlow(8 * KiB).subarray(1))).toBe(false);
  });
});
