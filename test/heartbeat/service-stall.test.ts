/**
 * A stall of the receiving node is not the peer's silence: beats the peer sent while this
 * process did not run wait in the path's socket, and the event loop runs its timers before it
 * reads them. The service's check, when it comes late, waits for the loop's I/O phase, so it
 * counts them before it judges (service.ts check()). Real timers, a real udp path, the peer's
 * beat sent by another process while this one is blocked (execFileSync: a stall, and a bound
 * on when the beat is in the socket).
 */
import dgram from 'node:dgram';
import { execFileSync } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { Heartbeats } from '../../src/engine/registry.js';
import { encodeBeat } from '../../src/heartbeat/beat.js';
import { HeartbeatService } from '../../src/heartbeat/service.js';
import { createUdpHeartbeat } from '../../plugins/heartbeat-udp/src/index.js';
import { freeUdpPort } from '../support/heartbeat.js';
import { waitFor } from '../support/spawn.js';

const KEY = Buffer.from('pair key, 32 bytes long, really');
const INTERVAL = 100;
const beat = (seq: bigint): Buffer => encodeBeat({ node: 'alpha', incarnation: 7n, seq, epoch: 0n, generation: '0000000000000000' }, KEY);

describe('heartbeat service after a stall of its own process', () => {
  const closers: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of closers.splice(0)) await c();
  });

  it('beats that arrived during the stall are counted before the silence is judged: no peer-suspect, no peer-dead', async () => {
    const [mine, theirs] = [await freeUdpPort(), await freeUdpPort()];
    const registry = new Heartbeats();
    registry.register('udp', createUdpHeartbeat);
    const events: string[] = [];
    const service = await HeartbeatService.start({
      uris: [`udp://127.0.0.1:${theirs}?listen=127.0.0.1:${mine}`],
      registry,
      self: 'beta',
      peer: 'alpha',
      key: KEY,
      intervalMs: INTERVAL,
      // suspect after 200 ms of silence, dead after 1 s
      detector: { kind: 'fixed', intervalMs: INTERVAL, misses: 10 },
      publish: (event) => events.push(event),
    });
    closers.push(() => service.stop());
    const peer = dgram.createSocket('udp4');
    await new Promise<void>((resolve) => peer.bind(theirs, '127.0.0.1', resolve));
    closers.push(() => new Promise((resolve) => peer.close(() => resolve())));

    peer.send(beat(1n), mine, '127.0.0.1');
    await waitFor(() => service.peerState === 'alive' || undefined, 'the first beat');
    expect(events).toEqual(['peer-alive']);

    // this process stalls for at least 2.5 intervals (the child sleeps 250 ms); the peer's next
    // beat is in the socket before the stall ends (the child sends it, then exits)
    const script = `const d=require('node:dgram');setTimeout(()=>{const s=d.createSocket('udp4');s.send(Buffer.from(process.argv[1],'hex'),${mine},'127.0.0.1',()=>s.close());},250);`;
    const before = performance.now();
    execFileSync(process.execPath, ['-e', script, beat(2n).toString('hex')], { timeout: 30_000 });
    expect(performance.now() - before).toBeGreaterThanOrEqual(2.5 * INTERVAL);

    await waitFor(() => service.status().paths[0]!.beats === 2 || undefined, 'the beat sent during the stall');
    // and a few checks after it (two check periods)
    const lastBeatAgo = (): number => service.status().paths[0]!.lastBeatAgoMs!;
    await waitFor(() => lastBeatAgo() >= 2 * (INTERVAL / 10) || undefined, 'checks after the beat');
    expect(events).toEqual(['peer-alive']);
    expect(service.peerState).toBe('alive');
  });
});
