/**
 * The secondary's pair link against a real `serve-nbd --secondary` process, with a scripted
 * primary (PairChannel + NbdClient): welcome, the replica export present only while the link is
 * up, checkpoint → done, one link at a time, refusals with their codes.
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, waitFor } from '../support/spawn.js';
import { dataClient, openLink, writerClient } from './scripted-primary.js';
import { ControlClient } from '../../src/control/client.js';
import { freshTuple, mint } from '../../src/pair/generations.js';

const MiB = 1024 * 1024;

async function secondary(extra: string[] = [], size = 4 * MiB) {
  const dir = await makeTempDir();
  const disk = join(dir, 'disk.img');
  await writeFile(disk, Buffer.alloc(size, 0x11));
  const socket = join(dir, 'nbd.sock');
  const control = join(dir, 'ctl.sock');
  const p = await serve([disk, '--secondary', '--socket', socket, '--control', control, ...extra]);
  return { dir, disk, socket, control, p, size };
}

async function status(control: string): Promise<{ exports: Array<{ name: string; present?: boolean; pair?: Record<string, unknown> }> }> {
  const c = await ControlClient.connect(control, { timeoutMs: 5000 });
  try {
    return (await c.request('status', {}, { timeoutMs: 5000 })) as never;
  } finally {
    await c.close();
  }
}

describe('serve-nbd --secondary: the pair link', () => {
  it('welcomes a primary, serves the replica export while the link is up, commits a checkpoint', async () => {
    const s = await secondary();
    // no primary: no replica export
    await expect(dataClient(s.socket)).rejects.toThrow();
    const before = await status(s.control);
    expect(before.exports.find((e) => e.name === '')).toMatchObject({ present: false, pair: { role: 'secondary', link: 'none', epoch: 0 } });
    const text = await runCli(['status', '--control', s.control]);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toContain('""  (not served: a secondary\'s replica export waits for a primary)');
    expect(text.stdout).toMatch(/pair: secondary → no peer, -, link none, epoch 0, no checkpoint yet, disk Inconsistent, queue 0 B, behind 0 B, generation 0000000000000004/);

    const link = await openLink(s.socket, { size: s.size });
    expect(link.answer).toMatchObject({ type: 'welcome', size: s.size, role: 'secondary', decision: { rule: 10, action: 'none' } });
    const c = await writerClient(s.socket, link);
    await c.write(MiB, Buffer.alloc(65536, 0x22));
    await c.flush();
    expect((await status(s.control)).exports.find((e) => e.name === '')!.pair).toMatchObject({ link: 'connected', protocol: 'sync', secondary: { copiedClusters: 1 } });
    const done = await link.checkpoint(1);
    expect(done).toMatchObject({ type: 'done', n: 1, epoch: 1 });
    const disk = await readFile(s.disk);
    expect(disk.subarray(MiB, MiB + 65536).equals(Buffer.alloc(65536, 0x22))).toBe(true);
    expect(JSON.parse(await readFile(`${s.disk}.pair.json`, 'utf8'))).toMatchObject({ role: 'secondary', epoch: 1, committing: null });
    // a retried checkpoint whose done was lost answers the same epoch
    expect(await link.checkpoint(1)).toMatchObject({ type: 'done', n: 1, epoch: 1 });

    // the link goes: the replica export goes, its connections are closed
    link.close();
    await waitFor(async () => (await status(s.control)).exports.find((e) => e.name === '')?.present === false, 'the replica export to go', { timeoutMs: 5000 });
    await expect(c.write(0, Buffer.alloc(512, 1))).rejects.toThrow();
    await c.close().catch(() => {});
  });

  it('refuses a second link while one is up (ERR_PAIR_BUSY), a wrong size (ERR_PAIR_SIZE), a peer that is not a primary (ERR_PAIR_ROLE)', async () => {
    const s = await secondary();
    // the first answers the ping a second hello makes the secondary send it: it is alive, the second is refused
    const first = await openLink(s.socket, { size: s.size, answerPings: true });
    expect(first.answer.type).toBe('welcome');
    const second = await openLink(s.socket, { size: s.size });
    expect(second.answer).toMatchObject({ type: 'refuse', code: 'ERR_PAIR_BUSY' });
    expect(first.received.filter((m) => m.type === 'ping')).toHaveLength(1);
    expect(first.channel.isOpen).toBe(true);
    first.close();
    await waitFor(async () => (await status(s.control)).exports.find((e) => e.name === '')?.pair?.link === 'none', 'the link to go', { timeoutMs: 5000 });
    const wrongSize = await openLink(s.socket, { size: s.size * 2 });
    expect(wrongSize.answer).toMatchObject({ type: 'refuse', code: 'ERR_PAIR_SIZE' });
    expect((wrongSize.answer as { message: string }).message).toContain(`${s.size * 2} bytes`);
    const notPrimary = await openLink(s.socket, { size: s.size, role: 'secondary' });
    expect(notPrimary.answer).toMatchObject({ type: 'refuse', code: 'ERR_PAIR_ROLE' });
  });

  it('--accept-plain-primary: the replica export is always there, for a plain NBD primary (nbdcopy), still copy-before-write', async () => {
    const s = await secondary(['--accept-plain-primary', '--view-export', 'view', '--view-read-only']);
    const src = `${s.dir}/src.img`;
    await writeFile(src, Buffer.alloc(s.size, 0x22));
    const w = await run('nbdcopy', [src, `nbd+unix:///?socket=${s.socket}`]);
    expect(w.code, w.stderr).toBe(0);
    expect((await readFile(s.disk)).equals(Buffer.alloc(s.size, 0x22))).toBe(true);
    const out = `${s.dir}/view.raw`;
    expect((await run('nbdcopy', [`nbd+unix:///view?socket=${s.socket}`, out])).code).toBe(0);
    expect((await readFile(out)).equals(Buffer.alloc(s.size, 0x11))).toBe(true);
    expect((await status(s.control)).exports.find((e) => e.name === '')!.pair).toMatchObject({ link: 'none', peerKind: 'plain' });
  });

  it('failover --to latest after a sync primary: the hidden disk is dropped, the active disk committed; the failback bitmap holds active ∪ hidden', async () => {
    const s = await secondary(['--view-export', 'view']);
    const link = await openLink(s.socket, { size: s.size, protocol: 'sync' });
    const c = await writerClient(s.socket, link);
    await c.write(MiB, Buffer.alloc(MiB, 0x22));
    await c.flush();
    await c.close();
    const v = await dataClient(s.socket, 'view');
    await v.write(3 * MiB, Buffer.alloc(65536, 0x33));
    await v.flush();
    await v.close();
    const r = await runCli(['failover', '--control', s.control, '--to', 'latest', '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ role: 'primary', to: 'latest', rule: 'failover-to-latest', bytes: 65536, hiddenBytes: MiB, activeBytes: 65536 });
    const expected = Buffer.alloc(s.size, 0x11);
    expected.fill(0x22, MiB, 2 * MiB);
    expected.fill(0x33, 3 * MiB, 3 * MiB + 65536);
    expect((await readFile(s.disk)).equals(expected)).toBe(true);
    const c2 = await ControlClient.connect(s.control, { timeoutMs: 5000 });
    const dump = (await c2.request('bitmap-dump', { name: 'failback' })) as { dirtyBytes: number; runs: Array<[number, number]> };
    await c2.close();
    expect(dump).toMatchObject({ dirtyBytes: MiB + 65536, runs: [[MiB, MiB], [3 * MiB, 65536]] });
    expect(link.received.some((m) => m.type === 'demote')).toBe(true);
  });

  it('a malformed hello is refused with ERR_PAIR_PROTOCOL naming the field; the daemon keeps serving', async () => {
    const s = await secondary();
    const bad = await openLink(s.socket, { size: s.size, gi: { current: 'not hex', bitmap: '0', history: [] } });
    expect(bad.answer).toMatchObject({ type: 'refuse', code: 'ERR_PAIR_PROTOCOL' });
    expect((bad.answer as { message: string }).message).toContain('"gi" must be');
    const good = await openLink(s.socket, { size: s.size });
    expect(good.answer.type).toBe('welcome');
  });

  it('an I/O error on the secondary\'s disk (failure case 4): the request fails, the disk is Failed, not promotable, no checkpoint', async () => {
    const s = await secondary(['--filter', 'error:ops=write,range=1M-2M,errno=EIO']);
    const link = await openLink(s.socket, { size: s.size });
    const c = await writerClient(s.socket, link);
    await c.write(0, Buffer.alloc(4096, 0x22));
    await expect(c.write(MiB, Buffer.alloc(4096, 0x22))).rejects.toMatchObject({ errno: 'EIO' });
    await c.close().catch(() => {});
    await waitFor(async () => (await status(s.control)).exports.find((e) => e.name === '')?.pair?.diskState === 'Failed', 'the disk to be Failed', { timeoutMs: 5000 });
    const pair = (await status(s.control)).exports.find((e) => e.name === '')!.pair as { secondary: { failedReason: string } };
    expect(pair.secondary.failedReason).toContain('a write to the disk failed');
    await expect.poll(() => link.received.some((m) => m.type === 'event' && m.name === 'secondary-failed'), { timeout: 5000 }).toBe(true);
    expect(await link.checkpoint(1)).toMatchObject({ type: 'failed', n: 1, code: 'ERR_PAIR_STATE' });
    const f = await runCli(['failover', '--control', s.control, '--json']);
    expect(f.code).toBe(1);
    expect(JSON.parse(f.stdout).error.code).toBe('ERR_PAIR_STATE');
    const disk = await readFile(s.disk);
    expect(disk.subarray(MiB, MiB + 4096).equals(Buffer.alloc(4096, 0x11))).toBe(true);
    expect(disk.subarray(0, 4096).equals(Buffer.alloc(4096, 0x22))).toBe(true);
  });

  it('a Failed secondary (case 4) that welcomes the primary again stays Failed while the resync runs: status says what failover decides by', async () => {
    const s = await secondary(['--filter', 'error:ops=write,range=1M-2M,errno=EIO']);
    const gi = freshTuple();
    const link = await openLink(s.socket, { size: s.size, gi });
    const c = await writerClient(s.socket, link);
    await expect(c.write(MiB, Buffer.alloc(4096, 0x22))).rejects.toMatchObject({ errno: 'EIO' });
    await c.close().catch(() => {});
    await expect.poll(() => link.received.some((m) => m.type === 'event' && m.name === 'secondary-failed'), { timeout: 5000 }).toBe(true);
    await link.close();
    // the primary reconnects (as a real one does at once, with backoff) with the generation it
    // minted at the degrade: a bitmap resync, and no write of it yet
    const again = await openLink(s.socket, { size: s.size, gi: mint(gi), nodeId: link.nodeId });
    expect(again.answer).toMatchObject({ type: 'welcome' });
    expect((again.answer as { decision: { action: string } }).decision.action).toMatch(/^resync-/);
    const pair = (await status(s.control)).exports.find((e) => e.name === '')!.pair as { diskState: string; link: string; secondary: { failedReason: string | null } };
    expect({ diskState: pair.diskState, link: pair.link }).toEqual({ diskState: 'Failed', link: 'resyncing' });
    expect(pair.secondary.failedReason).toMatch(/^a write to the disk failed: injected EIO/);
    const f = await runCli(['failover', '--control', s.control, '--json']);
    expect(f.code).toBe(1);
    expect(JSON.parse(f.stdout).error).toEqual({ code: 'ERR_PAIR_STATE', message: "the secondary's disk has Failed (an I/O error): it is not promotable" });
    await again.close();
  });
});

