/**
 * The bitmap verbs of the daemon's control socket (src/control/README.md lists them):
 * bitmap-list, -add, -remove, -clear, -enable, -disable, -merge, -dump, -fill, -checkpoint,
 * -checkpoints. Each takes `export` (optional when the daemon serves one export) and `name`.
 */
import { BlkrepError } from '../api/errors.js';
import type { ControlVerbRegistry as ControlServer } from '../api/control.js';
import { isJsonObject } from '../control/protocol.js';
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

type Args = Record<string, unknown>;

function str(cmd: string, args: Args, key: string): string | undefined {
  const v = args[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') throw bad(cmd, `"${key}" must be a string`);
  return v;
}

function requiredStr(cmd: string, args: Args, key: string): string {
  const v = str(cmd, args, key);
  if (v === undefined) throw bad(cmd, `"${key}" is required`);
  return v;
}

function int(cmd: string, args: Args, key: string): number | undefined {
  const v = args[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw bad(cmd, `"${key}" must be a non-negative integer`);
  return v;
}

function bool(cmd: string, args: Args, key: string): boolean | undefined {
  const v = args[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') throw bad(cmd, `"${key}" must be true or false`);
  return v;
}

/** `ranges`: [[offset, length], …] or [{offset, length}, …]. */
function ranges(cmd: string, args: Args): Run[] | undefined {
  const v = args.ranges;
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v)) throw bad(cmd, '"ranges" must be an array of [offset, length] pairs');
  if (v.length > MAX_RANGES_PER_REQUEST) throw bad(cmd, `at most ${MAX_RANGES_PER_REQUEST} ranges per request (got ${v.length}); send them in several requests`);
  return v.map((r, i) => {
    const [offset, length] = Array.isArray(r) ? r : isJsonObject(r) ? [r.offset, r.length] : [undefined, undefined];
    if (typeof offset !== 'number' || typeof length !== 'number' || !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw bad(cmd, `range ${i} is not [offset, length] of non-negative integers`);
    }
    return { offset, length };
  });
}

/**
 * Register the verbs. `lookup(exportName)` finds an export's bitmaps; an absent export name
 * means the only export (an error when the daemon serves several).
 */
export function registerBitmapVerbs(control: ControlServer, lookup: (exportName: string | undefined) => ExportBitmaps, all: () => ExportBitmaps[]): void {
  const on = (cmd: (typeof BITMAP_VERBS)[number], handler: (args: Args, eb: () => ExportBitmaps) => unknown): void => {
    control.register(cmd, (raw) => {
      const args = raw as Args;
      return handler(args, () => lookup(str(cmd, args, 'export')));
    });
  };
  on('bitmap-list', (args) => {
    const name = str('bitmap-list', args, 'export');
    const sets = name === undefined ? all() : [lookup(name)];
    return sets.flatMap((eb) => eb.list());
  });
  on('bitmap-add', (args, eb) =>
    eb().add(requiredStr('bitmap-add', args, 'name'), {
      ...opt('granularity', int('bitmap-add', args, 'granularity')),
      ...opt('enabled', bool('bitmap-add', args, 'disabled') === undefined ? undefined : !bool('bitmap-add', args, 'disabled')),
      ...opt('file', str('bitmap-add', args, 'file')),
      ...opt('persistent', bool('bitmap-add', args, 'persistent')),
    }),
  );
  on('bitmap-remove', (args, eb) => eb().remove(requiredStr('bitmap-remove', args, 'name'), { ifExists: bool('bitmap-remove', args, 'ifExists') ?? false }));
  on('bitmap-clear', (args, eb) => eb().clear(requiredStr('bitmap-clear', args, 'name'), ranges('bitmap-clear', args)));
  on('bitmap-enable', (args, eb) => eb().setEnabled(requiredStr('bitmap-enable', args, 'name'), true));
  on('bitmap-disable', (args, eb) => eb().setEnabled(requiredStr('bitmap-disable', args, 'name'), false));
  on('bitmap-merge', (args, eb) => {
    const source = str('bitmap-merge', args, 'source');
    const sourceFile = str('bitmap-merge', args, 'sourceFile');
    if ((source === undefined) === (sourceFile === undefined)) throw bad('bitmap-merge', 'give exactly one of "source" (a bitmap of the export) and "sourceFile" (a bitmap file)');
    return eb().merge(requiredStr('bitmap-merge', args, 'name'), source !== undefined ? { name: source } : { file: sourceFile! });
  });
  on('bitmap-fill', (args, eb) => {
    const r = ranges('bitmap-fill', args);
    const allBits = bool('bitmap-fill', args, 'all') ?? false;
    if ((r === undefined) === !allBits) throw bad('bitmap-fill', 'give exactly one of "ranges" and "all": true');
    return eb().fill(requiredStr('bitmap-fill', args, 'name'), allBits ? { all: true } : { ranges: r! });
  });
  on('bitmap-dump', (args, eb) =>
    eb().dump(requiredStr('bitmap-dump', args, 'name'), {
      ...opt('start', int('bitmap-dump', args, 'start')),
      ...opt('length', int('bitmap-dump', args, 'length')),
      ...opt('limit', int('bitmap-dump', args, 'limit')),
    }),
  );
  on('bitmap-checkpoint', (args, eb) => eb().checkpoint(requiredStr('bitmap-checkpoint', args, 'name')));
  on('bitmap-checkpoints', (args, eb) => eb().checkpoints(requiredStr('bitmap-checkpoints', args, 'name')));
}

function opt<K extends string, V>(key: K, value: V | undefined): { [P in K]?: V } {
  return (value === undefined ? {} : { [key]: value }) as { [P in K]?: V };
}
