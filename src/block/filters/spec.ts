/**
 * Filter specs, as the command line gives them (--filter, blkrep-filters(7)):
 *
 *   NAME[:KEY=VALUE[,KEY=VALUE]…]
 *   error:ops=write,rate=0.1,errno=EIO,seed=7
 *   error:ops=read+block-status,every=3,range=0-1M+4M-5M
 *   delay:ops=write+flush,ms=20     delay:read=5,write=50
 *   error:ops=write,range=1M-2M,at=disk   (serve-nbd: on the disk, under the pair's filters)
 *
 * Lists inside a value are joined by "+". parseFilterSpec() checks every key and value and says
 * which one is wrong and what was expected (ERR_BAD_FILTER); stackFilters() puts parsed specs on
 * a node, the first one outermost (as nbdkit's --filter: the first is nearest the client).
 */
import type { BlockNode } from '../../api/block.js';
import { BlkrepError, NBD_ERRNO, type Errno } from '../../api/errors.js';
import { parseSize } from '../../util/size.js';
import type { Filter } from '../filter.js';
import { DelayFilter, type DelayFilterOptions } from './delay.js';
import { ErrorFilter, FAULT_OPS, type ErrorFilterOptions, type FaultOp } from './error.js';

/**
 * Where serve-nbd puts a filter (key at=): `export` (the default) between the clients and the
 * export, above everything the daemon stacks; `disk` directly on the export's disk, below the
 * replication pair's filters (a primary's replication, a secondary's copy-before-write), so it
 * fails or delays the disk's own I/O as a failing disk would (replication.md §4 failure cases);
 * `active` on a secondary's active disk, under its view (the secondary's own workload); `hidden`
 * on a secondary's hidden disk as its copy-before-write filter writes it (failure case 3).
 */
export const FILTER_PLACES = ['export', 'disk', 'active', 'hidden'] as const;
export type FilterPlace = (typeof FILTER_PLACES)[number];

export type FilterSpec = ({ name: 'error'; spec: string; options: ErrorFilterOptions } | { name: 'delay'; spec: string; options: DelayFilterOptions }) & { at?: FilterPlace };

/** the filters --filter knows, and the keys each takes */
export const FILTER_KEYS = {
  error: ['ops', 'errno', 'rate', 'every', 'seed', 'range', 'at'],
  delay: ['ops', 'ms', ...FAULT_OPS, 'at'],
} as const;

export type FilterName = keyof typeof FILTER_KEYS;

/** the longest delay accepted (one hour) */
export const MAX_DELAY_MS = 3_600_000;

function bad(spec: string, why: string, details: Record<string, unknown> = {}): BlkrepError {
  return new BlkrepError('ERR_BAD_FILTER', `invalid filter "${spec}": ${why}`, { errno: 'EINVAL', details: { spec, ...details } });
}

/** Parse one --filter value. */
export function parseFilterSpec(spec: string): FilterSpec {
  const colon = spec.indexOf(':');
  const name = (colon < 0 ? spec : spec.slice(0, colon)).trim();
  if (!(name in FILTER_KEYS)) {
    throw bad(spec, `unknown filter "${name}": expected one of ${Object.keys(FILTER_KEYS).join(', ')}, as NAME[:KEY=VALUE,…]`, { filter: name });
  }
  const keys = FILTER_KEYS[name as FilterName] as readonly string[];
  const values = new Map<string, string>();
  const rest = colon < 0 ? '' : spec.slice(colon + 1);
  for (const pair of rest === '' ? [] : rest.split(',')) {
    const eq = pair.indexOf('=');
    const key = (eq < 0 ? pair : pair.slice(0, eq)).trim();
    const value = eq < 0 ? '' : pair.slice(eq + 1).trim();
    if (!keys.includes(key)) throw bad(spec, `${name}: unknown key "${key}": expected one of ${keys.join(', ')}`, { key });
    if (eq < 0 || value === '') throw bad(spec, `${name}: key "${key}" has no value: expected ${key}=VALUE`, { key });
    if (values.has(key)) throw bad(spec, `${name}: key "${key}" is given twice`, { key });
    values.set(key, value);
  }
  const p = new KeyReader(spec, name, values);
  const at = values.get('at');
  if (at !== undefined && !(FILTER_PLACES as readonly string[]).includes(at)) p.fail('at', 'where the filter goes: export (the default), disk, active or hidden');
  const place = at === undefined ? {} : { at: at as FilterPlace };
  if (name === 'error') return { name, spec, options: errorOptions(p), ...place };
  return { name: 'delay', spec, options: delayOptions(p), ...place };
}

