/**
 * Failure detectors and the peer monitor on a fake clock (replication.md §7 B.9): time is a
 * number the test advances; no timers, no sleeps.
 */
import { describe, expect, it } from 'vitest';
import { FixedDetector, PhiDetector, phiOf } from '../../src/heartbeat/detector.js';
import { PeerMonitor, type PeerEvent } from '../../src/heartbeat/monitor.js';
import { seededRandom as prng } from '../../src/block/filters/error.js';


/** The first instant, stepping 1 ms from `from`, at which `dead` holds (bounded). */
function firstDead(dead: (now: number) => boolean, from: number, limit = 10_000): number {
  for (let t = from; t < from + limit; t++) if (dead(t)) return t;
  throw new Error(`not dead within ${limit} ms`);
}

describe('fixed detector', () => {
  it('100 ms × 5 declares dead in [500, 600) ms after the last beat, and not before', () => {
    const d = new FixedDetector({ intervalMs: 100, misses: 5 });
    expect(d.state(0)).toBe('unknown');
    let now = 0;
    for (let i = 0; i < 50; i++) {
      d.heartbeat(now);
      now += 100;
      expect(d.state(now - 1)).toBe('alive');
    }
    const last = now - 100;
    const dead = firstDead((t) => d.state(t) === 'dead', last);
    expect(dead - last).toBeGreaterThanOrEqual(500);
    expect(dead - last).toBeLessThan(600);
    // one beat over an interval late is suspect, not yet dead
    expect(d.state(last + 250)).toBe('suspect');
    expect(d.state(last + 199)).toBe('alive');
    d.heartbeat(last + 700);
    expect(d.state(last + 700)).toBe('alive');
  });
});

describe('phi-accrual detector', () => {
  it('100 ms ± 10 ms jitter: no suspicion in 10^4 beats, and dead less than 1 s after silence', () => {
    const seed = 0x5eed12;
    const random = prng(seed);
    const d = new PhiDetector({ intervalMs: 100 });
    let now = 1_000;
    let suspicions = 0;
    let maxPhi = 0;
    for (let i = 0; i < 10_000; i++) {
      d.heartbeat(now);
      const gap = 90 + random() * 20;
      // sample φ along the gap, as the daemon's timer would, up to the next beat's arrival
      for (let t = now + 10; t < now + gap; t += 10) {
        if (d.state(t) !== 'alive') suspicions++;
        maxPhi = Math.max(maxPhi, d.phi(t));
      }
      now += gap;
    }
    expect({ seed, suspicions }).toEqual({ seed, suspicions: 0 });
    expect(maxPhi).toBeLessThan(1);
    const last = d.lastBeat!;
    const dead = firstDead((t) => d.state(t) === 'dead', last);
    expect(dead - last).toBeGreaterThan(300);
    expect(dead - last).toBeLessThan(1_000);
  });

  it('the threshold moves detection: 12 is later than 8, and both are above the mean', () => {
    const at = (threshold: number): number => {
      const d = new PhiDetector({ intervalMs: 100, threshold });
      for (let t = 0; t <= 10_000; t += 100) d.heartbeat(t);
      return firstDead((t) => d.state(t) === 'dead', 10_000) - 10_000;
    };
    const eight = at(8);
    const twelve = at(12);
    expect(eight).toBeGreaterThan(100);
    expect(twelve).toBeGreaterThan(eight);
  });

  it('an acceptable pause is added to the mean: a 2 s pause is no suspicion with pause 3 s', () => {
    const d = new PhiDetector({ intervalMs: 100, acceptablePauseMs: 3_000 });
    for (let t = 0; t <= 5_000; t += 100) d.heartbeat(t);
    expect(d.state(7_000)).toBe('alive');
    expect(d.state(5_000 + 3_100 + 1_000)).toBe('dead');
  });

  it('φ of the normal tail: 0.3 at the mean, grows without bound, never negative', () => {
    expect(phiOf(100, 100, 100)).toBeCloseTo(0.301, 2);
    expect(phiOf(0, 100, 100)).toBeGreaterThanOrEqual(0);
    expect(phiOf(1_000_000, 100, 100)).toBe(Infinity);
    expect(phiOf(-1_000_000, 100, 100)).toBe(0);
  });
});

describe('peer monitor', () => {
  const fixed = { kind: 'fixed' as const, intervalMs: 100, misses: 5 };

  it('is dead only when every path is silent; one live path keeps the peer alive', () => {
    const events: PeerEvent[] = [];
    const m = new PeerMonitor('b', ['udp://x', 'file:///y'], fixed, (e) => events.push(e));
    let now = 0;
    for (; now < 1_000; now += 100) {
      m.beat(0, now);
      m.beat(1, now);
    }
    expect(events.map((e) => e.event)).toEqual(['peer-alive']);
    // path 0 goes silent; path 1 keeps beating for 2 s
    for (; now < 3_000; now += 100) {
      m.beat(1, now);
      m.check(now + 50);
    }
    expect(events.map((e) => e.event)).toEqual(['peer-alive']);
    expect(m.view(now).map((p) => p.state)).toEqual(['dead', 'alive']);
    const last = now - 100;
    let t = now;
    while (m.peerState !== 'dead') m.check(++t);
    expect(t - last).toBeGreaterThanOrEqual(500);
    expect(t - last).toBeLessThan(600);
    expect(events.map((e) => e.event)).toEqual(['peer-alive', 'peer-suspect', 'peer-dead']);
    const dead = events[2]!;
    expect(dead).toMatchObject({ peer: 'b', from: 'suspect', silentMs: t - last });
    expect(dead.paths.map((p) => p.path)).toEqual(['udp://x', 'file:///y']);
    // it comes back
    const back = m.beat(0, t + 1000);
    expect(back).toMatchObject({ event: 'peer-alive', from: 'dead' });
  });

  it.each(['fixed', 'phi'] as const)('%s: 30 %% random loss on one path of two for 60 s never declares the peer dead', (kind) => {
    const seed = 0x10555;
    const random = prng(seed);
    const events: string[] = [];
    const spec = kind === 'fixed' ? fixed : { kind: 'phi' as const, intervalMs: 100 };
    const m = new PeerMonitor('b', ['udp://lossy', 'udp://clean'], spec, (e) => events.push(e.event));
    let lost = 0;
    for (let t = 0; t < 60_000; t += 100) {
      if (random() >= 0.3) m.beat(0, t);
      else lost++;
      m.beat(1, t + 1);
      for (let c = t + 10; c < t + 100; c += 10) m.check(c);
    }
    expect(lost).toBeGreaterThan(150);
    expect({ seed, events }).toEqual({ seed, events: ['peer-alive'] });
  });

  it('a peer never heard is unknown, never dead (wait for all)', () => {
    const events: PeerEvent[] = [];
    const m = new PeerMonitor('b', ['udp://x'], fixed, (e) => events.push(e));
    for (let t = 0; t < 10_000; t += 100) m.check(t);
    expect(events).toEqual([]);
    expect(m.state(10_000)).toBe('unknown');
  });

  it('suspect then alive again without a death (a pause shorter than the bound)', () => {
    const events: string[] = [];
    const m = new PeerMonitor('b', ['udp://x'], fixed, (e) => events.push(e.event));
    m.beat(0, 0);
    m.check(300);
    m.beat(0, 400);
    expect(events).toEqual(['peer-alive', 'peer-suspect', 'peer-alive']);
  });

  it('a beat on a path that does not exist is a RangeError', () => {
    const m = new PeerMonitor('b', ['udp://x'], fixed);
    expect(() => m.beat(3, 0)).toThrow(RangeError);
  });
});
