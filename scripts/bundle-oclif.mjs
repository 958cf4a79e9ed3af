#!/usr/bin/env node
// Writes dist/vendor/oclif-core-VERSION.cjs: @oclif/core's index and its dependencies as one
// minified CommonJS file. Loading @oclif/core from node_modules resolves, reads and compiles about
// 200 small modules, which is most of every command's start-up (bench/cli-startup); one file
// is about 120 ms of CPU less. bin/run.js puts it in require's cache under the installed
// @oclif/core's own path, so blkrep's commands and the oclif plugins (help, not-found,
// autocomplete) all get that one copy. The version in the name is the installed @oclif/core's:
// bin/run.js uses the file only when they match, and falls back to node_modules otherwise (a
// build without esbuild, an upgraded @oclif/core not yet rebuilt).
// `npm run build` runs it. typescript/ts-node/tsx stay outside: oclif loads them only to run
// commands from .ts sources in development.
import { mkdirSync, readdirSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(root, 'package.json'));

export function vendoredOclifPath(dir, version) {
  return path.join(dir, 'dist', 'vendor', `oclif-core-${version}.cjs`);
}

let esbuild;
try {
  esbuild = await import('esbuild');
} catch {
  console.log('esbuild not installed: no bundled @oclif/core (blkrep loads it from node_modules)');
  process.exit(0);
}
const { version } = require('@oclif/core/package.json');
const outfile = vendoredOclifPath(root, version);
mkdirSync(path.dirname(outfile), { recursive: true });
for (const old of readdirSync(path.dirname(outfile))) {
  if (old.startsWith('oclif-core-')) rmSync(path.join(path.dirname(outfile), old));
}
await esbuild.build({
  entryPoints: [require.resolve('@oclif/core')],
  outfile,
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  minify: true,
  external: ['typescript', 'ts-node', 'tsx'],
  logLevel: 'error',
});
console.log(`wrote ${path.relative(process.cwd(), outfile)}`);
