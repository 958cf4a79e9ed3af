/**
 * Regenerate man/*.1 from the command definitions and man/prose/*.roff.
 *   node dist/scripts/gen-man.js          write the pages
 *   node dist/scripts/gen-man.js --check  exit 1 if a page in man/ differs
 */
import { readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { describeCommand, renderCommandPage, renderIndexPage, type CommandDef } from '../src/man/render.js';
import { renderControlPage } from '../src/man/control-page.js';
import { BITMAP_VERB_SPECS } from '../src/bitmap/control-verbs.js';
import { DEFAULT_CONTROL_LIMITS, MAX_REQUEST_LINE_BYTES } from '../src/control/protocol.js';
import { SUBSCRIBE_VERB } from '../src/control/server.js';
import '../src/jobs/daemon-job-types.js';
import { JOB_VERB_SPECS, jobTypeSpec, jobTypes } from '../src/jobs/daemon-jobs.js';
import { PRIMARY_VERB_SPECS } from '../src/pair/primary-host.js';
import { DAEMON_VERB_SPECS } from '../src/serve/daemon-verbs.js';
import { PAIR_VERB_SPECS } from '../src/pair/control-verbs.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** the repository root, whether run from dist/scripts or scripts */
export const ROOT = path.resolve(here, here.includes(`${path.sep}dist${path.sep}`) ? '../..' : '..');
/** The date in the .TH line; fixed so regeneration is reproducible. Bump with the version. */
export const MAN_DATE = '2026-11-22';

async function readProse(page: string): Promise<string> {
  try {
    return await readFile(path.join(ROOT, 'man', 'prose', `${page}.roff`), 'utf8');
  } catch {
    return '';
  }
}

/** Every command: id from the file path under dist/src/commands. */
export async function loadCommands(): Promise<CommandDef[]> {
  const dir = path.join(ROOT, 'dist', 'src', 'commands');
  const out: CommandDef[] = [];
  async function walk(d: string, prefix: string[]): Promise<void> {
    for (const entry of await readdir(d, { withFileTypes: true })) {
      if (entry.isDirectory()) await walk(path.join(d, entry.name), [...prefix, entry.name]);
      else if (entry.name.endsWith('.js')) {
        const base = entry.name.replace(/\.js$/, '');
        const id = [...prefix, ...(base === 'index' ? [] : [base])].join(' ');
        const mod = (await import(pathToFileURL(path.join(d, entry.name)).href)) as { default: Parameters<typeof describeCommand>[1] };
        out.push(describeCommand(id, mod.default));
      }
    }
  }
  await walk(dir, []);
  return out.sort((a, b) => a.id.localeCompare(b.id));
}

/** page file name → contents */
export async function renderAll(): Promise<Map<string, string>> {
  const commands = await loadCommands();
  const pages = new Map<string, string>();
  pages.set('blkrep.1', renderIndexPage(commands, await readProse('blkrep'), MAN_DATE));
  for (const c of commands) {
    const page = `blkrep-${c.id.replace(/ /g, '-')}`;
    pages.set(`${page}.1`, renderCommandPage(c, await readProse(page), MAN_DATE));
  }
  pages.set('blkrep-control.7', renderControlPage(controlPageInput(), await readProse('blkrep-control'), MAN_DATE));
  return pages;
}

/** Every verb of the serve-nbd daemon's control socket, and its job types, as the tables define them. */
export function controlPageInput(): Parameters<typeof renderControlPage>[0] {
  return {
    verbs: [SUBSCRIBE_VERB, ...Object.values(DAEMON_VERB_SPECS), ...Object.values(BITMAP_VERB_SPECS), ...Object.values(JOB_VERB_SPECS), ...Object.values(PAIR_VERB_SPECS), ...Object.values(PRIMARY_VERB_SPECS)],
    jobTypes: jobTypes().map((type) => ({ type, ...jobTypeSpec(type)! })),
    limits: { maxLineBytes: MAX_REQUEST_LINE_BYTES, ...DEFAULT_CONTROL_LIMITS },
  };
}

async function main(): Promise<void> {
  const check = process.argv.includes('--check');
  const pages = await renderAll();
  let stale = 0;
  for (const [file, text] of pages) {
    const target = path.join(ROOT, 'man', file);
    const old = await readFile(target, 'utf8').catch(() => '');
    if (old === text) continue;
    if (check) {
      console.error(`man/${file} is out of date: run npm run man`);
      stale++;
    } else {
      await writeFile(target, text);
      console.error(`wrote man/${file}`);
    }
  }
  if (stale) process.exit(1);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) await main();
