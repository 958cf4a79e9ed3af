/**
 * serve-nbd --secondary --hidden-durability volatile (replication.md §2 "Hidden durability"): the
 * hidden disk is never fdatasynced; a host crash (faked with the test hook
 * BLKREP_TEST_BOOT_ID_FILE: another boot id at restart) makes the secondary Inconsistent, not
 * promotable (ERR_PAIR_INCONSISTENT, --force too), the forced target of a full resync, without
 * copy-before-write until the checkpoint after it; a clean stop syncs the hidden disk and clears
 * the boot id, so a reboot after it loses nothing. A boot id that cannot be read refuses the
 * start (ERR_PAIR_BOOT_ID).
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve } from '../support/spawn.js';
import { pairOf } from '../support/control.js';
import { openLink, writerClient } from './scripted-primary.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const BOOT_A = '11111111-1111-4111-8111-111111111111';
const BOOT_B = '22222222-2222-4222-8222-222222222222';

interface Node {
  dir: string;
  disk: string;
  socket: string;
  control: string;
  bootFile: string;
  args: string[];
}

async function node(): Promise<Node> {
  const dir = await makeTempDir();
  const disk = join(dir, 'disk.img');
  await writeFile(disk, Buffer.alloc(SIZE, 0x11));
  const socket = join(dir, 'nbd.sock');
  const control = join(dir, 'ctl.sock');
  const bootFile = join(dir, 'boot_id');
  await writeFile(bootFile, `${BOOT_A}\n`);
  return { dir, disk, socket, control, bootFile, args: [disk, '--secondary', '--socket', socket, '--control', control, '--view-export', 'view', '--view-read-only', '--hidden-durability', 'volatile'] };
}

function start(n: Node) {
  return serve(n.args, { env: { ...process.env, BLKREP_TEST_BOOT_ID_FILE: n.bootFile } });
}

async function readView(n: Node, tag: string): Promise<Buffer> {
  const out = join(n.dir, `view-${tag}.raw`);
  const r = await run('nbdcopy', [`nbd+unix:///view?socket=${n.socket}`, out]);
  expect(r.code, r.stderr).toBe(0);
  return readFile(out);
}

/** clusters the hidden disk maps itself (qemu-img map: depth 0 = data in that file) */
async function hiddenDataBytes(n: Node): Promise<number> {
  const r = await run('qemu-img', ['map', '-U', '--output=json', `${n.disk}.hidden.qcow2`]);
  expect(r.code, r.stderr).toBe(0);
  return (JSON.parse(r.stdout) as Array<{ depth: number; length: number; data: boolean }>).filter((e) => e.depth === 0 && e.data).reduce((s, e) => s + e.length, 0);
}

const state = async (n: Node): Promise<Record<string, unknown>> => JSON.parse(await readFile(`${n.disk}.pair.json`, 'utf8')) as Record<string, unknown>;

