/**
 * A metadata table's writeback writes only the pages changed since its last capture (cache.ts):
 * a whole table when new on disk or after a failed write or cycle, and the image stays what QEMU
 * reads after many single-cluster allocations, each followed by a flush.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Table } from '../../src/block/qcow2/cache.js';
import type { Qcow2Container } from '../../src/block/qcow2/file.js';
import { HostFile } from '../../src/block/qcow2/file.js';
import { Qcow2Node } from '../../src/block/qcow2/node.js';
import { KiB, MiB, qemuCheck, tool } from './helpers.js';

/** a container that records the writes and fails the next one when asked */
function recorder(): Qcow2Container & { writes: Array<[number, number]>; failNext: boolean } {
  const c = {
    path: 'mem',
    readOnly: false,
    length: 0,
    writes: [] as Array<[number, number]>,
    failNext: false,
    read: async () => {},
    write: async (offset: number, data: Buffer) => {
      if (c.failNext) {
        c.failNext = false;
        throw Object.assign(new Error('EIO: injected'), { code: 'EIO' });
      }
      c.writes.push([offset, data.length]);
    },
    sync: async () => {},
    truncate: async () => {},
    punch: async () => {},
    close: async () => {},
  };
  return c;
}

async function writeback(t: Table, file: Qcow2Container): Promise<void> {
  await t.write(file, t.capture());
}

