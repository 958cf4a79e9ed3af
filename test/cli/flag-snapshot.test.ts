/**
 * Every command's arguments and flags, one line each, against a file kept in the repository: a
 * flag added, removed, renamed or given another default, type, short form or choice is a visible
 * diff of test/cli/flags.snapshot.txt in review (scripts use these names). Read from the oclif
 * manifest the build writes. After a deliberate change:
 *   npx vitest run test/cli/flag-snapshot.test.ts -u
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../support/spawn.js';

interface ManifestFlag {
  name: string;
  type: 'boolean' | 'option';
  char?: string;
  charAliases?: string[];
  default?: unknown;
  options?: string[];
  multiple?: boolean;
  allowNo?: boolean;
  required?: boolean;
  helpValue?: string;
  dependsOn?: string[];
  exclusive?: string[];
}

interface ManifestCommand {
  args: Record<string, { name: string; required?: boolean; options?: string[] }>;
  flags: Record<string, ManifestFlag>;
}

function flagLine(f: ManifestFlag): string {
  const parts = [`--${f.name}`];
  if (f.char) parts.push(`-${f.char}`);
  for (const c of f.charAliases ?? []) parts.push(`-${c}`);
  parts.push(f.type === 'option' ? `${f.helpValue ?? 'VALUE'}` : 'boolean');
  if (f.allowNo) parts.push(`--no-${f.name}`);
  if (f.multiple) parts.push('multiple');
  if (f.required) parts.push('required');
  if (f.options) parts.push(`one of ${f.options.join('|')}`);
  if (f.default !== undefined && f.default !== false) parts.push(`default ${JSON.stringify(f.default)}`);
  if (f.dependsOn?.length) parts.push(`needs ${f.dependsOn.map((d) => `--${d}`).join(' ')}`);
  if (f.exclusive?.length) parts.push(`not with ${f.exclusive.map((d) => `--${d}`).join(' ')}`);
  return `  ${parts.join('  ')}`;
}

export function flagSnapshot(manifest: { commands: Record<string, ManifestCommand> }): string {
  const out: string[] = [];
  for (const id of Object.keys(manifest.commands).sort()) {
    const c = manifest.commands[id]!;
    const args = Object.values(c.args).map((a) => (a.required ? a.name.toUpperCase() : `[${a.name.toUpperCase()}]`));
    out.push(`blkrep ${id.replaceAll(":", " ")}${args.length ? ` ${args.join(' ')}` : ''}`);
    for (const name of Object.keys(c.flags).sort()) out.push(flagLine(c.flags[name]!));
  }
  return `${out.join('\n')}\n`;
}

describe('the flags of every command', () => {
  it('match test/cli/flags.snapshot.txt', async () => {
    const manifest = JSON.parse(readFileSync(join(REPO_ROOT, 'oclif.manifest.json'), 'utf8'));
    const text = flagSnapshot(manifest);
    // every command, and every command has --json
    expect(Object.keys(manifest.commands).length).toBeGreaterThanOrEqual(36);
    for (const id of Object.keys(manifest.commands)) expect(manifest.commands[id].flags.json, id).toBeDefined();
    await expect(text).toMatchFileSnapshot('./flags.snapshot.txt');
  });
});
