// test-bitmap-activity-log: the hot-extent log under concurrent writers with every await
// interleaved at random by fast-check's scheduler (seeded). Checks the rules its safety rests on:
// - a write is let through only when all its extents are in a durable transaction;
// - no transaction drops an extent a write is still pinning;
// - no transaction drops an extent whose bits are not yet durable;
// - the hot set never exceeds its capacity, and every writer finishes (no deadlock).
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ActivityLog } from '../../src/bitmap/activity-log.js';

const SEED = 0xa1_106;

describe('activity log', () => {
  // look-ahead 0: DRBD's log; 1–4: a request that follows the previous one (sequential) gets extents after its own
  it.each([0, 4])('keeps every pinned and every not-yet-stored extent in the log, under any interleaving (look-ahead up to %i)', async (maxAhead) => {
    const EXTENTS = 43;
    await fc.assert(
      fc.asyncProperty(
        fc.scheduler(),
        fc.integer({ min: 1, max: 12 }),
        // [first extent, span − 1, follows the previous request]: the last makes sequential runs
        fc.array(fc.tuple(fc.integer({ min: 0, max: 40 }), fc.integer({ min: 0, max: 2 }), fc.boolean()), { minLength: 1, maxLength: 40 }),
        fc.integer({ min: 0, max: maxAhead }),
        async (s, capacity, raw, ahead) => {
          let prev = -1;
          const requests = raw.map(([first, span, follows]) => {
            const f = follows ? Math.min(40, prev + 1) : first;
            prev = f + span;
            return [f, span, follows] as const;
          });
          const perRequest = Math.max(1, Math.floor(capacity / 4));
          let snap = 0;
          let durable = 0;
          let durableSet = new Set<number>();
          const pinned = new Map<number, number>();
          const touched = new Map<number, number>();
          const problems: string[] = [];
          let commits = 0;
          const log = new ActivityLog(capacity, {
            async commit(extents) {
              const next = new Set(extents);
              if (next.size > capacity) problems.push(`transaction of ${next.size} extents > capacity ${capacity}`);
              for (const e of extents) if (e >= EXTENTS) problems.push(`extent ${e} beyond the disk's ${EXTENTS}`);
              for (const [e, n] of pinned) if (n > 0 && !next.has(e)) problems.push(`extent ${e} dropped while pinned`);
              for (const e of durableSet) if (!next.has(e) && (touched.get(e) ?? 0) > durable) problems.push(`extent ${e} dropped before its bits were stored`);
              await s.schedule(Promise.resolve(), `commit ${extents.join(',')}`);
              durableSet = next;
              commits++;
            },
            async syncBits() {
              const mine = ++snap;
              await s.schedule(Promise.resolve(), 'sync');
              durable = Math.max(durable, mine);
            },
            durableEpoch: () => durable,
          }, { extents: EXTENTS, ahead });
          const writers = requests.map(async ([first, span, sequential], i) => {
            await s.schedule(Promise.resolve(), `start ${i}`);
            const last = first + Math.min(span, perRequest - 1);
            // half the writers take the synchronous fast path first (as PersistentBitmap does)
            if (i % 2 === 0 || !log.tryAcquire(first, last)) {
              const wait = log.acquire(first, last, sequential);
              if (wait) await wait;
            }
            for (let e = first; e <= last; e++) {
              if (!durableSet.has(e)) problems.push(`write ${i} let through with extent ${e} not durable`);
              pinned.set(e, (pinned.get(e) ?? 0) + 1);
            }
            await s.schedule(Promise.resolve(), `write ${i}`);
            const epoch = snap + 1; // bits set now are stored by the next sync
            for (let e = first; e <= last; e++) {
              pinned.set(e, pinned.get(e)! - 1);
              touched.set(e, Math.max(touched.get(e) ?? 0, epoch));
            }
            log.release(first, last, epoch);
          });
          const all = Promise.all(writers);
          await s.waitFor(all);
          expect(problems).toEqual([]);
          expect(log.size).toBeLessThanOrEqual(capacity);
          expect(log.pinned()).toBe(0);
          expect(commits).toBeLessThanOrEqual(requests.length + 1);
        },
      ),
      { seed: SEED, numRuns: 300 },
    );
  });

  it('rejects the waiting writes when the log cannot be written, and works again afterwards', async () => {
    let fail = true;
    const log = new ActivityLog(4, {
      commit: async () => {
        if (fail) throw Object.assign(new Error('disk on fire'), { code: 'EIO' });
      },
      syncBits: async () => {},
      durableEpoch: () => 0,
    });
    await expect(Promise.all([log.acquire(0, 0), log.acquire(1, 1)])).rejects.toThrow(/disk on fire/);
    expect(log.size).toBe(0);
    expect(log.pinned()).toBe(0);
    fail = false;
    await log.acquire(0, 0);
    expect(log.hotExtents()).toEqual([0]);
    expect(log.acquire(0, 0)).toBeUndefined(); // hot: no wait
    expect(log.pinned()).toBe(2);
  });

  it('tryAcquire pins hot extents synchronously, changes nothing for cold ones, and counts as a use for the LRU', async () => {
    const commits: number[][] = [];
    const log = new ActivityLog(2, {
      commit: async (extents) => {
        commits.push(extents);
      },
      syncBits: async () => {},
      durableEpoch: () => 0,
    });
    expect(log.tryAcquire(0, 0)).toBe(false);
    expect([log.size, log.pinned(), commits.length]).toEqual([0, 0, 0]);
    await Promise.all([log.acquire(0, 0), log.acquire(1, 1)]);
    log.release(0, 0, 0);
    log.release(1, 1, 0);
    expect(log.tryAcquire(0, 1)).toBe(true);
    expect(log.pinned()).toBe(2);
    log.release(0, 1, 0);
    // extent 1 used after 0 by the two-extent pin; now use 0 alone: 1 is the least recently used
    expect(log.tryAcquire(0, 0)).toBe(true);
    log.release(0, 0, 0);
    expect(log.tryAcquire(2, 2)).toBe(false);
    expect(log.pinned()).toBe(0);
    await log.acquire(2, 2);
    expect(log.hotExtents()).toEqual([0, 2]);
    expect(commits.at(-1)).toEqual([0, 2]);
    expect(log.tryAcquire(1, 2)).toBe(false); // 1 was retired: nothing pinned for a partly cold range
    expect(log.pinned()).toBe(1);
  });

  it('look-ahead: a sequential writer pays one transaction per ahead + 1 extents; a write not sequential, none extra; never past the disk', async () => {
    const commits: number[][] = [];
    let syncs = 0;
    const log = new ActivityLog(
      16,
      {
        commit: async (extents) => {
          commits.push(extents);
        },
        syncBits: async () => {
          syncs++;
        },
        durableEpoch: () => 1_000, // every bit stored: any unpinned extent may be retired
      },
      { extents: 40, ahead: 3 },
    );
    // a sequential writer over the whole disk, two requests per extent, one in flight at a time
    for (let half = 0; half < 80; half++) {
      const e = half >> 1;
      if (!log.tryAcquire(e, e)) await log.acquire(e, e, e > 0);
      log.release(e, e, 1);
    }
    // extent 0 alone (the disk's first extent follows nothing), then 1–4, 5–8, … 37–39 (cut at the disk's end)
    expect(commits.length).toBe(11);
    expect(commits[0]).toEqual([0]);
    expect(commits[1]).toEqual([0, 1, 2, 3, 4]);
    expect(commits.at(-1)).toEqual(Array.from({ length: 16 }, (_, i) => 24 + i)); // the 16 most recently used
    expect(log.stats).toEqual({ transactions: 11, added: 40, retired: 24, evictionSyncs: 0, ahead: 29 });
    expect(log.size).toBeLessThanOrEqual(16);
    expect(syncs).toBe(0);
    // a write not called sequential: no look-ahead
    const before = log.stats.added;
    await log.acquire(10, 10);
    expect(log.stats.added - before).toBe(1);
    expect(log.hotExtents()).toContain(10);
    expect(log.hotExtents()).not.toContain(11);
    log.release(10, 10, 1);
  });

  it('look-ahead never waits for a bitmap sync nor retires a pinned extent: a full log of unstored or pinned extents gets none', async () => {
    const commits: number[][] = [];
    let durable = 0;
    const log = new ActivityLog(
      4,
      {
        commit: async (extents) => {
          commits.push(extents);
        },
        syncBits: async () => {
          durable = 5;
        },
        durableEpoch: () => durable,
      },
      { extents: 100, ahead: 3 },
    );
    await log.acquire(0, 0); // [0], pinned from here on
    await log.acquire(1, 1, true); // sequential: 2, 3, 4 ahead, as far as the room goes
    expect(commits).toEqual([[0], [0, 1, 2, 3]]);
    expect(log.stats.ahead).toBe(2);
    // 2 and 3 were added ahead, never written (their bits are stored: retirable without a sync)
    log.release(1, 1, 5); // 1 written, its bits not stored yet (epoch 5 > durable 0)
    await log.acquire(4, 4, true); // 2 retired for 4 (least recently used), 3 for one extent ahead (5)
    expect(commits.at(-1)).toEqual([0, 1, 4, 5]); // kept: 0 (pinned) and 1 (bits not stored)
    expect(log.stats).toMatchObject({ evictionSyncs: 0, ahead: 3, retired: 2 });
    expect(durable).toBe(0); // no bitmap sync was asked
  });
});
