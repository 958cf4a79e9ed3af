/**
 * `blkrep demo`: the whole pair as two daemons, kill -9 of the primary, failover, failback —
 * run as a user runs it, checked by its JSON result (each step, and both byte-for-byte checks).
 */
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli } from '../support/spawn.js';
import { readdir } from 'node:fs/promises';

describe('blkrep demo', () => {
  it('runs every step; failover holds the checkpoint byte for byte, failback leaves equal disks; cleans up', async () => {
    const parent = await makeTempDir();
    const r = await runCli(['demo', '--size', '8M', '--dir', parent, '--json'], { timeoutMs: 120_000 });
    expect(r.stderr).toBe('');
    const out = JSON.parse(r.stdout) as { failoverVerified: boolean; failbackVerified: boolean; epoch: number; steps: Array<{ id: string }> };
    expect(r.code).toBe(0);
    expect(out.steps.map((s) => s.id)).toEqual([
      'disks', 'secondary', 'primary', 'write-1', 'checkpoint', 'write-2', 'kill-primary', 'failover', 'verify-failover', 'failback', 'verify-failback',
    ]);
    expect(out.epoch).toBeGreaterThanOrEqual(1);
    expect(out.failoverVerified).toBe(true);
    expect(out.failbackVerified).toBe(true);
    expect(await readdir(parent)).toEqual([]);
  }, 150_000);

  it('refuses a size that is not a whole number of MiB, exit 2, before starting anything', async () => {
    const parent = await makeTempDir();
    const r = await runCli(['demo', '--size', '3000K', '--dir', parent, '--json']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_USAGE', message: expect.stringContaining('multiple of 1 MiB') } });
    expect(await readdir(parent)).toEqual([]);
  });
});
