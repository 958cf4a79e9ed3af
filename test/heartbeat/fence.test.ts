/**
 * The fence hook runner with real shell scripts: every DRBD fence-peer exit code, the
 * environment the hook sees, force, a timeout that kills the hook's whole process group.
 */
import { existsSync, readFileSync } from 'node:fs';
import { readFile, writeFile, chmod } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { describeFence, runFenceHook } from '../../src/heartbeat/fence.js';
import { makeTempDir, waitFor } from '../support/spawn.js';

async function script(dir: string, name: string, body: string): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, `#!/bin/sh\n${body}\n`);
  await chmod(path, 0o700);
  return path;
}

describe('fence hook', () => {
  it.each([
    [3, 'inconsistent', false],
    [4, 'outdated', true],
    [5, 'unreachable', false],
    [6, 'refused', false],
    [7, 'fenced', true],
    [0, 'failed', false],
    [1, 'failed', false],
    [8, 'failed', false],
  ] as const)('exit %i is "%s", proceed %s', async (code, verdict, proceed) => {
    const dir = await makeTempDir();
    const hook = await script(dir, 'fence.sh', `echo "fencing $BLKREP_PEER" >&2\nexit ${code}`);
    const r = await runFenceHook({ command: hook, node: 'beta', peer: 'alpha' });
    expect(r).toMatchObject({ verdict, exitCode: code, proceed, forced: false, stderr: 'fencing alpha\n' });
  });

  it('force proceeds on any code and says it was forced; a confirmed fence is not "forced"', async () => {
    const dir = await makeTempDir();
    const five = await script(dir, 'five.sh', 'exit 5');
    const seven = await script(dir, 'seven.sh', 'exit 7');
    expect(await runFenceHook({ command: five, node: 'b', peer: 'a', force: true })).toMatchObject({ verdict: 'unreachable', proceed: true, forced: true });
    expect(await runFenceHook({ command: seven, node: 'b', peer: 'a', force: true })).toMatchObject({ verdict: 'fenced', proceed: true, forced: false });
  });

  it('gives the hook the peer in BLKREP_* and DRBD_* variables', async () => {
    const dir = await makeTempDir();
    const out = join(dir, 'env.txt');
    const hook = await script(dir, 'env.sh', `env | grep -E '^(BLKREP|DRBD)_' | sort > ${out}\nexit 4`);
    await runFenceHook({ command: hook, node: 'beta', peer: 'alpha', resource: 'disk0', epoch: 12n, generation: '00000000000000aa', peerAddresses: ['udp://10.0.0.1:7000', 'file:///dev/sdz'] });
    expect((await readFile(out, 'utf8')).trim().split('\n')).toEqual([
      'BLKREP_EPOCH=12',
      'BLKREP_GENERATION=00000000000000aa',
      'BLKREP_NODE=beta',
      'BLKREP_PEER=alpha',
      'BLKREP_PEER_ADDRESSES=udp://10.0.0.1:7000 file:///dev/sdz',
      'BLKREP_RESOURCE=disk0',
      'DRBD_PEER=alpha',
      'DRBD_RESOURCE=disk0',
    ]);
  });

  it('a hook past its timeout is killed with the children it started, and counts as not fenced', async () => {
    const dir = await makeTempDir();
    const pidFile = join(dir, 'child.pid');
    // the hook starts a child that would outlive it, then hangs
    const hook = await script(dir, 'hang.sh', `sleep 600 & echo $! > ${pidFile}\nwait`);
    const r = await runFenceHook({ command: hook, node: 'b', peer: 'a', timeoutMs: 300, killGraceMs: 200 });
    expect(r).toMatchObject({ verdict: 'timeout', proceed: false });
    expect(r.durationMs).toBeGreaterThanOrEqual(300);
    const pid = Number((await readFile(pidFile, 'utf8')).trim());
    await waitFor(() => !existsSync(`/proc/${pid}`) || /State:\s+Z/.test(safeRead(`/proc/${pid}/status`)), `sleep ${pid} to be killed`, { timeoutMs: 5000 });
  });

  it('a hook that does not exist fails (sh exits 127), never proceeds', async () => {
    const r = await runFenceHook({ command: '/nonexistent/fence-hook', node: 'b', peer: 'a' });
    expect(r).toMatchObject({ verdict: 'failed', exitCode: 127, proceed: false });
  });

  it('a hook that exits 4 while a background child holds stderr still counts at once', async () => {
    const dir = await makeTempDir();
    const hook = await script(dir, 'bg.sh', 'sleep 5 >&2 &\nexit 4');
    const r = await runFenceHook({ command: hook, node: 'b', peer: 'a', timeoutMs: 3000 });
    expect(r).toMatchObject({ verdict: 'outdated', proceed: true });
    expect(r.durationMs).toBeLessThan(2000);
  });

  it('a hook without the x bit fails (sh exits 126) and the log line says it never ran', async () => {
    const dir = await makeTempDir();
    const hook = await script(dir, 'fence.sh', 'exit 7');
    await chmod(hook, 0o644);
    const r = await runFenceHook({ command: hook, node: 'b', peer: 'a' });
    expect(r).toMatchObject({ verdict: 'failed', exitCode: 126, proceed: false, stderr: expect.stringContaining('Permission denied') });
    expect(describeFence(r, 'a')).toBe('fence hook for peer "a" exited 126 (the shell could not run it: not executable (chmod +x) — not fenced); not proceeding (only 4 "outdated" and 7 "fenced" confirm the peer cannot write)');
    const missing = await runFenceHook({ command: join(dir, 'nope.sh'), node: 'b', peer: 'a' });
    expect(describeFence(missing, 'a')).toContain('exited 127 (the shell could not find it: no such command — not fenced)');
  });

  it('a hook killed by a signal fails, never proceeds, and the log says which signal', async () => {
    const r = await runFenceHook({ command: 'kill -9 $$', node: 'b', peer: 'a' });
    expect(r).toMatchObject({ verdict: 'failed', exitCode: null, signal: 'SIGKILL', proceed: false });
    expect(describeFence(r, 'a')).toMatch(/^fence hook for peer "a" was killed by SIGKILL \(not a fence-peer exit code/);
  });

  it('a hook that writes 20 MB to stderr and stdout: its verdict counts, only the last 4 KiB of stderr is kept', async () => {
    const r = await runFenceHook({ command: 'head -c 10000000 /dev/zero; head -c 10000000 /dev/zero | tr "\\0" x >&2; echo END >&2; exit 7', node: 'b', peer: 'a', timeoutMs: 30_000 });
    expect(r).toMatchObject({ verdict: 'fenced', exitCode: 7, proceed: true });
    expect(r.stderr.length).toBe(4096);
    expect(r.stderr.endsWith('xEND\n')).toBe(true);
  });

  it('describes the outcome for the log', () => {
    const base = { exitCode: 5, signal: null, proceed: false, forced: false, durationMs: 1, stderr: '' };
    expect(describeFence({ ...base, verdict: 'unreachable' }, 'alpha')).toBe(
      'fence hook for peer "alpha" exited 5 (the peer is unreachable: not fenced); not proceeding (only 4 "outdated" and 7 "fenced" confirm the peer cannot write)',
    );
  });
});

function safeRead(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}
