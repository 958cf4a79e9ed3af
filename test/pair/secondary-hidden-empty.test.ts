/**
 * A secondary whose hidden disk is absent at start (a tmpfs after a reboot, deleted) after a
 * clean stop that left it empty (right after a checkpoint) loses nothing: the pair state records
 * `hiddenEmptyAt: epoch` at that stop, so the start creates an empty hidden disk and keeps the
 * restore point (no restore-point-lost, UpToDate, promotable to that checkpoint), and the primary
 * reconnects with a bitmap resync of its writes since, not a full one. The record goes before the
 * replica export takes a write: a kill -9 after copies into hidden, then hidden deleted, is a
 * lost restore point as before (test/pair/checkpoint-identity.test.ts has the clean stop with
 * copies in hidden).
 */
import { join } from 'node:path';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { eventsOf, pairOf, firstCheckpoint } from '../support/control.js';
import { openLink, writerClient } from './scripted-primary.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 4 * MiB;
const json = <T = Record<string, unknown>>(stdout: string): T => JSON.parse(stdout) as T;

/** A primary (disk of 0x42) replicating to a secondary (blank disk), both daemons, at checkpoint 1. */
async function pairAtCheckpoint1() {
  const dir = await makeTempDir();
  const p = (f: string): string => join(dir, f);
  const pData = Buffer.alloc(SIZE, 0x42);
  await writeFile(p('p.img'), pData);
  await writeFile(p('s.img'), Buffer.alloc(SIZE));
  const sArgs = [p('s.img'), '--secondary', '--socket', p('s.sock'), '--control', p('sctl')];
  const secondary = await serve(sArgs);
  const primary = await serve([p('p.img'), '--socket', p('p.sock'), '--control', p('pctl'), '--replicate-to', unixUri(p('s.sock'))]);
  await firstCheckpoint(p('pctl'), 60_000);
  return { p, pData, sArgs, primary, secondary };
}

interface SecondaryStatus {
  epoch: number;
  diskState: string;
  secondary: { noRestorePoint: string | null; hiddenRecreated: string | null };
}

async function primaryWrite(sock: string, offset: number, data: Buffer): Promise<void> {
  const c = await NbdClient.connect({ uri: unixUri(sock), reconnect: false, closeTimeoutMs: 2000 });
  await c.write(offset, data);
  await c.flush();
  await c.close();
}

/** clusters the hidden disk maps itself (qemu-img map: depth 0 = data in that file) */
async function hiddenDataBytes(path: string): Promise<number> {
  const r = await run('qemu-img', ['map', '-U', '--output=json', path]);
  expect(r.code, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as Array<{ depth: number; length: number; data: boolean }>).filter((e) => e.depth === 0 && e.data).reduce((s, e) => s + e.length, 0);
}

