/**
 * Attack (round 3): a secondary restarted on another disk of the same lineage — a snapshot of its
 * own disk and pair files taken while it ran at checkpoint 2 (SIGSTOP, copy, SIGCONT: what an LVM
 * or file-system snapshot, or a restored backup, gives), started again after the primary went on
 * to checkpoint 3 with it and then lost it. The snapshot's generations are the ones the primary
 * left when it lost the link (its bitmap generation), so the generations alone say "bitmap resync
 * of what the primary wrote since the link went" (rule 50) — but the disk lacks checkpoint 3's
 * writes too. Its epoch (2) is below the primary's (3): a disk that was a secondary all along is
 * never behind the primary's committed epoch, so it is another disk, and the resync is full: the
 * two disks are equal afterwards. Before, the bitmap resync left the disk mixed (checkpoint 3's
 * write missing) while both said UpToDate.
 */
import { execFileSync } from 'node:child_process';
import { copyFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { controlRequest as request, eventsOf, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';
import { makeTempDir, run, serve, unixUri, waitFor, type Served } from '../support/spawn.js';

const MiB = 1 << 20;

describe('a secondary restarted on a snapshot of its disk from an earlier checkpoint', () => {
  it('epoch behind the primary\'s: a full resync, the disks equal (cmp)', async () => {
    const dir = await makeTempDir();
    const p = pairPaths(dir);
    for (const f of [p.pImg, p.sImg]) execFileSync('truncate', ['-s', `${8 * MiB}`, f]);
    const sArgs = [p.sImg, '--secondary', '--socket', p.sSock, '--control', p.sControl];
    let s: Served | undefined = await serve(sArgs);
    const a = await serve([p.pImg, '--socket', p.pSock, '--control', p.pControl, '--replicate-to', unixUri(p.sSock), '--protocol', 'sync']);
    const snap = join(dir, 'snap');
    execFileSync('mkdir', [snap]);
    try {
      await firstCheckpoint(p.pControl);
      const pUri = unixUri(p.pSock);
      expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', 'write -P 0x11 0 64k'])).code).toBe(0);
      expect((await request<{ epoch: number }>(p.pControl, 'checkpoint')).epoch).toBe(2);
      // the snapshot: the secondary stopped for the copy, its link untouched
      const mine = (await readdir(dir)).filter((f) => f.startsWith('s.img'));
      process.kill(s.pid, 'SIGSTOP');
      for (const f of mine) await copyFile(join(dir, f), join(snap, f));
      process.kill(s.pid, 'SIGCONT');
      expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', `write -P 0x22 ${MiB} 64k`])).code).toBe(0);
      expect((await request<{ epoch: number }>(p.pControl, 'checkpoint')).epoch).toBe(3);
      await s.stop('SIGKILL');
      s = undefined;
      await waitFor(async () => (await pairOf(p.pControl)).link === 'degraded', 'the primary to lose its peer');
      expect((await run('qemu-io', ['-f', 'raw', pUri, '-c', `write -P 0x33 ${2 * MiB} 64k`])).code).toBe(0);

      // the secondary comes back on the snapshot
      // rolled back in place, as a file-system snapshot's rollback does: the same files (inodes), their
      // old contents, the files made since gone (a restore into new files is refused while its hidden
      // disk is not the file the last run served with: test/pair/attack-restart-hidden.test.ts)
      for (const f of (await readdir(dir)).filter((x) => x.startsWith('s.img') && !mine.includes(x))) await rm(join(dir, f));
      for (const f of mine) await copyFile(join(snap, f), join(dir, f));
      const ev = await eventsOf(p.pControl, 60_000);
      s = await serve(sArgs);
      await ev.next('replication-connected');
      await waitFor(async () => (await pairOf(p.pControl)).link === 'connected', 'the resync to end', { timeoutMs: 60_000 });
      await ev.close();
      expect((await pairOf<{ lastResync?: { full: boolean; bytes: number } }>(p.pControl)).lastResync).toMatchObject({ full: true, bytes: 8 * MiB });
      // the checkpoint after the resync (the primary takes it; asked here too, whichever comes first)
      const n = (await request<{ epoch: number }>(p.pControl, 'checkpoint')).epoch;
      expect([4, 5]).toContain(n);
      expect(await pairOf(p.sControl)).toMatchObject({ diskState: 'UpToDate', epoch: n });
      const cmp = await run('cmp', ['-l', p.pImg, p.sImg]);
      expect(cmp.stdout.split('\n').slice(0, 3).join('\n')).toBe('');
      expect(cmp.code).toBe(0);
    } finally {
      await a.stop('SIGKILL').catch(() => {});
      await s?.stop('SIGKILL').catch(() => {});
    }
  }, 120_000);
});
