/**
 * The bitmap verbs of the daemon's control socket, as a table (src/control/verb.ts):
 * bitmap-list, -add, -remove, -clear, -enable, -disable, -merge, -dump, -fill, -checkpoint,
 * -checkpoints. Each takes `export` (optional when the daemon serves one export) and `name`.
 * The server checks the arguments against each verb's schema before the handler runs.
 */
import { z } from 'zod';
import { BlkrepError } from '../api/errors.js';
import type { ControlVerbRegistry as ControlServer } from '../api/control.js';
import { arg, verb, type VerbSpec } from '../control/verb.js';
import type { Run } from './dirty-bitmap.js';
import type { ExportBitmaps } from './export-bitmaps.js';

/** Longest ranges list one request may carry (a request line is at most 1 MiB). */
export const MAX_RANGES_PER_REQUEST = 32768;

export const BITMAP_VERBS = [
  'bitmap-list', 'bitmap-add', 'bitmap-remove', 'bitmap-clear', 'bitmap-enable', 'bitmap-disable', 'bitmap-merge', 'bitmap-dump',
  'bitmap-fill', 'bitmap-checkpoint', 'bitmap-checkpoints',
] as const;

function bad(cmd: string, message: string): BlkrepError {
  return new BlkrepError('ERR_BAD_REQUEST', `${cmd}: ${message}`, { errno: 'EINVAL' });
}

// ------------------------------------------------------------------------------ the arguments

const exportArg = arg.string().nullish().describe('the export; may be left out when the daemon serves one');
const nameArg = arg.string().describe("the bitmap's name");
const PAIR = 'must be [offset, length] of non-negative integers';
const range = z.union([z.tuple([arg.uint(), arg.uint()]).rest(z.unknown()), z.object({ offset: arg.uint(), length: arg.uint() })], { error: PAIR });
/** `ranges`: [[offset, length], …] or [{offset, length}, …]. */
const rangesArg = z
  .array(range, { error: 'must be an array of [offset, length] pairs' })
  .max(MAX_RANGES_PER_REQUEST, { error: `at most ${MAX_RANGES_PER_REQUEST} ranges per request; send them in several requests` })
  .nullish()
  .describe(`[[offset, length], …] or [{offset, length}, …], at most ${MAX_RANGES_PER_REQUEST}`);

function runs(ranges: z.output<typeof rangesArg>): Run[] | undefined {
  return ranges?.map((r) => (Array.isArray(r) ? { offset: r[0], length: r[1] } : { offset: r.offset, length: r.length }));
}

const CHANGED = '{name, changed, bitmap}: changed is false when nothing had to change; bitmap is its BitmapInfo';
const LOOKUP_ERRORS = ['ERR_NO_EXPORT', 'ERR_BITMAP_NOT_FOUND'] as const;
const target = z.object({ export: exportArg, name: nameArg });

/** The bitmap verbs without their handlers: what blkrep-control(7) documents. */
export const BITMAP_VERB_SPECS = {
  'bitmap-list': {
    name: 'bitmap-list',
    summary: 'The bitmaps of one export, or of every export.',
    args: z.object({ export: arg.string().nullish().describe('the export; absent: every export') }),
    result: 'BitmapInfo[]',
    errors: ['ERR_NO_EXPORT'],
  },
  'bitmap-add': {
    name: 'bitmap-add',
    summary: 'Add a bitmap to an export: it records every write from now on. Durable before the reply.',
    args: target.extend({
      granularity: arg.uint().nullish().describe('bytes per bit, a power of two'),
      disabled: arg.bool().nullish().describe('add it disabled (it records nothing until enabled)'),
      file: arg.string().nullish().describe('where the bitmap file goes (default IMAGE.NAME.bitmap beside a file image)'),
      persistent: arg.bool().nullish().describe('false: keep it in memory only'),
    }),
    result: CHANGED,
    events: ['bitmap-added'],
    errors: ['ERR_NO_EXPORT', 'ERR_BITMAP_EXISTS', 'ERR_BITMAP_IN_USE', 'ERR_BITMAP_NAME', 'ERR_BITMAP_INVALID'],
  },
  'bitmap-remove': {
    name: 'bitmap-remove',
    summary: 'Remove a bitmap, its file and its checkpoints.',
    args: target.extend({ ifExists: arg.bool().nullish().describe('true: a bitmap that does not exist is not an error') }),
    result: '{name, changed, bitmap: null}',
    events: ['bitmap-removed'],
    errors: LOOKUP_ERRORS,
  },
  'bitmap-clear': {
    name: 'bitmap-clear',
    summary: 'Clear all of a bitmap, or the granules wholly inside ranges.',
    args: target.extend({ ranges: rangesArg }),
    result: CHANGED,
    events: ['bitmap-cleared'],
    errors: [...LOOKUP_ERRORS, 'ERR_OUT_OF_RANGE'],
  },
  'bitmap-enable': {
    name: 'bitmap-enable',
    summary: 'Make a bitmap record writes again.',
    args: target,
    result: CHANGED,
    events: ['bitmap-enabled'],
    errors: LOOKUP_ERRORS,
  },
  'bitmap-disable': {
    name: 'bitmap-disable',
    summary: 'Stop a bitmap recording writes (its bits stay).',
    args: target,
    result: CHANGED,
    events: ['bitmap-disabled'],
    errors: LOOKUP_ERRORS,
  },
  'bitmap-merge': {
    name: 'bitmap-merge',
    summary: 'OR into a bitmap another bitmap of the export (source) or a bitmap file (sourceFile): exactly one of them.',
    args: target.extend({
      source: arg.string().nullish().describe('a bitmap of the same export'),
      sourceFile: arg.string().nullish().describe('a bitmap file'),
    }),
    result: CHANGED,
    events: ['bitmap-merged'],
    errors: [...LOOKUP_ERRORS, 'ERR_BITMAP_INVALID', 'ERR_BITMAP_CORRUPT'],
  },
  'bitmap-dump': {
    name: 'bitmap-dump',
    summary: "One page of a bitmap's dirty runs; next says where the next page starts (null: done).",
    args: target.extend({
      start: arg.uint().nullish().describe('byte offset to start at (default 0)'),
      length: arg.uint().nullish().describe('bytes to cover (default to the end)'),
      limit: arg.uint().nullish().describe('most runs in the page (default and maximum 65536)'),
    }),
    result: '{name, size, granularity, enabled, dirtyGranules, dirtyBytes, start, end, runs: [[offset, length], …], next}',
    errors: [...LOOKUP_ERRORS, 'ERR_OUT_OF_RANGE'],
  },
  'bitmap-fill': {
    name: 'bitmap-fill',
    summary: 'Mark ranges of a bitmap dirty, or all of it: exactly one of ranges and all.',
    args: target.extend({ ranges: rangesArg, all: arg.bool().nullish().describe('true: mark the whole disk dirty') }),
    result: CHANGED,
    events: ['bitmap-filled'],
    errors: [...LOOKUP_ERRORS, 'ERR_OUT_OF_RANGE'],
  },
  'bitmap-checkpoint': {
    name: 'bitmap-checkpoint',
    summary: "Freeze a checkpoint of a bitmap (a numbered copy) for an incremental backup's consistency point.",
    args: target,
    result: 'CheckpointInfo of the checkpoint just frozen',
    events: ['bitmap-checkpoint'],
    errors: [...LOOKUP_ERRORS, 'ERR_BITMAP_NOT_PERSISTENT'],
  },
  'bitmap-checkpoints': {
    name: 'bitmap-checkpoints',
    summary: "A bitmap's checkpoints, oldest first.",
    args: target,
    result: 'CheckpointInfo[]',
    errors: LOOKUP_ERRORS,
  },
} as const satisfies Record<(typeof BITMAP_VERBS)[number], VerbSpec>;

