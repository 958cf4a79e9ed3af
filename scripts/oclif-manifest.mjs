#!/usr/bin/env node
// Writes oclif.manifest.json (what `oclif manifest` writes) from the built commands in dist/, so
// that `blkrep COMMAND` imports only COMMAND's module at start-up instead of every command's.
// `npm run build` runs it; bin/run.js runs writeManifest() itself when a compiled command is
// newer than the manifest (a build with tsc alone).
import { renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export async function writeManifest(root) {
  const { Plugin } = await import('@oclif/core');
  // the root plugin, ignoring the manifest there may be (Config.load's ignoreManifest does not reach the root)
  const plugin = new Plugin({ root, isRoot: true, ignoreManifest: true });
  await plugin.load();
  const file = path.join(root, 'oclif.manifest.json');
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(plugin.manifest, null, 2) + '\n');
  renameSync(tmp, file);
  return { file, commands: Object.keys(plugin.manifest.commands).length };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
  const { file, commands } = await writeManifest(root);
  console.log(`wrote ${path.relative(process.cwd(), file) || file}: ${commands} commands`);
}
