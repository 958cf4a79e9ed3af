/**
 * The etcd heartbeat backend against a real one-node etcd (test/support/etcd.ts): the shared
 * compliance suite, the key layout, a beat left behind that never counts, etcd down and back.
 */
import { describe, expect, it } from 'vitest';
import { Heartbeats } from '../../../src/engine/registry.js';
import { runHeartbeatCompliance } from '../../../src/testing/heartbeat-compliance.js';
import { startEtcd, type Etcd } from '../../../test/support/etcd.js';
import { waitFor } from '../../../test/support/spawn.js';
import hook from '../src/hook.js';
import { createEtcdHeartbeat, parseEtcdUri } from '../src/index.js';

let prefixes = 0;

runHeartbeatCompliance('etcd', createEtcdHeartbeat, {
  pair: async () => {
    // one etcd per test (the support module removes it after each)
    const etcd = await startEtcd();
    const uri = etcd.uri(`/pairs/p${prefixes++}`);
    return { a: uri, b: uri };
  },
  badUris: ['etcd://127.0.0.1/p', 'etcd://127.0.0.1:2379', 'etcd://127.0.0.1:2379/', 'etcd://127.0.0.1:2379/p?x=1', 'etcd://127.0.0.1:99999/p', 'udp://127.0.0.1:1'],
});

const get = async (e: Etcd, key: string): Promise<Buffer | undefined> => {
  const r = (await (await fetch(`${e.endpoint}/v3/kv/range`, { method: 'POST', body: JSON.stringify({ key: Buffer.from(key).toString('base64') }) })).json()) as { kvs?: Array<{ value: string }> };
  return r.kvs?.[0] ? Buffer.from(r.kvs[0].value, 'base64') : undefined;
};

describe('etcd heartbeat', () => {
  it('parses host, port and prefix', () => {
    expect(parseEtcdUri('etcd://10.0.0.5:2379/blkrep/pair1/')).toEqual({ endpoint: 'http://10.0.0.5:2379', prefix: '/blkrep/pair1' });
    expect(() => parseEtcdUri('etcd://h:1')).toThrow(expect.objectContaining({ code: 'ERR_BAD_HEARTBEAT', message: expect.stringContaining('no key prefix') }));
  });

  it('writes each frame into PREFIX/beat/NODE; a beat left there before the path started never counts', async () => {
    const e = await startEtcd();
    const uri = e.uri('/blkrep/pair9');
    // "beta" beat once and died
    await fetch(`${e.endpoint}/v3/kv/put`, { method: 'POST', body: JSON.stringify({ key: Buffer.from('/blkrep/pair9/beat/beta').toString('base64'), value: Buffer.from('stale').toString('base64') }) });
    const a = createEtcdHeartbeat().open(uri, { self: 'alpha', peer: 'beta', intervalMs: 50 });
    const got: string[] = [];
    a.onBeat((r) => got.push(r.frame.toString()));
    await a.start();
    a.send(Buffer.from('hello'));
    await waitFor(async () => (await get(e, '/blkrep/pair9/beat/alpha'))?.toString() === 'hello', 'alpha key');
    await new Promise((r) => setTimeout(r, 300));
    expect(got).toEqual([]);
    const b = createEtcdHeartbeat().open(uri, { self: 'beta', peer: 'alpha', intervalMs: 50 });
    await b.start();
    b.send(Buffer.from('fresh'));
    await waitFor(() => got.includes('fresh'), 'the fresh beat');
    expect(got).toEqual(['fresh']);
    await a.stop();
    await b.stop();
  });

  it('etcd killed: errors are reported, nothing is; etcd restarted: beats come through again', async () => {
    const e = await startEtcd();
    const uri = e.uri('/p');
    const a = createEtcdHeartbeat().open(uri, { self: 'alpha', peer: 'beta', intervalMs: 50 });
    const b = createEtcdHeartbeat().open(uri, { self: 'beta', peer: 'alpha', intervalMs: 50 });
    const got: string[] = [];
    const errors: Array<{ code: string; message: string }> = [];
    b.onBeat((r) => got.push(r.frame.toString()));
    b.onError((err) => errors.push(err as Error & { code: string }));
    await Promise.all([a.start(), b.start()]);
    a.send(Buffer.from('one'));
    await waitFor(() => got.includes('one'), 'beat one');
    await e.kill();
    await waitFor(() => errors.length > 0, 'a read error');
    expect(errors[0]).toMatchObject({ code: 'ERR_HEARTBEAT_RECEIVE', message: expect.stringContaining("cannot read the peer's key /p/beat/alpha on http://127.0.0.1:") });
    const count = got.length;
    await new Promise((r) => setTimeout(r, 200));
    expect(got.length).toBe(count);
    await e.restart();
    const resend = setInterval(() => a.send(Buffer.from('two')), 50);
    await waitFor(() => got.includes('two'), 'beat two after the restart', { timeoutMs: 10_000 });
    clearInterval(resend);
    await a.stop();
    await b.stop();
  });

  it('registers itself as "etcd" through the blkrep:register hook', async () => {
    const heartbeats = new Heartbeats();
    await hook.call(undefined, { transports: undefined as never, heartbeats });
    expect(heartbeats.get('etcd').name).toBe('etcd');
  });
});
