/**
 * Attack round 3 (issue 10), split brain: writes on both sides, overlapping clusters, resolved by
 * discard-least-changes (the old primary A changed 4 MiB, the promoted B 8 MiB, 2 MiB of them the
 * same clusters): A's diverged clusters (the union of both bitmaps) are salvaged, then the resync
 * copies B's data into A. Both daemons are killed -9 while that resync is under way (A's disk
 * writes delayed so that it is), once B's peer bitmap marks less than A's own 4 MiB. Both
 * restarted with the same flags, `replicate` again: the pair converges on B's data (the winner's
 * disk unchanged, cmp), the first salvage overlay is intact and holds exactly A's diverged
 * clusters with A's bytes (qemu-img map + convert, cmp).
 *
 * Found on main (session 14): the restarted secondary judged the split brain again by the policy,
 * with the primary's peer bitmap already cleared of what the resync had copied: B's 8 MiB counted
 * 0–2 MiB against A's 4 MiB, so A's half-copied disk was kept ("fail it over here"; refused link,
 * B's writes not replicated), or, when B still counted more, a second salvage overlay was taken of
 * the half-copied disk (listed beside the real one as A's diverged data).
 */
import { copyFile, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { PairStatus } from '../../src/pair/role.js';
import { controlRequest as request, eventsOf, firstCheckpoint, pairOf, stampedPair } from '../support/control.js';
import { cmp, expectSalvage } from '../support/pair-bytes.js';
import { run, serve, unixUri, waitFor, type Served } from '../support/spawn.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 32 * MiB;
const B64 = 64 * KiB;
/** block k of the 512 64 KiB blocks; i*79 mod 512 never repeats for i < 512 */
const blockAt = (i: number) => ((i * 79) % 512) * B64;
const A_BLOCKS = [...Array(64).keys()]; // i 0..63: 4 MiB
const B_BLOCKS = [...Array(128).keys()].map((i) => i + 32); // i 32..159: 8 MiB, 32 blocks shared with A

type SecondaryStatus = PairStatus & {
  secondary: {
    splitBrain: { rule: number; policy: string; keeps: 'primary' | 'secondary' | null; changedBytes: { secondary: number; primary: number }; explanation: string } | null;
    salvage: Array<{ path: string; complete: boolean; createdAt: string | null }>;
  };
};

async function qemuWrite(socket: string, blocks: number[], pattern: (i: number) => number): Promise<void> {
  const cmds: string[] = [];
  for (const i of blocks) cmds.push('-c', `write -P ${pattern(i)} ${blockAt(i)} 64k`);
  const w = await run('qemu-io', ['-f', 'raw', unixUri(socket), ...cmds, '-c', 'flush']);
  expect(w.code, w.stderr).toBe(0);
}

describe('attack: split brain resolved, both killed -9 mid-resync', () => {
  it('discard-least-changes, overlapping writes: after kill -9 of both mid-resync and a restart, the loser converges to the winner, the salvage is intact and exact', async () => {
    const { dir, p } = await stampedPair(SIZE);
    const aImg = p.pImg;
    const bImg = p.sImg;
    const bArgs = ['--socket', p.sSock, '--control', p.sControl, '--node-name', 'b'];
    const aSec = [aImg, '--secondary', '--socket', p.pSock, '--control', p.pControl, '--node-name', 'a', '--after-split-brain', 'discard-least-changes'];
    const procs: Served[] = [];
    const track = (s: Served) => (procs.push(s), s);
    try {
      let b = track(await serve([bImg, '--secondary', ...bArgs]));
      const a = track(await serve([aImg, '--socket', p.pSock, '--control', p.pControl, '--replicate-to', unixUri(p.sSock), '--node-name', 'a']));
      await firstCheckpoint(p.pControl, 60_000);
      expect(await request<{ role: string }>(p.sControl, 'failover', {})).toMatchObject({ role: 'primary' });
      await waitFor(async () => (await pairOf(p.pControl)).link === 'degraded', 'A degraded by the demote', { timeoutMs: 10_000 });
      await qemuWrite(p.pSock, A_BLOCKS, (i) => 0x40 + (i % 64));
      await qemuWrite(p.sSock, B_BLOCKS, (i) => 0x80 + (i % 100));
      expect(await a.stop()).toBe(0);
      const aBefore = join(dir, 'a-before.img');
      const bWinner = join(dir, 'b-winner.img');
      await copyFile(aImg, aBefore);

      // A back as a secondary with a slow disk: the policy's resync is under way for seconds
      let a2 = track(await serve([...aSec, '--filter', 'delay:write=2000,at=disk']));
      const aEv = await eventsOf(p.pControl, 60_000);
      const bEv = await eventsOf(p.sControl, 60_000);
      const replicating = request(p.sControl, 'replicate', { uri: unixUri(p.pSock), protocol: 'sync' }).catch((e: unknown) => e);
      const salvageEv = await aEv.next('salvage');
      expect(aEv.events.find((e) => e.event === 'split-brain')).toMatchObject({ rule: 90, policy: 'discard-least-changes', keeps: 'primary', resolved: true });
      await bEv.next('resync-started');
      // B's disk is the winner's: it must not change from here on
      await copyFile(bImg, bWinner);
      // the resync's progress, read from A's disk: kill once 128 of the 160 blocks hold B's data
      // (the primary's role is not in status until its resync at start is done)
      const bDisk = await readFile(bImg);
      const union0 = [...new Set([...A_BLOCKS, ...B_BLOCKS])].map(blockAt);
      const landed = await waitFor(
        async () => {
          const aDisk = await readFile(aImg);
          const n = union0.filter((o) => aDisk.subarray(o, o + B64).equals(bDisk.subarray(o, o + B64))).length;
          return n >= 128 && n < union0.length ? n : undefined;
        },
        "A's disk to hold 128 of the 160 resynced blocks",
        { timeoutMs: 60_000, intervalMs: 50 },
      );
      // then the next store of B's peer bitmap (the resync's stable flush clears what landed)
      const dirtyFile = `${bImg}.pair.dirty`;
      const m0 = (await stat(dirtyFile)).mtimeMs;
      await waitFor(async () => (await stat(dirtyFile)).mtimeMs > m0, "B's peer bitmap stored again", { timeoutMs: 10_000, intervalMs: 20 });
      const behind = `${landed} blocks landed`;
      await aEv.close();
      await bEv.close();
      b.child.kill('SIGKILL');
      a2.child.kill('SIGKILL');
      await b.waitExit();
      await a2.waitExit();
      await replicating;
      console.log(`killed both with ${behind}`);

      // both restarted with the same flags (A's disk no longer slow)
      b = track(await serve([bImg, ...bArgs]));
      a2 = track(await serve(aSec));
      const aEv2 = await eventsOf(p.pControl, 60_000);
      const bEv2 = await eventsOf(p.sControl, 60_000);
      const r = await request<unknown>(p.sControl, 'replicate', { uri: unixUri(p.pSock), protocol: 'sync' }).catch((e: unknown) => e);
      const aSt = await pairOf<SecondaryStatus>(p.pControl);
      console.log(`after the restart: replicate ${JSON.stringify(r).slice(0, 400)}; A status link ${aSt.link} diskState ${aSt.diskState}; splitBrain ${JSON.stringify(aSt.secondary.splitBrain)}`);
      expect(r).not.toBeInstanceOf(Error);
      // status explains it: the interrupted resync resumed, the first salvage named
      expect(aSt.secondary.splitBrain).toMatchObject({ rule: 90, policy: 'discard-least-changes', keeps: 'primary' });
      expect(aSt.secondary.splitBrain!.explanation).toContain(`interrupted`);
      expect(aSt.secondary.splitBrain!.explanation).toContain(salvageEv.path as string);
      expect(aEv2.events.find((e) => e.event === 'split-brain')).toMatchObject({ rule: 90, keeps: 'primary', resolved: true, resumed: true });
      await bEv2.next('checkpoint');
      await aEv2.close();
      await bEv2.close();
      const st = await pairOf<SecondaryStatus>(p.pControl);
      expect(st.diskState).toBe('UpToDate');
      // one salvage overlay: the one taken before the first resync, intact
      expect(st.secondary.salvage.map((s) => s.path)).toEqual([salvageEv.path]);
      expect(st.secondary.salvage[0]!.complete).toBe(true);
      expect(await a2.stop()).toBe(0);
      expect(await b.stop()).toBe(0);

      // the winner's disk is unchanged; the loser equals it
      expect(await cmp(bImg, bWinner)).toBe(0);
      expect(await cmp(aImg, bImg)).toBe(0);
      // the overlay maps exactly the union of both sides' diverged clusters, and over the resynced
      // disk reads as A's disk did before
      const union = [...new Set([...A_BLOCKS, ...B_BLOCKS])].map(blockAt).sort((x, y) => x - y);
      expect(salvageEv.bytes).toBe(union.length * B64);
      await expectSalvage(salvageEv.path as string, union, B64, aBefore, dir);
    } finally {
      for (const s of procs) await s.stop().catch(() => {});
    }
  }, 240_000);
});
