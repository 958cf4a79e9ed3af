import dgram from 'node:dgram';
import { afterEach, describe, expect, it } from 'vitest';
import { Heartbeats } from '../../../src/engine/registry.js';
import { runHeartbeatCompliance } from '../../../src/testing/heartbeat-compliance.js';
import hook from '../src/hook.js';
import { createUdpHeartbeat, parseUdpUri } from '../src/index.js';

/** A udp port nobody holds right now. */
async function freePort(): Promise<number> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => s.bind(0, '127.0.0.1', resolve));
  const port = s.address().port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

runHeartbeatCompliance('udp', createUdpHeartbeat, {
  pair: async () => {
    const [pa, pb] = [await freePort(), await freePort()];
    return { a: `udp://127.0.0.1:${pb}?listen=127.0.0.1:${pa}`, b: `udp://127.0.0.1:${pa}?listen=127.0.0.1:${pb}` };
  },
  badUris: ['udp://', 'udp://host', 'udp://host:0', 'udp://host:70000', 'udp://host:7000/path', 'udp://host:7000?listen=x', 'udp://host:7000?bind=1.2.3.4:1', 'tcp://host:7000', 'udp://[nothex]:7000'],
});

describe('udp heartbeat', () => {
  const stops: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const s of stops.splice(0)) await s();
  });

  it('listens on the peer\'s port on every address by default, IPv4 or IPv6 as the peer is', () => {
    expect(parseUdpUri('udp://10.0.0.2:7000')).toEqual({ peer: { host: '10.0.0.2', port: 7000 }, listen: { host: '0.0.0.0', port: 7000 } });
    expect(parseUdpUri('udp://[fd00::2]:7000')).toEqual({ peer: { host: 'fd00::2', port: 7000 }, listen: { host: '::', port: 7000 } });
    expect(parseUdpUri('udp://peer.example:7000?listen=192.168.1.1:7100')).toEqual({ peer: { host: 'peer.example', port: 7000 }, listen: { host: '192.168.1.1', port: 7100 } });
  });

  it('a listen port someone else holds is ERR_HEARTBEAT_START naming it', async () => {
    const holder = dgram.createSocket('udp4');
    await new Promise<void>((resolve) => holder.bind(0, '127.0.0.1', resolve));
    stops.push(() => new Promise((resolve) => holder.close(() => resolve())));
    const port = holder.address().port;
    const path = createUdpHeartbeat().open(`udp://127.0.0.1:9?listen=127.0.0.1:${port}`, { self: 'a', peer: 'b', intervalMs: 100 });
    await expect(path.start()).rejects.toMatchObject({ code: 'ERR_HEARTBEAT_START', message: expect.stringContaining(`127.0.0.1:${port}: EADDRINUSE`) });
  });

  it('drops datagrams too large to be a beat', async () => {
    const port = await freePort();
    const path = createUdpHeartbeat().open(`udp://127.0.0.1:9?listen=127.0.0.1:${port}`, { self: 'a', peer: 'b', intervalMs: 100 });
    stops.push(() => path.stop());
    const got: number[] = [];
    path.onBeat((r) => got.push(r.frame.length));
    await path.start();
    const sender = dgram.createSocket('udp4');
    for (const size of [257, 1000, 10]) await new Promise<void>((resolve) => sender.send(Buffer.alloc(size), port, '127.0.0.1', () => resolve()));
    sender.close();
    const deadline = Date.now() + 5000;
    while (got.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(got).toEqual([10]);
  });

  it('registers itself as "udp" through the blkrep:register hook', async () => {
    const heartbeats = new Heartbeats();
    await hook.call(undefined, { transports: undefined as never, heartbeats });
    expect(heartbeats.get('udp').name).toBe('udp');
  });
});
