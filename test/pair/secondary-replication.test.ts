/**
 * QEMU's tests/unit/test-replication.c secondary scenarios (replication.md §7 A) on a real
 * `serve-nbd --secondary`, with a scripted primary: "local" = the replica export (the disk, as
 * forwarded writes reach it), "top" = the view export (active → hidden → disk), read with
 * nbdcopy / qemu-io. Pass = exact byte equality. Plus failover, its dry run and refusals.
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, unixUri } from '../support/spawn.js';
import { replicaWriterExport } from '../../src/pair/data-token.js';
import { dataClient, openLink, writerClient } from './scripted-primary.js';
import { ControlClient } from '../../src/control/client.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const HALF = SIZE / 2;

async function secondary(extra: string[] = []) {
  const dir = await makeTempDir();
  const disk = join(dir, 'disk.img');
  // s/start: fill local with 0x11
  await writeFile(disk, Buffer.alloc(SIZE, 0x11));
  const socket = join(dir, 'nbd.sock');
  const control = join(dir, 'ctl.sock');
  const p = await serve([disk, '--secondary', '--socket', socket, '--control', control, '--view-export', 'view', ...extra]);
  return { dir, disk, socket, control, p };
}

/** the whole export, read by nbdcopy */
async function readExport(dir: string, socket: string, name: string): Promise<Buffer> {
  const out = join(dir, `${name || 'replica'}-${Date.now()}.raw`);
  const r = await run('nbdcopy', [`nbd+unix:///${name}?socket=${socket}`, out]);
  expect(r.code, r.stderr).toBe(0);
  return readFile(out);
}

function isFilled(b: Buffer, byte: number): boolean {
  return b.equals(Buffer.alloc(b.length, byte));
}

async function request(control: string, cmd: string, args: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
  const c = await ControlClient.connect(control, { timeoutMs: 5000 });
  try {
    return (await c.request(cmd, args, { timeoutMs: 30_000 })) as Record<string, unknown>;
  } finally {
    await c.close();
  }
}

