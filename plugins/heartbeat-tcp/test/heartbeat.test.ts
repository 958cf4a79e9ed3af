import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { Heartbeats } from '../../../src/engine/registry.js';
import { runHeartbeatCompliance } from '../../../src/testing/heartbeat-compliance.js';
import hook from '../src/hook.js';
import { createTcpHeartbeat, parseTcpUri } from '../src/index.js';

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

runHeartbeatCompliance('tcp', createTcpHeartbeat, {
  pair: async () => {
    const [pa, pb] = [await freePort(), await freePort()];
    return { a: `tcp://127.0.0.1:${pb}?listen=127.0.0.1:${pa}`, b: `tcp://127.0.0.1:${pa}?listen=127.0.0.1:${pb}` };
  },
  badUris: ['tcp://', 'tcp://host', 'tcp://host:0', 'tcp://host:99999', 'tcp://host:7000/x', 'tcp://host:7000?listen=nope', 'tcp://host:7000?x=1', 'udp://host:7000'],
});

describe('tcp heartbeat', () => {
  const cleanups: Array<() => unknown> = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0)) await c();
  });

  it('defaults to listening on the peer\'s port', () => {
    expect(parseTcpUri('tcp://10.0.0.2:7000')).toEqual({ peer: { host: '10.0.0.2', port: 7000 }, listen: { host: '0.0.0.0', port: 7000 } });
  });

  it('a listen port in use is ERR_HEARTBEAT_START', async () => {
    const holder = net.createServer();
    await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => new Promise((resolve) => holder.close(resolve)));
    const port = (holder.address() as net.AddressInfo).port;
    const path = createTcpHeartbeat().open(`tcp://127.0.0.1:9?listen=127.0.0.1:${port}`, { self: 'a', peer: 'b', intervalMs: 100 });
    await expect(path.start()).rejects.toMatchObject({ code: 'ERR_HEARTBEAT_START', message: expect.stringContaining('EADDRINUSE') });
  });

  it('cuts an incoming connection that announces a frame over 256 bytes, and says so', async () => {
    const port = await freePort();
    const path = createTcpHeartbeat().open(`tcp://127.0.0.1:9?listen=127.0.0.1:${port}`, { self: 'a', peer: 'b', intervalMs: 100 });
    cleanups.push(() => path.stop());
    const errors: Array<{ code?: string }> = [];
    const beats: Buffer[] = [];
    path.onError((e) => errors.push(e as { code?: string }));
    path.onBeat((r) => beats.push(r.frame));
    await path.start();
    const client = net.connect(port, '127.0.0.1');
    client.on('error', () => {});
    const closed = new Promise<void>((resolve) => client.once('close', () => resolve()));
    client.write(Buffer.from([0x01, 0x01, 0xff]));
    await closed;
    expect(beats).toEqual([]);
    expect(errors).toMatchObject([{ code: 'ERR_HEARTBEAT_FRAME' }]);
  });

  it('registers itself as "tcp" through the blkrep:register hook', async () => {
    const heartbeats = new Heartbeats();
    await hook.call(undefined, { transports: undefined as never, heartbeats });
    expect(heartbeats.get('tcp').name).toBe('tcp');
  });
});
