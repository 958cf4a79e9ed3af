/**
 * Attack: FLUSH ordering through an async primary (two daemons, kill -9). An async FLUSH is
 * acknowledged after the local flush only: it promises nothing about the secondary at that
 * instant (replication.md §3, protocol A), but it is a barrier of the forwarding order — a write
 * after it never reaches the secondary before a write before it (§2, write-order fidelity) — and a
 * checkpoint taken after it holds everything before it.
 *
 * A stamped writer: phases of 64 concurrent 4 KiB writes to random blocks, each block stamped
 * (block, phase), a FLUSH between phases; the secondary's disk writes are slowed (150 ms each) so
 * that the queue lags several phases and fills (writes wait for room: `--on-congestion block`);
 * a checkpoint after the FLUSH of phase 10; kill -9 of the primary with a phase in flight. Then,
 * once the writes the secondary had taken have landed, its disk must be the state after some
 * phase K-1 plus a subset of phase K's writes (never a later write without an earlier flushed
 * one), and failover gives the state after phase 10 exactly.
 */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { seededRandom as rng } from '../../src/block/filters/error.js';
import { makeTempDir, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { controlRequest, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;
const BLOCK = 4096;
const BLOCKS = SIZE / BLOCK;
const PER_PHASE = 64;
const PHASES = 40;
const CHECKPOINT_AFTER = 10;

function stamp(block: number, phase: number): Buffer {
  const b = Buffer.alloc(BLOCK);
  for (let i = 0; i < BLOCK; i += 8) {
    b.writeUInt32LE(block, i);
    b.writeUInt32LE(phase, i + 4);
  }
  return b;
}

/** the phase each block of a disk image holds (0: never written); throws on a torn or misplaced block */
function phasesOf(disk: Buffer): number[] {
  const out: number[] = [];
  for (let k = 0; k < BLOCKS; k++) {
    const b = disk.subarray(k * BLOCK, (k + 1) * BLOCK);
    const phase = b.readUInt32LE(4);
    if (phase === 0 && b.equals(Buffer.alloc(BLOCK))) {
      out.push(0);
      continue;
    }
    if (!b.equals(stamp(k, phase))) throw new Error(`block ${k} holds neither zeroes nor its own stamp (block ${b.readUInt32LE(0)}, phase ${phase})`);
    out.push(phase);
  }
  return out;
}

describe('attack: FLUSH ordering through an async primary', () => {
  it('kill -9 with phases queued: the secondary\'s disk is the state after a flushed phase K-1 plus part of phase K, never more; failover gives the checkpoint after phase 10 exactly', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    for (const f of [pImg, sImg]) {
      await writeFile(f, Buffer.alloc(0));
      await truncate(f, SIZE);
    }
    const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sControl, '--filter', 'delay:write=150,at=disk']);
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'async']);
    await firstCheckpoint(pControl);
    const c = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
    const r = rng(2027);
    /** written[phase] = the blocks phase wrote */
    const written: number[][] = [[]];
    let atCheckpoint: number[] = [];
    const state = new Array<number>(BLOCKS).fill(0);
    let lagged = false;
    /** the secondary's status counted writes in flight (the wait below relies on it) */
    let applying = false;
    for (let phase = 1; phase <= PHASES; phase++) {
      const blocks = new Set<number>();
      while (blocks.size < PER_PHASE) blocks.add(Math.floor(r() * BLOCKS));
      written.push([...blocks]);
      const writes = [...blocks].map((k) => c.write(k * BLOCK, stamp(k, phase)));
      if (phase === PHASES) {
        // the last phase in flight: kill the primary now
        writes.forEach((w) => w.catch(() => {}));
        break;
      }
      await Promise.all(writes);
      for (const k of blocks) state[k] = phase;
      await c.flush();
      if (phase === CHECKPOINT_AFTER) {
        expect((await controlRequest<{ epoch: number }>(pControl, 'checkpoint')).epoch).toBe(2);
        atCheckpoint = [...state];
      }
      if (phase > CHECKPOINT_AFTER && (await pairOf(pControl)).queueBytes > 4 * PER_PHASE * BLOCK) lagged = true;
      if (phase > CHECKPOINT_AFTER && (await pairOf<{ secondary: { writesInFlight: number } }>(sControl)).secondary.writesInFlight > 0) applying = true;
    }
    p.child.kill('SIGKILL');
    await p.waitExit();
    // the forwarding lagged several phases behind the flushes (else this test proves little)
    expect(lagged).toBe(true);
    expect(applying).toBe(true);
    await waitFor(async () => (await pairOf(sControl)).link === 'none', 'the secondary to see the link drop');
    // the writes it had taken when the link dropped still land (its disk is a prefix once they did):
    // with the link down its replica export is gone, so no more are taken
    await waitFor(async () => (await pairOf<{ secondary: { writesInFlight: number } }>(sControl)).secondary.writesInFlight === 0, 'the secondary\'s writes in flight to land');
    const got = phasesOf(await readFile(sImg));
    const K = Math.max(...got);
    expect(K).toBeGreaterThan(CHECKPOINT_AFTER);
    // the state after phase K-1: the last phase < K that wrote each block
    const prefix = new Array<number>(BLOCKS).fill(0);
    for (let j = 1; j < K; j++) for (const k of written[j]!) prefix[k] = j;
    const inK = new Set(written[K]);
    const wrong: string[] = [];
    for (let k = 0; k < BLOCKS; k++) {
      if (got[k] === prefix[k] || (got[k] === K && inK.has(k))) continue;
      wrong.push(`block ${k}: phase ${got[k]}, expected ${prefix[k]}${inK.has(k) ? ` or ${K}` : ''}`);
    }
    expect(wrong.slice(0, 10)).toEqual([]);

    const f = await runCli(['failover', '--control', sControl, '--json']);
    expect(f.code, f.stdout + f.stderr).toBe(0);
    expect(JSON.parse(f.stdout)).toMatchObject({ role: 'primary', epoch: 2 });
    await c.close().catch(() => {});
    expect(await s.stop()).toBe(0);
    expect(phasesOf(await readFile(sImg))).toEqual(atCheckpoint);
  }, 120_000);
});
