/**
 * The start-up path of bin/run.js (scripts/bundle-oclif.mjs): every command also built as one
 * CommonJS file in dist/vendor/commands/, loaded with V8's code cache when no tsc run emitted
 * after it; a plugin's `blkrep:register` hook still fills the registries a bundled command uses;
 * BLKREP_OCLIF_BUNDLE=0 and a newer compile both give the modules in dist/src.
 * NODE_DEBUG=module makes node name each CommonJS file it loads on stderr, which is how these
 * tests see which copy of a command ran.
 */
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { deflateRawSync } from 'node:zlib';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BIN, REPO_ROOT, makeTempDir, run, runCli, serve, start, unixUri, waitFor } from '../support/spawn.js';

const VENDOR = join(REPO_ROOT, 'dist', 'vendor');
const loaded = (stderr: string, file: string): boolean => stderr.includes(`load "${file}"`);
const debugEnv = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => ({ ...process.env, NODE_DEBUG: 'module', ...extra });

/** qemu-nbd serving a 20 MiB raw image with 4 KiB of 0xa5 at 1 MiB, on a Unix socket. */
async function qemuNbd(): Promise<string> {
  const dir = await makeTempDir();
  const img = join(dir, 'disk.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', img, '20M']);
  expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xa5 1M 4k', img])).code).toBe(0);
  const sock = join(dir, 'q.sock');
  start('qemu-nbd', ['-f', 'raw', '-k', sock, '-t', img]);
  await waitFor(() => existsSync(sock), 'the qemu-nbd socket');
  return unixUri(sock);
}

