/**
 * Crash of the secondary inside a checkpoint (replication.md §2 crash rules, §7 B.3): the fault
 * hook BLKREP_TEST_CRASH_AT=checkpoint-step-K kills serve-nbd --secondary with SIGKILL at the end
 * of step K; after a restart the view is exactly CP_{N-1} (step 4) or CP_N (steps 5–7), never a
 * mix, and the pair state says which. With a strict and with a volatile hidden disk (kill -9 is a
 * process crash: the page cache keeps the volatile hidden disk's unsynced copies). Also a kill -9
 * with 32 writes in flight between checkpoints: the view is the last checkpoint exactly (a copy
 * written without its qcow2 metadata would fail it: checked by dropping the copy's FUA). And the
 * same kill after the hidden disk was emptied and reused (it keeps its file's length: the next
 * epoch's copies land in clusters that held the last epoch's copies and L2 tables).
 */
import { join } from 'node:path';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, serve, type Started } from '../support/spawn.js';
import type { NbdClient } from '../../src/nbd/client.js';
import { qemuCheck } from '../qcow2/helpers.js';
import { readView } from '../support/pair-bytes.js';
import { openLink, writerClient } from './scripted-primary.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;


/**
 * 4 KiB writes all over the disk, 32 at a time, and kill -9 of the secondary after the 200th
 * reply; the writers stop at their first error. True when the kill was sent.
 */
async function writeUntilKilled(c: NbdClient, p: Started): Promise<boolean> {
  let next = 0;
  let replied = 0;
  let killed = false;
  const blocks = SIZE / 4096;
  const writer = async (): Promise<void> => {
    while (next < 1000) {
      const b = (next++ * 409) % blocks;
      try {
        await c.write(b * 4096, Buffer.alloc(4096, 0x60 + (b % 32)));
      } catch {
        return;
      }
      if (++replied === 200 && !killed) {
        killed = true;
        p.child.kill('SIGKILL');
      }
    }
  };
  await Promise.all(Array.from({ length: 32 }, writer));
  return killed;
}

