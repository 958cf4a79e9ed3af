/**
 * Two real serve-nbd daemons beating to each other over udp on 127.0.0.1 (test-heartbeat-*):
 * kill -9 one and the other declares it dead within the bound, never before; kill -STOP then
 * -CONT makes it suspect then alive again; the defaults declare a dead peer within 3 s; status
 * --json shows each path; bad flags are clear errors; --auto-failover without a pair says so.
 */
import { existsSync } from 'node:fs';
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent } from '../../src/control/protocol.js';
import { makeTempDir, runCli, serve, waitFor, type Served } from '../support/spawn.js';
import { freeUdpPort, pairKey, watch as watchEvents, type Watched } from '../support/heartbeat.js';

const watch = (control: string): Promise<Watched> => watchEvents(control, ['peer-alive', 'peer-suspect', 'peer-dead', 'fence', 'auto-failover']);

interface Pair {
  dir: string;
  a: Served;
  b: Served;
  ctlA: string;
  ctlB: string;
}

/** Daemons "alpha" and "beta" beating to each other on one udp path (plus `extraB` flags on beta; `keyB` another key for beta). */
async function startPair(flags: string[], extraB: string[] = [], keyB?: string): Promise<Pair> {
  const dir = await makeTempDir();
  const key = await pairKey(dir);
  const bKey = keyB === undefined ? key : await pairKey(dir, 'b.key', keyB);
  const [pa, pb] = [await freeUdpPort(), await freeUdpPort()];
  const ctlA = join(dir, 'a.ctl');
  const ctlB = join(dir, 'b.ctl');
  const common = ['memory:1M', ...flags];
  const a = await serve([...common, '--heartbeat-key', key, '--socket', join(dir, 'a.sock'), '--control', ctlA, '--node-id', 'alpha', '--peer-id', 'beta', '--heartbeat', `udp://127.0.0.1:${pb}?listen=127.0.0.1:${pa}`]);
  const b = await serve([...common, '--heartbeat-key', bKey, '--socket', join(dir, 'b.sock'), '--control', ctlB, '--node-id', 'beta', '--peer-id', 'alpha', '--heartbeat', `udp://127.0.0.1:${pa}?listen=127.0.0.1:${pb}`, ...extraB]);
  return { dir, a, b, ctlA, ctlB };
}

function names(w: Watched, from = 0): string[] {
  return w.events.slice(from).map((e) => e.event);
}

/**
 * Wait until the daemon's status says its peer is alive (its first peer-alive event may come
 * before the test could subscribe); returns the number of events seen so far, so the test can
 * look only at what follows.
 */
async function heard(w: Watched): Promise<number> {
  await waitFor(async () => ((await w.client.request('status')) as { heartbeat: { state: string } }).heartbeat.state === 'alive', 'the peer to be alive in status');
  return w.events.length;
}

function after(w: Watched, from: number, event: string): (ControlEvent & { at: number }) | undefined {
  return w.events.slice(from).find((e) => e.event === event);
}