describe('test-replication.c, secondary side (exact bytes)', () => {
  it('s/start and s/stop: top shows hidden\'s old data under local writes, top writes go to active; failover to the checkpoint commits 0x33 | 0x11', async () => {
    const s = await secondary();
    const link = await openLink(s.socket, { size: SIZE });
    expect(link.answer.type).toBe('welcome');
    // read top: all 0x11
    expect(isFilled(await readExport(s.dir, s.socket, 'view'), 0x11)).toBe(true);
    // write 0x22 local [32M, 64M) — a real NBD client on the replica export, with the link's writer token
    const w = await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x22 ${HALF} ${HALF}`, unixUri(s.socket, replicaWriterExport('', (link.answer as { dataToken: string }).dataToken))]);
    expect(w.code, w.stderr + w.stdout).toBe(0);
    // write 0x33 top [0, 32M)
    const c = await dataClient(s.socket, 'view');
    for (let at = 0; at < HALF; at += 4 * MiB) await c.write(at, Buffer.alloc(4 * MiB, 0x33));
    await c.flush();
    await c.close();
    const top = await readExport(s.dir, s.socket, 'view');
    expect(isFilled(top.subarray(0, HALF), 0x33)).toBe(true);
    expect(isFilled(top.subarray(HALF), 0x11)).toBe(true);
    // qemu-io agrees, on the view export
    const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', `read -P 0x11 ${HALF} ${HALF}`, '-c', `read -P 0x33 0 ${HALF}`, `nbd+unix:///view?socket=${s.socket}`]);
    expect(r.stdout).not.toContain('Pattern verification failed');
    expect(r.stdout).toMatch(/read 33554432\/33554432 bytes/);
    // the disk itself holds the primary's write
    expect(isFilled((await readFile(s.disk)).subarray(HALF), 0x22)).toBe(true);

    // s/stop: the dry run explains and changes nothing
    const dry = await runCli(['failover', '--control', s.control, '--dry-run', '--json']);
    expect(dry.code, dry.stderr).toBe(0);
    const explained = JSON.parse(dry.stdout) as Record<string, unknown>;
    expect(explained).toMatchObject({ dryRun: true, to: 'checkpoint', rule: 'failover-to-checkpoint', epoch: 0, hiddenBytes: HALF, activeBytes: HALF, bytes: SIZE, droppedBytes: HALF, allowed: true });
    expect(isFilled((await readFile(s.disk)).subarray(HALF), 0x22)).toBe(true);

    const events = await ControlClient.connect(s.control, { timeoutMs: 5000 });
    const seen: string[] = [];
    await events.subscribe(undefined, (e) => seen.push(e.event));
    const before = JSON.parse(await readFile(`${s.disk}.pair.json`, 'utf8')) as { gi: { current: string } };
    const f = await runCli(['failover', '--control', s.control, '--json']);
    expect(f.code, f.stderr).toBe(0);
    const result = JSON.parse(f.stdout) as { role: string; gi: { current: string; bitmap: string }; bytes: number; failbackBitmap: string };
    expect(result).toMatchObject({ role: 'primary', dryRun: false, bytes: SIZE, failbackBitmap: 'failback' });
    expect(result.gi.current).not.toBe(before.gi.current);
    expect(result.gi.bitmap).toBe(before.gi.current);
    // the old primary was told to demote; its link is closed
    await expect.poll(() => link.received.some((m) => m.type === 'demote'), { timeout: 5000 }).toBe(true);
    // the disk: [0,32M) = 0x33, [32M,64M) = 0x11 (QEMU's test says 0x22; committing active+hidden gives the checkpoint)
    const disk = await readFile(s.disk);
    expect(isFilled(disk.subarray(0, HALF), 0x33)).toBe(true);
    expect(isFilled(disk.subarray(HALF), 0x11)).toBe(true);
    // served read-write under the replica export's name, no link needed; the view is gone
    const replica = await readExport(s.dir, s.socket, '');
    expect(replica.equals(disk)).toBe(true);
    const st = (await request(s.control, 'status')) as { exports: Array<{ name: string; pair?: Record<string, unknown> }>; bitmaps: Array<{ name: string; dirtyBytes?: number }> };
    expect(st.exports.map((e) => e.name)).toEqual(['']);
    expect(st.exports.find((e) => e.name === '')!.pair).toMatchObject({ role: 'primary', link: 'none', diskState: 'UpToDate' });
    expect(st.bitmaps.find((b) => b.name === 'failback')).toMatchObject({ name: 'failback' });
    expect(JSON.parse(await readFile(`${s.disk}.pair.json`, 'utf8'))).toMatchObject({ role: 'primary', committing: null });
    await expect.poll(() => seen.includes('failover-done'), { timeout: 5000 }).toBe(true);
    expect(seen).toContain('failover-started');
    await events.close();

    // s/continuous: a primary's link and a second failover are refused now
    const again = await openLink(s.socket, { size: SIZE });
    expect(again.answer).toMatchObject({ type: 'refuse', code: 'ERR_PAIR_ROLE' });
    const f2 = await runCli(['failover', '--control', s.control, '--json']);
    expect(f2.code).toBe(1);
    expect(JSON.parse(f2.stdout).error.code).toBe('ERR_PAIR_ROLE');
    const disk2 = await readFile(s.disk);
    expect(disk2.equals(disk)).toBe(true);
  }, 120_000); // four CLI runs, three nbdcopy and two qemu-io of 64 MiB: 21 s on a loaded 2-core machine, near 60 s at worst

  it('s/do_checkpoint: local 0x22 in the second half, top reads 0x11 until the checkpoint, 0x22 after', async () => {
    const s = await secondary(['--view-read-only']);
    const link = await openLink(s.socket, { size: SIZE });
    const c = await writerClient(s.socket, link);
    for (let at = HALF; at < SIZE; at += 4 * MiB) await c.write(at, Buffer.alloc(4 * MiB, 0x22));
    await c.flush();
    expect(isFilled((await readExport(s.dir, s.socket, 'view')).subarray(HALF), 0x11)).toBe(true);
    expect(await link.checkpoint(1)).toMatchObject({ type: 'done', n: 1, epoch: 1 });
    const top = await readExport(s.dir, s.socket, 'view');
    expect(isFilled(top.subarray(0, HALF), 0x11)).toBe(true);
    expect(isFilled(top.subarray(HALF), 0x22)).toBe(true);
    // the view is read-only
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 4096', `nbd+unix:///view?socket=${s.socket}`]);
    expect(w.stdout + w.stderr).toMatch(/read-only|Operation not permitted|Permission denied/i);
    const st = (await request(s.control, 'status')) as { exports: Array<{ name: string; pair?: { epoch: number; lastCheckpointAgeMs: number | null; secondary: { copiedClusters: number } } }> };
    expect(st.exports.find((e) => e.name === '')!.pair).toMatchObject({ epoch: 1, secondary: { copiedClusters: 0 } });
    await c.close();
  });

  it('failover refusals: --to latest after an async primary (ERR_PAIR_STATE), an Outdated secondary without --force (ERR_PAIR_OUTDATED)', async () => {
    const s = await secondary();
    const link = await openLink(s.socket, { size: SIZE, protocol: 'async' });
    const latest = await runCli(['failover', '--control', s.control, '--to', 'latest', '--json']);
    expect(latest.code).toBe(1);
    expect(JSON.parse(latest.stdout).error).toMatchObject({ code: 'ERR_PAIR_STATE' });
    // the primary says it degraded: the secondary is Outdated
    link.channel.send({ type: 'event', name: 'replication-degraded', fields: { reason: 'queue overflow' } });
    await expect.poll(async () => ((await request(s.control, 'status')) as { exports: Array<{ name: string; pair?: { diskState: string } }> }).exports.find((e) => e.name === '')!.pair!.diskState, { timeout: 5000 }).toBe('Outdated');
    const dry = await runCli(['failover', '--control', s.control, '--dry-run']);
    expect(dry.code).toBe(0);
    expect(dry.stdout).toContain('Outdated');
    const out = await runCli(['failover', '--control', s.control, '--json']);
    expect(out.code).toBe(1);
    expect(JSON.parse(out.stdout).error).toMatchObject({ code: 'ERR_PAIR_OUTDATED' });
    const forced = await runCli(['failover', '--control', s.control, '--force', '--json']);
    expect(forced.code, forced.stderr).toBe(0);
    expect(JSON.parse(forced.stdout)).toMatchObject({ role: 'primary', bytes: 0 });
    expect(isFilled(await readFile(s.disk), 0x11)).toBe(true);
  });
});
