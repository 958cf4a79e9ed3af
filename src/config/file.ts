/**
 * Config files: /etc/blkrep/NAME.yaml (or .json) holding a command's flags as keys
 * (flag-schema.ts). Loading one parses it (YAML 1.2; a .json file must be strict JSON), checks
 * every key against the schema built from the command's flags and the flags' relations
 * (dependsOn, exclusive), and turns it into command-line words that go before the caller's own:
 * a flag given on the command line replaces the file's value of it (a repeatable one: its whole
 * list), a positional argument replaces the file's.
 *
 * Every error is ERR_CONFIG (exit 2) naming the file, the line and column, the key, and what was
 * expected; all problems of a file are reported at once (details.issues).
 */
import { readFile } from 'node:fs/promises';
import { LineCounter, isMap, isScalar, parseDocument, type Document, type Node as YamlNode, type Pair } from 'yaml';
import { BlkrepError } from '../api/errors.js';
import { closestKey, commandSchema, configKeys, NOT_IN_FILE, type CommandShape, type FlagDefinition } from './flag-schema.js';
export type { CommandShape } from './flag-schema.js';

export interface ConfigIssue {
  /** the key the problem is at ('' for the file as a whole) */
  key: string;
  line?: number;
  column?: number;
  message: string;
}

/** A config file problem: exit 2 like a usage error (the oclif exit code the base command honours). */
export class ConfigError extends BlkrepError {
  readonly oclif = { exit: 2 };
  readonly issues: ConfigIssue[];
  constructor(file: string, issues: ConfigIssue[]) {
    const lines = issues.map((i) => `${file}${i.line === undefined ? '' : `:${i.line}:${i.column ?? 1}`}: ${i.key === '' ? '' : `key "${i.key}": `}${i.message}`);
    super('ERR_CONFIG', issues.length === 1 ? lines[0]! : `${file}: ${issues.length} problems\n${lines.join('\n')}`, { errno: 'EINVAL', details: { file, issues } });
    this.issues = issues;
  }
}

/** A config file's checked values: flag or argument name → string, boolean or list of strings. */
export type ConfigValues = Record<string, string | boolean | string[]>;

export interface LoadedConfig {
  file: string;
  values: ConfigValues;
}

interface Located {
  doc: Document;
  lines: LineCounter;
}

function position(where: Located, range: [number, number, number] | undefined | null): { line?: number; column?: number } {
  if (!range) return {};
  const p = where.lines.linePos(range[0]);
  return { line: p.line, column: p.col };
}

/** The position of a key's value (or of the key itself, for keys that should not be there). */
function locate(where: Located, path: ReadonlyArray<PropertyKey>, atKey = false): { line?: number; column?: number } {
  if (path.length === 0) return position(where, where.doc.contents?.range);
  if (atKey || path.length === 1) {
    const pair = findPair(where, String(path[0]));
    const node = (pair ? (atKey ? pair.key : (pair.value ?? pair.key)) : undefined) as YamlNode | null | undefined;
    return position(where, node?.range);
  }
  const node = where.doc.getIn(path as unknown[], true) as YamlNode | undefined;
  return position(where, node?.range);
}

function findPair(where: Located, key: string): Pair | undefined {
  const root = where.doc.contents;
  if (!isMap(root)) return undefined;
  return root.items.find((p) => (isScalar(p.key) ? String(p.key.value) : String(p.key)) === key) as Pair | undefined;
}

/** Parse the text of a config file (YAML, or strict JSON for a .json file) into a document with positions. */
export function parseConfigText(file: string, text: string): { data: unknown; where: Located } {
  const lines = new LineCounter();
  if (file.endsWith('.json')) {
    try {
      JSON.parse(text);
    } catch (err) {
      const m = /position (\d+)/.exec((err as Error).message);
      const at = m ? offsetToLine(text, Number(m[1])) : {};
      throw new ConfigError(file, [{ key: '', ...at, message: `not valid JSON: ${(err as Error).message.replace(/ in JSON at position \d+.*$/, '')}` }]);
    }
  }
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true, strict: true, version: '1.2' });
  const where = { doc, lines };
  if (doc.errors.length > 0) {
    throw new ConfigError(
      file,
      doc.errors.map((e) => ({ key: '', ...position(where, [e.pos[0], e.pos[1], e.pos[1]]), message: `not valid YAML: ${e.message.split('\n')[0]}` })),
    );
  }
  const data: unknown = doc.toJS({ maxAliasCount: 100 });
  return { data, where };
}

