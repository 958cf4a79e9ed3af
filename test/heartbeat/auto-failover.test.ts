/**
 * Automatic failover with real fence scripts: fence first, fail over only on 4 or 7, never
 * forced, once per death; a daemon without a failover verb fences nothing.
 */
import { existsSync } from 'node:fs';
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { AutoFailover, type AutoFailoverOptions } from '../../src/heartbeat/auto-failover.js';
import type { PeerEvent } from '../../src/heartbeat/monitor.js';
import { makeTempDir } from '../support/spawn.js';

const dead: PeerEvent = { event: 'peer-dead', peer: 'alpha', from: 'suspect', silentMs: 2600, paths: [] };
const alive: PeerEvent = { event: 'peer-alive', peer: 'alpha', from: 'dead', silentMs: 0, paths: [] };

async function setup(exitCode: number, extra: Partial<AutoFailoverOptions> = {}) {
  const dir = await makeTempDir();
  const hook = join(dir, 'fence.sh');
  const ran = join(dir, 'ran');
  await writeFile(hook, `#!/bin/sh\necho "$BLKREP_PEER" >> ${ran}\nexit ${exitCode}\n`);
  await chmod(hook, 0o700);
  const events: Array<{ event: string; fields: Record<string, unknown> }> = [];
  const calls: number[] = [];
  const auto = new AutoFailover({
    node: 'beta',
    peer: 'alpha',
    fenceHook: hook,
    hasFailover: () => true,
    failover: async () => {
      calls.push(1);
      return { role: 'primary' };
    },
    publish: (event, fields) => events.push({ event, fields }),
    ...extra,
  });
  return { auto, events, calls, ran };
}

describe('automatic failover', () => {
  it.each([4, 7])('fence hook exit %i: fenced, then failover is called once', async (code) => {
    const { auto, events, calls } = await setup(code);
    const outcome = await auto.onPeerEvent(dead);
    expect(outcome).toMatchObject({ failedOver: true, code: null, fence: { exitCode: code, proceed: true, forced: false } });
    expect(calls).toEqual([1]);
    expect(events.map((e) => e.event)).toEqual(['fence', 'auto-failover']);
    expect(events[1]!.fields).toMatchObject({ peer: 'alpha', failedOver: true });
  });

  it.each([3, 5, 6, 0, 1])('fence hook exit %i: no failover, never forced (ERR_NOT_FENCED)', async (code) => {
    const { auto, events, calls } = await setup(code);
    const outcome = await auto.onPeerEvent(dead);
    expect(outcome).toMatchObject({ failedOver: false, code: 'ERR_NOT_FENCED', fence: { exitCode: code, proceed: false, forced: false } });
    expect(calls).toEqual([]);
    expect(events.map((e) => e.event)).toEqual(['fence', 'auto-failover']);
    expect(events[1]!.fields).toMatchObject({ failedOver: false, code: 'ERR_NOT_FENCED' });
  });

  it('one attempt per death: a second peer-dead does nothing until the peer was alive again', async () => {
    const { auto, calls, ran } = await setup(7);
    await auto.onPeerEvent(dead);
    expect(auto.onPeerEvent(dead)).toBeUndefined();
    expect(auto.onPeerEvent(alive)).toBeUndefined();
    await auto.onPeerEvent(dead);
    expect(calls).toEqual([1, 1]);
    expect(existsSync(ran)).toBe(true);
  });

  it('without a failover verb it fences nothing and says ERR_NO_FAILOVER', async () => {
    const { auto, events, calls, ran } = await setup(7, { hasFailover: () => false });
    const outcome = await auto.onPeerEvent(dead);
    expect(outcome).toMatchObject({ failedOver: false, code: 'ERR_NO_FAILOVER', fence: null });
    expect(existsSync(ran)).toBe(false);
    expect(calls).toEqual([]);
    expect(events.map((e) => e.event)).toEqual(['auto-failover']);
  });

  it('a failover the secondary would refuse (its dry run) fences nothing and says the refusal\'s code', async () => {
    const refusal = { code: 'ERR_PAIR_OUTDATED', message: 'the secondary is Outdated (the primary degraded after checkpoint 2)' };
    const { auto, events, calls, ran } = await setup(7, { refusal: async () => refusal });
    const outcome = await auto.onPeerEvent(dead);
    expect(outcome).toMatchObject({ failedOver: false, code: 'ERR_PAIR_OUTDATED', fence: null });
    expect(existsSync(ran)).toBe(false);
    expect(calls).toEqual([]);
    expect(events).toEqual([
      { event: 'auto-failover', fields: { peer: 'alpha', failedOver: false, fence: null, code: 'ERR_PAIR_OUTDATED', reason: `peer "alpha" is dead but this node's failover is refused, so nothing is fenced: ${refusal.message}` } },
    ]);
  });

  it('no refusal: fenced and failed over as before; a checkpoint in flight skips the dry run (it would wait behind it)', async () => {
    let asked = 0;
    const a = await setup(7, { refusal: async () => (asked++, null) });
    expect(await a.auto.onPeerEvent(dead)).toMatchObject({ failedOver: true });
    expect(asked).toBe(1);
    const b = await setup(7, { refusal: async () => (asked++, { code: 'ERR_PAIR_OUTDATED', message: 'x' }), checkpointInFlight: () => 3 });
    expect(await b.auto.onPeerEvent(dead)).toMatchObject({ failedOver: true });
    expect(asked).toBe(1);
    expect(b.events.map((e) => e.event)).toEqual(['fence', 'failover-deferred', 'auto-failover']);
  });

  it('a failover verb that fails gives its own code', async () => {
    const { auto, events } = await setup(4, {
      failover: async () => {
        throw new BlkrepError('ERR_SPLIT_BRAIN', 'both nodes were primary');
      },
    });
    const outcome = await auto.onPeerEvent(dead);
    expect(outcome).toMatchObject({ failedOver: false, code: 'ERR_SPLIT_BRAIN' });
    expect(events[1]!.fields).toMatchObject({ code: 'ERR_SPLIT_BRAIN', reason: expect.stringContaining('both nodes were primary') });
  });
});
