// The commit job on real qcow2 chains made by qemu-img/qemu-io: intermediate commit (the base
// equals the chain's view before, qemu-img check clean, the overlay emptied), pause, cancel,
// error policies against a failing base, and active commit under a concurrent writer.
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { BlockNode, Extent, IoOptions, WriteOptions, ZeroOptions } from '../../src/api/block.js';
import { openImage } from '../../src/block/open.js';
import { Qcow2Node } from '../../src/block/qcow2/node.js';
import { ActiveCommitJob, CommitJob } from '../../src/jobs/commit.js';
import type { JobEvent } from '../../src/jobs/job.js';
import { Gate, hookNode, type HookNode } from '../support/fault-node.js';
import { makeTempDir, run, withTimeout } from '../support/spawn.js';
import { io, qcow2, qemuCheckClean, qemuMap, sh } from '../cli/image-helpers.js';
import { MiB, RandomWriter, firstDifference, readAll, rng } from './helpers.js';

const SIZE = 16 * MiB;

/** Writes of every kind into an overlay: whole and partial clusters, zero clusters, a discard, runs across clusters. */
const TOP_WRITES = ['write -P 1 0 64k', 'write -P 2 100k 3k', 'write -z 1M 192k', 'write -z 2100k 10k', 'write -P 3 4095k 2k', 'discard 3M 64k', 'write -P 4 7M 3M', 'write -P 5 5000000 123', 'write -P 6 12M 4M'];

/** base.qcow2 (data, zero clusters, holes) ← top.qcow2 (TOP_WRITES); view.raw = the chain's view before any commit. */
async function chain(dir: string, extra: string[][] = []): Promise<void> {
  await sh(
    dir,
    qcow2('base.qcow2', `${SIZE}`),
    io('qcow2', 'base.qcow2', 'write -P 170 0 3M', 'write -z 3M 1M', 'write -P 171 6M 2M', 'write -P 172 11M 5M'),
    qcow2('top.qcow2', '', ['base.qcow2', 'qcow2']),
    io('qcow2', 'top.qcow2', ...TOP_WRITES),
    ...extra,
    ['qemu-img', 'convert', '-O', 'raw', 'top.qcow2', 'view.raw'],
  );
}

async function same(dir: string, a: [string, string], b: [string, string]): Promise<boolean> {
  const r = await run('qemu-img', ['compare', '-f', a[1], '-F', b[1], a[0], b[0]], { cwd: dir });
  expect(r.code === 0 || r.code === 1, r.stderr).toBe(true);
  return r.code === 0;
}

/** The ranges the image itself allocates (qemu-img map depth 0, present). */
async function ownRanges(image: string, dir: string) {
  return (await qemuMap(image, dir)).filter((e) => e.depth === 0 && e.present);
}

function record(job: CommitJob | ActiveCommitJob): JobEvent[] {
  const out: JobEvent[] = [];
  job.on('event', (e: JobEvent) => out.push(e));
  return out;
}

function statuses(events: JobEvent[]): string[] {
  return events.flatMap((e) => (e.event === 'status-change' ? [e.status] : []));
}

/** base read-write, top over it (read-write: it is made empty); optionally the base wrapped (faults, gate). */
async function openChain(dir: string, wrap?: (base: BlockNode) => HookNode): Promise<{ top: Qcow2Node; base: BlockNode; hooked?: HookNode }> {
  const base = await openImage(join(dir, 'base.qcow2'), { readOnly: false, format: 'qcow2' });
  const hooked = wrap ? wrap(base) : undefined;
  const top = await Qcow2Node.open(join(dir, 'top.qcow2'), { backing: hooked ?? base });
  return { top, base: hooked ?? base, ...(hooked ? { hooked } : {}) };
}

