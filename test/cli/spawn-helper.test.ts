/**
 * The spawn helper itself (test/support/spawn.ts): failures to start are reported with the
 * server's own words, the listening wait is bounded, and nothing outlives its test.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli, serve } from '../support/spawn.js';

function running(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('test/support/spawn.ts', () => {
  it('serve() rejects with what the server printed when it cannot start', async () => {
    const dir = await makeTempDir();
    const missing = join(dir, 'missing.raw');
    const err = await serve([missing, '--socket', join(dir, 's.sock')]).then(
      () => new Error('serve() resolved'),
      (e: unknown) => e as Error,
    );
    expect(err.message).toMatch(/exited \(code 1|not JSON|instead of the listening line/);
    expect(err.message).toContain(missing);
  });

  it('serve() gives up after its timeout, naming the command and killing the child', async () => {
    const dir = await makeTempDir();
    const err = await serve(['memory:1M', '--socket', join(dir, 's.sock')], { timeoutMs: 1 }).then(
      () => new Error('serve() resolved'),
      (e: unknown) => e as Error,
    );
    expect(err.message).toMatch(/timed out after 1 ms waiting for the listening line of blkrep serve-nbd memory:1M/);
  });

  let leftover = 0;
  let leftoverDir = '';
  it('a server started in a test …', async () => {
    leftoverDir = await makeTempDir();
    const s = await serve(['memory:1M', '--socket', join(leftoverDir, 's.sock')]);
    leftover = s.pid;
    expect(running(leftover)).toBe(true);
  });

  it('… is killed and its temp dir removed after that test', () => {
    expect(leftover).toBeGreaterThan(0);
    expect(running(leftover)).toBe(false);
    expect(existsSync(leftoverDir)).toBe(false);
  });

  it('runCli() returns code, stdout and stderr', async () => {
    const r = await runCli(['serve-nbd', '--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('--socket');
    expect(r.stderr).toBe('');
  });
});
