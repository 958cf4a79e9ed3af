/**
 * Image locks (src/block/image-lock.ts): the bytes each open locks are the bytes qemu-nbd locks
 * for the same open (read from /proc, for blkrep in this process and for qemu-nbd), a conflict is
 * ERR_IMAGE_LOCKED naming the file, the lock and the holder, a failed permission update keeps the
 * old locks, and closing releases them.
 */
import { statSync } from 'node:fs';
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { BlockNode } from '../../src/api/block.js';
import { BlkrepError } from '../../src/api/errors.js';
import { holdsByte, lockOf, lockPerms, PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE } from '../../src/block/image-lock.js';
import { loadNative } from '../../src/block/native.js';
import { openImage } from '../../src/block/open.js';
import { hasTool, makeTempDir } from '../support/spawn.js';
import { startQemuNbd } from '../support/qemu-nbd.js';
import { tool } from '../qcow2/helpers.js';

const native = loadNative();

/** The lock bytes (100…103, 200…203) process `pid` holds on `path`, from its /proc/PID/fdinfo. */
async function lockBytes(pid: number | 'self', path: string): Promise<number[]> {
  const ino = String(statSync(path).ino);
  const bytes = new Set<number>();
  for (const fd of await readdir(`/proc/${pid}/fdinfo`)) {
    const text = await readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8').catch(() => '');
    for (const line of text.split('\n')) {
      if (!line.startsWith('lock:')) continue;
      const f = line.trim().split(/\s+/);
      const at = f.findIndex((x) => x.endsWith(`:${ino}`));
      if (at < 0) continue;
      for (let b = Number(f[at + 1]); b <= Number(f[at + 2]); b++) bytes.add(b);
    }
  }
  return [...bytes].sort((a, b) => a - b);
}

