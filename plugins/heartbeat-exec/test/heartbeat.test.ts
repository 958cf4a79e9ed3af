import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Heartbeats } from '../../../src/engine/registry.js';
import { runHeartbeatCompliance } from '../../../src/testing/heartbeat-compliance.js';
import hook from '../src/hook.js';
import { createExecHeartbeat } from '../src/index.js';

const dir = mkdtempSync(join(os.tmpdir(), 'blkrep-hbexec-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

runHeartbeatCompliance('exec', createExecHeartbeat, {
  probe: { alive: 'exec:true', dead: 'exec:exit 1' },
  badUris: ['exec:', 'exec:   ', 'execx:true', 'udp://x:1'],
});

async function until(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('exec heartbeat', () => {
  it('gives the probe this node and its peer in the environment', async () => {
    const out = join(dir, 'env');
    const p = createExecHeartbeat().open(`exec:echo "$BLKREP_NODE $BLKREP_PEER" > ${out}`, { self: 'beta', peer: 'alpha', intervalMs: 50 });
    let beats = 0;
    p.onBeat(() => beats++);
    await p.start();
    await until(() => beats > 0, 'a beat');
    await p.stop();
    expect(readFileSync(out, 'utf8')).toBe('beta alpha\n');
  });

  it('a command that cannot run is an error, not a beat', async () => {
    const p = createExecHeartbeat().open('exec:/nonexistent/probe', { self: 'a', peer: 'b', intervalMs: 50 });
    const errors: Array<{ code?: string; message: string }> = [];
    let beats = 0;
    p.onBeat(() => beats++);
    p.onError((e) => errors.push(e as { code?: string; message: string }));
    await p.start();
    await until(() => errors.length > 0, 'an error');
    await p.stop();
    expect(beats).toBe(0);
    expect(errors[0]).toMatchObject({ code: 'ERR_HEARTBEAT_PROBE', message: expect.stringContaining('exit 127') });
  });

  it('a probe that hangs is killed with its children after max(5 intervals, 2 s), and is no beat', async () => {
    const pidFile = join(dir, 'hang.pid');
    const p = createExecHeartbeat().open(`exec:sleep 600 & echo $! > ${pidFile}; wait`, { self: 'a', peer: 'b', intervalMs: 50 });
    const errors: string[] = [];
    let beats = 0;
    p.onBeat(() => beats++);
    p.onError((e) => errors.push((e as unknown as { code: string }).code));
    await p.start();
    await until(() => errors.length > 0, 'the timeout');
    expect(errors[0]).toBe('ERR_HEARTBEAT_PROBE');
    const pid = Number(readFileSync(pidFile, 'utf8'));
    await until(() => !existsSync(`/proc/${pid}`) || /State:\s+Z/.test(readFileSync(`/proc/${pid}/status`, 'utf8')), 'the probe\'s child to die');
    await p.stop();
    expect(beats).toBe(0);
  });

  it('registers itself as "exec" through the blkrep:register hook', async () => {
    const heartbeats = new Heartbeats();
    await hook.call(undefined, { transports: undefined as never, heartbeats });
    expect(heartbeats.get('exec').name).toBe('exec');
  });
});
