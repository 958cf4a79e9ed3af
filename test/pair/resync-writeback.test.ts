/**
 * A bitmap resync flushes the secondary along the way once an eighth of its dirty bytes (8 MiB at
 * least, the mirror's 128 MiB at most) was written since the last flush: the secondary's disk
 * writes the copy back meanwhile, not all in the drain's last flush. Against a scripted secondary
 * in-process (a recording memory disk behind an NBD server).
 */
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { completeNode } from '../../src/block/node.js';
import { defaultTransports } from '../../src/engine/default-transports.js';
import { NbdServer } from '../../src/nbd/server.js';
import { OPT_BLKREP_PAIR_LINK } from '../../src/nbd/option-takeover.js';
import { freshTuple } from '../../src/pair/generations.js';
import { fetchRuns, PAIR_LINK_VERSION, PairChannel } from '../../src/pair/messages.js';
import { DEFAULT_WRITEBACK_BYTES } from '../../src/jobs/mirror.js';
import { PrimaryRole, resyncWritebackBytes } from '../../src/pair/primary.js';
import { ReplicationFilter } from '../../src/pair/replication-filter.js';
import { hookNode } from '../support/fault-node.js';
import { makeTempDir, unixUri, waitFor } from '../support/spawn.js';

const K = 1024;
const MiB = 1024 * K;

/**
 * A primary on a recording disk, replicating to a scripted secondary (a recording memory disk
 * behind an NBD server): the first hello is welcomed with a full resync; `relink()` drops the
 * link, and the next hello waits for `release()`, then asks the primary's bitmap (as a
 * secondary's precopy does) and is welcomed with a bitmap resync.
 */
async function scripted(size: number) {
  const dir = await makeTempDir();
  const sDisk = hookNode(completeNode(new MemoryNode(size)));
  const links: PairChannel[] = [];
  let hellos = 0;
  let release!: () => void;
  const written = new Promise<void>((r) => (release = r));
  const summary = { nodeId: 'scripted', role: 'secondary' as const, gi: freshTuple(), epoch: 0, diskState: 'UpToDate' as const, crashedPrimary: false, bitmapBytes: 0 };
  const asked: Array<{ offset: number; length: number }> = [];
  const server = new NbdServer({
    exports: [{ name: '', node: sDisk as ReturnType<typeof completeNode> }],
    optionExtensions: new Map([
      [
        OPT_BLKREP_PAIR_LINK,
        {
          name: 'pair link',
          accept: () => (stream: Duplex, rest: Buffer) => {
            const ch = new PairChannel(
              stream,
              'primary',
              (m, c) => {
                if (m.type === 'hello') {
                  hellos++;
                  if (hellos === 1) {
                    c.send({ type: 'welcome', re: m.seq, version: PAIR_LINK_VERSION, size, ...summary, decision: { rule: 20, action: 'resync-full', explanation: 'scripted' } });
                    return;
                  }
                  // a bitmap resync: the secondary asks the primary's bitmap first (as its precopy does)
                  void (async () => {
                    await written;
                    asked.push(...(await fetchRuns(c, size, 5000)));
                    c.send({ type: 'welcome', re: m.seq, version: PAIR_LINK_VERSION, size, ...summary, decision: { rule: 50, action: 'resync-bitmap', explanation: 'scripted' } });
                  })();
                }
                if (m.type === 'checkpoint') c.send({ type: 'done', re: m.seq, n: m.n, epoch: m.n });
                if (m.type === 'abort') c.send({ type: 'done', re: m.seq, n: m.n, epoch: 0 });
              },
              rest,
            );
            links.push(ch);
          },
        },
      ],
    ]),
  });
  const socket = join(dir, 's.sock');
  const listener = await (await defaultTransports()).get('unix').listen(socket, { onConnection: (c) => server.attach(c) });
  const disk = hookNode(completeNode(new MemoryNode(size)));
  const filter = new ReplicationFilter(disk, { protocol: 'sync' });
  const events: Array<{ event: string; [k: string]: unknown }> = [];
  const p = await PrimaryRole.start({ exportName: '', imagePath: join(dir, 'p.img'), filter, uri: unixUri(socket), publish: (event, fields) => events.push({ event, ...fields, logAt: sDisk.log.length }) });
  await waitFor(() => events.some((e) => e.event === 'checkpoint'), 'checkpoint 1');
  return {
    disk,
    sDisk,
    filter,
    events,
    asked,
    release,
    async relink(): Promise<void> {
      links[0]!.close(); // the link drops: the primary degrades and says hello again
      await waitFor(() => hellos === 2, 'the second hello');
    },
    resynced: () => waitFor(() => events.filter((e) => e.event === 'checkpoint').length === 2, 'the checkpoint after the bitmap resync'),
    async close(): Promise<void> {
      await p.close();
      await listener.close();
      await server.shutdown();
    },
  };
}

