/**
 * A pair member's raw disk is written only through the pair: once an export is a secondary, a
 * primary (--replicate-to) or replicating (blkrep replicate), its image lock stops sharing writes
 * (RawNode.unshareWrites), so qemu-io, qemu-nbd or a second serve-nbd cannot write it around the
 * pair (a write the peer would never see). Readers that share writes (qemu-img -U) still read it.
 * A replicate while another process has the disk open for writing fails ERR_IMAGE_LOCKED naming
 * it, changes nothing, and succeeds once that process is gone.
 */
import { existsSync } from 'node:fs';
import { readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, runCli, serve, start, unixUri, waitFor } from '../support/spawn.js';
import { startQemuNbd } from '../support/qemu-nbd.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;

async function disk(path: string, byte: number): Promise<void> {
  await writeFile(path, Buffer.alloc(SIZE, byte));
}

/** qemu-io writing the file itself, as an operator's stray command would */
async function qemuIoWrite(path: string): Promise<{ code: number | null; out: string }> {
  const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 64k', path]);
  return { code: r.code, out: r.stdout + r.stderr };
}

describe.skipIf(!hasTool('qemu-io') || !hasTool('qemu-nbd'))('a pair member\'s disk is not shared for writing', () => {
  it('secondary and primary: qemu-io and a second serve-nbd cannot write the disks; qemu-img -U still reads them; the disks are unchanged', async () => {
    const dir = await makeTempDir();
    const s = join(dir, 's.img');
    const p = join(dir, 'p.img');
    await disk(s, 0x11);
    await disk(p, 0x11);
    const ssock = join(dir, 's.sock');
    const sec = await serve([s, '--secondary', '--socket', ssock, '--control', join(dir, 's.ctl')]);
    const pri = await serve([p, '--socket', join(dir, 'p.sock'), '--control', join(dir, 'p.ctl'), '--replicate-to', unixUri(ssock)]);
    for (const path of [s, p]) {
      const w = await qemuIoWrite(path);
      expect(w.code).toBe(1);
      expect(w.out).toContain('Failed to get "write" lock');
      const second = await runCli(['serve-nbd', path, '--socket', join(dir, 'x.sock'), '--json']);
      expect(second.code).toBe(1);
      expect(JSON.parse(second.stdout).error).toMatchObject({ code: 'ERR_IMAGE_LOCKED' });
      expect(JSON.parse(second.stdout).error.message).toMatch(/does not share "write"/);
      const info = await run('qemu-img', ['info', '-U', '-f', 'raw', '--output=json', path]);
      expect(info.code, info.stderr).toBe(0);
      expect(JSON.parse(info.stdout)['virtual-size']).toBe(SIZE);
    }
    await pri.stop();
    await sec.stop();
    expect((await readFile(s)).equals(Buffer.alloc(SIZE, 0x11))).toBe(true);
    expect((await readFile(p)).equals(Buffer.alloc(SIZE, 0x11))).toBe(true);
    // stopped, the disks are anyone's again
    expect((await qemuIoWrite(s)).code).toBe(0);
  });

  it('blkrep replicate while qemu-nbd has the disk open for writing: ERR_IMAGE_LOCKED naming it, nothing changes; after it exits, replicate works and the disk is claimed', async () => {
    const dir = await makeTempDir();
    const p = join(dir, 'p.img');
    const t = join(dir, 't.img');
    await disk(p, 0x22);
    await writeFile(t, Buffer.alloc(0));
    await truncate(t, SIZE);
    const control = join(dir, 'c.sock');
    await serve([p, '--socket', join(dir, 'p.sock'), '--control', control]);
    const tsock = join(dir, 't.sock');
    const target = start('qemu-nbd', ['-f', 'raw', '-k', tsock, '--persistent', t]);
    await waitFor(() => existsSync(tsock), 'qemu-nbd (target) listening');
    // a stray writer: qemu-nbd serving the primary's own disk read-write (raw shares writes)
    // open and locked (qemu-nbd listens before it opens its image: test/support/qemu-nbd.ts)
    const stray = await startQemuNbd(dir, ['-f', 'raw', '--persistent', p], { name: 'stray' });
    const refused = await runCli(['replicate', '--control', control, unixUri(tsock), '--json']);
    expect(refused.code).toBe(1);
    const err = JSON.parse(refused.stdout).error as { code: string; message: string };
    expect(err.code).toBe('ERR_IMAGE_LOCKED');
    expect(err.message).toMatch(new RegExp(`^export "" cannot join a replication pair: image "${p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}" is in use: failed to get shared "write" lock: pid ${stray.pid} \\(qemu-nbd .*\\) has it open with "write" permission; a pair member's disk is written only through the pair$`));
    const st = await runCli(['status', '--control', control, '--json']);
    expect(JSON.parse(st.stdout).exports[0].pair ?? null).toBeNull();
    await stray.stop();
    await rm(join(dir, 'stray.sock'), { force: true });
    const ok = await runCli(['replicate', '--control', control, unixUri(tsock), '--json']);
    expect(ok.code, ok.stdout + ok.stderr).toBe(0);
    const w = await qemuIoWrite(p);
    expect(w.code).toBe(1);
    expect(w.out).toContain('Failed to get "write" lock');
    await target.stop();
  });
});