describe('CommitJob (intermediate commit)', () => {
  it('commits top into base: the base equals the chain view before, the overlay is empty, qemu-img check clean; states and events', async () => {
    const dir = await makeTempDir();
    await chain(dir);
    const { top, base } = await openChain(dir);
    const job = new CommitJob({ id: 'c1', top, base, makeEmpty: [top] });
    const events = record(job);
    job.start();
    await withTimeout(job.whenConcluded(), 30_000, 'the commit');
    expect(job.error).toBeUndefined();
    expect(statuses(events)).toEqual(['running', 'waiting', 'pending', 'concluded']);
    const plan = job.plan!;
    // TOP_WRITES: 64k+3k+2k+3M+123 B of data (partial clusters count whole), and zero clusters
    expect(plan.topAllocated).toBe(true);
    const done = events.find((e) => e.event === 'completed')!;
    expect(done).toMatchObject({ event: 'completed', id: 'c1', type: 'commit', length: plan.dataBytes + plan.zeroBytes, offset: plan.dataBytes + plan.zeroBytes });
    expect('error' in done).toBe(false);
    expect(job.emptied).toEqual([top]);
    expect(job.query()).toMatchObject({ type: 'commit', status: 'concluded', active: false, layers: 1 });
    await top.close();
    expect(await same(dir, ['view.raw', 'raw'], ['base.qcow2', 'qcow2'])).toBe(true);
    expect(await same(dir, ['view.raw', 'raw'], ['top.qcow2', 'qcow2'])).toBe(true);
    expect(await ownRanges('top.qcow2', dir)).toEqual([]);
    await qemuCheckClean('base.qcow2', dir);
    await qemuCheckClean('top.qcow2', dir);
  });

  it('commits a middle layer into the base under an untouched active layer, which reads the same', async () => {
    const dir = await makeTempDir();
    await sh(
      dir,
      qcow2('base.qcow2', `${SIZE}`),
      io('qcow2', 'base.qcow2', 'write -P 170 0 8M'),
      qcow2('mid.qcow2', '', ['base.qcow2', 'qcow2']),
      io('qcow2', 'mid.qcow2', ...TOP_WRITES),
      qcow2('active.qcow2', '', ['mid.qcow2', 'qcow2']),
      io('qcow2', 'active.qcow2', 'write -P 9 2M 1M', 'write -z 7M 64k'),
      ['qemu-img', 'convert', '-O', 'raw', 'mid.qcow2', 'mid-view.raw'],
      ['qemu-img', 'convert', '-O', 'raw', 'active.qcow2', 'active-view.raw'],
    );
    const base = await openImage(join(dir, 'base.qcow2'), { readOnly: false, format: 'qcow2' });
    const mid = await Qcow2Node.open(join(dir, 'mid.qcow2'), { backing: base });
    const active = await Qcow2Node.open(join(dir, 'active.qcow2'), { backing: mid });
    const job = new CommitJob({ top: mid, base, makeEmpty: [mid] });
    job.start();
    await withTimeout(job.whenConcluded(), 30_000, 'the commit');
    expect(job.error).toBeUndefined();
    // the active layer, reading through the emptied mid into base, shows what it showed
    expect(firstDifference(await readAll(active), await readAll(await openRaw(join(dir, 'active-view.raw'))))).toBe(-1);
    await active.close();
    expect(await same(dir, ['mid-view.raw', 'raw'], ['base.qcow2', 'qcow2'])).toBe(true);
    expect(await same(dir, ['active-view.raw', 'raw'], ['active.qcow2', 'qcow2'])).toBe(true);
    expect(await ownRanges('mid.qcow2', dir)).toEqual([]);
    for (const f of ['base.qcow2', 'mid.qcow2', 'active.qcow2']) await qemuCheckClean(f, dir);
  });

  it('pause stops the copy (no base write while paused, the offset stays); resume finishes it', async () => {
    const dir = await makeTempDir();
    await chain(dir);
    const gate = new Gate();
    const { top, hooked } = await openChain(dir, (b) => hookNode(b, { gate, gateOps: ['write', 'writeZeroes'] }));
    const job = new CommitJob({ top, base: hooked!, makeEmpty: [top], maxOps: 2, bufSize: 256 * 1024 });
    const events = record(job);
    gate.close();
    job.start();
    await gate.waitEntered(2);
    const paused = job.pause();
    expect(job.query().paused).toBe(true);
    gate.open();
    await withTimeout(paused, 10_000, 'the pause');
    expect(job.status).toBe('paused');
    const q = job.query();
    expect(q.offset).toBeGreaterThan(0);
    expect(q.offset).toBeLessThan(q.length);
    const writes = hooked!.log.length;
    expect(hooked!.log.every((r) => r.done)).toBe(true);
    // nothing happens while paused (the job is idle: this wait only gives it the chance to misbehave)
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(hooked!.log.length).toBe(writes);
    expect(job.query().offset).toBe(q.offset);
    job.resume();
    await withTimeout(job.whenConcluded(), 30_000, 'the commit');
    expect(job.error).toBeUndefined();
    expect(statuses(events)).toEqual(['running', 'paused', 'running', 'waiting', 'pending', 'concluded']);
    await top.close();
    expect(await same(dir, ['view.raw', 'raw'], ['base.qcow2', 'qcow2'])).toBe(true);
    await qemuCheckClean('base.qcow2', dir);
    await qemuCheckClean('top.qcow2', dir);
  });

  it('cancel: the job ends cancelled (not consistent), the overlay is kept and the chain reads as before', async () => {
    const dir = await makeTempDir();
    await chain(dir);
    const gate = new Gate();
    const { top, hooked } = await openChain(dir, (b) => hookNode(b, { gate, gateOps: ['write', 'writeZeroes'] }));
    const job = new CommitJob({ top, base: hooked!, makeEmpty: [top], maxOps: 2, bufSize: 256 * 1024 });
    const events = record(job);
    gate.close();
    job.start();
    await gate.waitEntered(2);
    const cancelled = job.cancel();
    gate.open();
    await withTimeout(cancelled, 10_000, 'the cancel');
    expect(job.status).toBe('concluded');
    expect(job.error?.code).toBe('ERR_JOB_CANCELLED');
    expect(statuses(events)).toEqual(['running', 'aborting', 'concluded']);
    expect(events.find((e) => e.event === 'cancelled')).toMatchObject({ consistent: false, type: 'commit' });
    expect(job.emptied).toEqual([]);
    expect(job.query().offset).toBeLessThan(job.query().length);
    await top.close();
    expect(await same(dir, ['view.raw', 'raw'], ['top.qcow2', 'qcow2'])).toBe(true);
    expect((await ownRanges('top.qcow2', dir)).length).toBeGreaterThan(0);
    await qemuCheckClean('base.qcow2', dir);
    await qemuCheckClean('top.qcow2', dir);
  });

  it('a base write error with policy report: the job ends with it (event, completed with the error), the overlay is kept', async () => {
    const dir = await makeTempDir();
    await chain(dir);
    const { top, hooked } = await openChain(dir, (b) => hookNode(b, { failWrites: [[7 * MiB + 100, 7 * MiB + 200]] }));
    const job = new CommitJob({ top, base: hooked!, makeEmpty: [top] });
    const events = record(job);
    job.start();
    await withTimeout(job.whenConcluded(), 30_000, 'the commit');
    expect(job.error).toMatchObject({ code: 'ERR_INJECTED', errno: 'EIO' });
    const errs = events.filter((e) => e.event === 'error');
    expect(errs).toHaveLength(1);
    expect(errs[0]).toMatchObject({ side: 'target', operation: 'write', errno: 'EIO', action: 'report', offset: 7 * MiB, length: MiB });
    expect(events.find((e) => e.event === 'completed')).toMatchObject({ error: { code: 'ERR_INJECTED', errno: 'EIO' } });
    expect(statuses(events)).toEqual(['running', 'aborting', 'concluded']);
    expect(job.emptied).toEqual([]);
    await top.close();
    expect(await same(dir, ['view.raw', 'raw'], ['top.qcow2', 'qcow2'])).toBe(true);
    await qemuCheckClean('base.qcow2', dir);
  });

  it('policy ignore retries the failed range once the base works again; policy stop pauses (io-status failed) until resume', async () => {
    for (const policy of ['ignore', 'stop'] as const) {
      const dir = await makeTempDir();
      await chain(dir);
      const { top, hooked } = await openChain(dir, (b) => hookNode(b, { failWrites: [[7 * MiB + 100, 7 * MiB + 200]] }));
      const job = new CommitJob({ top, base: hooked!, makeEmpty: [top], onTargetError: policy });
      const events = record(job);
      let failures = 0;
      job.on('io-error', () => {
        failures++;
        // the base heals after the third failure (ignore retries, backing off)
        if (policy === 'stop' || failures === 3) hooked!.hooks.failWrites = [];
      });
      job.start();
      if (policy === 'stop') {
        await withTimeout(new Promise<void>((resolve) => job.on('status-change', (e: JobEvent) => e.event === 'status-change' && e.status === 'paused' && resolve())), 10_000, 'the stop');
        expect(job.query()).toMatchObject({ status: 'paused', ioStatus: 'failed', paused: true });
        job.resume();
      }
      await withTimeout(job.whenConcluded(), 30_000, 'the commit');
      expect(job.error).toBeUndefined();
      const errs = events.filter((e) => e.event === 'error');
      expect(errs).toHaveLength(policy === 'ignore' ? 3 : 1);
      for (const e of errs) expect(e).toMatchObject({ side: 'target', operation: 'write', errno: 'EIO', action: policy, offset: 7 * MiB, length: MiB });
      expect(statuses(events)).toEqual(policy === 'stop' ? ['running', 'paused', 'running', 'waiting', 'pending', 'concluded'] : ['running', 'waiting', 'pending', 'concluded']);
      await top.close();
      expect(await same(dir, ['view.raw', 'raw'], ['base.qcow2', 'qcow2'])).toBe(true);
      expect(await ownRanges('top.qcow2', dir)).toEqual([]);
      await qemuCheckClean('base.qcow2', dir);
      await qemuCheckClean('top.qcow2', dir);
    }
  });

  it('refuses a read-only base and complete() (it is never ready)', async () => {
    const dir = await makeTempDir();
    await chain(dir);
    const top = await openImage(join(dir, 'top.qcow2'), { readOnly: true });
    const ro = (top as Qcow2Node).backing!;
    expect(() => new CommitJob({ top, base: ro })).toThrow(expect.objectContaining({ code: 'ERR_READ_ONLY' }));
    await top.close();
    const { top: t2, base } = await openChain(dir);
    const job = new CommitJob({ top: t2, base, speed: 1 });
    await expect(job.complete()).rejects.toMatchObject({ code: 'ERR_JOB_STATE', details: { verb: 'complete', status: 'created' } });
    await t2.close();
  });
});