function offsetToLine(text: string, offset: number): { line: number; column: number } {
  const before = text.slice(0, offset).split('\n');
  return { line: before.length, column: before[before.length - 1]!.length + 1 };
}

/** Check parsed data against the command's flags: every problem, with where it is. */
export async function checkConfigData(file: string, data: unknown, where: Located | undefined, command: CommandShape, present: ReadonlySet<string> = new Set()): Promise<ConfigValues> {
  const at = (path: ReadonlyArray<PropertyKey>, atKey = false) => (where ? locate(where, path, atKey) : {});
  if (data === null || data === undefined) {
    throw new ConfigError(file, [{ key: '', message: 'is empty: expected a mapping of serve-nbd flags to values (e.g. "image: /dev/vdb" and "port: 10809")' }]);
  }
  if (typeof data !== 'object' || Array.isArray(data)) {
    throw new ConfigError(file, [{ key: '', ...at([]), message: `expected a mapping of flags to values at the top, got ${Array.isArray(data) ? 'a list' : typeof data}` }]);
  }
  const keys = configKeys(command);
  const issues: ConfigIssue[] = [];
  const result = await commandSchema(command).safeParseAsync(data);
  if (!result.success) {
    for (const issue of result.error.issues) {
      if (issue.code === 'unrecognized_keys') {
        for (const key of issue.keys) {
          const near = closestKey(key, keys);
          const why = NOT_IN_FILE.includes(key) ? `--${key} cannot be given in a config file` : `is not a flag of serve-nbd${near ? ` (did you mean "${near}"?)` : ''}`;
          issues.push({ key, ...at([key], true), message: why });
        }
        continue;
      }
      // one value where a list may be: its issue is at the key, not at item 0
      const path = issue.path.length === 2 && !Array.isArray((data as Record<string, unknown>)[String(issue.path[0])]) ? issue.path.slice(0, 1) : issue.path;
      const key = path.map(String).join('.');
      // a value a union refused: say the most telling of its branches' messages
      issues.push({ key, ...at(path), message: issue.message });
    }
  }
  // in the file's order (the schema's output is in the flags' order)
  const parsed = (result.success ? result.data : {}) as ConfigValues;
  const values: ConfigValues = {};
  for (const k of Object.keys(data)) if (parsed[k] !== undefined) values[k] = parsed[k];
  if (issues.length === 0) issues.push(...relationIssues(values, command, present, at));
  if (issues.length > 0) {
    issues.sort((a, b) => (a.line ?? 0) - (b.line ?? 0));
    throw new ConfigError(file, issues);
  }
  return values;
}

/** dependsOn and exclusive between the file's keys (and the flags given on the command line). */
function relationIssues(values: ConfigValues, command: CommandShape, present: ReadonlySet<string>, at: (path: PropertyKey[], atKey?: boolean) => { line?: number; column?: number }): ConfigIssue[] {
  const set = new Set(present);
  for (const [k, v] of Object.entries(values)) if (v !== undefined && v !== false) set.add(k);
  const issues: ConfigIssue[] = [];
  for (const [k, v] of Object.entries(values)) {
    const flag = command.flags[k];
    if (!flag || v === undefined || v === false) continue;
    const missing = (flag.dependsOn ?? []).filter((d) => !set.has(d));
    if (missing.length > 0) issues.push({ key: k, ...at([k], true), message: `needs ${missing.map((d) => `"${d}"`).join(' and ')} too (as --${k} needs --${missing.join(' and --')})` });
    const clash = (flag.exclusive ?? []).filter((e) => set.has(e));
    if (clash.length > 0) issues.push({ key: k, ...at([k], true), message: `cannot be used with ${clash.map((e) => `"${e}"`).join(' or ')} (as --${k} cannot with --${clash.join(' or --')})` });
  }
  return issues;
}

