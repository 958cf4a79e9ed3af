/**
 * contrib/ansible: the example playbook passes ansible-playbook --syntax-check, and run for real
 * (-c local, a pair under a scratch root) it changes things the first time and nothing the second
 * (the role's changed is blkrep setup's "changed").
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, REPO_ROOT, run, BIN } from '../support/spawn.js';

const PLAYBOOK = join(REPO_ROOT, 'contrib', 'ansible', 'pair-localhost.yml');

function env(home: string): NodeJS.ProcessEnv {
  return { ...process.env, ANSIBLE_NOCOLOR: '1', ANSIBLE_HOME: home, ANSIBLE_LOCAL_TEMP: join(home, 'tmp'), ANSIBLE_RETRY_FILES_ENABLED: '0' };
}

function recap(stdout: string): { ok: number; changed: number; failed: number } {
  const m = /localhost\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)/.exec(stdout);
  if (!m) throw new Error(`no PLAY RECAP in:\n${stdout}`);
  return { ok: Number(m[1]), changed: Number(m[2]), failed: Number(m[3]) };
}

describe.runIf(hasTool('ansible-playbook'))('contrib/ansible', () => {
  it('the playbook passes --syntax-check', async () => {
    const home = await makeTempDir();
    const r = await run('ansible-playbook', ['--syntax-check', '-i', 'localhost,', PLAYBOOK], { env: env(home), timeoutMs: 120_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
  });

  it('sets up a pair on localhost; run again, it reports no change', async () => {
    const home = await makeTempDir();
    const scratch = join(await makeTempDir(), 'pair');
    const args = ['-c', 'local', '-i', 'localhost,', PLAYBOOK, '-e', `blkrep_scratch=${scratch}`, '-e', JSON.stringify({ blkrep_command: [process.execPath, BIN] })];
    const first = await run('ansible-playbook', args, { env: env(home), timeoutMs: 240_000 });
    expect(first.code, first.stdout + first.stderr).toBe(0);
    expect(recap(first.stdout).changed).toBeGreaterThanOrEqual(4); // the scratch dir, two disks, two setups (and the key)
    const yaml = await readFile(join(scratch, 'a/etc/blkrep/pair0.yaml'), 'utf8');
    expect(yaml).toContain(`replicate-to: nbds://blkrep-pair0@127.0.0.1:20809/pair0?tls-psk-file=${join(scratch, 'a/etc/blkrep/pair0/keys.psk')}\n`);
    expect(await readFile(join(scratch, 'a/etc/blkrep/pair0/keys.psk'), 'utf8')).toBe(await readFile(join(scratch, 'b/etc/blkrep/pair0/keys.psk'), 'utf8'));
    const second = await run('ansible-playbook', args, { env: env(home), timeoutMs: 240_000 });
    expect(second.code, second.stdout + second.stderr).toBe(0);
    expect(recap(second.stdout)).toMatchObject({ changed: 0, failed: 0 });
  }, 500_000);
});
