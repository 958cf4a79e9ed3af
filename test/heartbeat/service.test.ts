/**
 * The heartbeat service between two nodes of one process over an in-memory bus backend, with
 * vitest's fake timers (setInterval and performance.now advance together): beats both ways,
 * death within the bound once one side stops, wrong keys, replays and strangers refused and
 * counted, errors for bad configuration.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { HeartbeatBackend, HeartbeatPath, HeartbeatReport } from '../../src/api/index.js';
import { Heartbeats } from '../../src/engine/registry.js';
import { encodeBeat } from '../../src/heartbeat/beat.js';
import { HeartbeatService } from '../../src/heartbeat/service.js';

/** bus:NAME paths deliver to the other paths on NAME whose node is their peer; `tap` sees every frame. */
function busBackend(tap: Array<{ from: string; frame: Buffer }> = []): { backend: HeartbeatBackend; inject(channel: string, to: string, frame: Buffer): void } {
  const channels = new Map<string, Set<{ self: string; peer: string; listeners: Array<(r: HeartbeatReport) => void>; stopped: boolean }>>();
  const backend: HeartbeatBackend = {
    name: 'bus',
    summary: 'test bus',
    caps: { frames: true, independentPath: false, authoritative: false },
    open(uri, options): HeartbeatPath {
      const channel = uri.slice('bus:'.length);
      const me = { self: options.self, peer: options.peer, listeners: [] as Array<(r: HeartbeatReport) => void>, stopped: false };
      return {
        uri,
        async start() {
          if (!channels.has(channel)) channels.set(channel, new Set());
          channels.get(channel)!.add(me);
        },
        send(frame) {
          if (me.stopped) return;
          tap.push({ from: me.self, frame });
          for (const other of channels.get(channel) ?? []) if (other !== me && other.self === me.peer && !other.stopped) for (const l of other.listeners) l({ frame, from: me.self });
        },
        onBeat(l) {
          me.listeners.push(l);
        },
        onError() {},
        async stop() {
          me.stopped = true;
          channels.get(channel)?.delete(me);
        },
      };
    },
  };
  return {
    backend,
    inject(channel, to, frame) {
      for (const p of channels.get(channel) ?? []) if (p.self === to) for (const l of p.listeners) l({ frame, from: 'attacker' });
    },
  };
}

const KEY = Buffer.from('pair key, 32 bytes long, really');
const fixed = { kind: 'fixed' as const, intervalMs: 100, misses: 5 };

