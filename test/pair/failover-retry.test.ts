/**
 * A failover that fails halfway (replication.md §4 failure case 7) with the fault hook
 * BLKREP_TEST_FAIL_AT=failover-<step> (the step fails once with EIO): `failover` exits 1 with
 * ERR_PAIR_FAILOVER_FAILED, the event failover-failed names the step, the node stays a secondary
 * that refuses primaries and checkpoints, the view shows the checkpoint plus its own writes (and
 * takes writes), a daemon restart keeps that state; `failover --retry` finishes and the disk
 * holds exactly the view.
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { makeTempDir, runCli, serve, waitFor, type Served } from '../support/spawn.js';
import { dataClient, openLink, writerClient } from './scripted-primary.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

interface Ev {
  event: string;
  [k: string]: unknown;
}

async function failover(control: string, ...flags: string[]): Promise<{ code: number; json: Record<string, unknown> }> {
  const r = await runCli(['failover', '--control', control, '--json', ...flags]);
  return { code: r.code ?? -1, json: JSON.parse(r.stdout) as Record<string, unknown> };
}

async function secondaryStatus(control: string): Promise<Record<string, unknown>> {
  const c = await ControlClient.connect(control);
  try {
    const s = (await c.request('status')) as { exports: Array<{ pair?: Record<string, unknown> }> };
    return s.exports.find((e) => e.pair)!.pair!;
  } finally {
    await c.close();
  }
}

async function readAll(socket: string, name: string): Promise<Buffer> {
  const c = await dataClient(socket, name);
  try {
    const b = Buffer.alloc(SIZE);
    await c.read(0, b);
    return b;
  } finally {
    await c.close();
  }
}

/** A secondary at checkpoint 0 (the disk all 0x11) whose primary wrote 0x22 over [1, 2) MiB and whose view wrote 0x33 over [3, 3.0625) MiB. */
async function setUp(step: string, durability: 'strict' | 'volatile' = 'strict'): Promise<{ dir: string; args: string[]; s: Served; socket: string; control: string; expected: Buffer }> {
  const dir = await makeTempDir();
  const disk = join(dir, 'disk.img');
  await writeFile(disk, Buffer.alloc(SIZE, 0x11));
  const socket = join(dir, 'nbd.sock');
  const control = join(dir, 'ctl.sock');
  const args = [disk, '--secondary', '--socket', socket, '--control', control, '--view-export', 'view', '--hidden-durability', durability];
  const s = await serve(args, { env: { ...process.env, BLKREP_TEST_FAIL_AT: `failover-${step}` } });
  const link = await openLink(socket, { size: SIZE });
  expect(link.answer.type).toBe('welcome');
  const c = await writerClient(socket, link);
  await c.write(MiB, Buffer.alloc(MiB, 0x22));
  await c.flush();
  await c.close();
  const v = await dataClient(socket, 'view');
  await v.write(3 * MiB, Buffer.alloc(65536, 0x33));
  await v.flush();
  await v.close();
  link.close();
  const expected = Buffer.alloc(SIZE, 0x11);
  expected.fill(0x33, 3 * MiB, 3 * MiB + 65536);
  return { dir, args, s, socket, control, expected };
}