describe('a secondary whose hidden disk was empty at its clean stop, restarted without it', () => {
  it('keeps its restore point: not Inconsistent, epoch 2, a bitmap resync of the primary\'s writes since, disks equal', async () => {
    const { p, pData, sArgs, primary, secondary } = await pairAtCheckpoint1();
    let s = secondary;
    await primaryWrite(p('p.sock'), MiB, Buffer.alloc(MiB, 0x5a));
    pData.fill(0x5a, MiB, 2 * MiB);
    expect(await hiddenDataBytes(p('s.img.hidden.qcow2'))).toBe(MiB);
    const cp = await runCli(['checkpoint', '--control', p('pctl'), '--json']);
    expect(json<{ epoch: number }>(cp.stdout).epoch).toBe(2);
    // a clean stop right after the checkpoint: hidden maps nothing, recorded at epoch 2
    expect(await s.stop()).toBe(0);
    // (Consistent: the link went down with the stop, as with a hidden disk kept)
    expect(JSON.parse(await readFile(p('s.img.pair.json'), 'utf8'))).toMatchObject({ epoch: 2, committing: null, diskState: 'Consistent', hiddenEmptyAt: 2 });
    const pEv = await eventsOf(p('pctl'), 60_000);
    // the primary writes on while the secondary is down: its peer bitmap marks 128 KiB
    await primaryWrite(p('p.sock'), 3 * MiB, Buffer.alloc(128 * KiB, 0x77));
    pData.fill(0x77, 3 * MiB, 3 * MiB + 128 * KiB);
    // the "reboot": hidden and active (a tmpfs) are gone
    await rm(p('s.img.hidden.qcow2'));
    await rm(p('s.img.active.qcow2'));

    s = await serve(sArgs);
    expect(s.stderr()).not.toContain('was absent at start (deleted');
    const mark = pEv.events.length;
    const resync = await pEv.next('resync-started', mark);
    expect(resync).toMatchObject({ event: 'resync-started', full: false, bytes: 128 * KiB });
    expect(await pEv.next('resync-done', mark)).toMatchObject({ event: 'resync-done', bytes: 128 * KiB });
    await waitFor(async () => ((await pairOf(p('pctl'))).epoch === 3 ? true : undefined), 'checkpoint 3 after the resync', { timeoutMs: 60_000 });
    await pEv.close();
    const sec = await pairOf<SecondaryStatus>(p('sctl'));
    expect(sec).toMatchObject({ epoch: 3, diskState: 'UpToDate', secondary: { noRestorePoint: null, hiddenRecreated: null } });
    // the record went at the start: the replica export wrote copies into hidden since
    expect((JSON.parse(await readFile(p('s.img.pair.json'), 'utf8')) as { hiddenEmptyAt?: number | null }).hiddenEmptyAt).toBe(null);
    expect(await primary.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    expect((await readFile(p('s.img'))).equals(pData)).toBe(true);
    expect((await readFile(p('p.img'))).equals(pData)).toBe(true);
  }, 120_000);

  it('no restore point lost (state, status: nothing was lost), failover --dry-run says why, and failover --to checkpoint gives CP_2 exactly', async () => {
    const { p, pData, sArgs, primary, secondary } = await pairAtCheckpoint1();
    let s = secondary;
    await primaryWrite(p('p.sock'), 0, Buffer.alloc(MiB, 0x5a));
    pData.fill(0x5a, 0, MiB);
    expect(json<{ epoch: number }>((await runCli(['checkpoint', '--control', p('pctl'), '--json'])).stdout).epoch).toBe(2);
    const cp2 = Buffer.from(pData);
    expect(await primary.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    await rm(p('s.img.hidden.qcow2'));

    s = await serve(sArgs);
    const msg = 'hidden was empty at the clean stop of epoch 2: nothing lost';
    expect(s.stderr()).toContain(`the hidden disk ${p('s.img.hidden.qcow2')} was absent at start and was created empty: ${msg}`);
    const sec = await pairOf<SecondaryStatus>(p('sctl'));
    // Consistent, not Inconsistent: a secondary without its primary at checkpoint 2, as with its hidden disk kept
    expect(sec).toMatchObject({ epoch: 2, diskState: 'Consistent', secondary: { noRestorePoint: null, hiddenRecreated: expect.stringContaining(msg) } });
    expect(JSON.parse(await readFile(p('s.img.pair.json'), 'utf8'))).toMatchObject({ epoch: 2, diskState: 'Consistent', hiddenEmptyAt: null });
    expect((JSON.parse(await readFile(p('s.img.pair.json'), 'utf8')) as { restorePointLost?: string | null }).restorePointLost ?? null).toBe(null);
    expect((await runCli(['status', '--control', p('sctl')])).stdout).toContain(msg);
    const dry = json<{ allowed: boolean; rule: string; epoch: number; explanation: string }>((await runCli(['failover', '--control', p('sctl'), '--dry-run', '--json'])).stdout);
    expect(dry).toMatchObject({ allowed: true, rule: 'failover-to-checkpoint', epoch: 2 });
    expect(dry.explanation).toContain(msg);
    const fo = await runCli(['failover', '--control', p('sctl'), '--to', 'checkpoint', '--json']);
    expect(fo.code, fo.stdout + fo.stderr).toBe(0);
    expect(json(fo.stdout)).toMatchObject({ to: 'checkpoint', epoch: 2 });
    expect(await s.stop()).toBe(0);
    expect((await readFile(p('s.img'))).equals(cp2)).toBe(true);
  }, 120_000);

  it('kill -9 after copies into hidden (the record went at the start), hidden deleted: the restore point is lost', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(SIZE, 0x11));
    const args = [disk, '--secondary', '--socket', join(dir, 'nbd.sock'), '--control', join(dir, 'ctl.sock')];
    const stateOf = async () => JSON.parse(await readFile(`${disk}.pair.json`, 'utf8')) as Record<string, unknown>;
    let s = await serve(args);
    let link = await openLink(join(dir, 'nbd.sock'), { size: SIZE });
    expect(await link.checkpoint(1)).toMatchObject({ type: 'done', epoch: 1 });
    link.close();
    expect(await s.stop()).toBe(0);
    expect(await stateOf()).toMatchObject({ epoch: 1, hiddenEmptyAt: 1 });

    s = await serve(args);
    // cleared before the replica export takes a write
    expect((await stateOf()).hiddenEmptyAt).toBe(null);
    link = await openLink(join(dir, 'nbd.sock'), { size: SIZE, gi: (await stateOf()).gi as { current: string; bitmap: string; history: string[] } });
    const c = await writerClient(join(dir, 'nbd.sock'), link);
    await c.write(MiB, Buffer.alloc(64 * KiB, 0x22));
    await c.flush();
    expect(await hiddenDataBytes(`${disk}.hidden.qcow2`)).toBe(64 * KiB);
    s.child.kill('SIGKILL');
    await s.waitExit();
    await c.close().catch(() => {});
    link.close();
    await rm(`${disk}.hidden.qcow2`);

    s = await serve(args);
    expect(s.stderr()).toContain(`the hidden disk ${disk}.hidden.qcow2 was absent at start`);
    expect(await stateOf()).toMatchObject({ epoch: 1, diskState: 'Inconsistent', restorePointLost: expect.stringContaining('writes made after checkpoint 1 whose old data is gone'), hiddenEmptyAt: null });
    const dry = json<{ allowed: boolean; refusal: { code: string } }>((await runCli(['failover', '--control', join(dir, 'ctl.sock'), '--dry-run', '--json'])).stdout);
    expect(dry).toMatchObject({ allowed: false, refusal: { code: 'ERR_PAIR_INCONSISTENT' } });
    // a clean stop now records nothing: there is no restore point to keep
    expect(await s.stop()).toBe(0);
    expect((await stateOf()).hiddenEmptyAt ?? null).toBe(null);
  }, 120_000);

  it('--hidden-durability volatile on a "tmpfs": a reboot after a clean stop right after a checkpoint (another boot id, hidden gone) keeps the restore point', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(SIZE, 0x11));
    const bootFile = join(dir, 'boot_id');
    await writeFile(bootFile, '11111111-1111-4111-8111-111111111111\n');
    const args = [disk, '--secondary', '--socket', join(dir, 'nbd.sock'), '--control', join(dir, 'ctl.sock'), '--hidden-durability', 'volatile'];
    const env = { ...process.env, BLKREP_TEST_BOOT_ID_FILE: bootFile };
    const stateOf = async () => JSON.parse(await readFile(`${disk}.pair.json`, 'utf8')) as Record<string, unknown>;
    let s = await serve(args, { env });
    const link = await openLink(join(dir, 'nbd.sock'), { size: SIZE });
    const c = await writerClient(join(dir, 'nbd.sock'), link);
    await c.write(MiB, Buffer.alloc(MiB, 0x22));
    await c.flush();
    expect(await hiddenDataBytes(`${disk}.hidden.qcow2`)).toBe(MiB);
    expect(await link.checkpoint(1)).toMatchObject({ type: 'done', epoch: 1 });
    await c.close();
    link.close();
    expect(await s.stop()).toBe(0);
    expect(await stateOf()).toMatchObject({ epoch: 1, volatileHidden: null, hiddenEmptyAt: 1 });
    await writeFile(bootFile, '22222222-2222-4222-8222-222222222222\n');
    await rm(`${disk}.hidden.qcow2`);
    await rm(`${disk}.active.qcow2`);
    s = await serve(args, { env });
    expect(s.stderr()).toContain('hidden was empty at the clean stop of epoch 1: nothing lost');
    expect(await stateOf()).toMatchObject({ epoch: 1, diskState: 'Consistent', volatileHidden: { bootId: '22222222-2222-4222-8222-222222222222' }, hiddenEmptyAt: null });
    expect((await stateOf()).restorePointLost ?? null).toBe(null);
    expect((await pairOf<SecondaryStatus>(join(dir, 'ctl.sock'))).secondary.noRestorePoint).toBe(null);
    expect(await s.stop()).toBe(0);
    const cp1 = Buffer.alloc(SIZE, 0x11);
    cp1.fill(0x22, MiB, 2 * MiB);
    expect((await readFile(disk)).equals(cp1)).toBe(true);
  }, 60_000);

  it('a state file whose hiddenEmptyAt is not an epoch: the start fails ERR_PAIR_STATE naming the field', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(SIZE));
    const args = [disk, '--secondary', '--socket', join(dir, 'nbd.sock')];
    const s = await serve(args);
    expect(await s.stop()).toBe(0);
    const st = JSON.parse(await readFile(`${disk}.pair.json`, 'utf8')) as Record<string, unknown>;
    await writeFile(`${disk}.pair.json`, JSON.stringify({ ...st, hiddenEmptyAt: 'yes' }));
    const r = await runCli(['serve-nbd', ...args, '--json']);
    expect(r.code).toBe(1);
    const e = json<{ error: { code: string; message: string } }>(r.stdout.trim().split('\n')[0]!).error;
    expect(e.code).toBe('ERR_PAIR_STATE');
    expect(e.message).toBe(`the pair state ${disk}.pair.json has hiddenEmptyAt "yes", not an epoch (a non-negative integer) or null`);
    // an older build's state (no field) starts as before
    delete st.hiddenEmptyAt;
    await writeFile(`${disk}.pair.json`, JSON.stringify(st));
    const again = await serve(args);
    expect(await again.stop()).toBe(0);
  }, 60_000);
});
