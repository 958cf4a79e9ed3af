/**
 * Probe (session 15, hb 3): one primary daemon with two exports, each paired (`replicate`) with
 * its own secondary daemon (a secondary serves one export: --secondary excludes --export), one
 * heartbeat: the primary beats on a udp path to each secondary, both secondaries beat as "beta".
 *
 * A beat carries one generation, the first paired export's: the first secondary hears its own
 * lineage, the second hears the other export's generation, never its primary's. What that gives
 * (src/heartbeat/README.md, "One generation per beat"): with its link down the second secondary
 * compares another lineage and marks itself Outdated (a false Outdated: its automatic failover is
 * refused, never a silent rollback). This test pins the limitation the README states.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request } from '../support/control.js';
import { freeUdpPort, pairKey, sparseImages } from '../support/heartbeat.js';
import { makeTempDir, serve, unixUri, waitFor } from '../support/spawn.js';

const SIZE = 4 << 20;

interface Status {
  exports: Array<{ name: string; pair?: { role: string; epoch: number; lastCheckpointAgeMs: number | null; gi: { current: string } } }>;
  heartbeat: { state: string; peerAnnounced: { generation: string } | null };
}

describe('one primary daemon, two paired exports, one heartbeat (three daemons)', () => {
  it('its beats carry the first export\'s generation: the second secondary hears another lineage, never its own primary\'s', async () => {
    const dir = await makeTempDir();
    await sparseImages(dir, SIZE, ['p1.img', 'p2.img', 's1.img', 's2.img']);
    const key = await pairKey(dir);
    const [pa1, pa2, pb1, pb2] = [await freeUdpPort(), await freeUdpPort(), await freeUdpPort(), await freeUdpPort()];
    const beat = ['--heartbeat-key', key, '--heartbeat-interval', '0.1', '--heartbeat-misses', '5'];
    const f = (n: string): string => join(dir, n);
    const s1 = await serve([f('s1.img'), '--secondary', '--socket', f('s1.sock'), '--control', f('s1.ctl'), '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${pa1}?listen=127.0.0.1:${pb1}`, ...beat]);
    const s2 = await serve([f('s2.img'), '--secondary', '--socket', f('s2.sock'), '--control', f('s2.ctl'), '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${pa2}?listen=127.0.0.1:${pb2}`, ...beat]);
    const p = await serve(['--export', `a=${f('p1.img')}`, '--export', `b=${f('p2.img')}`, '--socket', f('p.sock'), '--control', f('p.ctl'), '--node-id', 'alpha', '--peer-id', 'beta', '--heartbeat', `udp://127.0.0.1:${pb1}?listen=127.0.0.1:${pa1}`, '--heartbeat', `udp://127.0.0.1:${pb2}?listen=127.0.0.1:${pa2}`, ...beat]);
    try {
      await request(f('p.ctl'), 'replicate', { export: 'a', uri: unixUri(f('s1.sock')), protocol: 'sync' });
      await request(f('p.ctl'), 'replicate', { export: 'b', uri: unixUri(f('s2.sock')), protocol: 'sync' });
      const status = (ctl: string): Promise<Status> => request<Status>(f(ctl), 'status');
      await waitFor(async () => (await status('p.ctl')).exports.every((e) => e.pair?.epoch === 1 && e.pair.lastCheckpointAgeMs !== null), 'checkpoint 1 of both pairs', { timeoutMs: 30_000 });
      const pSt = await status('p.ctl');
      const ga = pSt.exports.find((e) => e.name === 'a')!.pair!.gi.current;
      const gb = pSt.exports.find((e) => e.name === 'b')!.pair!.gi.current;
      expect(ga).not.toBe(gb);
      await waitFor(async () => (await status('s1.ctl')).heartbeat.peerAnnounced?.generation === ga && (await status('s2.ctl')).heartbeat.peerAnnounced !== null, 'both secondaries to hear the primary');
      const [st1, st2] = [await status('s1.ctl'), await status('s2.ctl')];
      // the first secondary hears its lineage; the second hears export a's, not b's (its own)
      expect(st1.exports[0]!.pair!.gi.current).toBe(ga);
      expect(st2.exports[0]!.pair!.gi.current).toBe(gb);
      expect(st2.heartbeat.peerAnnounced!.generation).toBe(ga);
    } finally {
      await p.stop('SIGKILL').catch(() => {});
      await s1.stop('SIGKILL').catch(() => {});
      await s2.stop('SIGKILL').catch(() => {});
    }
  });
});
