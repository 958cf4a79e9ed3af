/**
 * The secondary's "committed already" answer (checkpoint N <= its epoch) is given only to the
 * request that committed the epoch (the primary's node id and the request's id, recorded with
 * the epoch: state.ts checkpointBy); any other is refused with ERR_PAIR_STATE, the epoch it holds,
 * and the event checkpoint-failed. A primary numbers its checkpoints after the epoch the secondary
 * says it holds (welcome, a refusal, an abort's answer).
 *
 * Before: a secondary whose epoch had moved by other means (here: checkpoints taken for a plain
 * primary, then a blkrep primary) answered the primary's checkpoints 1..epoch DONE without
 * emptying its hidden disk; the primary counted them taken, the secondary stayed Inconsistent
 * after the resync, and a forced failover went back to the secondary's data before the resync.
 */
import { join } from 'node:path';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import type { PairStatus } from '../../src/pair/role.js';
import { makeTempDir, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { controlRequest, eventsOf, pairOf, firstCheckpoint } from '../support/control.js';
import { openLink } from './scripted-primary.js';

const MiB = 1 << 20;
const json = <T = Record<string, unknown>>(stdout: string): T => JSON.parse(stdout) as T;

describe('checkpoint identity: a blkrep primary after checkpoints taken for a plain primary', () => {
  it('the primary numbers after the secondary\'s epoch: the hidden disk is emptied, and a failover after kill -9 gives the primary\'s bytes', async () => {
    const dir = await makeTempDir();
    const p = (f: string): string => join(dir, f);
    const SIZE = 4 * MiB;
    await writeFile(p('s.img'), Buffer.alloc(SIZE, 0x41));
    const pData = Buffer.alloc(SIZE, 0x42);
    await writeFile(p('p.img'), pData);
    const s = await serve([p('s.img'), '--secondary', '--accept-plain-primary', '--socket', p('s.sock'), '--control', p('sctl')]);
    for (let i = 1; i <= 3; i++) {
      const r = await runCli(['checkpoint', '--control', p('sctl'), '--json']);
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(json<{ epoch: number }>(r.stdout).epoch).toBe(i);
    }
    const primary = await serve([p('p.img'), '--socket', p('p.sock'), '--control', p('pctl'), '--replicate-to', unixUri(p('s.sock'))]);
    // the checkpoint after the initial full sync
    const first = await waitFor(async () => {
      const st = await pairOf(p('pctl'));
      return st.lastCheckpointAgeMs !== null ? st : undefined;
    }, 'the primary\'s checkpoint after its resync', { timeoutMs: 60_000 });
    expect(first).toMatchObject({ link: 'connected', epoch: 4, peerKind: 'blkrep' });
    const sec = await pairOf<PairStatus & { secondary: Record<string, unknown> }>(p('sctl'));
    expect(sec).toMatchObject({ epoch: 4, diskState: 'UpToDate', link: 'connected' });
    // the link's peer on a Unix socket is the socket's path, not "unix"
    expect(sec.peer).toBe(`unix:${p('s.sock')}`);
    expect(json<{ hiddenBytes: number; allowed: boolean }>((await runCli(['failover', '--control', p('sctl'), '--dry-run', '--json'])).stdout)).toMatchObject({ epoch: 4, hiddenBytes: 0, allowed: true });
    const state = JSON.parse(await readFile(p('s.img.pair.json'), 'utf8')) as { checkpointBy: { nodeId: string; id: string } };
    const pState = JSON.parse(await readFile(p('p.img.pair.json'), 'utf8')) as { nodeId: string; epoch: number };
    expect(pState.epoch).toBe(4);
    expect(state.checkpointBy.nodeId).toBe(pState.nodeId);
    expect(state.checkpointBy.id).toMatch(/^[0-9a-f]{16}$/);

    // 1 MiB more through the primary, a checkpoint, kill -9, failover to it: the primary's bytes exactly
    const c = await NbdClient.connect({ uri: unixUri(p('p.sock')), reconnect: false, closeTimeoutMs: 2000 });
    await c.write(MiB, Buffer.alloc(MiB, 0x5a));
    await c.flush();
    await c.close();
    pData.fill(0x5a, MiB, 2 * MiB);
    const cp = await runCli(['checkpoint', '--control', p('pctl'), '--json']);
    expect(json<{ epoch: number }>(cp.stdout).epoch).toBe(5);
    await primary.stop('SIGKILL');
    const fo = await runCli(['failover', '--control', p('sctl'), '--json']);
    expect(fo.code, fo.stdout + fo.stderr).toBe(0);
    expect(json(fo.stdout)).toMatchObject({ to: 'checkpoint', epoch: 5 });
    expect(await s.stop()).toBe(0);
    expect((await readFile(p('s.img'))).equals(pData)).toBe(true);
  }, 120_000);
});

describe('checkpoint identity: the secondary\'s answer to a number it committed already (scripted primaries)', () => {
  it('DONE only to the request that committed it; any other: failed ERR_PAIR_STATE with the epoch, event checkpoint-failed', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    const SIZE = 4 * MiB;
    await writeFile(disk, Buffer.alloc(SIZE, 0x11));
    const control = join(dir, 'ctl.sock');
    await serve([disk, '--secondary', '--socket', join(dir, 'nbd.sock'), '--control', control]);
    const ev = await eventsOf(control);

    const a = await openLink(join(dir, 'nbd.sock'), { size: SIZE });
    expect(a.answer).toMatchObject({ type: 'welcome', epoch: 0 });
    expect(await a.checkpoint(1, 10_000, { id: 'a1', nodeId: a.nodeId })).toMatchObject({ type: 'done', n: 1, epoch: 1 });
    // the same request again (its DONE lost): committed already
    expect(await a.checkpoint(1, 10_000, { id: 'a1', nodeId: a.nodeId })).toMatchObject({ type: 'done', n: 1, epoch: 1 });
    // another request with the same number: refused, with the epoch held
    const other = await a.checkpoint(1, 10_000, { id: 'a2', nodeId: a.nodeId });
    expect(other).toMatchObject({ type: 'failed', n: 1, code: 'ERR_PAIR_STATE', epoch: 1 });
    expect((other as { message: string }).message).toBe(
      `checkpoint 1 refused: this secondary holds epoch 1, committed by checkpoint request a1 of node ${a.nodeId}, not by this request (node ${a.nodeId}, id a2); answering "committed already" would leave its overlays holding CP_1 while the primary counts checkpoint 1 as taken now. A primary numbers its next checkpoint after epoch 1 (an older blkrep primary does not: upgrade it)`,
    );
    const failed = await ev.next('checkpoint-failed');
    expect(failed).toMatchObject({ event: 'checkpoint-failed', export: '', n: 1, code: 'ERR_PAIR_STATE', epoch: 1 });
    // an older primary's request (no id) from the same node: not the one that committed epoch 1
    expect(await a.checkpoint(1)).toMatchObject({ type: 'failed', n: 1, code: 'ERR_PAIR_STATE', epoch: 1 });
    // a request naming another node than the link's hello
    expect(await a.checkpoint(2, 10_000, { id: 'x', nodeId: 'someone-else' })).toMatchObject({ type: 'failed', n: 2, code: 'ERR_PAIR_PROTOCOL', epoch: 1 });
    a.close();
    await waitFor(async () => (await pairOf(control)).link === 'none', 'the link from a to go');

    // an older primary (no ids) on another node: its checkpoint 1 is not the one that committed epoch 1
    const b = await openLink(join(dir, 'nbd.sock'), { size: SIZE });
    expect(b.answer).toMatchObject({ type: 'welcome', epoch: 1 });
    expect(await b.checkpoint(1)).toMatchObject({ type: 'failed', n: 1, code: 'ERR_PAIR_STATE', epoch: 1 });
    expect(await b.checkpoint(2)).toMatchObject({ type: 'done', n: 2, epoch: 2 });
    // its own retry of 2 (an older primary whose DONE was lost): committed already, as before
    expect(await b.checkpoint(2)).toMatchObject({ type: 'done', n: 2, epoch: 2 });
    expect(JSON.parse(await readFile(`${disk}.pair.json`, 'utf8'))).toMatchObject({ epoch: 2, committing: null, checkpointBy: { nodeId: b.nodeId, id: null } });
    b.close();
    await ev.close();
    // the status line names the epoch; the secondary took no checkpoint for the refused requests
    expect((await controlRequest<{ exports: Array<{ pair?: { epoch: number } }> }>(control, 'status')).exports[0]!.pair!.epoch).toBe(2);
  }, 60_000);
});