describe('command bundles', () => {
  it('every command of the manifest has a bundle, built from files that exist', () => {
    const manifest = JSON.parse(readFileSync(join(REPO_ROOT, 'oclif.manifest.json'), 'utf8')) as { commands: Record<string, unknown> };
    const index = JSON.parse(readFileSync(join(VENDOR, 'commands', 'index.json'), 'utf8')) as {
      commands: Record<string, { file: string; inputs: string[] }>;
    };
    expect(Object.keys(index.commands).sort()).toEqual(Object.keys(manifest.commands).sort());
    for (const { file, inputs } of Object.values(index.commands)) {
      expect(existsSync(join(VENDOR, 'commands', file))).toBe(true);
      expect(inputs.length).toBeGreaterThan(0);
      for (const input of inputs) expect(existsSync(join(REPO_ROOT, input)), input).toBe(true);
    }
  });

  it('a bundled command reaches qemu-nbd through the unix transport plugin, the same as the unbundled one', async () => {
    const uri = await qemuNbd();
    const bundled = await runCli(['map', uri, '--json'], { env: debugEnv() });
    expect(bundled.code).toBe(0);
    expect(loaded(bundled.stderr, join(VENDOR, 'commands', 'map.cjs'))).toBe(true);
    expect(readdirSync(join(VENDOR, 'commands')).some((f) => /^map\.cjs\.[0-9a-f]{8}\.v8cache$/.test(f))).toBe(true);
    // what qemu-nbd reports: the 4 KiB written at 1 MiB is data, and the extents cover 20 MiB
    const extents = JSON.parse(bundled.stdout) as Array<{ start: number; length: number; data: boolean }>;
    expect(extents).toContainEqual(expect.objectContaining({ start: 1 << 20, length: 4096, data: true }));
    expect(extents.reduce((sum, e) => sum + e.length, 0)).toBe(20 * (1 << 20));

    const unbundled = await runCli(['map', uri, '--json'], { env: debugEnv({ BLKREP_OCLIF_BUNDLE: '0' }) });
    expect(unbundled.code).toBe(0);
    expect(unbundled.stderr).not.toContain(VENDOR);
    expect(unbundled.stdout).toBe(bundled.stdout);
  });

  it('after a newer compile, a command runs from dist/src, not from its older bundle', async () => {
    // a copy of the built tree whose dist/src/commands/info.js and dist/.tsbuildinfo a "tsc run"
    // made newer than the bundles
    const copy = await copyOfBuild();
    const later = new Date(Date.now() + 60_000);
    for (const f of [join(copy, 'dist', 'src', 'commands', 'info.js'), join(copy, 'dist', '.tsbuildinfo')]) utimesSync(f, later, later);

    const img = join(copy, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '3M']);
    const info = await run(process.execPath, [join(copy, 'bin', 'run.js'), 'info', img, '--json'], { env: debugEnv() });
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ 'virtual-size': 3 * (1 << 20), format: 'qcow2' });
    expect(info.stderr).not.toContain(join(copy, 'dist', 'vendor', 'commands'));
    expect(loaded(info.stderr, join(copy, 'dist', 'vendor', 'oclif-core-' + oclifVersion() + '.cjs'))).toBe(true);

    // a command whose files that compile did not touch still runs from its bundle
    const version = await run(process.execPath, [join(copy, 'bin', 'run.js'), 'version', '--json'], { env: debugEnv() });
    expect(version.code).toBe(0);
    expect(loaded(version.stderr, join(copy, 'dist', 'vendor', 'commands', 'version.cjs'))).toBe(true);
  });

  it('a code cache V8 refuses (not one) is ignored, and replaced at exit', async () => {
    const copy = await copyOfBuild();
    const commands = join(copy, 'dist', 'vendor', 'commands');
    const run1 = await run(process.execPath, [join(copy, 'bin', 'run.js'), 'version', '--json'], { env: debugEnv() });
    expect(run1.code).toBe(0);
    const caches = readdirSync(commands).filter((f) => /^version\.cjs\.[0-9a-f]{8}\.v8cache$/.test(f));
    expect(caches).toHaveLength(1); // the one for this node's flags (node bin/run.js)
    const cache = join(commands, caches[0]!);
    writeFileSync(cache, Buffer.alloc(4096, 0x5a));
    const run2 = await run(process.execPath, [join(copy, 'bin', 'run.js'), 'version', '--json'], { env: debugEnv() });
    expect(run2.code).toBe(0);
    expect(run2.stderr).not.toMatch(/warning|error/i);
    expect(loaded(run2.stderr, join(commands, 'version.cjs'))).toBe(true);
    expect(JSON.parse(run2.stdout)).toEqual(JSON.parse(run1.stdout));
    expect(readFileSync(cache).equals(Buffer.alloc(4096, 0x5a))).toBe(false);
  });

  it('zod is a file of its own: not loaded by bitmap dump of a file, loaded by config check', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    await run('qemu-img', ['bitmap', '--add', img, 'b0']);
    const dump = await runCli(['bitmap', 'dump', img, '-n', 'b0', '--json'], { env: debugEnv() });
    expect(dump.code, dump.stderr).toBe(0);
    expect(JSON.parse(dump.stdout)).toEqual([expect.objectContaining({ offset: 0, length: 1 << 20 })]);
    expect(loaded(dump.stderr, join(VENDOR, 'commands', 'bitmap.dump.cjs'))).toBe(true);
    expect(dump.stderr).not.toMatch(/zod/);

    const zod = readdirSync(VENDOR).filter((f) => /^zod-[\d.]+\.cjs$/.test(f));
    expect(zod).toHaveLength(1);
    const config = join(dir, 'disk.yaml');
    writeFileSync(config, `image: ${img}\nsocket: ${join(dir, 's.sock')}\n`);
    const check = await runCli(['config', 'check', config, '--json'], { env: debugEnv() });
    expect(check.code, check.stdout + check.stderr).toBe(0);
    expect(loaded(check.stderr, join(VENDOR, zod[0]!))).toBe(true);
  });

  it('bitmap dump of a file neither loads child_process nor zlib, nor resolves @oclif/core or picomatch', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    await run('qemu-img', ['bitmap', '--add', img, 'b0']);
    const list = join(dir, 'modules.txt');
    const preload = join(dir, 'modules.cjs');
    writeFileSync(preload, `process.on('exit', () => require('node:fs').writeFileSync(${JSON.stringify(list)}, process.moduleLoadList.join('\\n')));\n`);
    const dump = await run(process.execPath, ['-r', preload, BIN, 'bitmap', 'dump', img, '-n', 'b0', '--json'], { env: debugEnv() });
    expect(dump.code, dump.stderr).toBe(0);
    expect(JSON.parse(dump.stdout)).toEqual([expect.objectContaining({ offset: 0, length: 1 << 20 })]);
    expect(loaded(dump.stderr, join(VENDOR, 'commands', 'bitmap.dump.cjs'))).toBe(true);
    const modules = readFileSync(list, 'utf8').split('\n');
    expect(modules).toContain('NativeModule fs');
    expect(modules).not.toContain('NativeModule child_process');
    expect(modules).not.toContain('NativeModule zlib');
    // the bundle's require('@oclif/core') is the bundle of @oclif/core without a lookup
    expect(dump.stderr).toContain('Module._load REQUEST @oclif/core parent: ' + join(VENDOR, 'commands', 'bitmap.dump.cjs'));
    expect(dump.stderr).not.toContain('looking for "@oclif/core"');
    expect(dump.stderr).not.toContain('looking for "picomatch"');
  });

  it('without dist/vendor/oclif-core.json @oclif/core is resolved; with it, in a tree whose node_modules is a link, plugins get the same copy', async () => {
    const copy = await copyOfBuild(); // node_modules: a link to the repository's
    const version1 = await run(process.execPath, [join(copy, 'bin', 'run.js'), 'version', '--json'], { env: debugEnv() });
    expect(version1.code, version1.stderr).toBe(0);
    expect(version1.stderr).not.toContain('looking for "@oclif/core" in ["' + join(copy, 'bin', 'node_modules'));
    // version loads every plugin (help, not-found … require @oclif/core): none loads node_modules' index
    const index = join(REPO_ROOT, 'node_modules', '@oclif', 'core', 'lib', 'index.js');
    expect(version1.stderr).not.toContain(`load "${index}"`);
    expect(loaded(version1.stderr, join(copy, 'dist', 'vendor', 'oclif-core-' + oclifVersion() + '.cjs'))).toBe(true);

    rmSync(join(copy, 'dist', 'vendor', 'oclif-core.json'));
    const version2 = await run(process.execPath, [join(copy, 'bin', 'run.js'), 'version', '--json'], { env: debugEnv() });
    expect(version2.code, version2.stderr).toBe(0);
    expect(version2.stderr).toContain('looking for "@oclif/core" in ["' + join(copy, 'bin', 'node_modules'));
    expect(version2.stderr).not.toContain(`load "${index}"`);
    expect(JSON.parse(version2.stdout)).toEqual(JSON.parse(version1.stdout));
  });

  it('a builtin loaded at first use: its functions are stubs until called, promisify included', async () => {
    const { lazyBuiltin } = (await import(join(REPO_ROOT, 'scripts', 'lazy-builtin.mjs'))) as { lazyBuiltin: (name: string) => string };
    const dir = await makeTempDir();
    writeFileSync(join(dir, 'cp.cjs'), lazyBuiltin('child_process'));
    writeFileSync(join(dir, 'zlib.cjs'), lazyBuiltin('zlib'));
    const deflated = deflateRawSync(Buffer.from('blkrep')).toString('hex');
    writeFileSync(
      join(dir, 'main.cjs'),
      `const { promisify } = require('node:util');
const cp = require('./cp.cjs');
const zlib = require('./zlib.cjs');
const execFile = promisify(cp.execFile);
const inflateRaw = promisify(zlib.inflateRaw);
const has = (m) => process.moduleLoadList.includes('NativeModule ' + m);
const before = { child_process: has('child_process'), zlib: has('zlib'), same: cp.execFile === cp.execFile, name: cp.execFile.name };
(async () => {
  const out = await execFile(process.execPath, ['-e', 'process.stdout.write("hi")']);
  const text = (await inflateRaw(Buffer.from('${deflated}', 'hex'))).toString();
  const after = { child_process: has('child_process'), zlib: has('zlib'), isClass: cp.ChildProcess === require('node:child_process').ChildProcess };
  console.log(JSON.stringify({ before, out, text, after }));
})();
`,
    );
    const r = await run(process.execPath, [join(dir, 'main.cjs')]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({
      before: { child_process: false, zlib: false, same: true, name: 'execFile' },
      out: { stdout: 'hi', stderr: '' }, // execFile's own promisify: stdout and stderr
      text: 'blkrep',
      after: { child_process: true, zlib: true, isClass: true },
    });
  });

  it('bin/run.js runs as a program (its shebang), bundled', async () => {
    const r = await run(BIN, ['version', '--json'], { env: debugEnv() });
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ name: 'blkrep', native: { loaded: true } });
    expect(loaded(r.stderr, join(VENDOR, 'commands', 'version.cjs'))).toBe(true);
  });
});

