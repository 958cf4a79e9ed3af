/**
 * A command's flags as a config file's keys: every long flag of the command is a key (its name
 * without the dashes, in the flag's own kebab-case), every argument too (serve-nbd's `image`).
 * The zod schema is built from the flag definitions themselves, so a flag added to serve-nbd is
 * accepted in the file with no edit here; values are checked by the flag's own parser (sizes,
 * durations, integers with their bounds), so the file and the command line agree on what is valid.
 *
 * This module never imports oclif (the layers keep oclif in src/cli and src/commands): it reads
 * the few fields of a flag definition it needs through the FlagDefinition shape below.
 */
import { z } from 'zod';

/** What this module reads of an oclif flag definition. */
export interface FlagDefinition {
  type: 'boolean' | 'option';
  multiple?: boolean;
  multipleNonGreedy?: boolean;
  options?: readonly string[];
  allowNo?: boolean;
  default?: unknown;
  char?: string;
  charAliases?: readonly string[];
  aliases?: readonly string[];
  dependsOn?: readonly string[];
  exclusive?: readonly string[];
  description?: string;
  helpValue?: string | string[];
  parse?: (input: string, context: unknown, options: unknown) => unknown;
}

/** What this module reads of an oclif argument definition. */
export interface ArgDefinition {
  description?: string;
  required?: boolean;
}

export interface CommandShape {
  flags: Record<string, FlagDefinition>;
  args?: Record<string, ArgDefinition>;
}

/** Flags that make no sense in a file: the file itself, and output choices of the one calling. */
export const NOT_IN_FILE: readonly string[] = ['config', 'json', 'help'];

/** The keys a config file for this command may hold: its flags (not NOT_IN_FILE), then its arguments. */
export function configKeys(command: CommandShape): string[] {
  return [...Object.keys(command.flags).filter((k) => !NOT_IN_FILE.includes(k)), ...Object.keys(command.args ?? {})];
}

/** A scalar of a file: strings as they are, numbers as written (a YAML 10809 is the flag's "10809"). */
const scalar = z.union([z.string(), z.number()], { error: (issue) => `expected a string or a number, got ${describe(issue.input)}` });

function describe(value: unknown): string {
  if (value === null) return 'null (an empty value)';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'a mapping';
  return `${typeof value} ${JSON.stringify(value)}`;
}

/** One value of an option flag, checked by the flag's own parser. */
function optionValue(flag: FlagDefinition): z.ZodType<string> {
  if (flag.options && flag.options.length > 0) {
    const options = flag.options as [string, ...string[]];
    return z.string({ error: (issue) => `expected one of ${options.join(', ')}, got ${describe(issue.input)}` }).refine((v) => options.includes(v), {
      error: (issue) => `expected one of ${options.join(', ')}, got ${JSON.stringify(issue.input)}`,
    });
  }
  return scalar.transform(async (v, ctx) => {
    const text = String(v);
    if (flag.parse) {
      try {
        await flag.parse(text, undefined, flag);
      } catch (err) {
        const message = (err instanceof Error ? err.message : String(err)).replace(/^Parsing --[\w-]+ \n\t/, '');
        ctx.addIssue({ code: 'custom', message: message.charAt(0).toLowerCase() + message.slice(1) });
        return z.NEVER;
      }
    }
    return text;
  }) as unknown as z.ZodType<string>;
}

/** The zod schema of one key. Booleans are YAML/JSON booleans; a repeatable flag takes a list or one value. */
export function keySchema(name: string, flag: FlagDefinition): z.ZodType {
  if (flag.type === 'boolean') {
    const bool = z.boolean({ error: (issue) => `expected true or false, got ${describe(issue.input)}` });
    if (flag.allowNo || flag.default !== true) return bool;
    return bool.refine((v) => v, { error: `is on by default and has no --no-${name}: leave it out` });
  }
  const one = optionValue(flag);
  if (!flag.multiple) return one;
  // one value is a list of one
  return z.preprocess((v) => (Array.isArray(v) ? v : [v]), z.array(one).min(1, { error: 'expected at least one value' }));
}

/** The schema of a whole file for this command: a mapping of known keys, nothing else. */
export function commandSchema(command: CommandShape): z.ZodObject {
  const shape: Record<string, z.ZodType> = {};
  for (const [name, flag] of Object.entries(command.flags)) {
    if (NOT_IN_FILE.includes(name)) continue;
    shape[name] = keySchema(name, flag).optional();
  }
  for (const name of Object.keys(command.args ?? {})) {
    shape[name] = z
      .union([z.string(), z.number()], { error: (issue) => `expected a string, got ${describe(issue.input)}` })
      .transform(String)
      .refine((v) => v !== '' && !v.startsWith('-'), { error: 'expected a path or memory:SIZE (not empty, not starting with "-")' })
      .optional();
  }
  return z.object(shape).strict();
}

/** Levenshtein distance, for "did you mean" on an unknown key. */
function distance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return row[b.length]!;
}

/** The closest known key to an unknown one, if it is close enough to be a typo. */
export function closestKey(key: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const k of known) {
    const d = distance(key.replace(/_/g, '-').toLowerCase(), k);
    if (d < bestD) {
      bestD = d;
      best = k;
    }
  }
  return best !== undefined && bestD <= Math.max(2, Math.floor(key.length / 3)) ? best : undefined;
}
