/**
 * A heartbeat plugin written outside the repository (test/fixtures/heartbeat-fixture, plain
 * JavaScript, its own package.json) loads through the blkrep:register oclif hook as an installed
 * plugin would, and passes the compliance suite.
 */
import { Config } from '@oclif/core';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import type { HeartbeatBackend, RegisterHookOptions } from '../../src/api/index.js';
import { Heartbeats, Transports, Upgraders } from '../../src/engine/registry.js';
import { runHeartbeatCompliance } from '../../src/testing/heartbeat-compliance.js';

const FIXTURE = fileURLToPath(new URL('../fixtures/heartbeat-fixture/', import.meta.url));

async function loadThroughHook(): Promise<Heartbeats> {
  const config = await Config.load(FIXTURE);
  const heartbeats = new Heartbeats();
  const result = await config.runHook('blkrep:register', { transports: new Transports(), upgraders: new Upgraders(), heartbeats } satisfies RegisterHookOptions);
  expect(result.failures).toEqual([]);
  return heartbeats;
}

const registry = await loadThroughHook();
let channel = 0;

describe('a heartbeat plugin from outside the repository', () => {
  it('registers "loop" through the blkrep:register hook', async () => {
    expect(registry.names()).toEqual(['loop']);
    expect((await loadThroughHook()).get('loop').summary).toContain('test fixture');
  });
});

runHeartbeatCompliance('loop', () => registry.get('loop') as HeartbeatBackend, {
  pair: () => {
    const uri = `loop:c${channel++}`;
    return { a: uri, b: uri };
  },
  badUris: ['loop:', 'loop:a b', 'udp://x:1'],
});
