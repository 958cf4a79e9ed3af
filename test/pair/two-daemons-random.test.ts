/**
 * Random-instant failover on two daemons, separate processes (replication.md §7 B.2): a writer
 * stamps every 4 KiB block it writes with (offset, version), a checkpoint every N writes, kill -9
 * of the primary at a seeded instant (a write in flight, or a checkpoint in flight), failover:
 * - `--to checkpoint`: the secondary holds exactly the state of the checkpoint it failed over to
 *   (the last one the writer saw committed, or the one whose answer the kill cut off);
 * - `--to latest` (sync): every block holds the version of the last acknowledged write to it; the
 *   one write in flight at the kill holds its old or its new version, nothing else.
 *
 * The suite runs a few seeds. BLKREP_SOAK_SEEDS ("1-200", "5,9,13") runs those instead:
 * scripts/soak-failover.mjs runs many. A seed decides everything (protocol, target, sizes, the
 * instant): seed odd → sync, else async; sync with seed % 4 = 3 → --to latest; seed % 3 = 0 → the
 * secondary's hidden disk is volatile (--hidden-durability), else strict.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { serve, unixUri, withTimeout, type Served } from '../support/spawn.js';
import { seededRandom as rng } from '../../src/block/filters/error.js';
import { controlRequest as request, blankPair, firstCheckpoint } from '../support/control.js';
import { stamp } from '../support/pair-bytes.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;
const BLOCK = 4096;
const REGION = 4 * MiB;
const BLOCKS = REGION / BLOCK;

/** the seeds to run: BLKREP_SOAK_SEEDS ("a-b", "a,b,c", or both mixed) or the suite's sample */
function seedsFrom(spec: string | undefined): number[] {
  if (!spec) return [1, 3, 7, 42];
  const out: number[] = [];
  for (const part of spec.split(',')) {
    const m = /^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$/.exec(part);
    if (!m) throw new Error(`BLKREP_SOAK_SEEDS: "${part}" is not a seed or a range a-b`);
    const a = Number(m[1]);
    const b = m[2] === undefined ? a : Number(m[2]);
    for (let s = a; s <= b; s++) out.push(s);
  }
  return out;
}

function variant(seed: number): { protocol: 'sync' | 'async'; to: 'checkpoint' | 'latest'; hidden: 'strict' | 'volatile' } {
  const protocol = seed % 2 === 1 ? 'sync' : 'async';
  return { protocol, to: protocol === 'sync' && seed % 4 === 3 ? 'latest' : 'checkpoint', hidden: seed % 3 === 0 ? 'volatile' : 'strict' };
}

async function startPair(protocol: 'sync' | 'async', hidden: 'strict' | 'volatile'): Promise<{ p: Served; sControl: string; pControl: string; sSock: string; pSock: string }> {
  const { dir, sSock, pSock, sControl, pControl } = await blankPair(SIZE);
  await serve([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sControl, '--hidden-durability', hidden]);
  const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', protocol]);
  await firstCheckpoint(pControl);
  return { p, sControl, pControl, sSock, pSock };
}

/** what a block holds: its version, or a description of what is wrong with it */
function versionOf(block: Buffer, offset: number): number | string {
  if (block.every((x) => x === 0)) return 0;
  const v = block.readUInt32BE(8);
  return block.equals(stamp(offset, v)) ? v : `garbage (first 16 bytes ${block.subarray(0, 16).toString('hex')})`;
}

describe('two daemons: random-instant failover', () => {
  for (const seed of seedsFrom(process.env.BLKREP_SOAK_SEEDS)) {
    const { protocol, to, hidden } = variant(seed);
    it(`seed ${seed} (${protocol}, --to ${to}, hidden ${hidden}): after kill -9 of the primary and failover the secondary holds exactly the ${to === 'latest' ? 'acknowledged writes' : 'checkpoint'}`, async () => {
      const random = rng(seed);
      const pair = await startPair(protocol, hidden);
      const pc = await NbdClient.connect({ uri: unixUri(pair.pSock), reconnect: false, closeTimeoutMs: 2000 });
      /** versions[b]: the last acknowledged version of block b */
      const versions = new Uint32Array(BLOCKS);
      /** the model at each committed (or possibly committed) epoch */
      const snapshots = new Map<number, Uint32Array>([[1, versions.slice()]]);
      const total = 120 + Math.floor(random() * 120);
      const every = 10 + Math.floor(random() * 20);
      const killAt = 20 + Math.floor(random() * (total - 20));
      const inCheckpoint = random() < 0.3;
      const killDelayMs = Math.floor(random() * 20);
      /** the write in flight at the kill: its block may hold the old or the new version */
      let inFlight: { block: number; version: number } | undefined;
      let epoch = 1;
      const kill = () => pair.p.child.kill('SIGKILL');
      for (let n = 1; n <= total; n++) {
        const block = Math.floor(random() * BLOCKS);
        const version = versions[block]! + 1;
        const write = pc.write(block * BLOCK, stamp(block * BLOCK, version));
        if (n >= killAt && !inCheckpoint) {
          kill();
          if (await write.then(() => true, () => false)) versions[block] = version;
          else inFlight = { block, version };
          break;
        }
        await write;
        versions[block] = version;
        if (n % every === 0) {
          // the next epoch's state is known before it is asked for: a kill may cut off its answer
          snapshots.set(epoch + 1, versions.slice());
          const cp = request<{ epoch: number }>(pair.pControl, 'checkpoint');
          if (n >= killAt) {
            setTimeout(kill, killDelayMs);
            await cp.catch(() => {});
            break;
          }
          epoch = (await cp).epoch;
        }
      }
      if (pair.p.child.exitCode === null && pair.p.child.signalCode === null) kill();
      await pair.p.waitExit();
      await pc.close().catch(() => {});
      const what = `seed ${seed}: writes ${total}, checkpoint every ${every}, kill at ${killAt}${inCheckpoint ? ` in a checkpoint after ${killDelayMs} ms` : ''}`;
      const fo = await withTimeout(request<{ epoch: number; role: string; to: string }>(pair.sControl, 'failover', { to }), 30_000, 'failover');
      expect(fo, what).toMatchObject({ role: 'primary', to });
      const sc = await NbdClient.connect({ uri: unixUri(pair.sSock), reconnect: false, closeTimeoutMs: 2000 });
      const disk = Buffer.alloc(REGION);
      await sc.read(0, disk);
      await sc.close();
      const found = (b: number) => versionOf(disk.subarray(b * BLOCK, (b + 1) * BLOCK), b * BLOCK);
      const wrong: string[] = [];
      if (to === 'checkpoint') {
        // the secondary may have committed the checkpoint whose answer the kill cut off
        expect([epoch, epoch + 1], what).toContain(fo.epoch);
        const expected = snapshots.get(fo.epoch)!;
        for (let b = 0; b < BLOCKS; b++) if (found(b) !== expected[b]) wrong.push(`block ${b}: ${found(b)}, checkpoint ${fo.epoch} has ${expected[b]}`);
      } else {
        for (let b = 0; b < BLOCKS; b++) {
          const ok = inFlight?.block === b ? [versions[b], inFlight.version] : [versions[b]];
          if (!ok.includes(found(b) as number)) wrong.push(`block ${b}: ${found(b)}, acknowledged ${versions[b]}${inFlight?.block === b ? ` (version ${inFlight.version} in flight)` : ''}`);
        }
      }
      expect(wrong, what).toEqual([]);
    });
  }
});
