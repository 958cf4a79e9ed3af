/**
 * The window between a checkpoint whose step 6 (emptying the overlays) failed after step 5 was
 * durable (`committing N`, failure case 6 of replication.md §4) and its redo. The crash rules say
 * the disk is CP_N then and the overlays are garbage, never read: the hidden disk still holds
 * clusters from before CP_N (it may be half emptied), and the copy-before-write bits are reset.
 * So in that window replica writes are held (a write would leave the disk no checkpoint at all),
 * the view reads the disk, and a failover discards the overlays: each gives exactly CP_N.
 * The fault hook BLKREP_TEST_FAIL_AT=checkpoint-step-6 with BLKREP_TEST_FAIL_UNTIL=FILE keeps
 * step 6 failing until FILE exists.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, unixUri } from '../support/spawn.js';
import { eventsOf, pairOf, pairPaths } from '../support/control.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 8 * MiB;

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** CP 2 of these tests: 0x11, with 0x22 in [1M, 1M+128K) */
function cp2(): Buffer {
  const b = Buffer.alloc(SIZE, 0x11);
  b.fill(0x22, MiB, MiB + 128 * KiB);
  return b;
}

async function pairWithFailedCheckpoint() {
  const dir = await makeTempDir();
  const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
  const heal = join(dir, 'heal');
  await writeFile(pImg, Buffer.alloc(SIZE, 0x11));
  await writeFile(sImg, Buffer.alloc(0));
  await truncate(sImg, SIZE);
  const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', 'sync']);
  const pEv = await eventsOf(pControl);
  const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view'], {
    env: { ...process.env, BLKREP_TEST_FAIL_AT: 'checkpoint-step-6', BLKREP_TEST_FAIL_UNTIL: heal },
  });
  const sEv = await eventsOf(sControl);
  expect(await pEv.next('checkpoint')).toMatchObject({ epoch: 1 });
  // epoch 2: hidden gets the old 0x11 of [1M, 1M+128K), the disk 0x22
  expect((await run('qemu-io', ['-f', 'raw', unixUri(pSock), '-c', 'write -P 0x22 1M 128k'])).code).toBe(0);
  const bad = await runCli(['checkpoint', '--control', pControl, '--json']);
  expect(bad.code).not.toBe(0);
  expect(await pEv.next('checkpoint-failed')).toMatchObject({ n: 2, code: 'ERR_TEST_FAULT' });
  expect(await sEv.next('checkpoint-failed')).toMatchObject({ n: 2, code: 'ERR_TEST_FAULT' });
  expect(await pairOf(sControl)).toMatchObject({ epoch: 1, secondary: { committing: 2 } });
  // a write after the failed checkpoint, to a cluster hidden holds (bits reset: it would copy the disk's 0x22 over hidden's 0x11)
  const held = run('qemu-io', ['-f', 'raw', unixUri(pSock), '-c', 'write -P 0x44 1M 64k']);
  return { dir, pImg, sImg, heal, sSock, pSock, sControl, pControl, p, s, pEv, sEv, held };
}

describe('the secondary between a failed checkpoint (step 6) and its redo', () => {
  it('holds replica writes, the view reads CP 2 (the disk), not the hidden disk\'s older clusters; the redo commits 2 and lets the write through; disks equal', async () => {
    const t = await pairWithFailedCheckpoint();
    const view = await run('qemu-io', ['-f', 'raw', unixUri(t.sSock, 'view'), '-r', '-c', 'read -P 0x11 0 1M', '-c', 'read -P 0x22 1M 128k', '-c', 'read -P 0x11 1152k 7040k']);
    expect(view.stdout).not.toContain('Pattern verification failed');
    expect(view.code).toBe(0);
    // the held write is not on the secondary's disk: it is CP 2
    expect(sha(await readFile(t.sImg))).toBe(sha(cp2()));
    expect(await pairOf(t.sControl)).toMatchObject({ epoch: 1, secondary: { committing: 2 } });
    // the disk heals: the secondary's redo commits 2 (its own checkpoint event), the write goes on
    const from = t.sEv.events.length;
    await writeFile(t.heal, '');
    expect(await t.sEv.next('checkpoint', from)).toMatchObject({ role: 'secondary', epoch: 2 });
    expect((await t.held).code).toBe(0);
    expect(await pairOf(t.sControl)).toMatchObject({ epoch: 2, secondary: { committing: null } });
    // the primary's retry finds checkpoint 2 committed
    const cp = await runCli(['checkpoint', '--control', t.pControl, '--json']);
    expect(cp.code).toBe(0);
    expect(JSON.parse(cp.stdout)).toMatchObject({ epoch: 2 });
    expect(t.pEv.events.filter((e) => e.event === 'replication-degraded')).toEqual([]);
    // the view is CP 2 still (the write after it is in the disk, its old data in hidden)
    const after = await run('qemu-io', ['-f', 'raw', unixUri(t.sSock, 'view'), '-r', '-c', 'read -P 0x22 1M 128k']);
    expect(after.stdout).not.toContain('Pattern verification failed');
    await t.pEv.close();
    await t.sEv.close();
    expect(await t.p.stop()).toBe(0);
    expect(await t.s.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', t.pImg, t.sImg]);
    expect(cmp.stdout).toContain('Images are identical.');
  });

  it('failover --to checkpoint in that window gives exactly CP 2 (the overlays discarded), not a mix with the hidden disk\'s older clusters', async () => {
    const t = await pairWithFailedCheckpoint();
    const dry = await runCli(['failover', '--control', t.sControl, '--dry-run', '--json']);
    expect(dry.code).toBe(0);
    expect(JSON.parse(dry.stdout)).toMatchObject({ rule: 'failover-to-checkpoint', epoch: 2, bytes: 0 });
    // the overlays still cannot be emptied: the failover fails at that step, having written nothing into the disk
    const fo = await runCli(['failover', '--control', t.sControl, '--json']);
    expect(fo.code).not.toBe(0);
    expect(JSON.parse(fo.stdout)).toMatchObject({ error: { code: 'ERR_PAIR_FAILOVER_FAILED' } });
    expect(JSON.parse(fo.stdout).error.message).toContain('failed at step empty-overlays');
    expect(JSON.parse(fo.stdout).error.message).toContain('the view "view" shows checkpoint 2');
    // the primary's held write was refused on the secondary (demoted link): the client's write succeeded on the primary
    expect((await t.held).code).toBe(0);
    expect(sha(await readFile(t.sImg))).toBe(sha(cp2()));
    const view = await run('qemu-io', ['-f', 'raw', unixUri(t.sSock, 'view'), '-r', '-c', 'read -P 0x11 0 1M', '-c', 'read -P 0x22 1M 128k', '-c', 'read -P 0x11 1152k 7040k']);
    expect(view.stdout).not.toContain('Pattern verification failed');
    expect(view.code).toBe(0);
    await writeFile(t.heal, '');
    const retry = await runCli(['failover', '--control', t.sControl, '--retry', '--json']);
    expect(retry.code).toBe(0);
    expect(JSON.parse(retry.stdout)).toMatchObject({ role: 'primary', epoch: 2 });
    await t.pEv.close();
    await t.sEv.close();
    expect(await t.p.stop()).toBe(0);
    expect(await t.s.stop()).toBe(0);
    expect(sha(await readFile(t.sImg))).toBe(sha(cp2()));
  });
});