describe('a secondary restarted without its hidden disk', () => {
  it('is Inconsistent with no restore point (failover refused) and takes a full resync: the missing hidden disk held CP_1\'s old data', async () => {
    const dir = await makeTempDir();
    const p = (f: string): string => join(dir, f);
    const SIZE = 4 * MiB;
    const pData = Buffer.alloc(SIZE, 0x42);
    await writeFile(p('p.img'), pData);
    await writeFile(p('s.img'), Buffer.alloc(SIZE));
    const sArgs = [p('s.img'), '--secondary', '--socket', p('s.sock'), '--control', p('sctl')];
    const pArgs = [p('p.img'), '--socket', p('p.sock'), '--control', p('pctl'), '--replicate-to', unixUri(p('s.sock'))];
    let s = await serve(sArgs);
    let primary = await serve(pArgs);
    await firstCheckpoint(p('pctl'), 60_000);
    const c = await NbdClient.connect({ uri: unixUri(p('p.sock')), reconnect: false, closeTimeoutMs: 2000 });
    await c.write(MiB, Buffer.alloc(MiB, 0x5a));
    await c.flush();
    await c.close();
    pData.fill(0x5a, MiB, 2 * MiB);
    expect(json<{ hiddenBytes: number }>((await runCli(['failover', '--control', p('sctl'), '--dry-run', '--json'])).stdout).hiddenBytes).toBe(MiB);
    expect(await primary.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    // hidden held copies at the clean stop: nothing recorded empty
    expect((JSON.parse(await readFile(p('s.img.pair.json'), 'utf8')) as { hiddenEmptyAt?: number | null }).hiddenEmptyAt ?? null).toBe(null);
    await rm(p('s.img.hidden.qcow2'));

    s = await serve(sArgs);
    expect(s.stderr()).toContain(`the hidden disk ${p('s.img.hidden.qcow2')} was absent at start`);
    const sec = await pairOf<PairStatus & { secondary: { noRestorePoint: string | null } }>(p('sctl'));
    expect(sec).toMatchObject({ epoch: 1, diskState: 'Inconsistent' });
    expect(sec.secondary.noRestorePoint).toMatch(/^the hidden disk .* was absent at start .*: the disk may hold writes made after checkpoint 1 whose old data is gone$/);
    const dry = json<{ allowed: boolean; refusal: { code: string } }>((await runCli(['failover', '--control', p('sctl'), '--dry-run', '--json'])).stdout);
    expect(dry).toMatchObject({ allowed: false, refusal: { code: 'ERR_PAIR_INCONSISTENT' } });

    primary = await serve(pArgs);
    const after = await waitFor(async () => {
      const st = await pairOf(p('pctl'));
      return st.epoch === 2 ? st : undefined;
    }, 'checkpoint 2 after the resync', { timeoutMs: 60_000 });
    expect((after as unknown as { lastResync: { full: boolean; bytes: number } }).lastResync).toMatchObject({ full: true, bytes: SIZE });
    expect(await pairOf(p('sctl'))).toMatchObject({ epoch: 2, diskState: 'UpToDate' });
    expect(await primary.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    expect((await readFile(p('s.img'))).equals(pData)).toBe(true);
  }, 120_000);
});
