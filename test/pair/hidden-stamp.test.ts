/**
 * The hidden disk's stamp extension (src/pair/hidden-stamp.ts) on a qcow2 overlay as blkrep
 * creates it (backing name after the extensions): added (the backing name moved), rewritten in
 * place, read back; the image stays clean for qemu-img check, its backing and data read the
 * same through our driver, and QEMU keeps the extension when it rewrites the header
 * (qemu-img rebase -u).
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createQcow2 } from '../../src/block/qcow2/create.js';
import { HostFile } from '../../src/block/qcow2/file.js';
import { Qcow2Node } from '../../src/block/qcow2/node.js';
import { newStamp, readHiddenStamp, writeHiddenStamp } from '../../src/pair/hidden-stamp.js';
import { makeTempDir, run } from '../support/spawn.js';

const MiB = 1 << 20;

async function info(path: string): Promise<{ 'backing-filename'?: string; 'backing-filename-format'?: string }> {
  const r = await run('qemu-img', ['info', '--output=json', '-U', path]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as { 'backing-filename'?: string; 'backing-filename-format'?: string };
}

describe('hidden disk stamp (qcow2 header extension)', () => {
  it('added, rewritten, read back; qemu-img check clean, backing kept, QEMU keeps it across a header rewrite', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    const hidden = join(dir, 'disk.img.hidden.qcow2');
    await writeFile(disk, Buffer.alloc(4 * MiB, 0x5a));
    await createQcow2(hidden, { size: 4 * MiB, clusterSize: 65536, backing: 'disk.img', backingFormat: 'raw' });
    const f = await HostFile.open(hidden);
    const a = newStamp();
    const b = newStamp();
    try {
      expect(await readHiddenStamp(f)).toBeNull();
      const at = await writeHiddenStamp(f, a);
      expect(await readHiddenStamp(f)).toEqual({ id: a, at });
      // the second write goes over the same 16 bytes
      expect(await writeHiddenStamp(f, b)).toBe(at);
      expect((await readHiddenStamp(f))?.id).toBe(b);
      await f.sync();
    } finally {
      await f.close();
    }
    const chk = await run('qemu-img', ['check', hidden]);
    expect(chk.code, chk.stdout + chk.stderr).toBe(0);
    expect(await info(hidden)).toMatchObject({ 'backing-filename': 'disk.img', 'backing-filename-format': 'raw' });
    const n = await Qcow2Node.open(hidden);
    try {
      const got = await n.read(MiB, 4096);
      expect(got.every((x) => x === 0x5a)).toBe(true);
    } finally {
      await n.close();
    }
    // QEMU rewrites the header (a new backing name): the unknown extension is kept
    expect((await run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-F', 'raw', '-b', disk, hidden])).code).toBe(0);
    expect(await info(hidden)).toMatchObject({ 'backing-filename': disk });
    const g = await HostFile.open(hidden, { readOnly: true });
    try {
      expect((await readHiddenStamp(g))?.id).toBe(b);
    } finally {
      await g.close();
    }
    expect((await run('qemu-img', ['check', hidden])).code).toBe(0);
  });
});
