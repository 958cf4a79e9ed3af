/**
 * src/config: serve-nbd's flags as a config file's keys. Every kind of error names the file, the
 * line and column, the key and what was expected (ERR_CONFIG); the schema is built from the flag
 * definitions (a flag added to the command is a key with no edit); the command line wins.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Args, Flags } from '@oclif/core';
import { describe, expect, it } from 'vitest';
import ServeNbd from '../../src/commands/serve-nbd.js';
import { applyConfig, ConfigError, configArgv, loadConfigFile, scanArgv, type CommandShape, type ConfigIssue } from '../../src/config/file.js';
import { makeTempDir } from '../support/spawn.js';

const SERVE = ServeNbd as unknown as CommandShape;

async function file(name: string, text: string): Promise<string> {
  const path = join(await makeTempDir(), name);
  await writeFile(path, text);
  return path;
}

/** The issues of a file that must be refused. */
async function refused(name: string, text: string, command: CommandShape = SERVE): Promise<{ path: string; err: ConfigError; issues: ConfigIssue[] }> {
  const path = await file(name, text);
  const err = await loadConfigFile(path, command).then(
    () => {
      throw new Error(`${name} was accepted`);
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ConfigError);
  const ce = err as ConfigError;
  expect(ce.code).toBe('ERR_CONFIG');
  expect(ce.oclif.exit).toBe(2);
  return { path, err: ce, issues: ce.issues };
}

describe('config file: accepted', () => {
  it('YAML: scalars, numbers for integer and size flags, lists for repeatable flags, in the file order', async () => {
    const path = await file('pair0.yaml', '# comment\nimage: /dev/vdb\nport: 10810\nmax-buffer: 64M\nshared: 4\nread-only: true\nheartbeat:\n  - udp://10.0.0.1:7000\n  - udp://10.1.0.1:7000\npeer-id: nodeA\ncheckpoint-interval: 20s\nreplicate-to: nbd://b:10809/\nprotocol: async\n');
    const { values } = await loadConfigFile(path, SERVE);
    expect(values).toEqual({
      image: '/dev/vdb',
      port: '10810',
      'max-buffer': '64M',
      shared: '4',
      'read-only': true,
      heartbeat: ['udp://10.0.0.1:7000', 'udp://10.1.0.1:7000'],
      'peer-id': 'nodeA',
      'checkpoint-interval': '20s',
      'replicate-to': 'nbd://b:10809/',
      protocol: 'async',
    });
    expect(Object.keys(values)[0]).toBe('image');
  });

  it('JSON, and a repeatable flag given one value', async () => {
    const path = await file('a.json', JSON.stringify({ image: 'memory:16M', export: 'b=memory:1M', 'auto-bitmaps': false }));
    expect((await loadConfigFile(path, SERVE)).values).toEqual({ image: 'memory:16M', export: ['b=memory:1M'], 'auto-bitmaps': false });
  });
});

describe('config file: every error names the file, line, key and what was expected', () => {
  it('a file that is not there, or a directory', async () => {
    const dir = await makeTempDir();
    for (const [path, why] of [[join(dir, 'none.yaml'), 'no such file'], [dir, 'is a directory']] as const) {
      const err = (await loadConfigFile(path, SERVE).catch((e: unknown) => e)) as ConfigError;
      expect(err).toBeInstanceOf(ConfigError);
      expect(err.message).toBe(`${path}: cannot read the config file: ${why}${why === 'is a directory' ? ', not a file' : ''}`);
    }
  });

  it('YAML that does not parse: the line and column of the fault', async () => {
    const { path, err, issues } = await refused('bad.yaml', 'image: a.img\nport: [10809\nbind: x\n');
    expect(issues.length).toBeGreaterThanOrEqual(1);
    expect(issues[0]!.line).toBeGreaterThanOrEqual(2);
    expect(err.message).toContain(`${path}:`);
    expect(err.message).toContain('not valid YAML');
  });

  it('a key given twice', async () => {
    const { issues } = await refused('dup.yaml', 'image: a.img\nport: 1\nport: 2\n');
    expect(issues[0]).toMatchObject({ line: 3 });
    expect(issues[0]!.message).toMatch(/not valid YAML: Map keys must be unique/);
  });

  it('JSON that does not parse (a .json file is strict JSON): the line', async () => {
    const { issues } = await refused('bad.json', '{\n  "image": "a.img",\n  "port": 10809,\n}\n');
    expect(issues).toHaveLength(1);
    expect(issues[0]!.line).toBe(4);
    expect(issues[0]!.message).toMatch(/^not valid JSON: /);
  });

  it('an empty file, a list at the top, a scalar at the top', async () => {
    expect((await refused('empty.yaml', '# nothing\n')).issues[0]!.message).toMatch(/^is empty: expected a mapping of serve-nbd flags/);
    const list = await refused('list.yaml', '- image: a\n- port: 1\n');
    expect(list.issues[0]).toMatchObject({ key: '', line: 1, column: 1, message: 'expected a mapping of flags to values at the top, got a list' });
    expect((await refused('scalar.yaml', 'disk.img\n')).issues[0]!.message).toBe('expected a mapping of flags to values at the top, got string');
  });

  it('an unknown key, with the closest flag; keys a file cannot hold', async () => {
    const { err, issues, path } = await refused('typo.yaml', 'image: a.img\nprotcol: async\nbogus-thing: 1\njson: true\nconfig: other.yaml\n');
    expect(issues).toEqual([
      { key: 'protcol', line: 2, column: 1, message: 'is not a flag of serve-nbd (did you mean "protocol"?)' },
      { key: 'bogus-thing', line: 3, column: 1, message: 'is not a flag of serve-nbd' },
      { key: 'json', line: 4, column: 1, message: '--json cannot be given in a config file' },
      { key: 'config', line: 5, column: 1, message: '--config cannot be given in a config file' },
    ]);
    expect(err.message.split('\n')[0]).toBe(`${path}: 4 problems`);
    expect(err.message.split('\n')[1]).toBe(`${path}:2:1: key "protcol": is not a flag of serve-nbd (did you mean "protocol"?)`);
  });

  it('a switch that is not true/false, a choice not in the list', async () => {
    const { issues } = await refused('kinds.yaml', 'read-only: "yes"\ntls: maybe\nprotocol: 3\n');
    expect(issues).toEqual([
      { key: 'read-only', line: 1, column: 12, message: 'expected true or false, got string "yes"' },
      { key: 'tls', line: 2, column: 6, message: 'expected one of off, on, require, got "maybe"' },
      { key: 'protocol', line: 3, column: 11, message: 'expected one of sync, async, got number 3' },
    ]);
  });

  it("values the flag's own parser refuses: integers and their range, sizes, durations", async () => {
    const { issues } = await refused('values.yaml', 'port: abc\nshared: 0\nmax-buffer: 12Q\ncheckpoint-interval: soon\nreplicate-to: nbd://b/\nheartbeat-misses: 5000\nheartbeat: [udp://a:1]\npeer-id: a\n');
    expect(issues.map((i) => [i.key, i.line, i.message])).toEqual([
      ['port', 1, 'expected an integer but received: abc'],
      ['shared', 2, 'expected an integer greater than or equal to 1 but received: 0'],
      ['max-buffer', 3, 'invalid size "12Q": expected a number with an optional suffix K, M, G, T or P (e.g. 64K, 1G)'],
      ['checkpoint-interval', 4, 'expected a duration such as 500ms, 20s, 2m or 1h, got "soon"'],
      ['heartbeat-misses', 6, 'expected an integer less than or equal to 1000 but received: 5000'],
    ]);
  });

  it('a mapping or null where a value is expected; an empty list; a bad item of a list (its own line)', async () => {
    const { issues } = await refused('shapes.yaml', 'bind: {a: 1}\nname:\nexport: []\nbitmap:\n  - b0\n  - [x]\n');
    expect(issues).toEqual([
      { key: 'bind', line: 1, column: 7, message: 'expected a string or a number, got a mapping' },
      { key: 'name', line: 2, column: 6, message: 'expected a string or a number, got null (an empty value)' },
      { key: 'export', line: 3, column: 9, message: 'expected at least one value' },
      { key: 'bitmap.1', line: 6, column: 5, message: 'expected a string or a number, got a list' },
    ]);
  });

  it('the image: a string that is not empty and does not look like a flag', async () => {
    expect((await refused('img.yaml', 'image: "-r"\n')).issues).toEqual([{ key: 'image', line: 1, column: 8, message: 'expected a path or memory:SIZE (not empty, not starting with "-")' }]);
    expect((await refused('img2.yaml', 'image: [a, b]\n')).issues).toEqual([{ key: 'image', line: 1, column: 8, message: 'expected a string, got a list' }]);
  });

  it('flags that need another (dependsOn) or exclude another (exclusive), as on the command line', async () => {
    const dep = await refused('dep.yaml', 'image: a.img\nprotocol: async\n');
    expect(dep.issues).toEqual([{ key: 'protocol', line: 2, column: 1, message: 'needs "replicate-to" too (as --protocol needs --replicate-to)' }]);
    const excl = await refused('excl.yaml', 'image: a.img\nsecondary: true\nread-only: true\n');
    expect(excl.issues).toEqual([{ key: 'secondary', line: 2, column: 1, message: 'cannot be used with "read-only" (as --secondary cannot with --read-only)' }]);
    // a switch set to false is not there
    const path = await file('off.yaml', 'image: a.img\nsecondary: true\nread-only: false\n');
    expect((await loadConfigFile(path, SERVE)).values).toEqual({ image: 'a.img', secondary: true, 'read-only': false });
  });

  it('a dependency given on the command line satisfies the file', async () => {
    const path = await file('dep.yaml', 'image: a.img\nprotocol: async\n');
    const { argv } = await applyConfig(['--config', path, '--replicate-to', 'nbd://b/'], SERVE);
    expect(argv).toEqual(['a.img', '--config', path, '--replicate-to', 'nbd://b/', '--protocol=async']);
  });

  it('--config with no file name', async () => {
    const err = (await applyConfig(['--config='], SERVE).catch((e: unknown) => e)) as ConfigError;
    expect(err.code).toBe('ERR_CONFIG');
    expect(err.message).toBe('--config: names no file');
  });
});

describe('config file: built from the flag definitions', () => {
  const command = {
    flags: {
      added: Flags.integer({ min: 2, max: 3 }),
      color: Flags.string({ options: ['red', 'blue'], multiple: true }),
      loud: Flags.boolean({ default: true }),
      quiet: Flags.boolean({ char: 'q', default: false }),
      json: Flags.boolean(),
    },
    args: { disk: Args.string() },
  } as unknown as CommandShape;

  it('a flag added to a command is a key of its file, checked by its own parser', async () => {
    const path = await file('new.yaml', 'added: 3\ncolor: [red, blue]\ndisk: d.img\n');
    expect((await loadConfigFile(path, command)).values).toEqual({ added: '3', color: ['red', 'blue'], disk: 'd.img' });
    const { issues } = await refused('new-bad.yaml', 'added: 4\ncolor: [red, green]\nloud: false\n', command);
    expect(issues).toEqual([
      { key: 'added', line: 1, column: 8, message: 'expected an integer less than or equal to 3 but received: 4' },
      { key: 'color.1', line: 2, column: 14, message: 'expected one of red, blue, got "green"' },
      { key: 'loud', line: 3, column: 7, message: 'is on by default and has no --no-loud: leave it out' },
    ]);
  });

  it('the command line wins: a flag it gives (long, short, --no-, =) is not taken from the file; nor the argument', async () => {
    const scan = scanArgv(['-q', '--added=2', 'x.img', '--color', 'red', 'blue', '--', '-y'], command);
    expect([...scan.flags].sort()).toEqual(['added', 'color', 'quiet']);
    expect(scan.positional).toBe(true);
    const values = { disk: 'd.img', added: '3', color: ['blue'], quiet: false, loud: true };
    expect(configArgv(values, command, scan)).toEqual({ args: [], flags: ['--loud'] });
    expect(configArgv(values, command, scanArgv([], command))).toEqual({ args: ['d.img'], flags: ['--added=3', '--color=blue', '--loud'] });
  });

  it("the file's flags go before a \"--\" of the caller's, its argument first", async () => {
    const path = await file('c.yaml', 'added: 2\ndisk: d.img\n');
    expect((await applyConfig([`--config=${path}`, '--quiet'], command)).argv).toEqual(['d.img', `--config=${path}`, '--quiet', '--added=2']);
    const withEnd = (await applyConfig(['--config', path, '--', 'x'], command)).argv;
    expect(withEnd).toEqual(['--config', path, '--added=2', '--', 'x']);
  });

  it('without --config, argv is left as it is', async () => {
    expect((await applyConfig(['a', '--quiet'], command)).argv).toEqual(['a', '--quiet']);
  });
});
