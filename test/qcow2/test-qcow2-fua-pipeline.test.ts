/**
 * Pipelined flushes (image.ts writeback(true)): a stream of concurrent FUA allocating writes —
 * the secondary's copies into its hidden disk — leaves each cycle's L2 tables to the next cycle's
 * fsync. Under a simulated volatile write cache (CrashContainer: a crash keeps any subset of the
 * sectors written since the last sync), at random moments: `qemu-img check` finds no corruption,
 * and every FUA write that had completed reads back (its data, refcounts and L2 entry were
 * durable before it completed). And the pipeline saves fsyncs: fewer than two per cycle.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { RawNode } from '../../src/block/raw.js';
import { Qcow2Node } from '../../src/block/qcow2/index.js';
import { makeTempDir } from '../support/spawn.js';
import { CrashContainer } from './crash-container.js';
import { pattern, qemuCheck, KiB, MiB } from './helpers.js';

const SIZE = 4 * MiB;
const CLUSTER = 16 * KiB;
const DEPTH = 8;

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 0x100000000;
  };
}

interface Snapshot {
  image: Buffer;
  /** the FUA writes completed at the crash: [offset, data] */
  acked: Array<[number, Buffer]>;
}

async function runSeed(dir: string, seed: number): Promise<{ syncs: number; writes: number }> {
  const random = rng(seed);
  const path = join(dir, 'fua.qcow2');
  const basePath = join(dir, 'base.raw');
  await writeFile(basePath, pattern(SIZE, seed));
  await Qcow2Node.create(path, { size: SIZE, clusterSize: CLUSTER, backing: 'base.raw', backingFormat: 'raw' });
  const container = new CrashContainer(path, await readFile(path));
  let syncs = 0;
  const sync = container.sync.bind(container);
  container.sync = () => (syncs++, sync());
  const node = await Qcow2Node.openContainer(container, { backing: await RawNode.open(basePath, { readOnly: true }) });
  const acked: Array<[number, Buffer]> = [];
  const snapshots: Snapshot[] = [];
  container.onCrashPoint = () => {
    if (snapshots.length < 10 && random() < 0.05) snapshots.push({ image: container.crashImage(random), acked: [...acked] });
  };
  // each write a cluster of its own (first touch, as copy-before-write does), 4 KiB inside it
  const clusters = Array.from({ length: SIZE / CLUSTER }, (_, i) => i).sort(() => random() - 0.5);
  let writes = 0;
  const worker = async (): Promise<void> => {
    for (let c = clusters.pop(); c !== undefined; c = clusters.pop()) {
      const offset = c * CLUSTER + Math.floor(random() * 4) * 4 * KiB;
      const data = pattern(4 * KiB, seed + c);
      await node.write(offset, data, { fua: true });
      acked.push([offset, data]);
      writes++;
    }
  };
  await Promise.all(Array.from({ length: DEPTH }, worker));
  container.onCrashPoint = undefined;
  await node.close();
  snapshots.push({ image: container.current(), acked: [...acked] });
  for (const [i, snap] of snapshots.entries()) {
    const what = `seed ${seed}, crash image ${i} (${snap.acked.length} FUA writes completed)`;
    await writeFile(path, snap.image);
    const check = await qemuCheck(path);
    expect({ corruptions: check.corruptions, checkErrors: check.checkErrors }, `${what}\n${check.raw}`).toEqual({ corruptions: 0, checkErrors: 0 });
    const reopened = await Qcow2Node.open(path, { readOnly: true, backing: await RawNode.open(basePath, { readOnly: true }) });
    for (const [offset, data] of snap.acked) {
      if (!(await reopened.read(offset, data.length)).equals(data)) expect.fail(`${what}: the FUA write at ${offset} completed and is lost`);
    }
    await reopened.close();
  }
  return { syncs, writes };
}

describe('qcow2 pipelined flushes: concurrent FUA allocating writes', () => {
  it('every completed FUA write survives any crash, the image stays consistent, and a cycle costs under two fsyncs', async () => {
    const dir = await makeTempDir();
    for (const seed of [11, 23, 37]) {
      const { syncs, writes } = await runSeed(dir, seed);
      expect(writes).toBe(SIZE / CLUSTER);
      // 145 here; 229 without the pipeline (two per cycle: data and refcounts, then L2)
      expect(syncs, `seed ${seed}: ${syncs} fsyncs for ${writes} FUA writes`).toBeLessThan(0.75 * writes);
    }
  }, 120_000);
});
