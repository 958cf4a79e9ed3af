/**
 * Attack (session 15, hb 3; fixed in session 16 by beat version 2): one primary daemon with two
 * exports, each paired (`replicate`) with its own secondary daemon (a secondary serves one
 * export: --secondary excludes --export), one heartbeat: the primary beats on a udp path to each
 * secondary, both secondaries beat as "beta".
 *
 * A version 1 beat carried one generation, the first paired export's: the second secondary heard
 * export a's lineage, never its own primary's, and once its link was down it compared another
 * lineage and marked itself Outdated (a false Outdated: its automatic failover refused after its
 * primary's death, though it had every write). Version 2 carries one entry per pair, named as the
 * pair link names it (the secondary's export name): each secondary hears its own pair's
 * generation. The test asserts the right behaviour:
 * - in sync, each secondary hears both entries and its own generation in its own;
 * - b's link cut, b's primary degrades (a new generation): b's secondary marks itself Outdated,
 *   a's does not, and the primary hears b's secondary report Outdated (event peer-outdated);
 * - the primary killed -9 while both are in sync: both secondaries stay Consistent (with version 1
 *   the second one was marked Outdated: it failed so on main).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request } from '../support/control.js';
import { freeUdpPort, pairKey, sparseImages, unixProxy, watch } from '../support/heartbeat.js';
import { makeTempDir, serve, unixUri, waitFor, type Served, type Started } from '../support/spawn.js';

const SIZE = 4 << 20;

interface PairSt {
  role: string;
  epoch: number;
  diskState: string;
  lastCheckpointAgeMs: number | null;
  gi: { current: string };
}
interface Status {
  exports: Array<{ name: string; pair?: PairSt }>;
  heartbeat: {
    state: string;
    beatVersion: number;
    peerAnnounced: { generation: string; version: number; exports: Array<{ name: string; generation: string; outdated: boolean; primary: boolean }> | null } | null;
  };
}

interface Three {
  f: (n: string) => string;
  p: Served;
  s1: Served;
  s2: Served;
  /** the proxy carrying b's pair link (kill -9 cuts it) */
  x: Started;
  status: (ctl: string) => Promise<Status>;
  pair: (ctl: string, name?: string) => Promise<PairSt>;
  ga: string;
  gb: string;
  stop(): Promise<void>;
}