/**
 * A bundled command runs before oclif loads the plugins (bin/run.js: the root plugin with the one
 * command's manifest entry); the plugins load at the first hook that is not one of oclif's own
 * around every command. DEBUG=oclif:config makes oclif say when it loads them.
 */
describe('a bundled command before the plugins load', () => {
  const oclifDebug = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => ({ ...process.env, DEBUG: 'oclif:config,oclif:main', ...extra });
  // oclif:main prints node's flags: --max-semi-space-size=2 only for the commands that move data
  const execArgv = (stderr: string): string => /process\.execArgv: (.*)/.exec(stderr)?.[1] ?? 'no execArgv line';
  const LOADS_PLUGINS = 'loading plugins [';

  it('--version alone runs without loading them, and prints what it prints with them loaded', async () => {
    const fast = await runCli(['--version'], { env: oclifDebug() });
    expect(fast.code, fast.stderr).toBe(0);
    expect(fast.stderr).toContain('start init hook');
    expect(fast.stderr).not.toContain(LOADS_PLUGINS);
    const pjson = JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string };
    expect(fast.stdout).toBe(`blkrep/${pjson.version} ${process.platform}-${process.arch} node-${process.version}\n`);

    const full = await runCli(['--version'], { env: oclifDebug({ BLKREP_OCLIF_BUNDLE: '0' }) });
    expect(full.code).toBe(0);
    expect(full.stderr).toContain(LOADS_PLUGINS);
    expect(full.stdout).toBe(fast.stdout);
  });

  it('info runs without loading them (and loads them with BLKREP_OCLIF_BUNDLE=0)', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '5M']);
    const fast = await runCli(['info', img, '--json'], { env: oclifDebug() });
    expect(fast.code).toBe(0);
    expect(JSON.parse(fast.stdout)).toMatchObject({ 'virtual-size': 5 * (1 << 20), format: 'qcow2' });
    expect(fast.stderr).toContain('start init hook');
    expect(fast.stderr).not.toContain(LOADS_PLUGINS);
    expect(execArgv(fast.stderr)).toBe('');

    const full = await runCli(['info', img, '--json'], { env: oclifDebug({ BLKREP_OCLIF_BUNDLE: '0' }) });
    expect(full.code).toBe(0);
    expect(full.stderr).toContain(LOADS_PLUGINS);
    expect(full.stdout).toBe(fast.stdout);
  });

  it('a command runs on the Config oclif loaded, not on a second load of it (node_modules oclif loads it twice)', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '5M']);
    const once = await runCli(['info', img, '--json'], { env: oclifDebug() });
    expect(once.code, once.stderr).toBe(0);
    expect(once.stderr.match(/oclif:config config done$/gm)).toHaveLength(1);
    expect(once.stderr).not.toContain('reloading config');
    const twice = await runCli(['info', img, '--json'], { env: oclifDebug({ BLKREP_OCLIF_BUNDLE: '0' }) });
    expect(twice.code, twice.stderr).toBe(0);
    expect(twice.stderr).toContain('reloading config');
    expect(twice.stderr.match(/oclif:config config done$/gm)).toHaveLength(2);
    expect(twice.stdout).toBe(once.stdout);
  });

  it('serve-nbd loads them at its blkrep:register hook: it listens through the unix transport plugin', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.raw');
    await run('qemu-img', ['create', '-q', '-f', 'raw', img, '2M']);
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 64k 4k', img])).code).toBe(0);
    const sock = join(dir, 's.sock');
    const served = await serve([img, '--socket', sock], { env: oclifDebug() });
    const stderr = served.stderr();
    // oclif's own hooks ran without them; they were loaded for the command's first other hook
    const at = (text: string): number => {
      expect(stderr).toContain(text);
      return stderr.indexOf(text);
    };
    expect(at(LOADS_PLUGINS)).toBeGreaterThan(at('preparse hook done'));
    expect(at('start blkrep:register hook')).toBeGreaterThan(at(LOADS_PLUGINS));
    expect(served.uris).toEqual([unixUri(sock)]);
    // node run again with the small young generation, as the same process (execv): the pid the
    // listening line gives is the one the test started, stdout and stderr still reach the test
    expect(execArgv(stderr)).toBe('--max-semi-space-size=2');
    expect(JSON.parse(served.listeningLine)).toMatchObject({ pid: served.child.pid });
    expect(readFileSync(`/proc/${served.child.pid}/cmdline`, 'utf8').split('\0')).toContain('--max-semi-space-size=2');
    const read = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x3c 64k 4k', `nbd+unix:///?socket=${sock}`]);
    expect(read.code, read.stdout + read.stderr).toBe(0);
    expect(read.stdout).not.toContain('Pattern verification failed');
    served.child.kill('SIGTERM');
    expect((await served.exited).code).toBe(0);
  });

  it('without the native addon (BLKREP_NO_NATIVE=1) serve-nbd runs without the flag', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'disk.raw');
    await run('qemu-img', ['create', '-q', '-f', 'raw', img, '1M']);
    const served = await serve([img, '--socket', join(dir, 's.sock')], { env: oclifDebug({ BLKREP_NO_NATIVE: '1' }) });
    expect(execArgv(served.stderr())).toBe('');
    served.child.kill('SIGTERM');
    expect((await served.exited).code).toBe(0);
  });

  it('a user plugin (DATA_DIR/package.json) is loaded first: its init and prerun hooks run', async () => {
    const dataDir = await makeTempDir();
    const pluginDir = join(dataDir, 'hook-plugin');
    mkdirSync(pluginDir);
    writeFileSync(
      join(pluginDir, 'package.json'),
      JSON.stringify({ name: 'blkrep-test-hooks', version: '1.0.0', oclif: { hooks: { init: './hook.cjs', prerun: './hook.cjs' } } }),
    );
    writeFileSync(join(pluginDir, 'hook.cjs'), 'module.exports = async function (opts) { process.stderr.write(`test hook ${opts.id ?? opts.Command.id}\\n`); };\n');
    writeFileSync(join(dataDir, 'package.json'), JSON.stringify({ oclif: { plugins: [{ name: 'blkrep-test-hooks', type: 'link', root: pluginDir }] } }));
    const img = join(dataDir, 'disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    const r = await runCli(['info', img, '--json'], { env: { ...process.env, BLKREP_DATA_DIR: dataDir } });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr.match(/^test hook info$/gm)).toHaveLength(2);
    expect(JSON.parse(r.stdout)).toMatchObject({ 'virtual-size': 1 << 20 });
    // --version alone (no command): the user plugin's init hook runs before the version is printed
    const v = await runCli(['--version'], { env: { ...process.env, BLKREP_DATA_DIR: dataDir } });
    expect(v.code, v.stderr).toBe(0);
    expect(v.stderr).toMatch(/^test hook --version$/m);
    expect(v.stdout).toMatch(/^blkrep\/[\d.]+ linux-x64 node-v[\d.]+\n$/);
  });

  it('version (loadsAllPlugins) lists the plugins; -h after the flags shows help', async () => {
    const version = await runCli(['version', '--json']);
    expect(version.code).toBe(0);
    const names = (JSON.parse(version.stdout) as { plugins: Array<{ name: string }> }).plugins.map((p) => p.name);
    expect(names).toEqual(expect.arrayContaining(['@blkrep/transport-unix', '@blkrep/heartbeat-udp', '@oclif/plugin-help']));
    const help = await runCli(['info', '--json', '-h']);
    expect(help.code).toBe(0);
    expect(help.stdout).toContain('$ blkrep info IMAGE');
  });
});

/** A copy of the built tree (timestamps kept; no code caches), node_modules and the addon linked. */
async function copyOfBuild(): Promise<string> {
  const copy = await makeTempDir();
  for (const entry of ['bin', 'dist', 'package.json', 'oclif.manifest.json']) {
    cpSync(join(REPO_ROOT, entry), join(copy, entry), { recursive: true, preserveTimestamps: true, filter: (f) => !f.endsWith('.v8cache') });
  }
  for (const entry of ['node_modules', 'native']) symlinkSync(join(REPO_ROOT, entry), join(copy, entry));
  return copy;
}

function oclifVersion(): string {
  return (JSON.parse(readFileSync(join(REPO_ROOT, 'node_modules', '@oclif', 'core', 'package.json'), 'utf8')) as { version: string }).version;
}