describe('qcow2 metadata table writeback', () => {
  it('writes the changed pages only, whole when new or after a failure, and stays dirty until a whole write succeeds', async () => {
    const file = recorder();
    const loaded = new Table(1 * MiB, Buffer.alloc(64 * KiB), true);
    expect(loaded.dirty).toBe(false);
    // one 8-byte entry in page 3
    loaded.touch(3 * 4096 + 16, 3 * 4096 + 24);
    await writeback(loaded, file);
    expect(file.writes).toEqual([[1 * MiB + 3 * 4096, 4096]]);
    expect(loaded.dirty).toBe(false);
    // two entries 5 pages apart: a page each, not the span between them
    loaded.touch(4096 + 8, 4096 + 16);
    loaded.touch(6 * 4096, 6 * 4096 + 2);
    await writeback(loaded, file);
    expect(file.writes.slice(1)).toEqual([
      [1 * MiB + 4096, 4096],
      [1 * MiB + 6 * 4096, 4096],
    ]);
    // adjacent changed pages are one run (an entry across a page boundary marks both pages)
    file.writes.length = 0;
    loaded.touch(8 * 4096 - 4, 8 * 4096 + 4);
    loaded.touch(9 * 4096, 9 * 4096 + 8);
    loaded.touch(15 * 4096 + 4088, 16 * 4096);
    await writeback(loaded, file);
    expect(file.writes).toEqual([
      [1 * MiB + 7 * 4096, 3 * 4096],
      [1 * MiB + 15 * 4096, 4096],
    ]);
    // the copy is the table's bytes at that moment
    loaded.buf.writeUInt32BE(0xdeadbeef, 10 * 4096);
    loaded.touch(10 * 4096, 10 * 4096 + 4);
    const cap = loaded.capture();
    loaded.buf.writeUInt32BE(0, 10 * 4096);
    loaded.touch(10 * 4096, 10 * 4096 + 4);
    expect(cap.runs.map((r) => r.at)).toEqual([10 * 4096]);
    expect(cap.runs[0]!.copy.readUInt32BE(0)).toBe(0xdeadbeef);
    await loaded.write(file, cap);
    expect(loaded.dirty).toBe(true); // changed again after the capture
    await writeback(loaded, file);
    expect(loaded.dirty).toBe(false);

    // a failed write: dirty, and the next capture is the whole table
    file.writes.length = 0;
    loaded.touch(8, 16);
    file.failNext = true;
    await expect(writeback(loaded, file)).rejects.toThrow(/injected/);
    expect(loaded.dirty).toBe(true);
    await writeback(loaded, file);
    expect(file.writes).toEqual([[1 * MiB, 64 * KiB]]);
    expect(loaded.dirty).toBe(false);

    // a later partial write landing after a failed one does not make the table clean
    file.writes.length = 0;
    loaded.touch(8, 16);
    const first = loaded.capture();
    loaded.touch(12 * 4096, 12 * 4096 + 8);
    const second = loaded.capture();
    file.failNext = true;
    const a = loaded.write(file, first);
    const b = loaded.write(file, second);
    await expect(a).rejects.toThrow(/injected/);
    await b;
    expect(file.writes).toEqual([[1 * MiB + 12 * 4096, 4096]]);
    expect(loaded.dirty).toBe(true);
    await writeback(loaded, file);
    expect(file.writes[1]).toEqual([1 * MiB, 64 * KiB]);
    expect(loaded.dirty).toBe(false);

    // a failed cycle (markDirty: the fsync after the write failed): whole again
    file.writes.length = 0;
    loaded.touch(8, 16);
    await writeback(loaded, file);
    loaded.markDirty();
    await writeback(loaded, file);
    expect(file.writes).toEqual([
      [1 * MiB, 4096],
      [1 * MiB, 64 * KiB],
    ]);

    // a failed write of two runs: the other run's write still settles, then the whole table next
    file.writes.length = 0;
    loaded.touch(0, 8);
    loaded.touch(5 * 4096, 5 * 4096 + 8);
    file.failNext = true;
    await expect(writeback(loaded, file)).rejects.toThrow(/injected/);
    expect(file.writes).toEqual([[1 * MiB + 5 * 4096, 4096]]);
    expect(loaded.dirty).toBe(true);
    await writeback(loaded, file);
    expect(file.writes[1]).toEqual([1 * MiB, 64 * KiB]);
    expect(loaded.dirty).toBe(false);

    // a table new on disk is written whole the first time, in pages after
    file.writes.length = 0;
    const fresh = new Table(2 * MiB, Buffer.alloc(64 * KiB));
    fresh.touch(100, 108);
    await writeback(fresh, file);
    fresh.touch(100, 108);
    await writeback(fresh, file);
    expect(file.writes).toEqual([
      [2 * MiB, 64 * KiB],
      [2 * MiB, 4096],
    ]);
    // a small table (512-byte clusters) is never written past its end
    const small = new Table(4096, Buffer.alloc(512), true);
    file.writes.length = 0;
    small.touch(504, 512);
    await writeback(small, file);
    expect(file.writes).toEqual([[4096, 512]]);
  });

  describe('on an image', () => {
    let dir = '';
    afterEach(() => rmSync(dir, { recursive: true, force: true }));

    it('single-cluster allocations with a flush each write pages of the L2 table and refcount block, and QEMU reads the image as written', async () => {
      dir = mkdtempSync(path.join(tmpdir(), 'blkrep-qcow2-pages-'));
      const img = path.join(dir, 'a.qcow2');
      await Qcow2Node.create(img, { size: 256 * MiB, clusterSize: 64 * KiB });
      const node = await Qcow2Node.open(img);
      // count the bytes of the image's writes after open
      const file = (node as unknown as { image: { file: HostFile } }).image.file;
      let bytes = 0;
      const realWrite = file.write.bind(file);
      file.write = (offset: number, data: Buffer) => {
        bytes += data.length;
        return realWrite(offset, data);
      };
      const clusters = [7, 3000, 12, 4095, 1, 2048, 500, 3999];
      for (const [i, c] of clusters.entries()) {
        await node.write(c * 64 * KiB, Buffer.alloc(64 * KiB, i + 1), { fua: true });
      }
      // per cluster: its 64 KiB, one page of L2 and one of refcounts (the first cycle writes the new L2 table whole)
      expect(bytes).toBeLessThanOrEqual(clusters.length * (64 * KiB + 2 * 4096) + 64 * KiB);
      // four allocations in one cycle, scattered over the L2 table (a page of it maps 512
      // clusters): a page of L2 each, not the span of 7 pages between the first and the last;
      // their refcounts are adjacent (one page)
      bytes = 0;
      const scattered = [100, 1100, 2100, 3100];
      await Promise.all(scattered.map((c, i) => node.write(c * 64 * KiB, Buffer.alloc(64 * KiB, 0x40 + i))));
      await node.flush();
      expect(bytes).toBe(scattered.length * 64 * KiB + (scattered.length + 1) * 4096);
      clusters.push(...scattered);
      await node.close();
      const check = await qemuCheck(img);
      expect(check.corruptions).toBe(0);
      expect(check.leaks).toBe(0);
      for (const [i, c] of clusters.entries()) {
        const pattern = i < 8 ? i + 1 : 0x40 + i - 8;
        const out = await tool('qemu-io', ['-f', 'qcow2', '-r', '-c', `read -P ${pattern} ${c * 64 * KiB} 64k`, img]);
        expect(out).not.toMatch(/Pattern verification failed/);
      }
    });
  });
});
