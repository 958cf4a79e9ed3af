/**
 * The heartbeat service between two nodes of one process over an in-memory bus backend, with
 * vitest's fake timers (setInterval and performance.now advance together): beats both ways,
 * death within the bound once one side stops, wrong keys, replays and strangers refused and
 * counted, errors for bad configuration.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { HeartbeatBackend, HeartbeatPath, HeartbeatReport } from '../../src/api/index.js';
import { Heartbeats } from '../../src/engine/registry.js';
import { decodeBeat, encodeBeat, type BeatExport } from '../../src/heartbeat/beat.js';
import { HeartbeatService, type PeerOutdated } from '../../src/heartbeat/service.js';
import * as v1 from './fixtures/beat-v1.js';

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
    expect(st.peerAnnounced).toEqual({ incarnation: '1', epoch: '3', generation: '00000000000000ab', primary: false, version: 1, exports: null });
  });

  /** the version byte of each frame `from` sent, in order */
  const versions = (tap: Array<{ from: string; frame: Buffer }>, from: string): number[] => tap.filter((t) => t.from === from).map((t) => t.frame[4]!);

  it('beat versions: a version 2 node sends version 1 (bit 2 set) until the peer says it decodes 2; an old peer keeps it at 1, and a peer restarted old brings it back to 1', async () => {
    const registry = new Heartbeats();
    const tap: Array<{ from: string; frame: Buffer }> = [];
    const bus = busBackend(tap);
    registry.register('bus', () => bus.backend);
    const b = await HeartbeatService.start({ uris: ['bus:v'], registry, self: 'beta', peer: 'alpha', key: KEY, intervalMs: 100, detector: fixed, exports: () => [{ name: 'x', generation: '000000000000000b' }] });
    services.push(b);
    // alpha is a version 1 node (session 15's encoder): beta hears it and keeps sending version 1
    for (let seq = 1n; seq <= 10n; seq++) {
      bus.inject('v', 'beta', v1.encodeBeat({ node: 'alpha', incarnation: 10n, seq, epoch: 1n, generation: '000000000000000a', primary: true }, KEY));
      await vi.advanceTimersByTimeAsync(100);
    }
    expect(b.status()).toMatchObject({ state: 'alive', beatVersion: 1, peerAnnounced: { version: 1, exports: null, generation: '000000000000000a', primary: true } });
    const sent = tap.filter((t) => t.from === 'beta');
    expect(sent.length).toBeGreaterThanOrEqual(10);
    expect(new Set(versions(tap, 'beta'))).toEqual(new Set([1]));
    // what it sends, the old node decodes (flag bit 2 is ignored there)
    for (const t of sent) expect(v1.decodeBeat(t.frame, KEY)).toMatchObject({ ok: true, beat: { node: 'beta' } });
    // alpha upgraded (a later incarnation, a version 1 frame with bit 2): beta sends version 2 from its next beat
    bus.inject('v', 'beta', encodeBeat({ node: 'alpha', incarnation: 20n, seq: 1n, epoch: 1n, generation: '000000000000000a', primary: true, capable: true }, KEY));
    tap.length = 0;
    await vi.advanceTimersByTimeAsync(300);
    expect(new Set(versions(tap, 'beta'))).toEqual(new Set([2]));
    expect(decodeBeat(tap[0]!.frame, KEY)).toMatchObject({ ok: true, beat: { exports: [{ name: 'x', generation: '000000000000000b' }] } });
    expect(b.status().beatVersion).toBe(2);
    // alpha rolled back (a later incarnation, the old encoder): version 1 again
    bus.inject('v', 'beta', v1.encodeBeat({ node: 'alpha', incarnation: 30n, seq: 1n, epoch: 1n, generation: '000000000000000a' }, KEY));
    tap.length = 0;
    await vi.advanceTimersByTimeAsync(300);
    expect(new Set(versions(tap, 'beta'))).toEqual(new Set([1]));
    // a late beat of the upgraded incarnation (a slow path) does not switch it back
    bus.inject('v', 'beta', encodeBeat({ node: 'alpha', incarnation: 20n, seq: 2n, epoch: 1n, generation: '000000000000000a', capable: true }, KEY));
    tap.length = 0;
    await vi.advanceTimersByTimeAsync(300);
    expect(new Set(versions(tap, 'beta'))).toEqual(new Set([1]));
  });

  it('two version 2 nodes switch to version 2 and hear each other\'s exports; an Outdated export is said once per generation (peer-outdated)', async () => {
    const registry = new Heartbeats();
    const tap: Array<{ from: string; frame: Buffer }> = [];
    const bus = busBackend(tap);
    registry.register('bus', () => bus.backend);
    const events: Array<[string, Record<string, unknown>]> = [];
    const outdated: PeerOutdated[] = [];
    let secondary: BeatExport[] = [{ name: 'b', generation: '00000000000000b1' }];
    const primary = await HeartbeatService.start({
      uris: ['bus:p'],
      registry,
      self: 'alpha',
      peer: 'beta',
      key: KEY,
      intervalMs: 100,
      detector: fixed,
      exports: () => [{ name: 'a', generation: '00000000000000a1', primary: true }, { name: 'b', generation: '00000000000000b2', primary: true }],
      publish: (event, fields) => events.push([event, fields]),
      onPeerOutdated: (e) => outdated.push(e),
    });
    services.push(primary);
    const sec = await HeartbeatService.start({ uris: ['bus:p'], registry, self: 'beta', peer: 'alpha', key: KEY, intervalMs: 100, detector: fixed, exports: () => secondary });
    services.push(sec);
    await vi.advanceTimersByTimeAsync(500);
    // each sends version 1 until it heard the other's first beat, then version 2
    expect(versions(tap, 'alpha')[0]).toBe(1);
    expect(versions(tap, 'alpha').slice(-3)).toEqual([2, 2, 2]);
    expect(versions(tap, 'beta').slice(-3)).toEqual([2, 2, 2]);
    expect(sec.status().peerAnnounced).toMatchObject({
      version: 2,
      exports: [
        { name: 'a', generation: '00000000000000a1', outdated: false, primary: true },
        { name: 'b', generation: '00000000000000b2', outdated: false, primary: true },
      ],
    });
    expect(outdated).toEqual([]);
    // the secondary of b marks itself Outdated: the primary hears it once, not on every beat
    secondary = [{ name: 'b', generation: '00000000000000b1', outdated: true }];
    await vi.advanceTimersByTimeAsync(1_000);
    const incarnation = sec.status().incarnation;
    expect(outdated).toEqual([{ peer: 'beta', export: 'b', generation: '00000000000000b1', incarnation }]);
    expect(events.filter(([e]) => e === 'peer-outdated')).toEqual([['peer-outdated', { peer: 'beta', export: 'b', generation: '00000000000000b1', incarnation }]]);
    expect(primary.status().peerAnnounced!.exports).toEqual([{ name: 'b', generation: '00000000000000b1', outdated: true, primary: false }]);
    // at another generation: said again
    secondary = [{ name: 'b', generation: '00000000000000b3', outdated: true }];
    await vi.advanceTimersByTimeAsync(500);
    expect(outdated.map((e) => e.generation)).toEqual(['00000000000000b1', '00000000000000b3']);
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
