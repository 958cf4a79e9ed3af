/**
 * A bitmap resync's secondary asks the primary's peer bitmap (`bitmap`) before its welcome, to
 * copy those clusters into its hidden disk first (precopy); the primary, answering, asks its own
 * disk to read those runs ahead (`cache`: WILLNEED on a raw file), since its resync's mirror reads
 * them next. Against a scripted secondary in-process, the primary's disk a recording node: the
 * hints are exactly the runs answered, none before the question, and the resync still copies them.
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
import { PrimaryRole } from '../../src/pair/primary.js';
import { ReplicationFilter } from '../../src/pair/replication-filter.js';
import { hookNode } from '../support/fault-node.js';
import { makeTempDir, unixUri, waitFor } from '../support/spawn.js';

const SIZE = 4 << 20;
const K = 1024;

describe('the primary reads ahead the runs a bitmap resync\'s secondary asks', () => {
  it('each run of the bitmap answered is hinted once; the resync copies them', async () => {
    const dir = await makeTempDir();
    const sDisk = completeNode(new MemoryNode(SIZE));
    const links: PairChannel[] = [];
    let hellos = 0;
    /** the second hello waits here until the test has written while degraded */
    let release!: () => void;
    const written = new Promise<void>((r) => (release = r));
    const summary = { nodeId: 'scripted', role: 'secondary' as const, gi: freshTuple(), epoch: 0, diskState: 'UpToDate' as const, crashedPrimary: false, bitmapBytes: 0 };
    const asked: Array<{ offset: number; length: number }> = [];
    const server = new NbdServer({
      exports: [{ name: '', node: sDisk }],
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
                      c.send({ type: 'welcome', re: m.seq, version: PAIR_LINK_VERSION, size: SIZE, ...summary, decision: { rule: 20, action: 'resync-full', explanation: 'scripted' } });
                      return;
                    }
                    // a bitmap resync: the secondary asks the primary's bitmap first (as its precopy does)
                    void (async () => {
                      await written;
                      asked.push(...(await fetchRuns(c, SIZE, 5000)));
                      c.send({ type: 'welcome', re: m.seq, version: PAIR_LINK_VERSION, size: SIZE, ...summary, decision: { rule: 50, action: 'resync-bitmap', explanation: 'scripted' } });
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
    const disk = hookNode(completeNode(new MemoryNode(SIZE)));
    const filter = new ReplicationFilter(disk, { protocol: 'sync' });
    const events: Array<{ event: string; [k: string]: unknown }> = [];
    const p = await PrimaryRole.start({ exportName: '', imagePath: join(dir, 'p.img'), filter, uri: unixUri(socket), publish: (event, fields) => events.push({ event, ...fields }) });
    try {
      await waitFor(() => events.some((e) => e.event === 'checkpoint'), 'checkpoint 1');
      expect(disk.log.filter((r) => r.op === 'cache')).toEqual([]);
      links[0]!.close(); // the link drops: the primary degrades and says hello again
      await waitFor(() => hellos === 2, 'the second hello');
      // written while degraded: into the peer bitmap (64 KiB granules; two adjacent blocks make one run)
      await filter.write(0, Buffer.alloc(64 * K, 0xa1));
      await filter.write(128 * K, Buffer.alloc(64 * K, 0xa2));
      await filter.write(192 * K, Buffer.alloc(64 * K, 0xa3));
      await filter.write(SIZE - 64 * K, Buffer.alloc(64 * K, 0xa4));
      expect(disk.log.filter((r) => r.op === 'cache')).toEqual([]);
      release();
      await waitFor(() => events.filter((e) => e.event === 'checkpoint').length === 2, 'the checkpoint after the bitmap resync');
      const runs = [
        { offset: 0, length: 64 * K },
        { offset: 128 * K, length: 128 * K },
        { offset: SIZE - 64 * K, length: 64 * K },
      ];
      expect(asked).toEqual(runs);
      expect(disk.log.filter((r) => r.op === 'cache').map((r) => ({ offset: r.offset, length: r.length }))).toEqual(runs);
      expect(events.find((e) => e.event === 'resync-done' && e.full === false)).toMatchObject({ dirtyBytes: 256 * K });
      for (const r of runs) expect((await sDisk.read(r.offset, r.length)).equals(await disk.read(r.offset, r.length))).toBe(true);
    } finally {
      await p.close();
      await listener.close();
      await server.shutdown();
    }
  }, 30_000);
});
