/**
 * A control verb as data: its name, the schema of its arguments, what it answers, the events it
 * may publish and the error codes it may answer with. The server validates every request's
 * arguments against the verb's schema in one place (`parseVerbArgs`) before the handler runs, and
 * blkrep-control(7) is generated from the same table (src/man/control-page.ts).
 *
 * Argument schemas are zod objects built from the field makers below, so every error reads the
 * same way: `VERB: "FIELD" must be EXPECTED, got VALUE` (ERR_BAD_REQUEST, EINVAL).
 */
import { z } from 'zod';
import { BlkrepError } from '../api/errors.js';

/** The static half of a verb: everything but the handler (what the documentation is made of). */
export interface VerbSpec<A extends z.ZodType = z.ZodType> {
  name: string;
  /** one line: what the verb does */
  summary: string;
  /** the arguments, a zod object; unknown fields are dropped unless the object is strict */
  args: A;
  /** what `result` holds on success */
  result: string;
  /** events the verb may publish (to subscribers) besides its reply */
  events?: readonly string[];
  /** error codes the verb may answer with besides ERR_BAD_REQUEST */
  errors?: readonly string[];
  /** more prose for the man page */
  notes?: string;
}

/** A verb with its handler, as `ControlServer.register` takes it. */
export interface ControlVerb<A extends z.ZodType = z.ZodType> extends VerbSpec<A> {
  handler(args: z.output<A>): unknown;
}

/** Bind a handler to a spec; the handler gets the arguments as the schema parsed them. */
export function verb<A extends z.ZodType>(spec: VerbSpec<A>, handler: (args: z.output<A>) => unknown): ControlVerb<A> {
  return { ...spec, handler };
}

// ------------------------------------------------------------------------------ field makers

/** `error` for a schema and its checks: the phrase after `"FIELD" `. */
function must(expected: string): { error: string } {
  return { error: `must be ${expected}` };
}

export const arg = {
  /** any string, "" included */
  string: () => z.string(must('a string')),
  /** a string with at least one character */
  name: () => z.string(must('a non-empty string')).min(1, must('a non-empty string')),
  /** 0 … 2^53-1 */
  uint: () => z.number(must('a non-negative integer')).int(must('a non-negative integer')).min(0, must('a non-negative integer')),
  /** any finite number */
  number: () => z.number(must('a number')),
  bool: () => z.boolean(must('true or false')),
  oneOf: <const T extends readonly [string, ...string[]]>(values: T) => z.enum(values, must(`one of ${values.join(', ')}`)),
};

/** The arguments of a verb that takes none (any object; its fields are ignored). */
export const NO_ARGS = z.object({});

// --------------------------------------------------------------------------------- validation

/** A short, safe rendering of a bad value for an error message (never the whole value). */
export function preview(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return `an array of ${value.length}`;
  switch (typeof value) {
    case 'string':
      return value.length > 40 ? `${JSON.stringify(value.slice(0, 40))}… (${value.length} characters)` : JSON.stringify(value);
    case 'number':
    case 'boolean':
      return String(value);
    case 'object':
      return 'an object';
    default:
      return typeof value;
  }
}

function fieldName(path: readonly PropertyKey[]): string {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : out === '' ? String(p) : `.${String(p)}`;
  return out;
}

function valueAt(input: unknown, path: readonly PropertyKey[]): unknown {
  let v = input;
  for (const p of path) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<PropertyKey, unknown>)[p];
  }
  return v;
}

/** The description of a top-level field, when it has one. */
function describedAs(schema: z.ZodType, key: PropertyKey): string | undefined {
  const shape = (schema as { shape?: Record<string, z.ZodType> }).shape;
  return typeof key === 'string' ? shape?.[key]?.description : undefined;
}

/** One issue as a sentence (without the verb). */
function issueText(schema: z.ZodType, input: unknown, issue: z.core.$ZodIssue, label: string): string {
  if (issue.code === 'unrecognized_keys') {
    const shape = (schema as { shape?: Record<string, unknown> }).shape ?? {};
    return `${label} takes no "${issue.keys[0]}" (it takes ${Object.keys(shape).join(', ')})`;
  }
  const field = fieldName(issue.path);
  const value = valueAt(input, issue.path);
  if (value === undefined && issue.path.length > 0) {
    const d = issue.path.length === 1 ? describedAs(schema, issue.path[0]!) : undefined;
    return `"${field}"${d ? ` (${d})` : ''} is required`;
  }
  const phrase = issue.message.startsWith('must be') || issue.message.startsWith('at most') ? issue.message : `is not valid (${issue.message})`;
  return `${issue.path.length === 0 ? 'the arguments' : `"${field}"`} ${phrase}, got ${preview(value)}`;
}

/**
 * Check `raw` against `schema`: the parsed value, or ERR_BAD_REQUEST naming the verb, the field,
 * what was expected and what came (`job-start: "speed" must be a non-negative integer, got "x"`).
 * `label` names what takes the arguments in an unknown-field error (default: the verb).
 */
export function parseVerbArgs<A extends z.ZodType>(verbName: string, schema: A, raw: unknown, label = verbName): z.output<A> {
  const r = schema.safeParse(raw);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  const field = issue.code === 'unrecognized_keys' ? issue.keys[0]! : fieldName(issue.path);
  throw new BlkrepError('ERR_BAD_REQUEST', `${verbName}: ${issueText(schema, raw, issue, label)}`, {
    errno: 'EINVAL',
    details: { verb: verbName, field },
  });
}
