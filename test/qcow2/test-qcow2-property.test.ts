/**
 * Random sequences of write, write-zeroes (with and without NO_HOLE and FAST), trim, flush and
 * reopen on our qcow2 give the same contents as a plain in-memory model, with and without a
 * backing chain, for cluster sizes 512 B … 2 MiB and several refcount widths; and at the end
 * `qemu-img check` finds no corruption and no leak, and `qemu-img compare` agrees.
 *
 * A second property runs batches of operations concurrently (their clusters disjoint, so the
 * model is exact whatever the order).
 */
import { join } from 'node:path';
import { writeFile } from 'node:fs/promises';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { Qcow2Node } from '../../src/block/qcow2/index.js';
import { makeTempDir } from '../support/spawn.js';
import { expectClean, expectSame, pattern, qemuCompare, KiB, MiB } from './helpers.js';

type Op =
  | { op: 'write'; offset: number; length: number; seed: number }
  | { op: 'zero'; offset: number; length: number; noHole: boolean; fast: boolean }
  | { op: 'trim'; offset: number; length: number }
  | { op: 'flush' }
  | { op: 'reopen' };

interface Config {
  clusterSize: number;
  size: number;
  refcountBits: number;
  backing: 'none' | 'raw' | 'chain';
  backingSize: number;
}

const configArb = (clusterSize: number, maxClusters: number): fc.Arbitrary<Config> =>
  fc.record({
    clusterSize: fc.constant(clusterSize),
    size: fc.integer({ min: 1, max: maxClusters * (clusterSize / 512) }).map((s) => s * 512),
    refcountBits: fc.constantFrom(1, 16, 64),
    backing: fc.constantFrom<'none' | 'raw' | 'chain'>('none', 'raw', 'chain'),
    backingSize: fc.integer({ min: 0, max: maxClusters * (clusterSize / 512) }).map((s) => s * 512),
  });

function opsArb(size: number, clusterSize: number, maxLength: number): fc.Arbitrary<Op[]> {
  const offset = fc.oneof(
    fc.integer({ min: 0, max: size - 1 }),
    fc.integer({ min: 0, max: Math.floor((size - 1) / clusterSize) }).map((c) => c * clusterSize),
  );
  const range = fc.tuple(offset, fc.integer({ min: 1, max: maxLength })).map(([o, l]) => ({ offset: o, length: Math.min(l, size - o) }));
  const op: fc.Arbitrary<Op> = fc.oneof(
    { weight: 6, arbitrary: fc.tuple(range, fc.integer({ min: 1, max: 1 << 30 })).map(([r, seed]) => ({ op: 'write' as const, ...r, seed })) },
    { weight: 2, arbitrary: fc.tuple(range, fc.boolean(), fc.boolean()).map(([r, noHole, fast]) => ({ op: 'zero' as const, ...r, noHole, fast })) },
    { weight: 2, arbitrary: range.map((r) => ({ op: 'trim' as const, ...r })) },
    { weight: 1, arbitrary: fc.constant({ op: 'flush' as const }) },
    { weight: 1, arbitrary: fc.constant({ op: 'reopen' as const }) },
  );
  return fc.array(op, { minLength: 1, maxLength: 40 });
}

/** The clusters a trim turns to zeros: whole ones, and the last partial one at the image end. */
function trimmed(offset: number, length: number, size: number, cs: number): [number, number] {
  const start = Math.ceil(offset / cs) * cs;
  const end = offset + length === size ? size : Math.floor((offset + length) / cs) * cs;
  return [Math.min(start, size), Math.min(size, Math.max(start, end))];
}

interface World {
  dir: string;
  top: string;
  node: Qcow2Node;
  model: Buffer;
  config: Config;
}

async function setUp(dir: string, config: Config, seed: number): Promise<World> {
  const top = join(dir, 'top.qcow2');
  const model = Buffer.alloc(config.size);
  let backingName: string | undefined;
  if (config.backing !== 'none') {
    const base = pattern(config.backingSize, seed);
    // holes in the base, so "zero in the backing" paths run too
    for (let at = 0; at < base.length; at += 3 * config.clusterSize) base.fill(0, at, Math.min(base.length, at + config.clusterSize));
    await writeFile(join(dir, 'base.raw'), base);
    base.copy(model, 0, 0, Math.min(base.length, model.length));
    backingName = 'base.raw';
    if (config.backing === 'chain') {
      // base.raw ← mid.qcow2 (our own, with some data of its own) ← top.qcow2
      await Qcow2Node.create(join(dir, 'mid.qcow2'), { size: config.backingSize, clusterSize: config.clusterSize, backing: 'base.raw', backingFormat: 'raw' });
      const mid = await Qcow2Node.open(join(dir, 'mid.qcow2'));
      for (let at = config.clusterSize / 2; at < config.backingSize; at += 5 * config.clusterSize) {
        const n = Math.min(config.clusterSize, config.backingSize - at);
        const data = pattern(n, seed + at);
        await mid.write(at, data);
        if (at < model.length) data.copy(model, at, 0, Math.min(n, model.length - at));
      }
      await mid.close();
      backingName = 'mid.qcow2';
    }
  }
  await Qcow2Node.create(top, {
    size: config.size,
    clusterSize: config.clusterSize,
    refcountBits: config.refcountBits,
    ...(backingName ? { backing: backingName, backingFormat: config.backing === 'chain' ? 'qcow2' : 'raw' } : {}),
  });
  return { dir, top, node: await Qcow2Node.open(top), model, config };
}