describe('serve-nbd --secondary --hidden-durability volatile', () => {
  it('a host crash (another boot id) after kill -9: Inconsistent, not promotable, full resync without copy-before-write, then a restore point again', async () => {
    const n = await node();
    const p = await start(n);
    expect(await state(n)).toMatchObject({ volatileHidden: { bootId: BOOT_A } });
    const link = await openLink(n.socket, { size: SIZE });
    expect(link.answer).toMatchObject({ type: 'welcome', decision: { action: 'none' } });
    const c = await writerClient(n.socket, link);
    await c.write(MiB, Buffer.alloc(MiB, 0x22));
    await c.flush();
    expect(await link.checkpoint(1)).toMatchObject({ type: 'done', epoch: 1 });
    await c.write(2 * MiB, Buffer.alloc(128 * 1024, 0x33));
    await c.flush();
    expect(await hiddenDataBytes(n)).toBe(128 * 1024);
    p.child.kill('SIGKILL');
    await p.waitExit();
    await c.close().catch(() => {});
    link.close();

    // the host "rebooted": another boot id, and the tmpfs hidden disk is garbage
    await writeFile(n.bootFile, `${BOOT_B}\n`);
    await writeFile(`${n.disk}.hidden.qcow2`, Buffer.alloc(1000, 0xee));
    const again = await start(n);
    expect(again.stderr()).toContain(`a host crash (boot id ${BOOT_A} at the last start, ${BOOT_B} now) lost the volatile hidden disk`);
    expect(await state(n)).toMatchObject({ epoch: 1, committing: null, diskState: 'Inconsistent', volatileHidden: { bootId: BOOT_B }, restorePointLost: expect.stringContaining('writes made after checkpoint 1 whose old data is gone') });
    const st = await pairOf<{ diskState: string; secondary: { noRestorePoint: string | null; hiddenDurability: string } }>(n.control);
    expect(st).toMatchObject({ diskState: 'Inconsistent', secondary: { hiddenDurability: 'volatile', noRestorePoint: expect.stringContaining('lost the volatile hidden disk') } });
    const text = await runCli(['status', '--control', n.control]);
    expect(text.stdout).toContain(`no checkpoint to roll back to (not promotable): ${st.secondary.noRestorePoint}`);
    for (const extra of [[], ['--force'], ['--to', 'latest', '--force']]) {
      const f = await runCli(['failover', '--control', n.control, '--json', ...extra]);
      expect(f.code, f.stdout + f.stderr).toBe(1);
      const e = (JSON.parse(f.stdout) as { error: { code: string; message: string } }).error;
      expect(e.code).toBe('ERR_PAIR_INCONSISTENT');
      expect(e.message).toContain('no checkpoint to roll back to');
      expect(e.message).toContain('not promotable, with or without --force');
    }
    const dry = await runCli(['failover', '--control', n.control, '--dry-run', '--json']);
    expect(JSON.parse(dry.stdout)).toMatchObject({ allowed: false, rule: 'refused-inconsistent', refusal: { code: 'ERR_PAIR_INCONSISTENT' } });

    // the same generations would need no resync: the Inconsistent side is the forced target of a full one
    const gi = (await state(n)).gi as { current: string; bitmap: string; history: string[] };
    const link2 = await openLink(n.socket, { size: SIZE, gi });
    expect(link2.answer).toMatchObject({ type: 'welcome', decision: { action: 'resync-full', explanation: expect.stringContaining('the forced target of a full resync') } });
    // the resync writes the disk without copy-before-write: there is nothing to keep
    const c2 = await writerClient(n.socket, link2);
    const full = Buffer.alloc(SIZE, 0x44);
    await c2.write(0, full);
    await c2.flush();
    expect(await hiddenDataBytes(n)).toBe(0);
    expect(await link2.checkpoint(2)).toMatchObject({ type: 'done', epoch: 2 });
    expect(await state(n)).toMatchObject({ epoch: 2, diskState: 'UpToDate', restorePointLost: null });
    // a restore point again: copy-before-write is back, failover is allowed
    await c2.write(0, Buffer.alloc(65536, 0x55));
    await c2.flush();
    expect(await hiddenDataBytes(n)).toBe(65536);
    expect((await readView(n, 'cp2')).equals(full)).toBe(true);
    const dry2 = await runCli(['failover', '--control', n.control, '--dry-run', '--json']);
    expect(JSON.parse(dry2.stdout)).toMatchObject({ allowed: true, rule: 'failover-to-checkpoint', epoch: 2 });
    await c2.close();
    link2.close();
    await again.stop();
  });

  it('a host crash inside a checkpoint, after step 5: the disk was flushed, so the checkpoint is finished, not Inconsistent', async () => {
    const n = await node();
    const p = await serve(n.args, { env: { ...process.env, BLKREP_TEST_BOOT_ID_FILE: n.bootFile, BLKREP_TEST_CRASH_AT: 'checkpoint-step-5' } });
    const link = await openLink(n.socket, { size: SIZE });
    const c = await writerClient(n.socket, link);
    await c.write(MiB, Buffer.alloc(MiB, 0x22));
    await c.flush();
    await expect(link.checkpoint(1)).rejects.toMatchObject({ code: 'ERR_PAIR_LINK_DOWN' });
    expect((await p.waitExit(10_000)).signal).toBe('SIGKILL');
    await c.close().catch(() => {});
    await writeFile(n.bootFile, `${BOOT_B}\n`);
    await writeFile(`${n.disk}.hidden.qcow2`, Buffer.alloc(0));
    const again = await start(n);
    expect(await state(n)).toMatchObject({ epoch: 1, committing: null, diskState: 'UpToDate', volatileHidden: { bootId: BOOT_B } });
    expect((await state(n)).restorePointLost ?? null).toBe(null);
    const cp1 = Buffer.alloc(SIZE, 0x11);
    cp1.fill(0x22, MiB, 2 * MiB);
    expect((await readView(n, 'after')).equals(cp1)).toBe(true);
    await again.stop();
  });

  it('a clean stop syncs the hidden disk and clears the boot id: a reboot after it keeps the restore point', async () => {
    const n = await node();
    const p = await start(n);
    const link = await openLink(n.socket, { size: SIZE });
    const c = await writerClient(n.socket, link);
    await c.write(MiB, Buffer.alloc(65536, 0x22));
    await c.flush();
    await c.close();
    link.close();
    expect(await p.stop()).toBe(0);
    expect((await state(n)).volatileHidden).toBe(null);
    await writeFile(n.bootFile, `${BOOT_B}\n`);
    const again = await start(n);
    expect(await state(n)).toMatchObject({ epoch: 0, diskState: 'Consistent', volatileHidden: { bootId: BOOT_B } });
    // the view is still the restore point: the copy survived in hidden
    expect((await readView(n, 'after')).equals(Buffer.alloc(SIZE, 0x11))).toBe(true);
    expect(await hiddenDataBytes(n)).toBe(65536);
    await again.stop();
  });

  it('refuses to start volatile without a boot id (ERR_PAIR_BOOT_ID, exit 1), and --hidden-durability without --secondary (exit 2)', async () => {
    const n = await node();
    const r = await runCli(['serve-nbd', ...n.args, '--json'], { env: { ...process.env, BLKREP_TEST_BOOT_ID_FILE: join(n.dir, 'absent') } });
    expect(r.code).toBe(1);
    const e = (JSON.parse(r.stdout.trim().split('\n')[0]!) as { error: { code: string; message: string } }).error;
    expect(e.code).toBe('ERR_PAIR_BOOT_ID');
    expect(e.message).toContain(`--hidden-durability volatile needs the boot id to tell a host crash from a process crash: cannot read ${join(n.dir, 'absent')}`);
    const u = await runCli(['serve-nbd', n.disk, '--socket', n.socket, '--hidden-durability', 'volatile']);
    expect(u.code).toBe(2);
    expect(u.stderr).toContain('--hidden-durability needs --secondary');
    const v = await runCli(['serve-nbd', ...n.args.slice(0, -1), 'fast']);
    expect(v.code).toBe(2);
    expect(v.stderr).toContain('Expected --hidden-durability=fast to be one of: strict, volatile');
  });
});
