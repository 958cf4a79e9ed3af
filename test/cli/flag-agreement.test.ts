/**
 * Sibling commands agree on their flags (oclif.manifest.json, written by `npm run build`): one
 * name for a job id, one unit for --timeout, one meaning per flag letter (except the letters that
 * follow the qemu tool a command mirrors), and the old spellings still parse as hidden aliases.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { withBareWait } from '../../src/cli/flags.js';
import { REPO_ROOT, runCli } from '../support/spawn.js';

interface ManifestFlag {
  name: string;
  char?: string;
  aliases?: string[];
  charAliases?: string[];
  helpValue?: string;
  type: string;
  options?: string[];
}

const manifest = JSON.parse(readFileSync(join(REPO_ROOT, 'oclif.manifest.json'), 'utf8')) as { commands: Record<string, { flags: Record<string, ManifestFlag> }> };
const flags = Object.entries(manifest.commands).flatMap(([command, c]) => Object.values(c.flags).map((f) => ({ command, ...f })));

/**
 * Letters kept with two meanings because each is the letter of the qemu tool its command mirrors
 * (qemu-img create -b BACKING -F FMT, commit -b BASE -r RATE, compare -f/-F; qemu-nbd -b ADDR -r;
 * qemu-img bitmap -b SOURCE_FILE): operators type the peer's letters. -f/-F are one idea, the
 * format of the first and of the second image (mirror/backup -F the target's, as compare's B).
 */
const QEMU_LETTERS: Record<string, string[]> = {
  f: ['format', 'format-a'],
  F: ['backing-format', 'format-b', 'target-format'],
  b: ['backing', 'base', 'bind', 'source-file'],
  r: ['rate', 'read-only', 'repair'], // check -r as qemu-img check -r
};

describe('flags of sibling commands', () => {
  it('a job id is --job-id (-j) everywhere; --id and --job are hidden aliases', () => {
    const jobIds = flags.filter((f) => /job id|of this job/.test(JSON.stringify(f)) && f.type === 'option');
    expect(jobIds.map((f) => [f.command, f.name, f.char]).sort()).toEqual([
      ['backup', 'job-id', 'j'],
      ['commit', 'job-id', 'j'],
      ['events', 'job-id', 'j'],
      ['mirror', 'job-id', 'j'],
    ]);
    expect(flags.filter((f) => f.name === 'id' || f.name === 'job')).toEqual([]);
    const aliases = Object.fromEntries(jobIds.map((f) => [f.command, f.aliases ?? []]));
    expect(aliases).toEqual({ backup: ['id'], commit: ['id'], events: ['job'], mirror: [] });
  });

  it('--wait is ready|done in every command that starts a job; a bare --wait means done', () => {
    const waits = flags.filter((f) => f.name === 'wait');
    expect(waits.map((f) => [f.command, f.type, f.options]).sort()).toEqual([
      ['backup', 'option', ['ready', 'done']],
      ['commit', 'option', ['ready', 'done']],
      ['mirror', 'option', ['ready', 'done']],
    ]);
    expect(withBareWait(['--control', 'c', '--wait'])).toEqual(['--control', 'c', '--wait=done']);
    expect(withBareWait(['--wait', '--json'])).toEqual(['--wait=done', '--json']);
    expect(withBareWait(['--wait', 'ready', '--wait', 'done'])).toEqual(['--wait', 'ready', '--wait', 'done']);
    expect(withBareWait(['--', '--wait'])).toEqual(['--', '--wait']);
  });

  it('--wait ready where a job has no ready state, or --keep without done, is a usage error (exit 2)', async () => {
    const ctl = join(REPO_ROOT, 'no-such.sock');
    const backup = await runCli(['backup', '--control', ctl, '--export', 'disk', '/tmp/t.img', '--wait', 'ready', '--json']);
    expect(backup.code).toBe(2);
    expect(JSON.parse(backup.stdout)).toMatchObject({ error: { code: 'ERR_USAGE', message: expect.stringContaining('no ready state') } });
    const commit = await runCli(['commit', '--control', ctl, '--export', 'disk', '--keep', '--wait', 'ready', '--json']);
    expect(commit.code).toBe(2);
    expect(JSON.parse(commit.stdout)).toMatchObject({ error: { code: 'ERR_USAGE', message: expect.stringContaining('--wait done') } });
  });

  it('a flag given twice that takes one value is a usage error (ERR_USAGE, exit 2), not an internal one', async () => {
    const r = await runCli(['info', '-f', 'raw', '-f', 'qcow2', '/nonexistent.img', '--json']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ERR_USAGE', message: 'Flag --format can only be specified once' } });
  });

  it('every timeout is in seconds', () => {
    const timeouts = flags.filter((f) => /timeout/.test(f.name));
    expect(timeouts.length).toBeGreaterThan(20);
    expect(timeouts.filter((f) => f.helpValue !== 'SECONDS').map((f) => `${f.command} --${f.name}`)).toEqual([]);
  });

  it('a flag letter means one thing in every command (qemu letters excepted, listed)', () => {
    const byChar = new Map<string, Set<string>>();
    for (const f of flags) if (f.char) byChar.set(f.char, (byChar.get(f.char) ?? new Set()).add(f.name));
    const several = Object.fromEntries([...byChar].filter(([, names]) => names.size > 1).map(([c, names]) => [c, [...names].sort()]));
    expect(several).toEqual(QEMU_LETTERS);
  });

  it('letters that meant a second thing are hidden aliases now', () => {
    const hidden = flags.filter((f) => f.charAliases?.length).map((f) => `${f.command} -${f.charAliases!.join(',')} --${f.name}`).sort();
    expect(hidden).toEqual(['bitmap:clear -r --range', 'bitmap:fill -r --range', 'bitmap:merge -s --source', 'events -n --count', 'serve-nbd -s --shared']);
  });

  it('the old spellings still parse: events --job and -n, as --job-id and --count', async () => {
    // nothing listens there: the flags parsed, and the command failed reaching the daemon (exit 1, not 2)
    for (const args of [['--job', 'm0', '-n', '1'], ['--job-id', 'm0', '--count', '1']]) {
      const r = await runCli(['events', '--control', join(REPO_ROOT, 'no-such.sock'), ...args, '--json']);
      expect(r.code).toBe(1);
      expect(JSON.parse(r.stdout)).toMatchObject({ error: { code: 'ERR_CONTROL_UNREACHABLE' } });
    }
  });
});