/** A node in front of `inner` that remembers the ranges of writes started once `after` is set. */
function recorder(inner: BlockNode) {
  const late: Array<[number, number]> = [];
  const state = { after: false };
  const note = (offset: number, length: number): void => {
    if (state.after) late.push([offset, offset + length]);
  };
  const node: BlockNode = {
    driver: 'recorder',
    description: inner.description,
    get size() {
      return inner.size;
    },
    limits: inner.limits,
    caps: inner.caps,
    read: (o: number, l: number, opt?: IoOptions) => inner.read(o, l, opt),
    write: (o: number, d: Buffer, opt?: WriteOptions) => (note(o, d.length), inner.write(o, d, opt)),
    writeZeroes: (o: number, l: number, opt?: ZeroOptions) => (note(o, l), inner.writeZeroes!(o, l, opt)),
    flush: (opt?: IoOptions) => inner.flush!(opt),
    extents: (o: number, l: number, opt?: IoOptions): Promise<Extent[]> => inner.extents!(o, l, opt),
    close: async () => {},
  };
  return { node, late, state };
}

async function openRaw(path: string): Promise<BlockNode> {
  return openImage(path, { readOnly: true, format: 'raw' });
}

describe('ActiveCommitJob (the overlay is written meanwhile)', () => {
  it('refuses a base that is not the node the overlay reads through, and a read-only backing', async () => {
    const dir = await makeTempDir();
    await chain(dir);
    const { top, base } = await openChain(dir);
    // a second node of the same file (sharing every permission: the chain holds it read-write)
    const other = await openImage(join(dir, 'base.qcow2'), { readOnly: true, format: 'qcow2', forceShare: true });
    expect(() => new ActiveCommitJob({ overlay: top, base: other })).toThrow(expect.objectContaining({ code: 'ERR_JOB_INVALID' }));
    expect(new ActiveCommitJob({ overlay: top, base }).type).toBe('commit');
    await other.close();
    await top.close();
    const plain = await openImage(join(dir, 'top.qcow2'));
    expect(() => new ActiveCommitJob({ overlay: plain })).toThrow(expect.objectContaining({ code: 'ERR_READ_ONLY' }));
    await plain.close();
  });

  for (const copyMode of ['background', 'write-blocking'] as const) {
    it(`${copyMode}: under a concurrent writer, ready, complete empties the overlay while writes wait; the export reads exactly what was written and the base holds all but the writes started after complete`, async () => {
      const dir = await makeTempDir();
      await chain(dir);
      const { top, base } = await openChain(dir);
      const job = new ActiveCommitJob({ id: 'active', overlay: top, copyMode });
      const events = record(job);
      const rec = recorder(job.node);
      const writer = new RandomWriter(rec.node, await readAll(top), rng(copyMode === 'background' ? 7 : 8), 4, 2);
      job.start();
      writer.start();
      await withTimeout(new Promise<void>((resolve) => (job.isReady ? resolve() : job.once('ready', () => resolve()))), 30_000, 'ready');
      await writer.waitWrites(50);
      rec.state.after = true;
      await withTimeout(job.complete(), 30_000, 'complete');
      await writer.waitWrites(20);
      await writer.stop();
      expect(writer.errors).toEqual([]);
      expect(job.error).toBeUndefined();
      expect(job.emptied).toBe(true);
      expect(statuses(events).slice(-4)).toEqual(['ready', 'waiting', 'pending', 'concluded']);
      expect(events.find((e) => e.event === 'completed')).toMatchObject({ type: 'commit', id: 'active' });
      // the export (the overlay over the base) reads exactly what was written
      expect(firstDifference(await readAll(top), writer.expected)).toBe(-1);
      // the overlay holds only writes started after complete was called; the base holds the rest
      let pos = 0;
      const baseView = await readAll(base);
      for (const e of await top.extents(0, SIZE)) {
        if (e.depth === 1) {
          expect(rec.late.some(([s, t]) => s < pos + e.length && pos < t), `overlay range ${pos}+${e.length} from a late write`).toBe(true);
        } else {
          expect(firstDifference(baseView.subarray(pos, pos + e.length), writer.expected.subarray(pos, pos + e.length))).toBe(-1);
        }
        pos += e.length;
      }
      expect(pos).toBe(SIZE);
      await top.close();
      await qemuCheckClean('base.qcow2', dir);
      await qemuCheckClean('top.qcow2', dir);
    });
  }

  it('writer stopped before complete: the base alone holds everything written, the overlay is empty', async () => {
    const dir = await makeTempDir();
    await chain(dir);
    const { top } = await openChain(dir);
    const job = new ActiveCommitJob({ overlay: top });
    const writer = new RandomWriter(job.node, await readAll(top), rng(11), 4, 2);
    job.start();
    writer.start();
    await withTimeout(new Promise<void>((resolve) => (job.isReady ? resolve() : job.once('ready', () => resolve()))), 30_000, 'ready');
    await writer.waitWrites(100);
    await writer.stop();
    await withTimeout(job.complete(), 30_000, 'complete');
    expect(firstDifference(await readAll(top), writer.expected)).toBe(-1);
    await top.close();
    const base = await openImage(join(dir, 'base.qcow2'), { readOnly: true });
    expect(firstDifference(await readAll(base), writer.expected)).toBe(-1);
    await base.close();
    expect(await ownRanges('top.qcow2', dir)).toEqual([]);
    await qemuCheckClean('base.qcow2', dir);
    await qemuCheckClean('top.qcow2', dir);
  });

  it('cancel after ready: the base is consistent, the overlay is kept and reads what was written (cancelled, consistent)', async () => {
    const dir = await makeTempDir();
    await chain(dir);
    const { top } = await openChain(dir);
    const job = new ActiveCommitJob({ overlay: top });
    const events = record(job);
    const writer = new RandomWriter(job.node, await readAll(top), rng(12), 4, 2);
    job.start();
    writer.start();
    await withTimeout(new Promise<void>((resolve) => (job.isReady ? resolve() : job.once('ready', () => resolve()))), 30_000, 'ready');
    await writer.waitWrites(30);
    await writer.stop();
    await withTimeout(job.cancel(), 30_000, 'cancel');
    expect(job.emptied).toBe(false);
    expect(events.find((e) => e.event === 'cancelled')).toMatchObject({ consistent: true, type: 'commit' });
    expect(firstDifference(await readAll(top), writer.expected)).toBe(-1);
    await top.close();
    // the base holds the overlay's view (sync top: everything the overlay shows)
    expect(await same(dir, ['top.qcow2', 'qcow2'], ['base.qcow2', 'qcow2'])).toBe(true);
    expect((await ownRanges('top.qcow2', dir)).length).toBeGreaterThan(0);
    await qemuCheckClean('base.qcow2', dir);
    await qemuCheckClean('top.qcow2', dir);
  });
});
