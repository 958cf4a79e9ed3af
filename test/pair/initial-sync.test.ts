/**
 * No copy-before-write while the secondary has no checkpoint to roll back to (the initial full
 * sync, before the first committed epoch: its disk is Inconsistent anyway): the replica's writes
 * go straight to the disk, the hidden disk stays empty, failover refuses (ERR_PAIR_INCONSISTENT);
 * from the first checkpoint on, copy-before-write is back. On two daemons (a real initial full
 * copy) and with a scripted primary (the refusal in the middle of it).
 */
import { join } from 'node:path';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { newGeneration, EMPTY } from '../../src/pair/generations.js';
import { makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { pairOf, firstCheckpoint } from '../support/control.js';
import { openLink, writerClient } from './scripted-primary.js';

const MiB = 1 << 20;

/** bytes the hidden disk maps itself (qemu-img map: depth 0 with data) */
async function hiddenDataBytes(disk: string): Promise<number> {
  const r = await run('qemu-img', ['map', '-U', '--output=json', `${disk}.hidden.qcow2`]);
  expect(r.code, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as Array<{ depth: number; length: number; data: boolean }>).filter((e) => e.depth === 0 && e.data).reduce((s, e) => s + e.length, 0);
}

describe('the initial full sync: no copy-before-write', () => {
  it('two daemons: after the initial full copy the hidden disk holds nothing; the next write is copied again', async () => {
    const SIZE = 32 * MiB;
    const dir = await makeTempDir();
    const p = join(dir, 'p.img');
    const s = join(dir, 's.img');
    const data = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i += 4096) data.fill((i / 4096) % 251 + 1, i, i + 4096);
    await writeFile(p, data);
    await writeFile(s, Buffer.alloc(0));
    await truncate(s, SIZE);
    const sSock = join(dir, 's.sock');
    const sControl = join(dir, 's.ctl');
    const pSock = join(dir, 'p.sock');
    const pControl = join(dir, 'p.ctl');
    const sec = await serve([s, '--secondary', '--socket', sSock, '--control', sControl]);
    const pri = await serve([p, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock)]);
    await firstCheckpoint(pControl);
    expect((await readFile(s)).equals(data)).toBe(true);
    expect(await hiddenDataBytes(s)).toBe(0);
    expect(await pairOf(sControl)).toMatchObject({ epoch: 1, diskState: 'UpToDate', secondary: { copiedClusters: 0, noRestorePoint: null } });
    // checkpoint 1 is a restore point: a write now keeps the cluster's old data
    const c = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
    await c.write(5 * MiB, Buffer.alloc(4096, 0xee));
    await c.flush();
    await c.close();
    expect(await hiddenDataBytes(s)).toBe(65536);
    expect(await pairOf(sControl)).toMatchObject({ secondary: { copiedClusters: 1 } });
    await pri.stop();
    await sec.stop();
  });

  it('scripted primary: during the first resync the disk is written directly and failover refuses; checkpoint 1 makes a restore point', async () => {
    const SIZE = 4 * MiB;
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(SIZE, 0x11));
    const socket = join(dir, 'nbd.sock');
    const control = join(dir, 'ctl.sock');
    const sec = await serve([disk, '--secondary', '--socket', socket, '--control', control]);
    // a primary with data of its own (a generation): this fresh secondary is the target of a full resync
    const link = await openLink(socket, { size: SIZE, gi: { current: newGeneration(), bitmap: EMPTY, history: [] } });
    expect(link.answer).toMatchObject({ type: 'welcome', decision: { action: 'resync-full' } });
    const c = await writerClient(socket, link);
    await c.write(0, Buffer.alloc(2 * MiB, 0x22));
    await c.flush();
    expect(await hiddenDataBytes(disk)).toBe(0);
    const st = await pairOf<{ diskState: string; epoch: number; secondary: { noRestorePoint: string | null } }>(control);
    expect(st).toMatchObject({ epoch: 0, diskState: 'Inconsistent', secondary: { noRestorePoint: expect.stringContaining('never committed a checkpoint') } });
    const f = await runCli(['failover', '--control', control, '--force', '--json']);
    expect(f.code).toBe(1);
    expect((JSON.parse(f.stdout) as { error: { code: string } }).error.code).toBe('ERR_PAIR_INCONSISTENT');
    expect(await link.checkpoint(1)).toMatchObject({ type: 'done', epoch: 1 });
    await c.write(2 * MiB, Buffer.alloc(65536, 0x33));
    await c.flush();
    expect(await hiddenDataBytes(disk)).toBe(65536);
    const dry = await runCli(['failover', '--control', control, '--dry-run', '--json']);
    expect(JSON.parse(dry.stdout)).toMatchObject({ allowed: true, rule: 'failover-to-checkpoint', epoch: 1, hiddenBytes: 65536 });
    await c.close();
    link.close();
    await sec.stop();
  });

  it('a hidden disk that kept the first state before a resync at epoch 0 is checkpoint 0: copy-before-write goes on, failover is allowed with --force', async () => {
    const SIZE = 4 * MiB;
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(SIZE, 0x11));
    const socket = join(dir, 'nbd.sock');
    const control = join(dir, 'ctl.sock');
    const sec = await serve([disk, '--secondary', '--socket', socket, '--control', control, '--view-export', 'view', '--view-read-only']);
    // both just created: no resync, UpToDate at epoch 0, copy-before-write on
    const link = await openLink(socket, { size: SIZE });
    expect(link.answer).toMatchObject({ type: 'welcome', decision: { action: 'none' } });
    const c = await writerClient(socket, link);
    await c.write(0, Buffer.alloc(65536, 0x22));
    await c.flush();
    await c.close();
    link.close();
    await waitFor(async () => (await pairOf(control)).link === 'none', 'the link to close');
    // a primary with a generation: a full resync into this disk, which kept its first state in hidden
    const link2 = await openLink(socket, { size: SIZE, gi: { current: newGeneration(), bitmap: EMPTY, history: [] } });
    expect(link2.answer).toMatchObject({ type: 'welcome', decision: { action: 'resync-full' } });
    const c2 = await writerClient(socket, link2);
    await c2.write(MiB, Buffer.alloc(65536, 0x33));
    await c2.flush();
    expect(await hiddenDataBytes(disk)).toBe(2 * 65536);
    expect(await pairOf(control)).toMatchObject({ epoch: 0, diskState: 'Inconsistent', secondary: { noRestorePoint: null } });
    // the resync copies what the primary wrote after checkpoint 0: promotable to it with --force (attack-failover-resync.test.ts)
    const refused = await runCli(['failover', '--control', control, '--dry-run', '--json']);
    expect(JSON.parse(refused.stdout)).toMatchObject({ allowed: false, rule: 'refused-outdated', refusal: { code: 'ERR_PAIR_OUTDATED' } });
    const dry = await runCli(['failover', '--control', control, '--dry-run', '--force', '--json']);
    expect(JSON.parse(dry.stdout)).toMatchObject({ allowed: true, rule: 'failover-to-checkpoint', epoch: 0, hiddenBytes: 2 * 65536 });
    await c2.close();
    link2.close();
    await sec.stop();
  });
});
