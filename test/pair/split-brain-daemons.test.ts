/**
 * Split brain on two daemons (separate processes): the secondary is promoted while the primary
 * lives on, and both write apart. The old primary restarts as `--secondary` and the new primary
 * replicates to it: the generations say split brain (rule 90). By default the link is refused
 * and explained (replicate's error, the secondary's status and `failover --dry-run`, the event
 * split-brain); each --after-split-brain policy keeps the documented side; when the secondary's
 * data loses, its diverged clusters go to a salvage overlay first, which reads exactly as the
 * secondary's disk did before (qemu-img convert + cmp, qemu-io read -P), and the disks end equal.
 */
import { join } from 'node:path';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import type { PairStatus } from '../../src/pair/role.js';
import { makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { controlRequest as request, pairOf, firstCheckpoint } from '../support/control.js';
import { writeFlushed } from '../support/pair-bytes.js';

const MiB = 1 << 20;
const SIZE = 32 * MiB;

interface Ev {
  event: string;
  [k: string]: unknown;
}

type SecondaryStatus = PairStatus & {
  secondary: {
    splitBrain: { rule: number; policy: string; keeps: 'primary' | 'secondary' | null; changedBytes: { secondary: number; primary: number }; explanation: string } | null;
    salvage: Array<{ path: string; complete: boolean; createdAt: string | null }>;
  };
};

describe('split brain on two daemons: policies and salvage', () => {
  it('refused and explained by default; each policy keeps its side; the loser is salvaged; disks equal', async () => {
    const dir = await makeTempDir();
    const aImg = join(dir, 'a.img');
    const bImg = join(dir, 'b.img');
    const content = Buffer.alloc(SIZE);
    for (let m = 0; m < SIZE / MiB; m++) content.fill(m + 1, m * MiB, (m + 1) * MiB);
    await writeFile(aImg, content);
    await writeFile(bImg, Buffer.alloc(SIZE));
    const aSock = join(dir, 'a.sock');
    const bSock = join(dir, 'b.sock');
    const aCtl = join(dir, 'a.ctl');
    const bCtl = join(dir, 'b.ctl');
    const b = await serve([bImg, '--secondary', '--socket', bSock, '--control', bCtl, '--node-name', 'b']);
    const a = await serve([aImg, '--socket', aSock, '--control', aCtl, '--replicate-to', unixUri(bSock), '--node-name', 'a']);
    await firstCheckpoint(aCtl, 60_000);

    // B is promoted while A lives on: A is demoted on the link and tracks its writes; both write apart
    expect(await request<{ role: string }>(bCtl, 'failover', {})).toMatchObject({ role: 'primary' });
    await waitFor(async () => (await pairOf(aCtl)).link === 'degraded', 'A degraded by the demote', { timeoutMs: 10_000 });
    await writeFlushed(aSock, 4 * MiB, 0xa5, MiB);
    await writeFlushed(bSock, 20 * MiB, 0xb5, 3 * MiB);
    expect(await a.stop()).toBe(0);
    const aBefore = join(dir, 'a-before.img');
    await copyFile(aImg, aBefore);

    const aArgs = [aImg, '--secondary', '--socket', aSock, '--control', aCtl, '--node-name', 'a'];
    const replicate = () => runCli(['replicate', '--control', bCtl, unixUri(aSock), '--json']);
    type PrimarySide = PairStatus & { splitBrain?: { at: string; rule: number | null; explanation: string }; refused?: { code: string; message: string } };
    const refusedWith = async (extra: string[]): Promise<{ message: string; status: SecondaryStatus; events: Ev[]; dry: { explanation: string; splitBrain?: unknown }; b: { status: PrimarySide; text: string; events: Ev[] } }> => {
      const a2 = await serve([...aArgs, ...extra]);
      const events: Ev[] = [];
      const ec = await ControlClient.connect(aCtl);
      await ec.subscribe(undefined, (e) => events.push(e as unknown as Ev));
      const bEvents: Ev[] = [];
      const bc = await ControlClient.connect(bCtl);
      await bc.subscribe(undefined, (e) => bEvents.push(e as unknown as Ev));
      try {
        const r = await replicate();
        expect(r.code).toBe(1);
        const err = (JSON.parse(r.stdout) as { error: { code: string; message: string } }).error;
        expect(err.code).toBe('ERR_PAIR_SPLIT_BRAIN');
        await waitFor(() => events.find((e) => e.event === 'split-brain'), 'event split-brain', { timeoutMs: 10_000 });
        const status = await pairOf<SecondaryStatus>(aCtl);
        const dry = await request<{ explanation: string; splitBrain?: unknown }>(aCtl, 'failover', { dryRun: true });
        // the side that ran replicate (B) keeps the export in the pair: link split-brain, the
        // explanation, and the event, in status --json and in the text
        await waitFor(() => bEvents.find((e) => e.event === 'split-brain'), 'event split-brain on B', { timeoutMs: 10_000 });
        const bStatus = JSON.parse((await runCli(['status', '--control', bCtl, '--json'])).stdout) as { exports: Array<{ pair?: PrimarySide }> };
        const text = await runCli(['status', '--control', bCtl]);
        expect(text.code, text.stderr).toBe(0);
        return { message: err.message, status, events, dry, b: { status: bStatus.exports.find((e) => e.pair)!.pair!, text: text.stdout, events: bEvents } };
      } finally {
        await ec.close();
        await bc.close();
        expect(await a2.stop()).toBe(0);
      }
    };

    // default: refused and explained, nothing copied
    const none = await refusedWith([]);
    expect(none.message).toMatch(/rule 90/);
    expect(none.message).toMatch(/--after-split-brain/);
    expect(none.status.link).toBe('split-brain');
    expect(none.status.secondary.splitBrain).toMatchObject({ rule: 90, policy: 'disconnect', keeps: null, changedBytes: { secondary: MiB, primary: 3 * MiB } });
    expect(none.events.find((e) => e.event === 'split-brain')).toMatchObject({ rule: 90, policy: 'disconnect', keeps: null, resolved: false });
    expect(none.dry.splitBrain).toMatchObject({ rule: 90, keeps: null });
    expect(none.dry.explanation).toMatch(/split brain with b/);
    // B (the primary that ran replicate): split-brain with the secondary's explanation, and the event
    expect(none.b.status).toMatchObject({ role: 'primary', link: 'split-brain', peer: unixUri(aSock), splitBrain: { rule: 90, explanation: none.status.secondary.splitBrain!.explanation }, refused: { code: 'ERR_PAIR_SPLIT_BRAIN' } });
    // what A misses: B's 3 MiB written since the failover (the failback bitmap), kept for the next replicate
    expect(none.b.status.bytesBehind).toBe(3 * MiB);
    expect(none.b.events.find((e) => e.event === 'split-brain')).toEqual({ event: 'split-brain', time: expect.any(String), export: '', peer: unixUri(aSock), side: 'primary', rule: 90, resolved: false, explanation: none.status.secondary.splitBrain!.explanation });
    expect(none.b.text).toContain(`link split-brain`);
    expect(none.b.text).toContain(`      split brain: ${none.status.secondary.splitBrain!.explanation}\n`);
    expect(await cmp(aImg, aBefore)).toBe(0);

    // discard-zero-changes: both changed, so it does not decide: refused
    const zero = await refusedWith(['--after-split-brain', 'discard-zero-changes']);
    expect(zero.status.secondary.splitBrain).toMatchObject({ policy: 'discard-zero-changes', keeps: null });
    expect(zero.message).toMatch(/both nodes changed data/);

    // discard-younger-primary: B was promoted after A became primary: B's data is discarded, so the
    // secondary keeps its data and must be the source: refused with that advice
    const younger = await refusedWith(['--after-split-brain', 'discard-younger-primary']);
    expect(younger.status.secondary.splitBrain).toMatchObject({ policy: 'discard-younger-primary', keeps: 'secondary' });
    expect(younger.message).toMatch(/fail it over here/);
    expect(younger.status.link).toBe('split-brain');

    // discard-node=b: the same side
    const nodeB = await refusedWith(['--after-split-brain', 'discard-node=b']);
    expect(nodeB.status.secondary.splitBrain).toMatchObject({ policy: 'discard-node=b', keeps: 'secondary' });
    expect(await cmp(aImg, aBefore)).toBe(0);
    expect(nodeB.status.secondary.salvage).toEqual([]);

    // discard-least-changes: A changed 1 MiB, B 3 MiB: A loses; salvaged first, then resynced
    const a3 = await serve([...aArgs, '--after-split-brain', 'discard-least-changes']);
    const events: Ev[] = [];
    const ec = await ControlClient.connect(aCtl);
    await ec.subscribe(undefined, (e) => events.push(e as unknown as Ev));
    const r = await replicate();
    expect(r.code).toBe(0);
    await waitFor(() => events.find((e) => e.event === 'checkpoint'), 'the checkpoint after the resync', { timeoutMs: 60_000 });
    await ec.close();
    expect(events.find((e) => e.event === 'split-brain')).toMatchObject({ rule: 90, policy: 'discard-least-changes', keeps: 'primary', resolved: true });
    const salvageEv = events.find((e) => e.event === 'salvage')!;
    expect(salvageEv.bytes).toBe(4 * MiB);
    const st = await pairOf<SecondaryStatus>(aCtl);
    expect(st.secondary.salvage).toHaveLength(1);
    const overlay = st.secondary.salvage[0]!;
    expect(overlay).toMatchObject({ path: salvageEv.path, complete: true });
    expect(overlay.path).toMatch(/a\.img\.salvage-\d{8}T\d{6}Z\.qcow2$/);
    expect(await a3.stop()).toBe(0);
    expect(await b.stop()).toBe(0);
    // the disks are equal, and hold B's data
    expect(await cmp(aImg, bImg)).toBe(0);
    const after = await readFile(aImg);
    expect(after.subarray(4 * MiB, 5 * MiB).every((x) => x === 5)).toBe(true);
    expect(after.subarray(20 * MiB, 23 * MiB).every((x) => x === 0xb5)).toBe(true);
    // the salvage overlay over the resynced disk reads as A's disk did before
    const io = await run('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -P 0xa5 ${4 * MiB} ${MiB}`, '-c', `read -P 21 ${20 * MiB} ${MiB}`, overlay.path]);
    expect(io.code).toBe(0);
    expect(io.stdout).not.toMatch(/Pattern verification failed/);
    const raw = join(dir, 'salvaged.raw');
    expect((await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay.path, raw])).code).toBe(0);
    expect(await cmp(raw, aBefore)).toBe(0);
  }, 240_000);
});

async function cmp(x: string, y: string): Promise<number> {
  return (await run('cmp', [x, y])).code ?? -1;
}