describe('a bitmap resync on the primary', () => {
  it('flushes the secondary along the way (an eighth of its dirty bytes written, 8 MiB at least), not only at the end', async () => {
    expect(resyncWritebackBytes(41 * MiB)).toBe(8 * MiB);
    expect(resyncWritebackBytes(164 * MiB)).toBe(20.5 * MiB);
    expect(resyncWritebackBytes(16 * 1024 * MiB)).toBe(DEFAULT_WRITEBACK_BYTES);
    const t = await scripted(32 * MiB);
    try {
      await t.relink();
      // 24 MiB dirty: a flush once 8 MiB were written (another only while granules wait to be copied), then the drain's
      for (let at = 0; at < 24 * MiB; at += MiB) await t.filter.write(at, Buffer.alloc(MiB, 0xb0 + at / MiB));
      const from = t.sDisk.log.length;
      t.release();
      await t.resynced();
      const log = t.sDisk.log.slice(from);
      const writes = log.flatMap((r, i) => (r.op === 'write' ? [i] : []));
      const flushesAmid = log.slice(writes[0], writes.at(-1)).filter((r) => r.op === 'flush').length;
      expect(flushesAmid).toBeGreaterThanOrEqual(1);
      expect(log.filter((r) => r.op === 'write').reduce((n, r) => n + r.length, 0)).toBe(24 * MiB);
      expect((await t.sDisk.read(0, 32 * MiB)).equals(await t.disk.read(0, 32 * MiB))).toBe(true);
    } finally {
      await t.close();
    }
  }, 60_000);

  it('issues no write-back flush once less than an interval is left to copy (the consistency flush follows)', async () => {
    const t = await scripted(48 * MiB);
    try {
      await t.relink();
      // 19 MiB dirty in scattered 64 KiB blocks (operations of 64 KiB, 4 MiB in flight), a flush once 8 MiB
      // more were sent: the one at 8 MiB (~15 MiB not written yet), none at 16 (~7 MiB, 3 of them not
      // sent): the drain's flush writes those
      for (let i = 0; i < 304; i++) await t.filter.write(i * 128 * K, Buffer.alloc(64 * K, 0x40 + (i % 64)));
      const from = t.sDisk.log.length;
      t.release();
      await t.resynced();
      // the secondary's log up to the resync's end: the write-back flush at 8 MiB and the consistency flush
      const done = t.events.find((e) => e.event === 'resync-done' && e.full === false)!;
      const log = t.sDisk.log.slice(from, done.logAt as number);
      expect(log.filter((r) => r.op === 'flush')).toHaveLength(2);
      expect(log.filter((r) => r.op === 'write').reduce((n, r) => n + r.length, 0)).toBe(19 * MiB);
      expect((await t.sDisk.read(0, 48 * MiB)).equals(await t.disk.read(0, 48 * MiB))).toBe(true);
    } finally {
      await t.close();
    }
  }, 60_000);
});
