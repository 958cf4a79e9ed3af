/**
 * Attack round 3 (issue 10): the secondary killed by the fault hook at each checkpoint step
 * (BLKREP_TEST_CRASH_AT=checkpoint-step-K, at the C-th checkpoint: BLKREP_TEST_CRASH_COUNT) on two
 * daemons, with the primary's writer going on while the checkpoint runs (the cut falls between
 * writes the test cannot order against it). Then the primary stops, the secondary restarts: its
 * view export is exactly the state after some prefix of the acknowledged writes (4 KiB blocks
 * stamped with offset and version) — a prefix no shorter than the writes acknowledged before the
 * last checkpoint the secondary holds was asked for, no longer than those acknowledged before it
 * was answered (or the crash) — never a mix. Then the primary comes back: resync, checkpoint, disks
 * equal (cmp).
 *
 * A seed decides everything: step 4 + seed % 4, crash at checkpoint 2 + seed % 3, sync when the
 * seed is odd, hidden volatile when seed % 5 = 0, the writes and the checkpoint interval.
 * The suite runs a few seeds; BLKREP_SOAK_SEEDS ("1-200", "5,9") runs those instead
 * (scripts/soak-failover.mjs --test test/pair/attack-restart-crash-seeds.test.ts).
 */
import { join } from 'node:path';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { seededRandom as rng } from '../../src/block/filters/error.js';
import { controlRequest as request, pairOf } from '../support/control.js';
import { stamp } from '../support/pair-bytes.js';
import { makeTempDir, run, serve, unixUri, waitFor, type Served } from '../support/spawn.js';

const MiB = 1 << 20;
const SIZE = 4 * MiB;
const BLOCK = 4096;
const BLOCKS = SIZE / BLOCK;

function seedsFrom(spec: string | undefined): number[] {
  if (!spec) return [1, 10];
  const out: number[] = [];
  for (const part of spec.split(',')) {
    const m = /^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$/.exec(part);
    if (!m) throw new Error(`BLKREP_SOAK_SEEDS: "${part}" is not a seed or a range a-b`);
    for (let s = Number(m[1]); s <= Number(m[2] ?? m[1]); s++) out.push(s);
  }
  return out;
}

