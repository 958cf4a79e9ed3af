/**
 * Regenerate schemas/*.json (the JSON Schema of every command's --json output, of an error and
 * of an event line) from src/cli/output-schemas.ts.
 *   node dist/scripts/gen-schemas.js          write the files
 *   node dist/scripts/gen-schemas.js --check  exit 1 if a file in schemas/ differs or is missing
 */
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { jsonSchemaText, schemaFiles } from '../src/cli/output-schemas.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(here, here.includes(`${path.sep}dist${path.sep}`) ? '../..' : '..');
const DIR = path.join(ROOT, 'schemas');

const check = process.argv.includes('--check');
const wanted = new Map(schemaFiles().map((e) => [e.file, jsonSchemaText(e)]));
const present = (await readdir(DIR, { recursive: true }).catch(() => [] as string[])).map((f) => f.split(path.sep).join('/'));
const stale: string[] = [];
for (const [file, text] of wanted) {
  const old = await readFile(path.join(DIR, file), 'utf8').catch(() => undefined);
  if (old === text) continue;
  stale.push(file);
  if (!check) {
    await mkdir(path.dirname(path.join(DIR, file)), { recursive: true });
    await writeFile(path.join(DIR, file), text);
  }
}
for (const file of present) {
  if (wanted.has(file) || !file.endsWith('.json')) continue;
  stale.push(file);
  if (!check) await rm(path.join(DIR, file));
}
if (check && stale.length) {
  console.error(`schemas/ is out of date (${stale.join(', ')}): run npm run schemas`);
  process.exit(1);
}
console.log(check ? `schemas/: ${wanted.size} files up to date` : `schemas/: ${stale.length} of ${wanted.size} files written or removed`);
