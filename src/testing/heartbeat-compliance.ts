/**
 * The behaviour every heartbeat backend must have, as one vitest suite each backend runs against
 * itself (as transports run src/testing/transport-compliance.ts). A third-party backend imports
 * it from `blkrep/testing/heartbeat-compliance` in a vitest test file:
 *
 *   runHeartbeatCompliance('quic', createQuicHeartbeat, {
 *     pair: async () => ({ a: 'quic://127.0.0.1:7001?listen=127.0.0.1:7000', b: 'quic://127.0.0.1:7000?listen=127.0.0.1:7001' }),
 *     badUris: ['quic://nowhere'],
 *   });
 *
 * `pair()` gives two URIs that reach each other (node "a" opens the first, node "b" the second),
 * fresh for every test. A backend that carries frames (caps.frames) must deliver each frame byte
 * for byte, report nothing while the other side is silent, and stop reporting once stopped. A
 * probe backend (caps.frames false) gives `probe` instead: a URI whose probe succeeds and one
 * whose probe fails. Bad URIs are refused by open() with ERR_BAD_HEARTBEAT and the URI in the
 * message. Every wait is bounded.
 */
import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import type { HeartbeatBackend, HeartbeatPath, HeartbeatReport } from '../api/index.js';

export interface HeartbeatComplianceOptions {
  /** two URIs that reach each other: node "a" opens `a`, node "b" opens `b` (frame backends) */
  pair?: () => Promise<{ a: string; b: string }> | { a: string; b: string };
  /** probe backends: a URI whose probe succeeds and one whose probe fails */
  probe?: { alive: string; dead: string };
  /** URIs open() must refuse */
  badUris: string[];
  /** the beat interval the paths are opened with (default 50 ms) */
  intervalMs?: number;
}

/** A path's reports, and a way to wait for the next ones. */
class Inbox {
  readonly reports: HeartbeatReport[] = [];
  private waiters: Array<() => void> = [];

  constructor(path: HeartbeatPath) {
    path.onBeat((r) => {
      this.reports.push(r);
      for (const w of this.waiters.splice(0)) w();
    });
  }

  /** resolves once `predicate` holds over the reports, or rejects after `ms` */
  async until(predicate: (reports: HeartbeatReport[]) => boolean, ms: number, what: string): Promise<void> {
    const deadline = performance.now() + ms;
    while (!predicate(this.reports)) {
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`timed out after ${ms} ms waiting for ${what} (${this.reports.length} reports so far)`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(left, 50));
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }
}