describe('secondary killed at a checkpoint step under writes, restarted: view = a prefix of the writes at a checkpoint', () => {
  for (const seed of seedsFrom(process.env.BLKREP_SOAK_SEEDS)) {
    const step = 4 + (seed % 4);
    const count = 2 + (seed % 3);
    const protocol = seed % 2 === 1 ? 'sync' : 'async';
    const hidden = seed % 5 === 0 ? 'volatile' : 'strict';
    it(`seed ${seed}: step ${step} at checkpoint ${count}, ${protocol}, hidden ${hidden}`, async () => {
      const random = rng(seed);
      const dir = await makeTempDir();
      const at = (f: string) => join(dir, f);
      for (const f of ['p.img', 's.img']) {
        await writeFile(at(f), Buffer.alloc(0));
        await truncate(at(f), SIZE);
      }
      const sArgs = [at('s.img'), '--secondary', '--socket', at('s.sock'), '--control', at('s.ctl'), '--view-export', 'view', '--view-read-only', '--hidden-durability', hidden];
      const pArgs = [at('p.img'), '--socket', at('p.sock'), '--control', at('p.ctl'), '--replicate-to', unixUri(at('s.sock')), '--protocol', protocol];
      const procs: Served[] = [];
      const track = (x: Served) => (procs.push(x), x);
      try {
        const s = track(await serve(sArgs, { env: { ...process.env, BLKREP_TEST_CRASH_AT: `checkpoint-step-${step}`, BLKREP_TEST_CRASH_COUNT: String(count) } }));
        let p = track(await serve(pArgs));
        await waitFor(async () => {
          const st = await pairOf(at('p.ctl'));
          return st.epoch === 1 && st.lastCheckpointAgeMs !== null;
        }, 'checkpoint 1', { timeoutMs: 30_000 });
        const pc = await NbdClient.connect({ uri: unixUri(at('p.sock')), reconnect: false, closeTimeoutMs: 2000 });
        /** the acknowledged writes in order */
        const log: Array<{ block: number; version: number }> = [];
        const versions = new Uint32Array(BLOCKS);
        /** per epoch the secondary may hold: the log lengths between which its cut fell */
        const cuts = new Map<number, { from: number; to: number }>([[1, { from: 0, to: 0 }]]);
        const every = 5 + Math.floor(random() * 15);
        let crashed = false;
        for (let n = 1; n <= 400 && !crashed; n++) {
          const block = Math.floor(random() * BLOCKS);
          const version = versions[block]! + 1;
          await pc.write(block * BLOCK, stamp(block * BLOCK, version));
          versions[block] = version;
          log.push({ block, version });
          if (n % every === 0) {
            const from = log.length;
            const epochBefore = (await pairOf(at('p.ctl'))).epoch;
            // the writer goes on while the checkpoint runs (QD1: at most a few writes race its cut)
            let answered = false;
            const cp = request<{ epoch: number }>(at('p.ctl'), 'checkpoint').then(
              (r) => ((answered = true), r),
              (e: unknown) => ((answered = true), e),
            );
            for (let k = 0; k < 3 && !answered; k++) {
              const b2 = Math.floor(random() * BLOCKS);
              const v2 = versions[b2]! + 1;
              const ok = await pc.write(b2 * BLOCK, stamp(b2 * BLOCK, v2)).then(() => true, () => false);
              if (!ok) break;
              versions[b2] = v2;
              log.push({ block: b2, version: v2 });
            }
            await cp;
            cuts.set(epochBefore + 1, { from, to: log.length });
            crashed = s.child.exitCode !== null || s.child.signalCode !== null || (await s.waitExit(300).then(() => true, () => false));
          }
        }
        await pc.close().catch(() => {});
        expect(crashed, `seed ${seed}: the secondary was killed by the hook`).toBe(true);
        expect(s.child.signalCode).toBe('SIGKILL');
        expect(await p.stop()).toBe(0);
        // the secondary alone: its view is the state at its epoch's cut
        const s2 = track(await serve(sArgs));
        const state = JSON.parse(await readFile(`${at('s.img')}.pair.json`, 'utf8')) as { epoch: number; committing: number | null };
        expect(state.committing).toBeNull();
        const out = at('view.raw');
        const r = await run('nbdcopy', [`nbd+unix:///view?socket=${at('s.sock')}`, out]);
        expect(r.code, r.stderr).toBe(0);
        const view = await readFile(out);
        const cut = cuts.get(state.epoch);
        expect(cut, `seed ${seed}: epoch ${state.epoch} was asked for`).toBeDefined();
        const model = new Uint32Array(BLOCKS);
        for (let i = 0; i < cut!.from; i++) model[log[i]!.block] = log[i]!.version;
        const matches: number[] = [];
        for (let k = cut!.from; k <= cut!.to; k++) {
          if (k > cut!.from) model[log[k - 1]!.block] = log[k - 1]!.version;
          let ok = true;
          for (let b = 0; b < BLOCKS && ok; b++) ok = view.subarray(b * BLOCK, (b + 1) * BLOCK).equals(stamp(b * BLOCK, model[b]!));
          if (ok) matches.push(k);
        }
        expect(matches.length, `seed ${seed}: step ${step}, epoch ${state.epoch}, the view is the state after no prefix of writes ${cut!.from}..${cut!.to}`).toBeGreaterThan(0);
        // the primary comes back: resync, checkpoint, disks equal
        p = track(await serve(pArgs));
        await waitFor(async () => {
          const st = await pairOf(at('p.ctl'));
          return st.link === 'connected' && st.epoch > state.epoch + 0 && st.lastCheckpointAgeMs !== null ? st : undefined;
        }, 'the resync and a checkpoint after it', { timeoutMs: 60_000 });
        expect(await p.stop()).toBe(0);
        expect(await s2.stop()).toBe(0);
        expect((await run('cmp', [at('p.img'), at('s.img')])).code).toBe(0);
      } finally {
        for (const x of procs) await x.stop().catch(() => {});
      }
    }, 120_000);
  }
});
