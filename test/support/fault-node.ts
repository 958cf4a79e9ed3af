/**
 * A block node wrapper for server tests: records every operation, injects errors, and can hold
 * operations at a gate until the test releases them (deterministic "in flight" without sleeps).
 */
import { BlkrepError } from '../../src/api/errors.js';
import type { BlockNode, Extent, IoOptions, WriteOptions, ZeroOptions } from '../../src/api/block.js';

export type OpName = 'read' | 'write' | 'writeZeroes' | 'trim' | 'flush' | 'extents' | 'cache';

export interface OpRecord {
  op: OpName;
  offset: number;
  length: number;
  fua?: boolean;
  noHole?: boolean;
  fast?: boolean;
  /** set when the operation resolved */
  done: boolean;
}

/** A gate operations wait at while it is closed. */
export class Gate {
  private opened = true;
  private waiting: Array<() => void> = [];
  private enteredCount = 0;
  private enteredWaiters: Array<{ n: number; resolve: () => void }> = [];

  close(): void {
    this.opened = false;
  }

  open(): void {
    this.opened = true;
    for (const w of this.waiting.splice(0)) w();
  }

  /** operations that reached the gate while it was closed */
  get entered(): number {
    return this.enteredCount;
  }

  async pass(): Promise<void> {
    if (this.opened) return;
    this.enteredCount++;
    for (const w of this.enteredWaiters.filter((x) => this.enteredCount >= x.n)) {
      this.enteredWaiters.splice(this.enteredWaiters.indexOf(w), 1);
      w.resolve();
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }

  /** Resolve once n operations (in total) have been held at the gate; reject after timeoutMs. */
  waitEntered(n: number, timeoutMs = 5000): Promise<void> {
    if (this.enteredCount >= n) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`only ${this.enteredCount} of ${n} operations reached the gate within ${timeoutMs} ms`)), timeoutMs);
      this.enteredWaiters.push({ n, resolve: () => { clearTimeout(timer); resolve(); } });
    });
  }
}

export interface HookOptions {
  /** reads overlapping any of these [start, end) ranges fail with EIO */
  failReads?: Array<[number, number]>;
  /** writes overlapping any of these ranges fail with EIO */
  failWrites?: Array<[number, number]>;
  /** operations listed in gateOps wait at this gate */
  gate?: Gate;
  gateOps?: OpName[];
  /** leave these optional operations out (so completeNode emulates them) */
  omit?: Array<'writeZeroes' | 'trim' | 'extents' | 'cache'>;
}

export interface HookNode extends BlockNode {
  readonly log: OpRecord[];
  readonly hooks: HookOptions;
}

function overlaps(ranges: Array<[number, number]> | undefined, offset: number, length: number): boolean {
  return (ranges ?? []).some(([s, e]) => offset < e && s < offset + Math.max(length, 1));
}

function eio(op: string, offset: number, length: number): BlkrepError {
  return new BlkrepError('ERR_INJECTED', `injected I/O error: ${op} of ${length} bytes at offset ${offset}`, { errno: 'EIO' });
}

/** Wrap `inner` (whose optional operations must all exist) with recording, faults and a gate. */
export function hookNode(inner: BlockNode, hooks: HookOptions = {}): HookNode {
  const log: OpRecord[] = [];
  const around = async <T>(rec: Omit<OpRecord, 'done'>, run: () => Promise<T>): Promise<T> => {
    const r: OpRecord = { ...rec, done: false };
    log.push(r);
    if (hooks.gate && hooks.gateOps?.includes(rec.op)) await hooks.gate.pass();
    const out = await run();
    r.done = true;
    return out;
  };
  const node: HookNode = {
    driver: 'hook',
    description: `hook:${inner.description}`,
    size: inner.size,
    limits: inner.limits,
    caps: { ...inner.caps },
    log,
    hooks,
    read: (offset: number, length: number, o?: IoOptions) =>
      around({ op: 'read', offset, length }, async () => {
        if (overlaps(hooks.failReads, offset, length)) throw eio('read', offset, length);
        return inner.read(offset, length, o);
      }),
    write: (offset: number, data: Buffer, o?: WriteOptions) =>
      around({ op: 'write', offset, length: data.length, fua: Boolean(o?.fua) }, async () => {
        if (overlaps(hooks.failWrites, offset, data.length)) throw eio('write', offset, data.length);
        return inner.write(offset, data, o);
      }),
    flush: (o?: IoOptions) => around({ op: 'flush', offset: 0, length: 0 }, () => inner.flush!(o)),
    close: () => inner.close(),
  };
  const omit = new Set(hooks.omit ?? []);
  if (!omit.has('writeZeroes')) {
    node.writeZeroes = (offset: number, length: number, o?: ZeroOptions) =>
      around({ op: 'writeZeroes', offset, length, fua: Boolean(o?.fua), noHole: Boolean(o?.noHole), fast: Boolean(o?.fast) }, () => inner.writeZeroes!(offset, length, o));
  } else {
    node.caps.canFastZero = false;
  }
  if (!omit.has('trim')) {
    node.trim = (offset: number, length: number, o?: WriteOptions) =>
      around({ op: 'trim', offset, length, fua: Boolean(o?.fua) }, () => inner.trim!(offset, length, o));
  }
  if (!omit.has('extents')) {
    node.extents = (offset: number, length: number, o?: IoOptions): Promise<Extent[]> =>
      around({ op: 'extents', offset, length }, () => inner.extents!(offset, length, o));
  } else {
    node.caps.canExtents = false;
  }
  if (!omit.has('cache')) {
    node.cache = (offset: number, length: number, o?: IoOptions) => around({ op: 'cache', offset, length }, () => inner.cache ? inner.cache(offset, length, o) : Promise.resolve());
  }
  return node;
}
