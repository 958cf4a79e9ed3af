/**
 * The server's buffer budget on its own: the allowance, first come first served, a waiter that
 * asks again goes to the back, a waiter that leaves makes room for the next.
 */
import { describe, expect, it } from 'vitest';
import { BufferBudget, type BudgetWaiter } from '../../src/nbd/server-budget.js';

const MiB = 1024 * 1024;

function waiter(log: string[], name: string, onGrant?: (bytes: number) => void): BudgetWaiter {
  return {
    granted(bytes) {
      log.push(`${name}:${bytes}`);
      onGrant?.(bytes);
    },
  };
}

describe('BufferBudget', () => {
  it('a connection within its allowance never waits, even over the limit', () => {
    const b = new BufferBudget(32 * MiB, 256 * 1024);
    const log: string[] = [];
    expect(b.reserve(waiter(log, 'a'), 0, 32 * MiB)).toBe(true);
    expect(b.reserve(waiter(log, 'b'), 0, 4096)).toBe(true);
    expect(b.reserve(waiter(log, 'b'), 4096, 252 * 1024)).toBe(true);
    expect(b.used).toBe(32 * MiB + 256 * 1024);
    expect(b.reserve(waiter(log, 'b'), 256 * 1024, 1)).toBe(false);
    expect(b.status()).toEqual({ limit: 32 * MiB, used: 32 * MiB + 256 * 1024, allowance: 256 * 1024, waiting: 1 });
  });

  it('waiters are served in order; a large one is not overtaken by small ones that arrive later', () => {
    const b = new BufferBudget(32 * MiB, 0);
    const log: string[] = [];
    expect(b.reserve(waiter(log, 'holder'), 0, 30 * MiB)).toBe(true);
    expect(b.reserve(waiter(log, 'big'), 0, 16 * MiB)).toBe(false);
    // 1 MiB would fit, but someone is waiting: it queues behind
    expect(b.reserve(waiter(log, 'small'), 0, MiB)).toBe(false);
    b.release(10 * MiB); // 20 MiB used: big (16) does not fit yet, small must not pass it
    expect(log).toEqual([]);
    b.release(20 * MiB);
    expect(log).toEqual([`big:${16 * MiB}`, `small:${MiB}`]);
    expect(b.used).toBe(17 * MiB);
    expect(b.waiting).toBe(0);
  });

  it('a waiter that reserves again from granted() goes to the back of the line', () => {
    const b = new BufferBudget(32 * MiB, 0);
    const log: string[] = [];
    expect(b.reserve(waiter(log, 'holder'), 0, 32 * MiB)).toBe(true);
    let greedyAsks = 0;
    const greedy: BudgetWaiter = waiter(log, 'greedy', () => {
      if (greedyAsks++ < 1) expect(b.reserve(greedy, 16 * MiB, 16 * MiB)).toBe(false);
    });
    expect(b.reserve(greedy, 0, 16 * MiB)).toBe(false);
    expect(b.reserve(waiter(log, 'other'), 0, 16 * MiB)).toBe(false);
    b.release(32 * MiB);
    // greedy got 16, asked for 16 more and queued behind other, which got the rest
    expect(log).toEqual([`greedy:${16 * MiB}`, `other:${16 * MiB}`]);
    expect(b.waiting).toBe(1);
    b.release(16 * MiB);
    expect(log.at(-1)).toBe(`greedy:${16 * MiB}`);
  });

  it('a waiter that leaves the line lets the next one in; adjust charges and gives back reply bytes', () => {
    const b = new BufferBudget(32 * MiB, 0);
    const log: string[] = [];
    expect(b.reserve(waiter(log, 'holder'), 0, 20 * MiB)).toBe(true);
    const gone = waiter(log, 'gone');
    expect(b.reserve(gone, 0, 32 * MiB)).toBe(false);
    expect(b.reserve(waiter(log, 'next'), 0, 8 * MiB)).toBe(false);
    b.forget(gone);
    expect(log).toEqual([`next:${8 * MiB}`]);
    b.adjust(4 * MiB);
    expect(b.used).toBe(32 * MiB);
    expect(b.reserve(waiter(log, 'late'), 0, MiB)).toBe(false);
    b.adjust(-4 * MiB);
    expect(log.at(-1)).toBe(`late:${MiB}`);
    expect(b.used).toBe(29 * MiB);
  });
});
