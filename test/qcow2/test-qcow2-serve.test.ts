/**
 * serve-nbd with qcow2 images (built CLI: run `npm run build` first):
 * - a three-level chain (raw ← qcow2 ← qcow2) served by blkrep answers `nbdinfo --map` and
 *   `nbdinfo --map=qemu:allocation-depth` as qemu-img map says, and exactly as qemu-nbd -A does
 *   on the same chain; qemu-img compare through NBD agrees;
 * - kill -9 of serve-nbd during random write workloads on a qcow2 export (repeated, seeded):
 *   `qemu-img check` finds no corruption, and every write acknowledged before a FLUSH reply is
 *   there.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD } from '../../src/nbd/constants.js';
import { RawClient, replyError } from '../support/raw-client.js';
import { hasTool, makeTempDir, run, serve, start, unixUri, waitFor, type Served } from '../support/spawn.js';
import { existsSync } from 'node:fs';
import { pattern, qemuCheck, qemuContents, qemuMap, tool, MiB } from './helpers.js';

interface NbdMapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

/** nbdinfo --map, adjacent runs of the same type merged */
async function nbdMap(uri: string, context?: string): Promise<Array<[number, number, number]>> {
  const r = await run('nbdinfo', [context ? `--map=${context}` : '--map', '--json', uri], { timeoutMs: 15_000 });
  expect(r.code, r.stderr).toBe(0);
  const out: Array<[number, number, number]> = [];
  for (const e of JSON.parse(r.stdout) as NbdMapEntry[]) {
    const last = out[out.length - 1];
    if (last && last[2] === e.type && last[0] + last[1] === e.offset) last[1] += e.length;
    else out.push([e.offset, e.length, e.type]);
  }
  return out;
}

/** What qemu-img map says, as the two maps nbdinfo prints (base:allocation, allocation depth). */
async function expectedMaps(image: string): Promise<{ base: Array<[number, number, number]>; depth: Array<[number, number, number]> }> {
  const base: Array<[number, number, number]> = [];
  const depth: Array<[number, number, number]> = [];
  const push = (list: Array<[number, number, number]>, start: number, length: number, type: number): void => {
    const last = list[list.length - 1];
    if (last && last[2] === type && last[0] + last[1] === start) last[1] += length;
    else list.push([start, length, type]);
  };
  for (const m of await qemuMap(image)) {
    push(base, m.start, m.length, (m.data ? 0 : 1) | (m.zero ? 2 : 0));
    push(depth, m.start, m.length, m.present ? m.depth + 1 : 0);
  }
  return { base, depth };
}

const hasPeers = hasTool('nbdinfo') && hasTool('qemu-nbd');

describe.skipIf(!hasPeers)('serve-nbd of a qcow2 chain', () => {
  it('maps (base:allocation, qemu:allocation-depth) agree with qemu-img map and qemu-nbd -A', async () => {
    const dir = await makeTempDir();
    const base = pattern(6 * MiB, 5);
    base.fill(0, 2 * MiB, 3 * MiB);
    await writeFile(join(dir, 'base.raw'), base);
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(dir, 'mid.qcow2'), '8M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x21 1M 192k', '-c', 'write -z 4M 128k', '-c', 'write -P 0x22 7M 64k', join(dir, 'mid.qcow2')]);
    const top = join(dir, 'top.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top]);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x31 1088k 64k', '-c', 'discard 7M 64k', '-c', 'write -z -u 5M 64k', '-c', 'write -P 0x32 2M 64k', top]);

    const expected = await expectedMaps(top);
    const sock = join(dir, 'b.sock');
    const s = await serve([top, '--socket', sock, '--read-only']);
    const ours = { base: await nbdMap(unixUri(sock)), depth: await nbdMap(unixUri(sock), 'qemu:allocation-depth') };
    expect(ours).toEqual(expected);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', unixUri(sock), top], { timeoutMs: 15_000 });
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    await s.stop();

    const qsock = join(dir, 'q.sock');
    start('qemu-nbd', ['-r', '-A', '-f', 'qcow2', '-k', qsock, '-t', top]);
    await waitFor(() => existsSync(qsock), 'qemu-nbd to listen');
    const theirs = { base: await nbdMap(unixUri(qsock)), depth: await nbdMap(unixUri(qsock), 'qemu:allocation-depth') };
    // Past the end of the short raw base (6 MiB) qemu-nbd counts the raw file as holding the
    // zeros (depth 3) while qemu-img map says no layer does (present: false); we follow qemu-img
    // map and part D (0 = nowhere). Up to there the answers are identical.
    const clip = (list: Array<[number, number, number]>): Array<[number, number, number]> =>
      list.filter(([o]) => o < 6 * MiB).map(([o, l, t]) => [o, Math.min(l, 6 * MiB - o), t]);
    expect({ base: clip(ours.base), depth: clip(ours.depth) }).toEqual({ base: clip(theirs.base), depth: clip(theirs.depth) });
  });
});

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 0x100000000;
  };
}