/** Three daemons, both pairs at checkpoint 1, each secondary hearing version 2 beats. */
async function three(): Promise<Three> {
  const dir = await makeTempDir();
  await sparseImages(dir, SIZE, ['p1.img', 'p2.img', 's1.img', 's2.img']);
  const key = await pairKey(dir);
  const [pa1, pa2, pb1, pb2] = [await freeUdpPort(), await freeUdpPort(), await freeUdpPort(), await freeUdpPort()];
  const beat = ['--heartbeat-key', key, '--heartbeat-interval', '0.1', '--heartbeat-misses', '5'];
  const f = (n: string): string => join(dir, n);
  const started: Array<{ stop(signal?: NodeJS.Signals): Promise<unknown> }> = [];
  const stop = async (): Promise<void> => {
    for (const d of started.reverse()) await d.stop('SIGKILL').catch(() => {});
  };
  try {
    // each secondary serves its replica export under the pair's name: the beats' entries are named so
    const s1 = await serve([f('s1.img'), '--name', 'a', '--secondary', '--socket', f('s1.sock'), '--control', f('s1.ctl'), '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${pa1}?listen=127.0.0.1:${pb1}`, ...beat]);
    started.push(s1);
    const s2 = await serve([f('s2.img'), '--name', 'b', '--secondary', '--socket', f('s2.sock'), '--control', f('s2.ctl'), '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${pa2}?listen=127.0.0.1:${pb2}`, ...beat]);
    started.push(s2);
    const x = await unixProxy(dir, f('x.sock'), f('s2.sock'));
    started.push(x);
    const p = await serve(['--export', `a=${f('p1.img')}`, '--export', `b=${f('p2.img')}`, '--socket', f('p.sock'), '--control', f('p.ctl'), '--node-id', 'alpha', '--peer-id', 'beta', '--heartbeat', `udp://127.0.0.1:${pb1}?listen=127.0.0.1:${pa1}`, '--heartbeat', `udp://127.0.0.1:${pb2}?listen=127.0.0.1:${pa2}`, ...beat]);
    started.push(p);
    await request(f('p.ctl'), 'replicate', { export: 'a', uri: unixUri(f('s1.sock'), 'a'), protocol: 'sync' });
    await request(f('p.ctl'), 'replicate', { export: 'b', uri: unixUri(f('x.sock'), 'b'), protocol: 'sync' });
    const status = (ctl: string): Promise<Status> => request<Status>(f(ctl), 'status');
    const pair = async (ctl: string, name?: string): Promise<PairSt> => (await status(ctl)).exports.find((e) => name === undefined || e.name === name)!.pair!;
    await waitFor(async () => (await status('p.ctl')).exports.every((e) => e.pair?.epoch === 1 && e.pair.lastCheckpointAgeMs !== null), 'checkpoint 1 of both pairs', { timeoutMs: 30_000 });
    const [ga, gb] = [(await pair('p.ctl', 'a')).gi.current, (await pair('p.ctl', 'b')).gi.current];
    expect(ga).not.toBe(gb);
    const hears = async (ctl: string): Promise<boolean> => {
      const pa = (await status(ctl)).heartbeat.peerAnnounced;
      return pa?.version === 2 && pa.exports?.find((e) => e.name === 'a')?.generation === ga && pa.exports.find((e) => e.name === 'b')?.generation === gb;
    };
    await waitFor(async () => (await hears('s1.ctl')) && (await hears('s2.ctl')), 'both secondaries to hear version 2 beats with both pairs at checkpoint 1');
    return { f, p, s1, s2, x, status, pair, ga, gb, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

describe('one primary daemon, two paired exports, one heartbeat (three daemons)', () => {
  it('each secondary hears its own pair\'s generation; b\'s link cut and b degraded: only b\'s secondary is Outdated, and the primary hears it say so', async () => {
    const t = await three();
    const wp = await watch(t.f('p.ctl'), ['peer-outdated', 'peer-dead']);
    const w1 = await watch(t.f('s1.ctl'), ['replication-degraded', 'peer-outdated', 'peer-suspect', 'peer-dead']);
    const w2 = await watch(t.f('s2.ctl'), ['replication-degraded', 'peer-outdated', 'peer-dead']);
    try {
      const [st1, st2] = [await t.status('s1.ctl'), await t.status('s2.ctl')];
      expect(st1.exports[0]!.pair!.gi.current).toBe(t.ga);
      expect(st2.exports[0]!.pair!.gi.current).toBe(t.gb);
      for (const st of [st1, st2]) {
        expect(st.heartbeat).toMatchObject({ state: 'alive', beatVersion: 2 });
        expect(st.heartbeat.peerAnnounced!.exports).toEqual([
          { name: 'a', generation: t.ga, outdated: false, primary: true },
          { name: 'b', generation: t.gb, outdated: false, primary: true },
        ]);
      }
      // the header still carries the first pair's generation (what a version 1 node reads)
      expect(st2.heartbeat.peerAnnounced!.generation).toBe(t.ga);

      // b's pair link cut; the heartbeat passes: the primary degrades b and mints a generation for it
      await t.x.stop('SIGKILL');
      await waitFor(async () => (await t.pair('p.ctl', 'b')).gi.current !== t.gb, 'the primary to mint a generation for b');
      const gb2 = (await t.pair('p.ctl', 'b')).gi.current;
      expect((await t.pair('p.ctl', 'a')).gi.current).toBe(t.ga);
      await waitFor(async () => (await t.pair('s2.ctl')).diskState === 'Outdated', 'b\'s secondary to know it is Outdated', { timeoutMs: 5_000 });
      // b's secondary reports it on its beats: the primary hears it once, at b's secondary's generation
      await waitFor(() => wp.events.length > 0, 'the primary to hear b\'s secondary report Outdated', { timeoutMs: 5_000 });
      // a's secondary heard the same beats (b's new generation in b's entry) and stays UpToDate
      await waitFor(async () => (await t.status('s1.ctl')).heartbeat.peerAnnounced?.exports?.find((e) => e.name === 'b')?.generation === gb2, 'a\'s secondary to hear b\'s new generation');
      expect(await t.pair('s1.ctl')).toMatchObject({ role: 'secondary', epoch: 1, diskState: 'UpToDate', gi: { current: t.ga } });
      expect(await t.pair('s2.ctl')).toMatchObject({ role: 'secondary', epoch: 1, diskState: 'Outdated', gi: { current: t.gb } });
      const beatsLater = (await t.status('p.ctl')).heartbeat;
      expect(beatsLater.state).toBe('alive');
      expect(wp.events.map(({ event, peer, export: name, generation }) => ({ event, peer, export: name, generation }))).toEqual([{ event: 'peer-outdated', peer: 'beta', export: 'b', generation: t.gb }]);
      expect(w1.events).toEqual([]);
      expect(w2.events.map((e) => [e.event, e.export, e.role])).toEqual([['replication-degraded', 'b', 'secondary']]);
    } finally {
      await wp.client.close().catch(() => {});
      await w1.client.close().catch(() => {});
      await w2.client.close().catch(() => {});
      await t.stop();
    }
  });

  it('the primary killed -9 with both pairs in sync: both secondaries stay Consistent (with one generation per beat the second was marked Outdated)', async () => {
    const t = await three();
    try {
      await t.p.stop('SIGKILL');
      await waitFor(async () => (await t.status('s1.ctl')).heartbeat.state === 'dead' && (await t.status('s2.ctl')).heartbeat.state === 'dead', 'both secondaries to declare the primary dead', { timeoutMs: 10_000 });
      expect(await t.pair('s1.ctl')).toMatchObject({ role: 'secondary', epoch: 1, diskState: 'Consistent', gi: { current: t.ga } });
      expect(await t.pair('s2.ctl')).toMatchObject({ role: 'secondary', epoch: 1, diskState: 'Consistent', gi: { current: t.gb } });
    } finally {
      await t.stop();
    }
  });
});