describe.each(['strict', 'volatile'] as const)('secondary crash inside a checkpoint (kill -9 by the fault hook), hidden %s', (durability) => {
  const cp0 = Buffer.alloc(SIZE, 0x11);
  const cp1 = Buffer.from(cp0);
  cp1.fill(0x22, MiB, 2 * MiB);
  // 100 KiB into the second MiB: a write that starts and ends inside clusters
  cp1.fill(0x23, 3 * MiB + 1000, 3 * MiB + 1000 + 100 * 1024);

  it.each([
    ['checkpoint-step-4', 0],
    ['checkpoint-step-5', 1],
    ['checkpoint-step-6', 1],
    ['checkpoint-step-7', 1],
  ] as const)('%s → after restart the view is CP_%i exactly', async (step, epoch) => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, cp0);
    const socket = join(dir, 'nbd.sock');
    const args = [disk, '--secondary', '--socket', socket, '--view-export', 'view', '--view-read-only', '--hidden-durability', durability];
    const p = await serve(args, { env: { ...process.env, BLKREP_TEST_CRASH_AT: step } });
    const link = await openLink(socket, { size: SIZE });
    const c = await writerClient(socket, link);
    await c.write(MiB, Buffer.alloc(MiB, 0x22));
    await c.write(3 * MiB + 1000, Buffer.alloc(100 * 1024, 0x23));
    await c.flush();
    await expect(link.checkpoint(1)).rejects.toMatchObject({ code: 'ERR_PAIR_LINK_DOWN' });
    expect((await p.waitExit(10_000)).signal).toBe('SIGKILL');
    await c.close().catch(() => {});

    const again = await serve(args);
    const view = await readView(dir, socket, 'after');
    const expected = epoch === 0 ? cp0 : cp1;
    expect(view.equals(expected)).toBe(true);
    expect(JSON.parse(await readFile(`${disk}.pair.json`, 'utf8'))).toMatchObject({ epoch, committing: null, diskState: 'UpToDate', ...(durability === 'volatile' ? { volatileHidden: { bootId: expect.any(String) } } : {}) });
    // the disk holds the primary's writes in every case
    expect((await readFile(disk)).equals(cp1)).toBe(true);

    // the pair goes on: a write into a cluster the hidden disk kept does not overwrite its old data
    const link2 = await openLink(socket, { size: SIZE });
    expect(link2.answer.type).toBe('welcome');
    const c2 = await writerClient(socket, link2);
    await c2.write(MiB, Buffer.alloc(65536, 0x44));
    await c2.flush();
    const mid = await readView(dir, socket, 'mid');
    expect(mid.equals(expected)).toBe(true);
    expect(await link2.checkpoint(2)).toMatchObject({ type: 'done', n: 2, epoch: 2 });
    const cp2 = Buffer.from(cp1);
    cp2.fill(0x44, MiB, MiB + 65536);
    expect((await readView(dir, socket, 'cp2')).equals(cp2)).toBe(true);
    await c2.close();
    link2.close();
    await again.stop();
  });

  it('an epoch without writes: step 5 writes no "committing" (step 6 changes nothing), so a kill there leaves epoch 0 with the same bytes', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, cp0);
    const socket = join(dir, 'nbd.sock');
    const args = [disk, '--secondary', '--socket', socket, '--view-export', 'view', '--view-read-only', '--hidden-durability', durability];
    const p = await serve(args, { env: { ...process.env, BLKREP_TEST_CRASH_AT: 'checkpoint-step-5' } });
    const link = await openLink(socket, { size: SIZE });
    await expect(link.checkpoint(1)).rejects.toMatchObject({ code: 'ERR_PAIR_LINK_DOWN' });
    expect((await p.waitExit(10_000)).signal).toBe('SIGKILL');
    expect(JSON.parse(await readFile(`${disk}.pair.json`, 'utf8'))).toMatchObject({ epoch: 0, committing: null });
    const again = await serve(args);
    expect((await readView(dir, socket, 'after')).equals(cp0)).toBe(true);
    const link2 = await openLink(socket, { size: SIZE });
    expect(await link2.checkpoint(1)).toMatchObject({ type: 'done', n: 1, epoch: 1 });
    link2.close();
    await again.stop();
  });

  it('kill -9 with 32 writes in flight: after restart the view is the last checkpoint exactly (every copy into hidden survived)', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, cp0);
    const socket = join(dir, 'nbd.sock');
    const args = [disk, '--secondary', '--socket', socket, '--view-export', 'view', '--view-read-only', '--hidden-durability', durability];
    const p = await serve(args);
    const link = await openLink(socket, { size: SIZE });
    const c = await writerClient(socket, link);
    await c.write(MiB, Buffer.alloc(MiB, 0x22));
    await c.write(3 * MiB + 1000, Buffer.alloc(100 * 1024, 0x23));
    await c.flush();
    expect(await link.checkpoint(1)).toMatchObject({ type: 'done', epoch: 1 });
    // 4 KiB writes all over the disk, 32 at a time; the secondary is killed after the 200th reply
    expect(await writeUntilKilled(c, p)).toBe(true);
    await p.waitExit();
    await c.close().catch(() => {});
    link.close();
    const again = await serve(args);
    expect((await readView(dir, socket, 'after')).equals(cp1)).toBe(true);
    // the disk itself holds at least the 200 replied writes (it is not the checkpoint)
    expect((await readFile(disk)).equals(cp1)).toBe(false);
    await again.stop();
  });
  it('after reuse: copies of epoch 2 land inside the file epoch 1 grew, qemu-img check clean; kill -9 mid-epoch 3 → the view is CP_2 exactly', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    const hidden = `${disk}.hidden.qcow2`;
    await writeFile(disk, cp0);
    const socket = join(dir, 'nbd.sock');
    const args = [disk, '--secondary', '--socket', socket, '--view-export', 'view', '--view-read-only', '--hidden-durability', durability];
    const p = await serve(args);
    const link = await openLink(socket, { size: SIZE });
    const c = await writerClient(socket, link);
    const clusters = SIZE / 65536;
    const expected = Buffer.from(cp0);
    const epoch = async (n: number, byte: number): Promise<void> => {
      // one 4 KiB write in every 64 KiB cluster: every cluster copied into hidden
      await Promise.all(
        Array.from({ length: clusters }, (_, k) => {
          const at = k * 65536 + ((k * 5 + n) % 16) * 4096;
          expected.fill(byte, at, at + 4096);
          return c.write(at, Buffer.alloc(4096, byte));
        }),
      );
      await c.flush();
      expect(await link.checkpoint(n)).toMatchObject({ type: 'done', epoch: n });
    };
    await epoch(1, 0x31);
    const grown = (await stat(hidden)).size;
    expect(grown).toBeGreaterThan(SIZE); // 64 copies and the metadata
    expect((await readView(dir, socket, 'cp1')).equals(expected)).toBe(true);
    await epoch(2, 0x32);
    expect((await stat(hidden)).size, 'epoch 2 reused the space epoch 1 left').toBe(grown);
    const cp2 = Buffer.from(expected);
    expect((await readView(dir, socket, 'cp2')).equals(cp2)).toBe(true);
    // epoch 3: 4 KiB writes all over the disk, 32 at a time; killed after the 200th reply
    expect(await writeUntilKilled(c, p)).toBe(true);
    await p.waitExit();
    await c.close().catch(() => {});
    link.close();
    expect((await stat(hidden)).size, 'epoch 3 reused it too').toBe(grown);
    // leaks are allowed after a kill (a writeback cycle cut short), corruption is not
    const check = await qemuCheck(hidden);
    expect({ corruptions: check.corruptions, checkErrors: check.checkErrors }, check.raw).toEqual({ corruptions: 0, checkErrors: 0 });
    const again = await serve(args);
    expect((await readView(dir, socket, 'after')).equals(cp2)).toBe(true);
    expect((await readFile(disk)).equals(cp2)).toBe(false);
    await again.stop();
  });
});