describe('serve-nbd --heartbeat between two daemons', () => {
  it('kill -9 one: the other declares it dead 500 ms after its last beat (0.1 s × 5), never sooner; status shows the path', async () => {
    const { a, ctlB } = await startPair(['--heartbeat-interval', '0.1', '--heartbeat-misses', '5']);
    const w = await watch(ctlB);
    try {
      await heard(w);
      const status = await runCli(['status', '--control', ctlB, '--json']);
      expect(status.code).toBe(0);
      const hb = JSON.parse(status.stdout).heartbeat;
      expect(hb).toMatchObject({ node: 'beta', peer: 'alpha', state: 'alive', keyed: true, detector: { kind: 'fixed', intervalMs: 100, misses: 5 } });
      expect(hb.paths).toHaveLength(1);
      expect(hb.paths[0]).toMatchObject({ backend: 'udp', state: 'alive', phi: null, rejected: {}, authenticated: true });
      expect(hb.paths[0].beats).toBeGreaterThan(0);
      expect(hb.paths[0].lastBeatAgoMs).toBeLessThan(1000);
      expect(Date.parse(hb.paths[0].lastBeatAt)).toBeGreaterThan(0);
      const text = await runCli(['status', '--control', ctlB]);
      expect(text.stdout).toContain('Heartbeat: node "beta", peer "alpha" ALIVE (fixed, 100 ms x 5, signed)');
      expect(text.stdout).toMatch(/ {2}udp:\/\/127\.0\.0\.1:\d+\?listen=127\.0\.0\.1:\d+ {2}alive {2}last beat \d+ ms ago, \d+ beats/);

      const mark = w.events.length;
      const killedAt = performance.now();
      a.child.kill('SIGKILL');
      const dead = await waitFor(() => after(w, mark, 'peer-dead'), 'peer-dead on beta', { timeoutMs: 10_000 });
      expect(names(w, mark)).toEqual(['peer-suspect', 'peer-dead']);
      expect(names(w).filter((n) => n === 'peer-dead')).toHaveLength(1);
      // measured by the daemon from the last beat it accepted: never before the bound
      expect(dead.silentMs as number).toBeGreaterThanOrEqual(500);
      // its bound is 500 ms + one check (10 ms); a loaded machine may delay the check timer itself
      expect(dead.silentMs as number).toBeLessThan(1_000);
      expect(dead.at - killedAt).toBeLessThan(1_500);
      expect(dead).toMatchObject({ peer: 'alpha', from: 'suspect', paths: [{ state: 'dead' }] });
    } finally {
      await w.client.close();
    }
  });

  it('kill -STOP makes the peer suspect, -CONT alive again, and it is never declared dead', async () => {
    // dead only after 20 × 0.1 s: ample time to resume it once it is suspect
    const { a, ctlB } = await startPair(['--heartbeat-interval', '0.1', '--heartbeat-misses', '20']);
    const w = await watch(ctlB);
    try {
      const mark = await heard(w);
      a.child.kill('SIGSTOP');
      let suspect: number;
      try {
        await waitFor(() => after(w, mark, 'peer-suspect'), 'peer-suspect on beta', { timeoutMs: 10_000, intervalMs: 5 });
        suspect = w.events.findIndex((e, i) => i >= mark && e.event === 'peer-suspect');
      } finally {
        a.child.kill('SIGCONT');
      }
      const back = await waitFor(() => after(w, suspect + 1, 'peer-alive'), 'peer-alive again on beta', { timeoutMs: 10_000 });
      expect(back).toMatchObject({ from: 'suspect' });
      expect(names(w)).not.toContain('peer-dead');
    } finally {
      await w.client.close();
    }
  });

  it('with the defaults (0.5 s × 5) a peer killed with -9 is dead within 3 s of its last beat', async () => {
    const { a, ctlB } = await startPair([]);
    const w = await watch(ctlB);
    try {
      const mark = await heard(w);
      a.child.kill('SIGKILL');
      const dead = await waitFor(() => after(w, mark, 'peer-dead'), 'peer-dead on beta', { timeoutMs: 10_000 });
      expect(dead.silentMs as number).toBeGreaterThanOrEqual(2_500);
      expect(dead.silentMs as number).toBeLessThan(3_000);
    } finally {
      await w.client.close();
    }
  });

  it('--detector phi: status shows phi per path; kill -9 is declared dead well under 3 s, never within 300 ms', async () => {
    const { a, ctlB } = await startPair(['--heartbeat-interval', '0.1', '--detector', 'phi'], []);
    const w = await watch(ctlB);
    try {
      await heard(w);
      const st = (await w.client.request('status')) as { heartbeat: { detector: unknown; paths: Array<{ phi: unknown }> } };
      expect(st.heartbeat.detector).toEqual({ kind: 'phi', intervalMs: 100, threshold: 8 });
      expect(typeof st.heartbeat.paths[0]!.phi).toBe('number');
      const mark = w.events.length;
      a.child.kill('SIGKILL');
      const dead = await waitFor(() => after(w, mark, 'peer-dead'), 'peer-dead on beta', { timeoutMs: 10_000 });
      // φ = 8 with σ ≥ 100 ms lies about 0.52 s past the mean interval; jitter here only widens σ
      expect(dead.silentMs as number).toBeGreaterThan(300);
      expect(dead.silentMs as number).toBeLessThan(3_000);
    } finally {
      await w.client.close();
    }
  });

  it('beats signed with another key are refused and counted: the peer is never heard, and the daemon says why on stderr', async () => {
    const { b, ctlB } = await startPair(['--heartbeat-interval', '0.1'], [], 'another key, also thirty-two b!!');
    const client = await ControlClient.connect(ctlB, { timeoutMs: 10_000 });
    try {
      const st = await waitFor(async () => {
        const s = (await client.request('status')) as { heartbeat: { state: string; paths: Array<{ rejected: Record<string, number>; beats: number }> } };
        return (s.heartbeat.paths[0]!.rejected['bad-mac'] ?? 0) >= 5 ? s : undefined;
      }, 'five refused beats');
      expect(st.heartbeat.state).toBe('unknown');
      expect(st.heartbeat.paths[0]!.beats).toBe(0);
      expect(b.stderr()).toContain('refused (bad-mac): the HMAC does not match: the sender has another --heartbeat-key');
    } finally {
      await client.close();
    }
  });

  it('--auto-failover on a daemon that is not a secondary says ERR_NO_FAILOVER when the peer dies, and fences nothing', async () => {
    const dir = await makeTempDir();
    const marker = join(dir, 'fenced');
    const hook = join(dir, 'fence.sh');
    await writeFile(hook, `#!/bin/sh\ntouch ${marker}\nexit 7\n`);
    await chmod(hook, 0o700);
    const { a, ctlB } = await startPair(['--heartbeat-interval', '0.1', '--heartbeat-misses', '5'], ['--auto-failover', '--fence-hook', hook]);
    const w = await watch(ctlB);
    try {
      const mark = await heard(w);
      a.child.kill('SIGKILL');
      const auto = await waitFor(() => after(w, mark, 'auto-failover'), 'auto-failover on beta', { timeoutMs: 10_000 });
      expect(names(w, mark)).toEqual(['peer-suspect', 'peer-dead', 'auto-failover']);
      expect(auto).toMatchObject({ peer: 'alpha', failedOver: false, fence: null, code: 'ERR_NO_FAILOVER' });
      expect(existsSync(marker)).toBe(false);
    } finally {
      await w.client.close();
    }
  });
});