async function images(dir: string): Promise<{ qcow2: string; raw: string; overlay: string }> {
  const qcow2 = join(dir, 'a.qcow2');
  const raw = join(dir, 'r.raw');
  const overlay = join(dir, 'o.qcow2');
  await tool('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '4M']);
  await writeFile(raw, Buffer.alloc(1 << 20));
  await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', overlay]);
  return { qcow2, raw, overlay };
}

describe('lockPerms', () => {
  it('is what QEMU 7.2 takes for each open', () => {
    const unshareWR = PERM_ALL & ~(PERM_WRITE | PERM_RESIZE);
    expect(lockPerms({ format: 'qcow2', readOnly: false })).toEqual({ perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared: unshareWR });
    expect(lockPerms({ format: 'qcow2', readOnly: true })).toEqual({ perm: PERM_CONSISTENT_READ, shared: unshareWR });
    expect(lockPerms({ format: 'raw', readOnly: false })).toEqual({ perm: PERM_CONSISTENT_READ | PERM_WRITE, shared: PERM_ALL & ~PERM_RESIZE });
    expect(lockPerms({ format: 'raw', readOnly: true })).toEqual({ perm: PERM_CONSISTENT_READ, shared: PERM_ALL & ~PERM_RESIZE });
    expect(lockPerms({ format: 'raw', readOnly: true, backing: true })).toEqual({ perm: PERM_CONSISTENT_READ, shared: unshareWR });
    expect(lockPerms({ format: 'qcow2', readOnly: true, forceShare: true })).toEqual({ perm: PERM_CONSISTENT_READ, shared: PERM_ALL });
  });

  it('holdsByte reads fdinfo lock lines', () => {
    const info = 'pos:\t0\nflags:\t02\nlock:\t1: OFDLCK ADVISORY  READ -1 fe:00:42 100 101\nlock:\t2: POSIX  ADVISORY  WRITE 7 fe:00:43 0 EOF\n';
    expect(holdsByte(info, 'fe:00:42', 100)).toBe(true);
    expect(holdsByte(info, 'fe:00:42', 101)).toBe(true);
    expect(holdsByte(info, 'fe:00:42', 103)).toBe(false);
    expect(holdsByte(info, 'fe:00:43', 5_000_000)).toBe(true);
    expect(holdsByte(info, 'fe:00:44', 100)).toBe(false);
  });
});

describe.skipIf(native === null || !hasTool('qemu-nbd'))('image locks against qemu-nbd', () => {
  it('each open locks the bytes qemu-nbd locks for the same open', async () => {
    const dir = await makeTempDir();
    const { qcow2, raw, overlay } = await images(dir);
    const cases: Array<{ what: string; path: string; blkrep: () => Promise<BlockNode>; qemu: string[]; check?: string }> = [
      { what: 'qcow2 read-write', path: qcow2, blkrep: () => openImage(qcow2), qemu: ['-f', 'qcow2', qcow2] },
      { what: 'qcow2 read-only', path: qcow2, blkrep: () => openImage(qcow2, { readOnly: true }), qemu: ['-r', '-f', 'qcow2', qcow2] },
      { what: 'raw read-write', path: raw, blkrep: () => openImage(raw), qemu: ['-f', 'raw', raw] },
      { what: 'raw read-only', path: raw, blkrep: () => openImage(raw, { readOnly: true }), qemu: ['-r', '-f', 'raw', raw] },
      { what: 'backing file of an overlay', path: overlay, blkrep: () => openImage(overlay), qemu: ['-f', 'qcow2', overlay], check: qcow2 },
    ];
    for (const c of cases) {
      const checked = c.check ?? c.path;
      const node = await c.blkrep();
      const ours = await lockBytes('self', checked);
      await node.close();
      expect(await lockBytes('self', checked)).toEqual([]);
      // started: its whole chain open and locked (qemu-nbd locks one byte at a time, after it listens)
      const q = await startQemuNbd(dir, c.qemu);
      const theirs = await lockBytes(q.pid, checked);
      await q.stop();
      expect({ what: c.what, bytes: ours }).toEqual({ what: c.what, bytes: theirs });
      expect(ours.length).toBeGreaterThan(0);
    }
    // --force-share: only "consistent read" (as qemu-img -U / qemu-io -U -r)
    const shared = await openImage(overlay, { readOnly: true, forceShare: true });
    expect(await lockBytes('self', overlay)).toEqual([100]);
    expect(await lockBytes('self', qcow2)).toEqual([100]);
    await shared.close();
  });

  it('a writer refuses a second writer and any reader; the error names the file, the lock and the holder', async () => {
    const dir = await makeTempDir();
    const { qcow2 } = await images(dir);
    const q = await startQemuNbd(dir, ['-f', 'qcow2', qcow2], { name: 'q1' });
    const rw = await openImage(qcow2).catch((e: unknown) => e);
    expect(rw).toBeInstanceOf(BlkrepError);
    expect((rw as BlkrepError).code).toBe('ERR_IMAGE_LOCKED');
    expect((rw as BlkrepError).message).toBe(`image "${qcow2}" is in use: failed to get "write" lock: pid ${q.pid} (qemu-nbd -k ${join(dir, 'q1.sock')} --pid-file q1.pid -f qcow2 ${qcow2}) has it open and does not share "write"`);
    expect((rw as BlkrepError).details).toMatchObject({ path: qcow2, lock: 'write', kind: 'use', byte: 201, holders: [{ pid: q.pid }] });
    const ro = await openImage(qcow2, { readOnly: true }).catch((e: unknown) => e);
    expect((ro as BlkrepError).code).toBe('ERR_IMAGE_LOCKED');
    expect((ro as BlkrepError).message).toMatch(/failed to get shared "write" lock: pid \d+ \(qemu-nbd .*\) has it open with "write" permission \(--force-share reads it anyway, as qemu-img -U does\)$/);
    expect((ro as BlkrepError).details).toMatchObject({ lock: 'write', kind: 'share', byte: 101, holders: [{ pid: q.pid }] });
    // a refused open holds nothing
    expect(await lockBytes('self', qcow2)).toEqual([]);
    // -U reads it
    const shared = await openImage(qcow2, { readOnly: true, forceShare: true });
    expect(shared.size).toBe(4 << 20);
    await shared.close();
    await q.stop();
    // released: now it opens
    const after = await openImage(qcow2);
    await after.close();
  });

  it('a failed permission update keeps the old locks; it succeeds once the other user is gone', async () => {
    const dir = await makeTempDir();
    const { qcow2 } = await images(dir);
    const a = await openImage(qcow2, { readOnly: true });
    const b = await openImage(qcow2, { readOnly: true });
    const lock = lockOf(a)!;
    expect(lock).toBeDefined();
    const before = await lockBytes('self', qcow2);
    expect(before).toEqual([100, 201, 203]);
    const err = await lock.update(lockPerms({ format: 'qcow2', readOnly: false })).catch((e: unknown) => e);
    expect((err as BlkrepError).code).toBe('ERR_IMAGE_LOCKED');
    expect((err as BlkrepError).details).toMatchObject({ lock: 'write', kind: 'use', holders: [{ pid: process.pid }] });
    expect(lock.perms).toEqual(lockPerms({ format: 'qcow2', readOnly: true }));
    expect(await lockBytes('self', qcow2)).toEqual(before);
    await b.close();
    await lock.update(lockPerms({ format: 'qcow2', readOnly: false }));
    expect(await lockBytes('self', qcow2)).toEqual([100, 101, 103, 201, 203]);
    await a.close();
    expect(await lockBytes('self', qcow2)).toEqual([]);
  });

  it('--force-share with a read-write open is refused', async () => {
    const dir = await makeTempDir();
    const { raw } = await images(dir);
    const err = await openImage(raw, { forceShare: true }).catch((e: unknown) => e);
    expect((err as BlkrepError).code).toBe('ERR_USAGE');
    expect((err as BlkrepError).message).toBe(`cannot open "${raw}" read-write with --force-share: sharing every permission is for read-only inspection (as qemu-img -U)`);
  });
});
