/**
 * Attack: a node's wall clock set back between two starts (an NTP step, a VM restored from a
 * snapshot, a wrong RTC at boot). A beat's incarnation orders the sender's restarts, and the
 * receiver refuses any (incarnation, seq) not after the last it accepted (beat.ts ReplayGuard).
 * Before, the incarnation was the wall clock at start: restarted with its clock behind its last
 * start, the node sent beats its peer refused as replays until the peer itself restarted, so the
 * peer called a live node dead (and could fail over to it). Now the incarnation is kept in the
 * term file and the next start's is above it whatever the clock says.
 *
 * Two real daemons, the first start of "alpha" with its clock an hour ahead (a preload shifting
 * Date.now), then restarted with the true clock.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest } from '../support/control.js';
import { freeUdpPort, pairKey, sparseImages } from '../support/heartbeat.js';
import { makeTempDir, serve, waitFor, type Served } from '../support/spawn.js';

interface Hb {
  heartbeat: { state: string; incarnation: string; peerAnnounced: { incarnation: string } | null };
}
const hb = async (ctl: string): Promise<Hb['heartbeat']> => (await controlRequest<Hb>(ctl, 'status')).heartbeat;
const HOUR = 3_600_000n;

describe('attack: a wall clock set back between two starts', () => {
  it('the restarted node\'s beats are still heard: its incarnation is above the last one kept in its term file, not the clock\'s', async () => {
    const dir = await makeTempDir();
    await sparseImages(dir, 1 << 20, ['a.img', 'b.img']);
    const key = await pairKey(dir);
    const [pa, pb] = [await freeUdpPort(), await freeUdpPort()];
    const beat = ['--heartbeat-key', key, '--heartbeat-interval', '0.1', '--heartbeat-misses', '5'];
    const aCtl = join(dir, 'a.ctl');
    const bCtl = join(dir, 'b.ctl');
    const aArgs = [join(dir, 'a.img'), '--socket', join(dir, 'a.sock'), '--control', aCtl, '--node-id', 'alpha', '--peer-id', 'beta', '--heartbeat', `udp://127.0.0.1:${pb}?listen=127.0.0.1:${pa}`, ...beat];
    const bArgs = [join(dir, 'b.img'), '--socket', join(dir, 'b.sock'), '--control', bCtl, '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${pa}?listen=127.0.0.1:${pb}`, ...beat];
    const ahead = join(dir, 'clock-ahead.cjs');
    await writeFile(ahead, 'const now = Date.now; Date.now = () => now() + 3600000;\n');
    const started: Served[] = [];
    try {
      const b = await serve(bArgs);
      started.push(b);
      const a1 = await serve(aArgs, { env: { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --require ${ahead}` } });
      started.push(a1);
      await waitFor(async () => (await hb(bCtl)).peerAnnounced !== null && (await hb(bCtl)).state === 'alive', 'beta to hear alpha');
      const first = BigInt((await hb(aCtl)).incarnation);
      // the first start's clock was an hour ahead
      expect(first > BigInt(Date.now()) + HOUR - 600_000n).toBe(true);
      expect((await hb(bCtl)).peerAnnounced!.incarnation).toBe(first.toString());
      expect(JSON.parse(await readFile(join(dir, 'a.img.term.json'), 'utf8'))).toMatchObject({ incarnation: first.toString() });
      expect(await a1.stop()).toBe(0);

      // restarted with the true clock, an hour behind its last start
      const a2 = await serve(aArgs);
      started.push(a2);
      expect((await hb(aCtl)).incarnation).toBe((first + 1n).toString());
      await waitFor(async () => (await hb(bCtl)).peerAnnounced?.incarnation === (first + 1n).toString(), 'beta to take the restarted alpha\'s beats', { timeoutMs: 15_000 });
      expect((await hb(bCtl)).state).toBe('alive');
      expect(JSON.parse(await readFile(join(dir, 'a.img.term.json'), 'utf8'))).toMatchObject({ incarnation: (first + 1n).toString() });
    } finally {
      for (const s of started.reverse()) await s.stop('SIGKILL').catch(() => undefined);
    }
  }, 90_000);
});