function pause(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export function runHeartbeatCompliance(name: string, make: () => HeartbeatBackend, options: HeartbeatComplianceOptions): void {
  const intervalMs = options.intervalMs ?? 50;
  /** how long a frame may take to arrive (a polling backend needs an interval or two) */
  const arrivalMs = Math.max(2_000, intervalMs * 20);

  describe(`heartbeat compliance: ${name}`, () => {
    const opened: HeartbeatPath[] = [];

    afterEach(async () => {
      for (const path of opened.splice(0).reverse()) await path.stop();
    });

    function open(uri: string, self: string, peer: string, signal?: AbortSignal): HeartbeatPath {
      const path = make().open(uri, { self, peer, intervalMs, ...(signal ? { signal } : {}) });
      opened.push(path);
      return path;
    }

    async function startPair(): Promise<{ a: HeartbeatPath; b: HeartbeatPath; inA: Inbox; inB: Inbox }> {
      const uris = await options.pair!();
      const a = open(uris.a, 'node-a', 'node-b');
      const b = open(uris.b, 'node-b', 'node-a');
      const inA = new Inbox(a);
      const inB = new Inbox(b);
      await Promise.all([a.start(), b.start()]);
      return { a, b, inA, inB };
    }

    /**
     * Send from `from` once per interval, as the engine does, until `inbox` holds this very frame:
     * a path may drop a frame it cannot send at once (no connection yet), never queue it.
     */
    async function deliver(from: HeartbeatPath, inbox: Inbox, frame: Buffer): Promise<void> {
      from.send(frame);
      const resend = setInterval(() => from.send(frame), intervalMs);
      try {
        await inbox.until((rs) => rs.some((r) => r.frame.equals(frame)), arrivalMs, `a ${frame.length}-byte frame to arrive`);
      } finally {
        clearInterval(resend);
      }
    }

    it('has a name, a summary and its capabilities', () => {
      const backend = make();
      expect(backend.name).toBe(name);
      expect(backend.summary.length).toBeGreaterThan(0);
      expect(typeof backend.caps.frames).toBe('boolean');
      expect(typeof backend.caps.independentPath).toBe('boolean');
      expect(typeof backend.caps.authoritative).toBe('boolean');
    });

    it('refuses bad URIs at open() with ERR_BAD_HEARTBEAT naming the URI', () => {
      expect(options.badUris.length).toBeGreaterThan(0);
      for (const uri of options.badUris) {
        let err: unknown;
        try {
          make().open(uri, { self: 'node-a', peer: 'node-b', intervalMs });
        } catch (e) {
          err = e;
        }
        expect(err, uri).toBeInstanceOf(Error);
        expect(err, uri).toMatchObject({ code: 'ERR_BAD_HEARTBEAT' });
        expect((err as Error).message, uri).toContain(uri);
      }
    });

    if (options.pair) {
      it('carries frames byte for byte, both ways, from 1 to 256 bytes', async () => {
        const { a, b, inA, inB } = await startPair();
        expect(a.uri.length).toBeGreaterThan(0);
        for (const size of [1, 40, 136, 256]) {
          await deliver(a, inB, randomBytes(size));
          await deliver(b, inA, randomBytes(size));
        }
        for (const r of [...inA.reports, ...inB.reports]) expect(r.from.length).toBeGreaterThan(0);
      });

      it('carries a steady stream of beats, one per interval', async () => {
        const { a, inB } = await startPair();
        const frames = Array.from({ length: 10 }, (_, i) => Buffer.from(`beat ${i} ${randomBytes(8).toString('hex')}`));
        for (const f of frames) await deliver(a, inB, f);
        // every frame reported is one that was sent; none is made up
        for (const r of inB.reports) expect(frames.some((f) => f.equals(r.frame))).toBe(true);
      });

      it('reports nothing while the other side is silent', async () => {
        const { a, inB } = await startPair();
        await deliver(a, inB, Buffer.from('last words'));
        const count = inB.reports.length;
        await pause(intervalMs * 6);
        expect(inB.reports.length).toBe(count);
      });

      it('stops reporting once stopped; stop() twice is fine; the URIs can be opened again', async () => {
        const { a, b, inB } = await startPair();
        await deliver(a, inB, Buffer.from('before stop'));
        await b.stop();
        await b.stop();
        const count = inB.reports.length;
        a.send(Buffer.from('after stop'));
        await pause(intervalMs * 6);
        expect(inB.reports.length).toBe(count);
        await a.stop();
        // the sockets, files or children were released: the same pair starts again
        const again = await startPair();
        await deliver(again.a, again.inB, Buffer.from('again'));
      });

      it('stops when its signal aborts', async () => {
        const uris = await options.pair!();
        const controller = new AbortController();
        const a = open(uris.a, 'node-a', 'node-b');
        const b = open(uris.b, 'node-b', 'node-a', controller.signal);
        const inB = new Inbox(b);
        await Promise.all([a.start(), b.start()]);
        await deliver(a, inB, Buffer.from('before abort'));
        controller.abort();
        await pause(intervalMs * 2);
        const count = inB.reports.length;
        a.send(Buffer.from('after abort'));
        await pause(intervalMs * 6);
        expect(inB.reports.length).toBe(count);
      });

      it('sending before the peer exists, or to a stopped peer, neither throws nor stops the path', async () => {
        const uris = await options.pair!();
        const a = open(uris.a, 'node-a', 'node-b');
        await a.start();
        for (let i = 0; i < 5; i++) a.send(Buffer.from(`into the void ${i}`));
        await pause(intervalMs * 2);
        const b = open(uris.b, 'node-b', 'node-a');
        const inB = new Inbox(b);
        await b.start();
        await deliver(a, inB, Buffer.from('now someone listens'));
      });
    }

    if (options.probe) {
      const probe = options.probe;
      it('reports empty beats while the probe succeeds, one per interval or so', async () => {
        const path = open(probe.alive, 'node-a', 'node-b');
        const inbox = new Inbox(path);
        await path.start();
        await inbox.until((rs) => rs.length >= 3, arrivalMs, 'three probe beats');
        for (const r of inbox.reports) {
          expect(r.frame.length).toBe(0);
          expect(r.from.length).toBeGreaterThan(0);
        }
      });

      it('reports nothing while the probe fails', async () => {
        const path = open(probe.dead, 'node-a', 'node-b');
        const inbox = new Inbox(path);
        await path.start();
        await pause(intervalMs * 8);
        expect(inbox.reports.length).toBe(0);
      });

      it('stops probing once stopped; stop() twice is fine', async () => {
        const path = open(probe.alive, 'node-a', 'node-b');
        const inbox = new Inbox(path);
        await path.start();
        await inbox.until((rs) => rs.length >= 1, arrivalMs, 'a probe beat');
        await path.stop();
        await path.stop();
        const count = inbox.reports.length;
        await pause(intervalMs * 6);
        expect(inbox.reports.length).toBe(count);
      });

      it('send() is accepted and ignored', async () => {
        const path = open(probe.alive, 'node-a', 'node-b');
        await path.start();
        expect(() => path.send(Buffer.from('ignored'))).not.toThrow();
      });
    }
  });
}