async function apply(w: World, o: Op): Promise<void> {
  const cs = w.config.clusterSize;
  switch (o.op) {
    case 'write': {
      const data = pattern(o.length, o.seed);
      await w.node.write(o.offset, data);
      data.copy(w.model, o.offset);
      return;
    }
    case 'zero':
      try {
        await w.node.writeZeroes(o.offset, o.length, { noHole: o.noHole, fast: o.fast });
      } catch (err) {
        // FAST may refuse, changing nothing
        if (!(o.fast && err instanceof BlkrepError && err.code === 'ERR_NOT_FAST')) throw err;
        return;
      }
      w.model.fill(0, o.offset, o.offset + o.length);
      return;
    case 'trim': {
      await w.node.trim(o.offset, o.length);
      const [s, e] = trimmed(o.offset, o.length, w.config.size, cs);
      w.model.fill(0, s, e);
      return;
    }
    case 'flush':
      await w.node.flush();
      return;
    case 'reopen':
      await w.node.close();
      w.node = await Qcow2Node.open(w.top);
  }
}

async function finish(w: World): Promise<void> {
  expectSame(await w.node.read(0, w.config.size), w.model, 'read back');
  await w.node.close();
  await expectClean(w.top);
  await qemuCompare(w.top, w.model, join(w.dir, 'model.raw'));
}

/** QCOW2_PROPERTY_SCALE=10 QCOW2_PROPERTY_SEED=… for a longer hunt */
const SCALE = Number(process.env.QCOW2_PROPERTY_SCALE ?? 1);
const SEED = process.env.QCOW2_PROPERTY_SEED === undefined ? undefined : Number(process.env.QCOW2_PROPERTY_SEED);

const CASES: Array<[string, number, number, number, number]> = [
  // name, cluster size, max clusters, max op length, runs
  ['512 B clusters', 512, 6000, 96 * KiB, 25],
  ['4 KiB clusters', 4 * KiB, 300, 64 * KiB, 20],
  ['64 KiB clusters', 64 * KiB, 40, 400 * KiB, 20],
  ['2 MiB clusters', 2 * MiB, 3, 3 * MiB, 10],
];

describe('qcow2 against an in-memory model', () => {
  for (const [name, cs, maxClusters, maxLength, runs] of CASES) {
    it(`sequential operations, ${name}`, async () => {
      const dir = await makeTempDir();
      await fc.assert(
        fc.asyncProperty(
          configArb(cs, maxClusters).chain((c) => fc.tuple(fc.constant(c), opsArb(c.size, cs, maxLength), fc.integer({ min: 1, max: 1 << 20 }))),
          async ([config, ops, seed]) => {
            const w = await setUp(dir, config, seed);
            try {
              for (const o of ops) await apply(w, o);
            } catch (err) {
              await w.node.close().catch(() => {});
              throw err;
            }
            await finish(w);
          },
        ),
        { numRuns: Math.ceil(runs * SCALE), seed: SEED ?? 0x9c02 + cs },
      );
    }, 120_000 * SCALE);
  }

  it('overlapping concurrent requests (undefined order) leave a clean image that QEMU reads as we do', async () => {
    const dir = await makeTempDir();
    for (const cs of [512, 64 * KiB]) {
      await fc.assert(
        fc.asyncProperty(
          configArb(cs, cs === 512 ? 2000 : 24).chain((c) => fc.tuple(fc.constant(c), fc.array(opsArb(c.size, cs, 3 * cs), { minLength: 1, maxLength: 5 }), fc.integer({ min: 1, max: 1 << 20 }))),
          async ([config, batches, seed]) => {
            const w = await setUp(dir, config, seed);
            try {
              // the same few clusters, hammered by everything at once
              for (const batch of batches) await Promise.all(batch.filter((o) => o.op !== 'reopen').map((o) => apply(w, { ...o, ...('offset' in o ? { offset: o.offset % (4 * cs) } : {}) } as Op).catch((err: unknown) => {
                if (!(err instanceof BlkrepError && (err.code === 'ERR_NOT_FAST' || err.code === 'ERR_OUT_OF_RANGE'))) throw err;
              })));
              const ours = await w.node.read(0, config.size);
              await w.node.close();
              await expectClean(w.top);
              await qemuCompare(w.top, ours, join(dir, 'ours.raw'));
            } catch (err) {
              await w.node.close().catch(() => {});
              throw err;
            }
          },
        ),
        { numRuns: Math.ceil(15 * SCALE), seed: SEED ?? 0x0fe + cs },
      );
    }
  }, 120_000 * SCALE);

  it('concurrent batches of operations on disjoint clusters', async () => {
    const dir = await makeTempDir();
    const cs = 4 * KiB;
    await fc.assert(
      fc.asyncProperty(
        configArb(cs, 200).chain((c) => fc.tuple(fc.constant(c), fc.array(opsArb(c.size, cs, 24 * KiB), { minLength: 1, maxLength: 6 }), fc.integer({ min: 1, max: 1 << 20 }))),
        async ([config, batches, seed]) => {
          const w = await setUp(dir, config, seed);
          try {
            for (const batch of batches) {
              // keep the operations whose clusters are not touched by an earlier one in the batch
              const taken: Array<[number, number]> = [];
              const chosen = batch.filter((o) => {
                if (o.op === 'reopen') return false;
                if (o.op === 'flush') return true;
                const s = Math.floor(o.offset / cs) * cs;
                const e = Math.ceil((o.offset + o.length) / cs) * cs;
                if (taken.some(([a, b]) => a < e && s < b)) return false;
                taken.push([s, e]);
                return true;
              });
              await Promise.all(chosen.map((o) => apply(w, o)));
            }
          } catch (err) {
            await w.node.close().catch(() => {});
            throw err;
          }
          await finish(w);
        },
      ),
      { numRuns: Math.ceil(25 * SCALE), seed: SEED ?? 0x5eed },
    );
  }, 120_000 * SCALE);
});
