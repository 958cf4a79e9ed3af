#!/usr/bin/env node
// Builds native/ (the sparse-file addon, src/block/native.ts) with node-gyp. Run by `npm install`
// through the root "install" script. It never fails the install: when the addon cannot be built,
// it prints one warning line and exits 0, and the raw driver uses its portable fallback.
//
// node-gyp is taken from npm (npm_config_node_gyp, set for lifecycle scripts), else from the npm
// next to this node, else from node_modules. Headers: npm's `nodedir` setting (passed to node-gyp
// as npm_config_nodedir); without one, the headers installed with node (<prefix>/include/node),
// and only as the last resort node-gyp's own download.
//
// BLKREP_NO_NATIVE=1 skips the build.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = join(root, 'native');
const addon = join(nativeDir, 'build', 'Release', 'blkrep_native.node');
const TIMEOUT_MS = 5 * 60 * 1000;

function warn(reason) {
  process.stderr.write(`blkrep: native addon not built (${reason}); using the portable fallback\n`);
}

function findNodeGyp() {
  const candidates = [];
  if (process.env.npm_config_node_gyp) candidates.push(process.env.npm_config_node_gyp);
  if (process.env.npm_execpath) candidates.push(join(dirname(process.env.npm_execpath), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  const prefix = resolve(dirname(process.execPath), '..');
  candidates.push(join(prefix, 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  candidates.push(join(dirname(process.execPath), 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  try {
    candidates.push(createRequire(join(root, 'package.json')).resolve('node-gyp/bin/node-gyp.js'));
  } catch {
    // not installed locally
  }
  return candidates.find((c) => existsSync(c));
}

/** node-gyp arguments for the headers, when npm does not configure them. */
function headerArgs() {
  if (process.env.npm_config_nodedir) return [];
  const prefix = resolve(dirname(process.execPath), '..');
  const include = join(prefix, 'include', 'node');
  if (existsSync(join(include, 'node_api.h')) && existsSync(join(include, 'common.gypi'))) return [`--nodedir=${prefix}`];
  return [];
}

/** The most telling line of node-gyp's output. */
function reasonFrom(output) {
  const lines = output.split('\n').map((l) => l.trim()).filter(Boolean);
  const boilerplate = /^gyp ERR! (stack|System|command|cwd|node -v|node-gyp -v|not ok|find Python|configure error|build error)/;
  const compiler = lines.find((l) => !l.startsWith('gyp') && /(fatal )?error:/.test(l));
  const stack = lines.find((l) => /^gyp ERR! stack \w*Error: /.test(l))?.replace(/^gyp ERR! stack \w*Error: /, '');
  const other = lines.filter((l) => l.startsWith('gyp ERR!') && !boilerplate.test(l)).pop()?.replace(/^gyp ERR! /, '');
  return (compiler ?? stack ?? other ?? lines[lines.length - 1] ?? 'node-gyp failed').slice(0, 200);
}

function main() {
  if (process.env.BLKREP_NO_NATIVE === '1') return;
  if (process.platform === 'win32') return warn('not supported on Windows');
  if (!existsSync(join(nativeDir, 'binding.gyp'))) return warn('native/binding.gyp is missing');
  const nodeGyp = findNodeGyp();
  if (!nodeGyp) return warn('node-gyp not found');
  const result = spawnSync(process.execPath, [nodeGyp, 'rebuild', '--directory', nativeDir, ...headerArgs()], {
    cwd: nativeDir,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: TIMEOUT_MS,
    maxBuffer: 16 * 1024 * 1024,
  });
  if (result.error) return warn(result.error.code === 'ETIMEDOUT' ? 'node-gyp timed out' : result.error.message);
  if (result.status !== 0) return warn(reasonFrom(`${result.stdout ?? ''}\n${result.stderr ?? ''}`));
  try {
    createRequire(import.meta.url)(addon);
  } catch (err) {
    return warn(`built but cannot be loaded: ${err instanceof Error ? err.message.split('\n')[0] : String(err)}`);
  }
}

try {
  main();
} catch (err) {
  warn(err instanceof Error ? err.message : String(err));
}
process.exitCode = 0;
