/**
 * The primary's data connection to the secondary asks for a 4 MiB send buffer on a Unix socket
 * (src/pair/primary.ts DATA_SEND_BUFFER; the kernel reports twice it): a 1 MiB forward then goes
 * in one write instead of ~5 pieces of the default 208 KiB. BLKREP_PAIR_SNDBUF=0 leaves the
 * system's. Against a scripted secondary in-process (an NBD server over a memory disk whose pair
 * link option answers hello and checkpoints).
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { loadNative } from '../../src/block/native.js';
import { PrimaryRole } from '../../src/pair/primary.js';
import { ReplicationFilter } from '../../src/pair/replication-filter.js';
import { makeTempDir, waitFor } from '../support/spawn.js';
import { scriptedSecondary, secondarySummary, welcome } from '../support/scripted-secondary.js';
import { fdOf, recordWritevSockets } from '../support/writev-recorder.js';

const MiB = 1 << 20;
const SIZE = 4 * MiB;
const native = loadNative();

/** the client-side sockets that wrote with writev (the data connection's WRITE: header and payload) */
const sockets = recordWritevSockets();
afterEach(() => {
  delete process.env.BLKREP_PAIR_SNDBUF;
});

/** the send buffers of the client sockets a 1 MiB sync write went through (its bytes checked on the secondary) */
async function sendBuffersOfForward(): Promise<number[]> {
  const dir = await makeTempDir();
  const s = await scriptedSecondary(dir, SIZE, (m, ch) => {
    if (m.type === 'hello') ch.send(welcome(m, SIZE, secondarySummary()));
    if (m.type === 'checkpoint') ch.send({ type: 'done', re: m.seq, n: m.n, epoch: m.n });
    if (m.type === 'abort') ch.send({ type: 'done', re: m.seq, n: m.n, epoch: 0 });
  });
  const disk = s.disk;
  const filter = new ReplicationFilter(new MemoryNode(SIZE), { protocol: 'sync' });
  const events: string[] = [];
  const p = await PrimaryRole.start({ exportName: '', imagePath: join(dir, 'p.img'), filter, uri: s.uri, publish: (event) => events.push(event) });
  try {
    await waitFor(() => events.includes('checkpoint'), 'checkpoint 1');
    sockets.clear();
    const data = Buffer.alloc(MiB, 0x5c);
    await filter.write(MiB, data);
    expect((await disk.read(MiB, MiB)).equals(data)).toBe(true);
    return [...sockets].map((sock) => native!.getSendBuffer!(fdOf(sock)));
  } finally {
    await p.close();
    await s.close();
  }
}

describe.skipIf(!native?.getSendBuffer)("the primary's data connection", () => {
  it('has an 8 MiB send buffer on a Unix socket (4 MiB asked, doubled by the kernel; root here)', async () => {
    expect(await sendBuffersOfForward()).toEqual([8 * MiB]);
  });

  it('keeps the system default with BLKREP_PAIR_SNDBUF=0', async () => {
    process.env.BLKREP_PAIR_SNDBUF = '0';
    const sizes = await sendBuffersOfForward();
    expect(sizes.length).toBe(1);
    expect(sizes[0]).toBeLessThan(8 * MiB);
  });

  it('says on stderr that a BLKREP_PAIR_SNDBUF that is no byte count is ignored, and asks for the default', async () => {
    process.env.BLKREP_PAIR_SNDBUF = '4M';
    const written: string[] = [];
    const orig = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
      written.push(String(chunk));
      return (orig as (...a: unknown[]) => boolean)(chunk, ...rest);
    }) as typeof process.stderr.write;
    try {
      expect(await sendBuffersOfForward()).toEqual([8 * MiB]);
    } finally {
      process.stderr.write = orig;
    }
    expect(written.filter((w) => w.includes('BLKREP_PAIR_SNDBUF'))).toEqual([
      'blkrep: BLKREP_PAIR_SNDBUF="4M" is not a byte count from 0 to 1073741824; the data connection asks for 4194304\n',
    ]);
  });
});