/** Read, parse and check a config file. */
export async function loadConfigFile(file: string, command: CommandShape, present: ReadonlySet<string> = new Set()): Promise<LoadedConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'is a directory, not a file' : (err as Error).message;
    throw new ConfigError(file, [{ key: '', message: `cannot read the config file: ${why}` }]);
  }
  const { data, where } = parseConfigText(file, text);
  return { file, values: await checkConfigData(file, data, where, command, present) };
}

// -------------------------------------------------------------------------------------------------
// the command line

export interface ArgvScan {
  /** long flag names given (short ones and --no-X mapped to their names) */
  flags: Set<string>;
  /** a positional argument is given */
  positional: boolean;
  /** the value of --config, if given */
  config?: string;
}

/** Which flags and whether an argument the command line gives (before "--"; everything after is positional). */
export function scanArgv(argv: readonly string[], command: CommandShape): ArgvScan {
  const byChar = new Map<string, string>();
  for (const [name, f] of Object.entries(command.flags)) {
    if (f.char) byChar.set(f.char, name);
    for (const c of f.charAliases ?? []) byChar.set(c, name);
  }
  const scan: ArgvScan = { flags: new Set(), positional: false };
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i]!;
    if (word === '--') {
      if (i + 1 < argv.length) scan.positional = true;
      break;
    }
    let name: string | undefined;
    let inline = false;
    if (word.startsWith('--')) {
      const eq = word.indexOf('=');
      name = word.slice(2, eq < 0 ? undefined : eq);
      inline = eq >= 0;
      if (!(name in command.flags) && name.startsWith('no-') && command.flags[name.slice(3)]?.allowNo) name = name.slice(3);
    } else if (word.startsWith('-') && word.length > 1) {
      name = byChar.get(word[1]!);
      inline = word.length > 2;
    } else {
      scan.positional = true;
      continue;
    }
    if (name === undefined) continue;
    scan.flags.add(name);
    if (name === 'config') {
      scan.config = inline ? word.slice(word.indexOf('=') + 1) : argv[++i];
      continue;
    }
    const flag = command.flags[name];
    if (!flag || flag.type === 'boolean') continue;
    if (!inline) i++; // the value
    // a greedy repeatable flag takes every following word up to the next flag
    if (flag.multiple && !flag.multipleNonGreedy) while (i + 1 < argv.length && !argv[i + 1]!.startsWith('-')) i++;
  }
  return scan;
}

/** The file's values as command-line words (those the command line does not give itself): the argument apart. */
export function configArgv(values: ConfigValues, command: CommandShape, given: ArgvScan): { args: string[]; flags: string[] } {
  const flags: string[] = [];
  const args: string[] = [];
  for (const [key, value] of Object.entries(values)) {
    if (!(key in command.flags)) {
      if (!given.positional) args.push(String(value));
      continue;
    }
    if (given.flags.has(key)) continue;
    const flag: FlagDefinition = command.flags[key]!;
    if (flag.type === 'boolean') {
      if (value === true) flags.push(`--${key}`);
      else if (flag.allowNo) flags.push(`--no-${key}`);
      continue;
    }
    // --KEY=VALUE: a value that starts with "-" stays a value
    for (const v of Array.isArray(value) ? value : [value]) flags.push(`--${key}=${String(v)}`);
  }
  return { args, flags };
}

/**
 * argv with the --config file applied: the file's argument first (when the caller gives none), the
 * caller's words, then the file's flags that the caller does not give (before a "--", so they
 * stay flags; each one --KEY=VALUE, so no greedy flag of the caller's takes them as values).
 * argv without --config is returned as it is.
 */
export async function applyConfig(argv: readonly string[], command: CommandShape): Promise<{ argv: string[]; config?: LoadedConfig }> {
  const scan = scanArgv(argv, command);
  if (scan.config === undefined) return { argv: [...argv] };
  if (scan.config === '') throw new ConfigError('--config', [{ key: '', message: 'names no file' }]);
  const present = new Set([...scan.flags].filter((f) => f !== 'config'));
  const config = await loadConfigFile(scan.config, command, present);
  const { args, flags } = configArgv(config.values, command, scan);
  const end = argv.indexOf('--');
  const before = end < 0 ? [...argv] : argv.slice(0, end);
  const after = end < 0 ? [] : argv.slice(end);
  return { argv: [...args, ...before, ...flags, ...after], config };
}