describe('serve-nbd heartbeat flags', () => {
  async function refused(args: string[]): Promise<{ code: number | null; error: { code: string; message: string } }> {
    const r = await runCli(['serve-nbd', 'memory:1M', '--socket', join(await makeTempDir(), 's.sock'), '--json', ...args]);
    return { code: r.code, error: JSON.parse(r.stdout.trim().split('\n')[0]!).error };
  }

  it.each([
    [['--heartbeat', 'udp://127.0.0.1:7000'], 2, 'ERR_USAGE', '--peer-id'],
    [['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--node-id', 'x'], 2, 'ERR_USAGE', 'are the same'],
    [['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--heartbeat-interval', '0'], 2, 'ERR_USAGE', '--heartbeat-interval "0"'],
    [['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--phi-threshold', '9'], 2, 'ERR_USAGE', '--phi-threshold is for --detector phi'],
    [['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--detector', 'phi', '--phi-threshold', 'high'], 2, 'ERR_USAGE', '--phi-threshold "high"'],
    [['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--auto-failover'], 2, 'ERR_USAGE', 'fence-hook'],
    [['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x'.repeat(65)], 2, 'ERR_USAGE', 'is not a node id (1 to 64 bytes'],
    [['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--auto-failover', '--fence-hook', 'true', '--fence-timeout', 'soon'], 2, 'ERR_USAGE', '--fence-timeout "soon"'],
    [['--heartbeat', 'quic://127.0.0.1:7000', '--peer-id', 'x'], 1, 'ERR_NO_HEARTBEAT', 'no heartbeat backend named "quic" is installed (installed: etcd, exec, file, tcp, udp)'],
    [['--heartbeat', 'udp://127.0.0.1', '--peer-id', 'x'], 1, 'ERR_BAD_HEARTBEAT', 'invalid heartbeat URI "udp://127.0.0.1"'],
    [['--heartbeat', 'udp://127.0.0.1:7000', '--peer-id', 'x', '--heartbeat-key', '/nonexistent/key'], 1, 'ERR_HEARTBEAT_KEY', '/nonexistent/key'],
  ] as const)('%j → exit %i %s', async (args, exit, code, text) => {
    const r = await refused([...args]);
    expect(r.code).toBe(exit);
    expect(r.error.code).toBe(code);
    expect(r.error.message).toContain(text);
  });
});
