/**
 * Attack: a checkpoint numbered past the secondary's epoch + 1, and the secondary killed -9
 * between steps 5 and 7 of it (the crash rules' "redo step 6" window).
 *
 * A primary numbers its next checkpoint after the larger of its own epoch and its secondary's
 * (primary.ts checkpointNow). It is ahead of the secondary's epoch + 1 whenever the secondary is
 * behind it: a disk restored from a snapshot or backup, a replacement secondary resynced in full
 * (attack-ha-stale-disk), an old primary back for failback that never got its last DONE. Its
 * first checkpoint then records "checkpoint N committing" with epoch M < N − 1 at step 5.
 *
 * Before: the pair state's check said "a checkpoint being committed is always epoch + 1", so a
 * secondary killed in steps 5–7 of that checkpoint could not start again (ERR_PAIR_STATE: its own
 * state file refused as damaged) although the crash rules say exactly what to do (the disk is
 * CP_N: redo step 6, commit N). Now a committing checkpoint only has to be past the epoch.
 *
 * The secondary is a real daemon killed -9 by the fault hook; the primary is this process
 * (scripted-primary.ts), numbering its checkpoint 4 as a primary at epoch 3 does.
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, serve } from '../support/spawn.js';
import { readView } from '../support/pair-bytes.js';
import { openLink, writerClient } from './scripted-primary.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;


describe('attack: a checkpoint numbered past epoch + 1, the secondary killed -9 inside it', () => {
  it.each(['checkpoint-step-5', 'checkpoint-step-6'] as const)('%s of checkpoint 4 at epoch 0: the restart commits checkpoint 4 (the view is CP_4 exactly), the pair goes on', async (step) => {
    const cp0 = Buffer.alloc(SIZE, 0x11);
    const cp4 = Buffer.from(cp0);
    cp4.fill(0x22, MiB, 2 * MiB);
    cp4.fill(0x23, 3 * MiB + 1000, 3 * MiB + 1000 + 100 * 1024);
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, cp0);
    const socket = join(dir, 'nbd.sock');
    const args = [disk, '--secondary', '--socket', socket, '--view-export', 'view', '--view-read-only'];
    const p = await serve(args, { env: { ...process.env, BLKREP_TEST_CRASH_AT: step } });
    const link = await openLink(socket, { size: SIZE });
    expect(link.answer.type).toBe('welcome');
    const c = await writerClient(socket, link);
    await c.write(MiB, Buffer.alloc(MiB, 0x22));
    await c.write(3 * MiB + 1000, Buffer.alloc(100 * 1024, 0x23));
    await c.flush();
    await expect(link.checkpoint(4)).rejects.toMatchObject({ code: 'ERR_PAIR_LINK_DOWN' });
    expect((await p.waitExit(10_000)).signal).toBe('SIGKILL');
    await c.close().catch(() => {});
    expect(JSON.parse(await readFile(`${disk}.pair.json`, 'utf8'))).toMatchObject({ epoch: 0, committing: 4 });

    // the restart finishes checkpoint 4 (redo step 6, commit): the view is CP_4, the disk too
    const again = await serve(args);
    expect(again.stderr()).toContain('checkpoint 4 was committing when the secondary stopped: emptying the hidden and active disks again and committing epoch 4');
    expect((await readView(dir, socket, 'after')).equals(cp4)).toBe(true);
    expect(JSON.parse(await readFile(`${disk}.pair.json`, 'utf8'))).toMatchObject({ epoch: 4, committing: null, diskState: 'UpToDate' });
    expect((await readFile(disk)).equals(cp4)).toBe(true);

    // the pair goes on: a write into a kept cluster leaves the view at CP_4 until checkpoint 5
    const link2 = await openLink(socket, { size: SIZE });
    expect(link2.answer).toMatchObject({ type: 'welcome', epoch: 4 });
    const c2 = await writerClient(socket, link2);
    await c2.write(MiB, Buffer.alloc(65536, 0x44));
    await c2.flush();
    expect((await readView(dir, socket, 'mid')).equals(cp4)).toBe(true);
    expect(await link2.checkpoint(5)).toMatchObject({ type: 'done', n: 5, epoch: 5 });
    const cp5 = Buffer.from(cp4);
    cp5.fill(0x44, MiB, MiB + 65536);
    expect((await readView(dir, socket, 'cp5')).equals(cp5)).toBe(true);
    await c2.close();
    link2.close();
    expect(await again.stop()).toBe(0);
  }, 60_000);
});