describe('failover that fails halfway, and failover --retry', () => {
  it('fails at commit-active: failover-failed names the step, primaries and checkpoints are refused, the view works; --retry finishes', async () => {
    const { socket, control, expected } = await setUp('commit-active');
    // nothing to retry yet
    const none = await failover(control, '--retry');
    expect(none.code).toBe(1);
    expect(none.json.error).toMatchObject({ code: 'ERR_PAIR_STATE' });

    const events: Ev[] = [];
    const ec = await ControlClient.connect(control);
    await ec.subscribe(undefined, (e) => events.push(e as unknown as Ev));
    try {
      const bad = await failover(control);
      expect(bad.code).toBe(1);
      expect(bad.json.error).toMatchObject({ code: 'ERR_PAIR_FAILOVER_FAILED' });
      expect(String((bad.json.error as { message: string }).message)).toContain('step commit-active');
      const failed = await waitFor(() => events.find((e) => e.event === 'failover-failed'), 'event failover-failed');
      expect(failed).toMatchObject({ step: 'commit-active', code: 'ERR_TEST_FAULT', to: 'checkpoint', epoch: 0 });
      expect(await secondaryStatus(control)).toMatchObject({ role: 'secondary', secondary: { failoverFailed: { step: 'commit-active', code: 'ERR_TEST_FAULT' }, replicaExport: false } });

      // the old primary (or any) is refused; so is a checkpoint
      const again = await openLink(socket, { size: SIZE });
      expect(again.answer).toMatchObject({ type: 'refuse', code: 'ERR_PAIR_STATE' });
      again.close();
      const cp = await runCli(['checkpoint', '--control', control, '--json']);
      expect(cp.code).toBe(1);
      expect(JSON.parse(cp.stdout).error.code).toBe('ERR_PAIR_STATE');
      // a different target is refused
      const latest = await failover(control, '--to', 'latest');
      expect(latest.json.error).toMatchObject({ code: 'ERR_PAIR_STATE' });

      // the view shows the checkpoint plus the secondary's writes, and takes more (into active)
      expect((await readAll(socket, 'view')).equals(expected)).toBe(true);
      const v = await dataClient(socket, 'view');
      await v.write(5 * MiB, Buffer.alloc(4096, 0x44));
      await v.flush();
      await v.close();
      expected.fill(0x44, 5 * MiB, 5 * MiB + 4096);

      const ok = await failover(control, '--retry');
      expect(ok.code).toBe(0);
      expect(ok.json).toMatchObject({ role: 'primary', to: 'checkpoint', epoch: 0, retry: true, dryRun: false });
      expect(events.filter((e) => e.event.startsWith('failover-')).map((e) => [e.event, e.retry ?? null])).toEqual([
        ['failover-started', false],
        ['failover-failed', null],
        ['failover-started', true],
        ['failover-done', null],
      ]);
    } finally {
      await ec.close();
    }
    expect((await readAll(socket, '')).equals(expected)).toBe(true);
    expect(await secondaryStatus(control)).toMatchObject({ role: 'primary', secondary: { failoverFailed: null } });
    // promoted: nothing left to retry
    expect((await failover(control, '--retry')).json.error).toMatchObject({ code: 'ERR_PAIR_STATE' });
  });

  it.each(['strict', 'volatile'] as const)('fails at empty-overlays (commit flushed), daemon killed: after restart primaries are refused; --retry only empties; disk = view (hidden %s)', async (durability) => {
    const { dir, args, s, socket, control, expected } = await setUp('empty-overlays', durability);
    const bad = await failover(control);
    expect(bad.json.error).toMatchObject({ code: 'ERR_PAIR_FAILOVER_FAILED' });
    const state = JSON.parse(await readFile(join(dir, 'disk.img.pair.json'), 'utf8'));
    expect(state).toMatchObject({ role: 'secondary', failingOver: { to: 'checkpoint', epoch: 0, committed: true } });
    s.child.kill('SIGKILL');
    await s.waitExit();

    await serve(args);
    expect(await secondaryStatus(control)).toMatchObject({ role: 'secondary', secondary: { failoverFailed: { step: 'restart', code: 'ERR_PAIR_FAILOVER_FAILED' } } });
    const link = await openLink(socket, { size: SIZE });
    expect(link.answer).toMatchObject({ type: 'refuse', code: 'ERR_PAIR_STATE' });
    link.close();
    expect((await readAll(socket, 'view')).equals(expected)).toBe(true);
    // a plain failover with the recorded target finishes it too
    const ok = await failover(control);
    expect(ok.code).toBe(0);
    expect(ok.json).toMatchObject({ role: 'primary', epoch: 0, retry: true });
    expect((await readAll(socket, '')).equals(expected)).toBe(true);
    expect(JSON.parse(await readFile(join(dir, 'disk.img.pair.json'), 'utf8'))).toMatchObject({ role: 'primary', failingOver: null, ...(durability === 'volatile' ? { volatileHidden: null } : {}) });
  });
});