type Specs = typeof BITMAP_VERB_SPECS;
type ArgsOf<K extends keyof Specs> = z.output<Specs[K]['args']>;

/**
 * Register the verbs. `lookup(exportName)` finds an export's bitmaps; an absent export name
 * means the only export (an error when the daemon serves several).
 */
export function registerBitmapVerbs(control: ControlServer, lookup: (exportName: string | undefined) => ExportBitmaps, all: () => ExportBitmaps[]): void {
  const on = <K extends keyof Specs>(cmd: K, handler: (args: ArgsOf<K>, eb: () => ExportBitmaps) => unknown): void => {
    const spec = BITMAP_VERB_SPECS[cmd] as VerbSpec;
    control.register(verb(spec, (raw) => {
      const args = raw as ArgsOf<K>;
      return handler(args, () => lookup(args.export ?? undefined));
    }));
  };
  on('bitmap-list', (args) => (args.export == null ? all() : [lookup(args.export)]).flatMap((eb) => eb.list()));
  on('bitmap-add', (args, eb) =>
    eb().add(args.name, {
      ...opt('granularity', args.granularity),
      ...opt('enabled', args.disabled == null ? undefined : !args.disabled),
      ...opt('file', args.file),
      ...opt('persistent', args.persistent),
    }),
  );
  on('bitmap-remove', (args, eb) => eb().remove(args.name, { ifExists: args.ifExists ?? false }));
  on('bitmap-clear', (args, eb) => eb().clear(args.name, runs(args.ranges)));
  on('bitmap-enable', (args, eb) => eb().setEnabled(args.name, true));
  on('bitmap-disable', (args, eb) => eb().setEnabled(args.name, false));
  on('bitmap-merge', (args, eb) => {
    const { source, sourceFile } = args;
    if ((source == null) === (sourceFile == null)) throw bad('bitmap-merge', 'give exactly one of "source" (a bitmap of the export) and "sourceFile" (a bitmap file)');
    return eb().merge(args.name, source != null ? { name: source } : { file: sourceFile! });
  });
  on('bitmap-fill', (args, eb) => {
    const r = runs(args.ranges);
    const allBits = args.all ?? false;
    if ((r === undefined) === !allBits) throw bad('bitmap-fill', 'give exactly one of "ranges" and "all": true');
    return eb().fill(args.name, allBits ? { all: true } : { ranges: r! });
  });
  on('bitmap-dump', (args, eb) =>
    eb().dump(args.name, { ...opt('start', args.start), ...opt('length', args.length), ...opt('limit', args.limit) }),
  );
  on('bitmap-checkpoint', (args, eb) => eb().checkpoint(args.name));
  on('bitmap-checkpoints', (args, eb) => eb().checkpoints(args.name));
}

function opt<K extends string, V>(key: K, value: V | null | undefined): { [P in K]?: V } {
  return (value == null ? {} : { [key]: value }) as { [P in K]?: V };
}