describe('heartbeat service', () => {
  const services: HeartbeatService[] = [];
  beforeEach(() => {
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval', 'setTimeout', 'clearTimeout', 'performance', 'Date'] });
  });
  afterEach(async () => {
    for (const s of services.splice(0)) await s.stop();
    vi.useRealTimers();
  });

  async function node(registry: Heartbeats, self: string, peer: string, uris: string[], extra: { key?: Buffer; events?: string[] } = {}): Promise<HeartbeatService> {
    const s = await HeartbeatService.start({
      uris,
      registry,
      self,
      peer,
      intervalMs: 100,
      detector: fixed,
      ...(extra.key ? { key: extra.key } : {}),
      publish: (event) => extra.events?.push(event),
    });
    services.push(s);
    return s;
  }

  it('two nodes hear each other; when one stops, the other declares it dead within [500, 610) ms of its last beat', async () => {
    const registry = new Heartbeats();
    const tap: Array<{ from: string; frame: Buffer }> = [];
    const bus = busBackend(tap);
    registry.register('bus', () => bus.backend);
    const eventsB: string[] = [];
    const a = await node(registry, 'alpha', 'beta', ['bus:one', 'bus:two'], { key: KEY });
    const b = await node(registry, 'beta', 'alpha', ['bus:one', 'bus:two'], { key: KEY, events: eventsB });
    await vi.advanceTimersByTimeAsync(1_000);
    expect(eventsB).toEqual(['peer-alive']);
    const st = b.status();
    expect(st).toMatchObject({ node: 'beta', peer: 'alpha', state: 'alive', keyed: true, peerAnnounced: { epoch: '0', generation: '0000000000000000' } });
    expect(st.paths.map((p) => [p.uri, p.backend, p.state, p.rejected])).toEqual([
      ['bus:one', 'bus', 'alive', {}],
      ['bus:two', 'bus', 'alive', {}],
    ]);
    expect(st.paths[0]!.beats).toBeGreaterThanOrEqual(9);
    await a.stop();
    const lastBeat = performance.now() - (b.status().paths[0]!.lastBeatAgoMs ?? 0);
    while (b.peerState !== 'dead' || eventsB.length < 3) await vi.advanceTimersByTimeAsync(1);
    const declaredAfter = performance.now() - lastBeat;
    expect(declaredAfter).toBeGreaterThanOrEqual(500);
    expect(declaredAfter).toBeLessThan(610);
    expect(eventsB).toEqual(['peer-alive', 'peer-suspect', 'peer-dead']);
  });

  it('the pair link is a path: its pongs keep the peer alive with every heartbeat path cut (heartbeat-paths-down/up); it dies when they stop too', async () => {
    const registry = new Heartbeats();
    const bus = busBackend();
    registry.register('bus', () => bus.backend);
    const events: string[] = [];
    let linkUp = true;
    let pings = 0;
    const a = await node(registry, 'alpha', 'beta', ['bus:hb'], { key: KEY });
    const b = await HeartbeatService.start({
      uris: ['bus:hb'],
      registry,
      self: 'beta',
      peer: 'alpha',
      key: KEY,
      intervalMs: 100,
      detector: fixed,
      publish: (event) => events.push(event),
      // the link answers each ping at once while it is up
      pingLink: (heard) => {
        if (!linkUp) return false;
        pings++;
        heard();
        return true;
      },
    });
    services.push(b);
    await vi.advanceTimersByTimeAsync(1_000);
    expect(events).toEqual(['peer-alive']);
    expect(b.status().link).toMatchObject({ state: 'alive', pings, pongs: pings });
    // every heartbeat path cut (alpha stops beating), the link answers: said once, never suspect or dead
    await a.stop();
    await vi.advanceTimersByTimeAsync(3_000);
    expect(events).toEqual(['peer-alive', 'heartbeat-paths-down']);
    expect(b.status()).toMatchObject({ state: 'alive', paths: [{ state: 'dead' }], link: { state: 'alive' } });
    // a heartbeat path back
    const a2 = await node(registry, 'alpha', 'beta', ['bus:hb'], { key: KEY });
    await vi.advanceTimersByTimeAsync(300);
    expect(events).toEqual(['peer-alive', 'heartbeat-paths-down', 'heartbeat-paths-up']);
    // both gone: dead within the bound
    await a2.stop();
    linkUp = false;
    await vi.advanceTimersByTimeAsync(1_000);
    expect(events).toEqual(['peer-alive', 'heartbeat-paths-down', 'heartbeat-paths-up', 'peer-suspect', 'peer-dead']);
    expect(b.status().link!.state).toBe('dead');
  });

  it('a wrong key, a missing key and a replay are refused and counted; only a correctly signed beat is heard', async () => {
    const registry = new Heartbeats();
    const tap: Array<{ from: string; frame: Buffer }> = [];
    const bus = busBackend(tap);
    registry.register('bus', () => bus.backend);
    const eventsB: string[] = [];
    await node(registry, 'alpha', 'beta', ['bus:k'], { key: Buffer.from('another key, 32 bytes long, yes') });
    const b = await node(registry, 'beta', 'alpha', ['bus:k'], { key: KEY, events: eventsB });
    await vi.advanceTimersByTimeAsync(500);
    // alpha's first beat went out before beta listened; the five after it were all refused
    expect(b.status().paths[0]!.rejected).toEqual({ 'bad-mac': 5 });
    expect(eventsB).toEqual([]);
    expect(b.status().state).toBe('unknown');
    bus.inject('k', 'beta', encodeBeat({ node: 'alpha', incarnation: 1n, seq: 1n, epoch: 0n, generation: '0000000000000000' }, undefined));
    expect(b.status().paths[0]!.rejected).toMatchObject({ unkeyed: 1 });
    // a correctly signed beat is accepted once; its replay is refused
    const good = encodeBeat({ node: 'alpha', incarnation: 1n, seq: 1n, epoch: 3n, generation: '00000000000000ab' }, KEY);
    bus.inject('k', 'beta', good);
    bus.inject('k', 'beta', good);
    bus.inject('k', 'beta', encodeBeat({ node: 'gamma', incarnation: 1n, seq: 9n, epoch: 3n, generation: '00000000000000ab' }, KEY));
    const st = b.status();
    expect(st.paths[0]!.beats).toBe(1);
    expect(st.paths[0]!.rejected).toMatchObject({ replay: 1, 'unknown-node': 1 });
    expect(st.peerAnnounced).toEqual({ incarnation: '1', epoch: '3', generation: '00000000000000ab', primary: false });
  });

  it('refuses bad configuration with coded errors before anything starts', async () => {
    const registry = new Heartbeats();
    registry.register('bus', () => busBackend().backend);
    const base = { registry, self: 'a', peer: 'b', intervalMs: 100, detector: fixed };
    await expect(HeartbeatService.start({ ...base, uris: ['quic://x:1'] })).rejects.toMatchObject({ code: 'ERR_NO_HEARTBEAT', message: 'no heartbeat backend named "quic" is installed (installed: bus)' });
    await expect(HeartbeatService.start({ ...base, uris: ['no scheme'] })).rejects.toMatchObject({ code: 'ERR_BAD_HEARTBEAT' });
    await expect(HeartbeatService.start({ ...base, uris: ['bus:x', 'bus:x'] })).rejects.toMatchObject({ code: 'ERR_USAGE', message: 'heartbeat path "bus:x" is given twice' });
    await expect(HeartbeatService.start({ ...base, peer: 'a', uris: ['bus:x'] })).rejects.toMatchObject({ code: 'ERR_USAGE' });
    await expect(HeartbeatService.start({ ...base, uris: [] })).rejects.toMatchObject({ code: 'ERR_USAGE' });
  });
});