class KeyReader {
  constructor(
    readonly spec: string,
    readonly filter: string,
    readonly values: ReadonlyMap<string, string>,
  ) {}

  fail(key: string, expected: string): never {
    throw bad(this.spec, `${this.filter}: ${key}=${this.values.get(key)}: expected ${expected}`, { key, value: this.values.get(key) });
  }

  ops(key = 'ops'): FaultOp[] | undefined {
    const v = this.values.get(key);
    if (v === undefined) return undefined;
    if (v === 'all') return [...FAULT_OPS];
    const ops = v.split('+').map((s) => s.trim());
    for (const op of ops) if (!(FAULT_OPS as readonly string[]).includes(op)) this.fail(key, `kinds of request joined by "+" (${FAULT_OPS.join(', ')}) or all; "${op}" is none of them`);
    return [...new Set(ops as FaultOp[])];
  }

  number(key: string, min: number, max: number, integer: boolean, expected: string): number | undefined {
    const v = this.values.get(key);
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!/^[0-9.eE+-]+$/.test(v) || !Number.isFinite(n) || n < min || n > max || (integer && !Number.isInteger(n))) this.fail(key, expected);
    return n;
  }
}

function errorOptions(p: KeyReader): ErrorFilterOptions {
  const o: ErrorFilterOptions = {};
  const ops = p.ops();
  if (ops) o.ops = ops;
  const errno = p.values.get('errno');
  if (errno !== undefined) {
    if (!(errno in NBD_ERRNO)) p.fail('errno', `an errno NBD carries: ${Object.keys(NBD_ERRNO).join(', ')}`);
    o.errno = errno as Errno;
  }
  const rate = p.number('rate', 0, 1, false, 'a probability from 0 to 1 (e.g. 0.1)');
  const every = p.number('every', 1, 2 ** 32, true, 'a whole number of requests from 1 (every=3: the 3rd, 6th, 9th … fail)');
  if (rate !== undefined && every !== undefined) throw bad(p.spec, 'error: rate and every exclude each other: give one (neither: every matching request fails)', { key: 'every' });
  if (rate !== undefined) o.rate = rate;
  if (every !== undefined) o.every = every;
  const seed = p.number('seed', 0, 2 ** 32 - 1, true, 'a whole number from 0 to 4294967295');
  if (seed !== undefined) {
    if (rate === undefined) throw bad(p.spec, 'error: seed is used only with rate', { key: 'seed' });
    o.seed = seed;
  }
  const range = p.values.get('range');
  if (range !== undefined) {
    o.ranges = range.split('+').map((r) => {
      const m = /^([^-]+)-([^-]+)$/.exec(r.trim());
      if (!m) p.fail('range', `byte ranges START-END (END excluded, sizes such as 4K or 1M) joined by "+"; "${r}" is not one`);
      let start: number;
      let end: number;
      try {
        start = parseSize(m[1]!, 'range start');
        end = parseSize(m[2]!, 'range end');
      } catch (err) {
        p.fail('range', `byte ranges START-END with sizes such as 4K or 1M: ${(err as Error).message}`);
      }
      if (end <= start) p.fail('range', `a range whose END is past its START; "${r}" is empty`);
      return [start, end] as const;
    });
  }
  return o;
}

function delayOptions(p: KeyReader): DelayFilterOptions {
  const o: DelayFilterOptions = {};
  const expected = `milliseconds from 0 to ${MAX_DELAY_MS}`;
  const ms = p.number('ms', 0, MAX_DELAY_MS, false, expected);
  const ops = p.ops();
  if (ops && ms === undefined) throw bad(p.spec, 'delay: ops needs ms (how long to delay them)', { key: 'ops' });
  if (ms !== undefined) for (const op of ops ?? FAULT_OPS) o[op] = ms;
  for (const op of FAULT_OPS) {
    const v = p.number(op, 0, MAX_DELAY_MS, false, expected);
    if (v !== undefined) o[op] = v;
  }
  if (Object.keys(o).length === 0) throw bad(p.spec, `delay: nothing to delay: give ms=MS (with ops=…) or KIND=MS (${FAULT_OPS.join(', ')})`);
  return o;
}

/** One parsed spec over `next`. */
export function makeFilter(spec: FilterSpec, next: BlockNode): Filter {
  return spec.name === 'error' ? new ErrorFilter(next, spec.options) : new DelayFilter(next, spec.options);
}

/** The specs stacked on `node`: the first outermost, the last directly on `node`. */
export function stackFilters(node: BlockNode, specs: readonly FilterSpec[]): BlockNode {
  let top = node;
  for (let i = specs.length - 1; i >= 0; i--) top = makeFilter(specs[i]!, top);
  return top;
}
