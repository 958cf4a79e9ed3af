/**
 * The engine's registries (transports, connection upgraders, heartbeat backends) and the NBD
 * client connecting only through a transport registry.
 */
import { describe, expect, it } from 'vitest';
import type { ConnectionUpgrader, TransportConnection } from '../../src/api/index.js';
import { defaultTransports } from '../../src/engine/default-transports.js';
import { Heartbeats, Transports, Upgraders } from '../../src/engine/registry.js';
import { NbdClient } from '../../src/nbd/client.js';

describe('registries', () => {
  it('an upgrader is registered by name, made once, and takes a connection and returns the upgraded one', async () => {
    const upgraders = new Upgraders();
    let made = 0;
    const tag = (c: TransportConnection, side: string): TransportConnection => ({ stream: c.stream, peer: `${side}(${c.peer})` });
    upgraders.register('tls', (): ConnectionUpgrader => {
      made += 1;
      return { name: 'tls', summary: 'test', server: async (c) => tag(c, 'server-tls'), client: async (c) => tag(c, 'client-tls') };
    });
    expect(upgraders.names()).toEqual(['tls']);
    expect(upgraders.get('tls')).toBe(upgraders.get('tls'));
    expect(made).toBe(1);
    const { PassThrough } = await import('node:stream');
    const up = await upgraders.get('tls').client({ stream: new PassThrough(), peer: 'p' });
    expect(up.peer).toBe('client-tls(p)');
  });

  it('a missing entry is a clear error naming what is installed, with a code per registry', () => {
    const transports = new Transports();
    transports.register('tcp', () => ({ name: 'tcp', summary: '', listen: () => Promise.reject(new Error('unused')), connect: () => Promise.reject(new Error('unused')) }));
    expect(() => transports.get('quic')).toThrow(expect.objectContaining({ code: 'ERR_NO_TRANSPORT', message: 'no transport named "quic" is installed (installed: tcp)' }));
    expect(() => new Upgraders().get('tls')).toThrow(expect.objectContaining({ code: 'ERR_NO_UPGRADER', message: 'no connection upgrader named "tls" is installed (installed: none)' }));
    const heartbeats = new Heartbeats();
    expect(() => heartbeats.get('udp')).toThrow(expect.objectContaining({ code: 'ERR_NO_HEARTBEAT', details: { name: 'udp', installed: [] } }));
    heartbeats.register('udp', () => ({ name: 'udp', summary: 'test', caps: { frames: true, independentPath: false, authoritative: false }, open: () => { throw new Error('unused'); } }));
    expect(heartbeats.get('udp').name).toBe('udp');
  });

  it('the default registry holds the built-in tcp and unix plugins', async () => {
    const t = await defaultTransports();
    expect(t.names()).toEqual(['tcp', 'unix']);
    expect(t.get('tcp').name).toBe('tcp');
    expect(t.get('unix').name).toBe('unix');
  });

  it('the NBD client connects only through its registry: one without the URI\'s transport is ERR_NO_TRANSPORT, not a direct socket', async () => {
    const onlyUnix = new Transports();
    onlyUnix.register('unix', () => ({ name: 'unix', summary: '', listen: () => Promise.reject(new Error('unused')), connect: () => Promise.reject(new Error('unused')) }));
    await expect(NbdClient.connect({ uri: 'nbd://127.0.0.1:1/x', transports: onlyUnix, reconnect: false })).rejects.toMatchObject({ code: 'ERR_NO_TRANSPORT' });
  });
});
