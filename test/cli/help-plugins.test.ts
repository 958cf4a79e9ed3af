/**
 * The oclif conventions operators expect: `blkrep help`, `-h`, a typo answered with a pointer to
 * help and exit 127, shell completion scripts.
 */
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli } from '../support/spawn.js';

describe('help, -h, not-found, autocomplete', () => {
  it('blkrep help lists the topics that have commands (bitmap, job — not the map command) and every command', async () => {
    const r = await runCli(['help']);
    expect(r.code).toBe(0);
    const topics = r.stdout.slice(r.stdout.indexOf('TOPICS'), r.stdout.indexOf('COMMANDS'));
    expect(topics).toMatch(/^ {2}bitmap /m);
    expect(topics).toMatch(/^ {2}job /m);
    expect(topics).not.toMatch(/^ {2}map /m);
    const commands = r.stdout.slice(r.stdout.indexOf('COMMANDS'));
    for (const c of ['backup', 'demo', 'info', 'map', 'mirror', 'serve-nbd', 'status']) expect(commands).toMatch(new RegExp(`^ {2}${c} `, 'm'));
  });

  it('-h and help COMMAND show the command\'s usage', async () => {
    const short = await runCli(['info', '-h']);
    expect(short.code).toBe(0);
    expect(short.stdout).toContain('$ blkrep info IMAGE');
    const long = await runCli(['help', 'bitmap', 'dump']);
    expect(long.code).toBe(0);
    expect(long.stdout).toContain('$ blkrep bitmap dump');
  });

  it('a mistyped command: exit 127, says it is not a command and where the list is', async () => {
    const r = await runCli(['mirorr', 'a.img']);
    expect(r.code).toBe(127);
    const stderr = r.stderr.replace(/\x1b\[[0-9;]*m/g, ''); // colours where CI is set
    expect(stderr).toMatch(/mirorr( a.img)? is not a blkrep command/);
    expect(stderr).toContain('blkrep help');
  });

  it('autocomplete script bash|zsh prints a completion script that names blkrep', async () => {
    const home = await makeTempDir();
    const env = { ...process.env, HOME: home, XDG_CACHE_HOME: `${home}/.cache` };
    for (const shell of ['bash', 'zsh']) {
      const r = await runCli(['autocomplete', 'script', shell], { env });
      expect(r.code).toBe(0);
      expect(r.stdout).toContain('blkrep');
      expect(r.stdout).toContain('autocomplete');
    }
    const how = await runCli(['autocomplete', 'bash'], { env });
    expect(how.code).toBe(0);
    expect(how.stdout).toContain('blkrep autocomplete');
  });
});

describe('version', () => {
  it('--version is one line; --version --json and version --json are the version object with the addon and plugins', async () => {
    const line = await runCli(['--version']);
    expect(line.code).toBe(0);
    expect(line.stdout).toMatch(/^blkrep\/\d+\.\d+\.\d+ linux-x64 node-v\d+/);
    for (const args of [['--version', '--json'], ['version', '--json']]) {
      const r = await runCli(args);
      expect(r.code).toBe(0);
      const v = JSON.parse(r.stdout) as { name: string; version: string; node: string; native: { loaded: boolean }; plugins: Array<{ name: string }> };
      expect(v).toMatchObject({ name: 'blkrep', version: expect.stringMatching(/^\d+\.\d+\.\d+$/), node: process.versions.node, native: { loaded: true } });
      expect(v.plugins.map((p) => p.name)).toEqual(expect.arrayContaining(['@blkrep/transport-tcp', '@blkrep/transport-unix']));
    }
  });
});