const SECTOR = 512;

describe.skipIf(!hasTool('qemu-img'))('kill -9 of serve-nbd on a qcow2 export', () => {
  it('no corruption, and every write acknowledged before a FLUSH reply is there (4 kills, seeded)', async () => {
    const dir = await makeTempDir();
    const size = 32 * MiB;
    const baseData = pattern(24 * MiB, 11);
    await writeFile(join(dir, 'base.raw'), baseData);
    const image = join(dir, 'disk.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', image, String(size)]);
    const durable = Buffer.alloc(size);
    baseData.copy(durable);
    const random = rng(20240611);
    const int = (n: number): number => Math.floor(random() * n);
    const sock = join(dir, 's.sock');

    for (let round = 0; round < 4; round++) {
      const s: Served = await serve([image, '--socket', sock]);
      const { client } = await RawClient.open(sock);
      const model = Buffer.from(durable);
      const touched = new Uint8Array(size / SECTOR);
      let flushed = Buffer.from(durable);
      // the kill point, seeded and counted in requests (not in time: on a loaded machine a timer
      // could fire before any batch was flushed): after `killBatch` flushed batches, once
      // `killAfter` replies of the next batch are read, or (killAfter >= its length) once its
      // FLUSH is sent and not answered; the server still holds the batch's other requests
      const killBatch = 1 + int(3);
      const killAfter = int(18);
      let stop = false;
      const kill = (): void => {
        stop = true;
        process.kill(s.pid, 'SIGKILL');
      };
      try {
        for (let n = 0; !stop; n++) {
          // a batch of concurrent requests on disjoint sectors, then FLUSH
          const claimed: Array<[number, number]> = [];
          const batch: Array<{ cookie: bigint; apply: () => void }> = [];
          for (let i = 0; i < 16; i++) {
            const offset = int(size / SECTOR) * SECTOR;
            const length = Math.min(size - offset, (1 + int(kindLength(random))) * SECTOR);
            if (claimed.some(([a, b]) => a < offset + length && offset < b)) continue;
            claimed.push([offset, offset + length]);
            touched.fill(1, offset / SECTOR, (offset + length) / SECTOR);
            const kind = int(10);
            if (kind < 8) {
              const data = pattern(length, round * 1e6 + i + int(1e6));
              batch.push({ cookie: client.send(CMD.WRITE, { offset, data }), apply: () => void data.copy(model, offset) });
            } else {
              batch.push({ cookie: client.send(CMD.WRITE_ZEROES, { offset, length }), apply: () => void model.fill(0, offset, offset + length) });
            }
          }
          const last = n === killBatch;
          for (const [k, b] of batch.entries()) {
            if (last && k === killAfter) kill();
            if (stop) break;
            const r = await client.readReply(b.cookie, 10_000);
            expect(replyError(r)).toBe(0);
            b.apply();
          }
          if (stop) break;
          // everything above is acknowledged: a FLUSH reply makes it the durable state
          const cookie = client.send(CMD.FLUSH);
          if (last) {
            kill();
            break;
          }
          const f = await client.readReply(cookie, 10_000);
          expect(replyError(f)).toBe(0);
          flushed = Buffer.from(model);
          touched.fill(0);
        }
      } finally {
        if (!stop) kill(); // an assertion failed: the server goes anyway
        client.destroy();
        await s.waitExit(10_000);
      }
      // the durable state: the last flushed model, except sectors touched since that flush
      const check = await qemuCheck(image);
      expect({ corruptions: check.corruptions, checkErrors: check.checkErrors }, check.raw).toEqual({ corruptions: 0, checkErrors: 0 });
      const got = await qemuContents(image, join(dir, 'got.raw'));
      for (let sector = 0; sector < size / SECTOR; sector++) {
        if (touched[sector]) continue;
        const a = got.subarray(sector * SECTOR, (sector + 1) * SECTOR);
        if (!a.equals(flushed.subarray(sector * SECTOR, (sector + 1) * SECTOR))) {
          expect.fail(`round ${round}: sector ${sector} (offset ${sector * SECTOR}) differs from what was flushed`);
        }
      }
      // what the image holds now is where the next round starts
      got.copy(durable);
    }
    // repair the leaks the kills left; then the image is clean
    await tool('qemu-img', ['check', '-q', '-r', 'leaks', image], [0, 3]);
    const final = await qemuCheck(image);
    expect({ corruptions: final.corruptions, leaks: final.leaks }).toEqual({ corruptions: 0, leaks: 0 });
  }, 120_000);
});

/** request lengths in sectors: mostly small, some large (allocating many clusters at once) */
function kindLength(random: () => number): number {
  const r = random();
  return r < 0.6 ? 8 : r < 0.9 ? 64 : 512;
}

