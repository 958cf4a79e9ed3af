import net from 'node:net';
import os from 'node:os';
import { afterEach, describe, expect, it, vi } from 'vitest';
import type { TransportConnection } from '../../../src/api/index.js';
import { Transports } from '../../../src/engine/registry.js';
import { runTransportCompliance } from '../../../src/testing/transport-compliance.js';
import hook from '../src/hook.js';
import { createTcpTransport, parseTcpAddress } from '../src/index.js';

runTransportCompliance('tcp', createTcpTransport, () => '127.0.0.1:0', { uriScheme: 'nbd:' });

const hasIpv6Loopback = Object.values(os.networkInterfaces()).some((addrs) => addrs?.some((a) => a.address === '::1'));

describe('tcp transport', () => {
  const cleanups: Array<() => unknown> = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });

  it('resolves port 0 to the port actually bound', async () => {
    const listener = await createTcpTransport().listen('127.0.0.1:0', { onConnection: (c) => c.stream.destroy() });
    cleanups.push(() => listener.close());
    const { host, port } = parseTcpAddress(listener.address);
    expect(host).toBe('127.0.0.1');
    expect(port).toBeGreaterThan(0);
    expect(listener.uri('disk 1')).toBe(`nbd://127.0.0.1:${port}/disk%201`);
    expect(listener.uri('')).toBe(`nbd://127.0.0.1:${port}/`);
  });

  /** Listen with a transport; the promise resolves with the first accepted connection. */
  async function listenOnce(address: string) {
    const transport = createTcpTransport();
    let accept!: (c: TransportConnection) => void;
    const accepted = new Promise<TransportConnection>((resolve) => (accept = resolve));
    const listener = await transport.listen(address, {
      onConnection: (c) => {
        cleanups.push(() => c.stream.destroy());
        accept(c);
      },
    });
    cleanups.push(() => listener.close());
    return { transport, listener, accepted };
  }

  it.skipIf(!hasIpv6Loopback)('listens and connects on [::1], with the host in brackets in the URI', async () => {
    const { transport, listener, accepted } = await listenOnce('[::1]:0');
    expect(listener.address).toMatch(/^\[::1\]:[1-9]\d*$/);
    expect(new URL(listener.uri('x')).hostname).toBe('[::1]');
    const client = await transport.connect(listener.address);
    cleanups.push(() => client.stream.destroy());
    expect(client.peer).toBe(listener.address);
    expect((await accepted).peer).toMatch(/^\[::1\]:\d+$/);
  });

  it('turns Nagle off on both ends', async () => {
    const setNoDelay = vi.spyOn(net.Socket.prototype, 'setNoDelay');
    cleanups.push(() => setNoDelay.mockRestore());
    const { transport, listener, accepted } = await listenOnce('127.0.0.1:0');
    const client = await transport.connect(listener.address);
    cleanups.push(() => client.stream.destroy());
    const server = await accepted;
    expect(setNoDelay.mock.contexts).toContain(client.stream);
    expect(setNoDelay.mock.contexts).toContain(server.stream);
    for (const call of setNoDelay.mock.calls) expect(call[0]).toBe(true);
  });

  it('refuses a port already in use, naming the address', async () => {
    const transport = createTcpTransport();
    const first = await transport.listen('127.0.0.1:0', { onConnection: (c) => c.stream.destroy() });
    cleanups.push(() => first.close());
    await expect(transport.listen(first.address, { onConnection: () => {} })).rejects.toMatchObject({
      code: 'ERR_ADDRESS_IN_USE',
      message: expect.stringContaining(first.address),
    });
  });

  it.each([
    ['localhost', 'expected "host:port"'],
    ['::1:10809', 'in brackets'],
    ['127.0.0.1:65536', 'port 65536'],
    ['127.0.0.1:port', 'expected "host:port"'],
    [':10809', 'expected "host:port"'],
  ])('rejects the address %s', async (address, why) => {
    const err = await createTcpTransport()
      .listen(address, { onConnection: () => {} })
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'ERR_BAD_ADDRESS', errno: 'EINVAL' });
    expect((err as Error).message).toContain(address);
    expect((err as Error).message).toContain(why);
  });

  it('refuses to connect to port 0', async () => {
    await expect(createTcpTransport().connect('127.0.0.1:0')).rejects.toMatchObject({ code: 'ERR_BAD_ADDRESS' });
  });

  it('parses addresses', () => {
    expect(parseTcpAddress('example.com:10809')).toEqual({ host: 'example.com', port: 10809 });
    expect(parseTcpAddress('[fe80::1%eth0]:0')).toEqual({ host: 'fe80::1%eth0', port: 0 });
  });
});

describe('tcp plugin hook', () => {
  it('registers the tcp factory in the transport registry', async () => {
    const transports = new Transports();
    await hook.call({}, { transports });
    expect(transports.names()).toEqual(['tcp']);
    const transport = transports.get('tcp');
    expect(transport.name).toBe('tcp');
    expect(transports.get('tcp')).toBe(transport);
  });
});
