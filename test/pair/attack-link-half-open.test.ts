/**
 * Attack: the primary's host dies without a FIN (power loss, a cut network, a frozen VM): the
 * secondary's end of the pair link stays open, half-open, and nothing on an idle link ever closes
 * it. The primary restarted (or another host taking its disk) says hello.
 *
 * Before: the secondary refused every hello with ERR_PAIR_BUSY ("a primary holds the pair link
 * already") as long as the dead link looked up, i.e. until the secondary daemon was restarted;
 * the restarted primary's start failed on it. Now a hello while a link is held pings the held
 * link: a live primary answers (the second is refused as before, attack-two-primaries), a silent
 * one is closed after LINK_PROBE_MS (its writer token retired with it) and the hello is taken.
 *
 * The dead primary is this test process (its link and data connection as a blkrep primary opens
 * them) that stops mid-message (half a checkpoint line) and answers nothing more: not the ping,
 * and its sockets stay open.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { LINK_PROBE_MS } from '../../src/pair/secondary.js';
import { makeTempDir, run, serve, unixUri, waitFor } from '../support/spawn.js';
import { controlRequest, eventsOf, firstCheckpoint, pairOf } from '../support/control.js';
import { openLink, writerClient } from './scripted-primary.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('attack: a dead primary\'s half-open pair link', () => {
  it('the restarted primary is welcomed after the silent link is pinged and closed (not ERR_PAIR_BUSY forever); the dead link\'s writer gets EPERM; the disks are equal (sha256)', async () => {
    const dir = await makeTempDir();
    const [pImg, sImg] = ['p.img', 's.img'].map((f) => join(dir, f)) as [string, string];
    await writeFile(pImg, Buffer.alloc(SIZE, 0x33));
    await writeFile(sImg, Buffer.alloc(0));
    await truncate(sImg, SIZE);
    const sSock = join(dir, 's.sock');
    const sCtl = join(dir, 's.ctl');
    const pCtl = join(dir, 'p.ctl');
    const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sCtl]);
    const ev = await eventsOf(sCtl);

    // the primary that dies silently: welcomed, writes through its token, then says nothing more
    const dead = await openLink(sSock, { size: SIZE });
    expect(dead.answer).toMatchObject({ type: 'welcome' });
    const stale = await writerClient(sSock, dead);
    await stale.write(MiB, Buffer.alloc(64 * 1024, 0x99));
    await stale.flush();
    expect(await pairOf(sCtl)).toMatchObject({ link: 'connected' });
    // it stalls mid-message: half a checkpoint line, then nothing
    dead.channel.stream.write('{"type":"checkpoint","seq":9,"n":');

    // the primary restarted: its start says hello while the dead link is still held
    const t0 = Date.now();
    const p = await serve([pImg, '--socket', join(dir, 'p.sock'), '--control', pCtl, '--replicate-to', unixUri(sSock), '--protocol', 'sync']);
    await firstCheckpoint(pCtl);
    // the dead link was pinged, got no answer and was closed: then the hello was taken
    const tookMs = Date.now() - t0;
    expect(tookMs).toBeGreaterThanOrEqual(LINK_PROBE_MS);
    expect(tookMs).toBeLessThan(30_000);
    expect(dead.received.filter((m) => m.type === 'ping').length).toBeGreaterThanOrEqual(1);
    expect(dead.channel.isOpen).toBe(false);
    const degraded = ev.events.filter((e) => e.event === 'replication-degraded');
    expect(degraded).toHaveLength(1);
    expect(degraded[0]!.reason).toBe(
      `pair link from unix:${sSock}: no answer to a ping within ${LINK_PROBE_MS} ms while unix:${sSock} says hello: the peer is gone (a half-open connection), the link is closed`,
    );
    expect(ev.events.filter((e) => e.event === 'pair-refused')).toEqual([]);
    expect(await pairOf(pCtl)).toMatchObject({ link: 'connected', epoch: 1 });

    // the dead primary's data connection is fenced: EPERM, nothing written
    await expect(stale.write(2 * MiB, Buffer.alloc(4096, 0x99))).rejects.toMatchObject({ errno: 'EPERM' });
    await stale.close().catch(() => {});

    // the pair works: a write, a checkpoint, both disks equal byte for byte
    expect((await run('qemu-io', ['-f', 'raw', unixUri(join(dir, 'p.sock')), '-c', 'write -P 0x44 3M 1M'])).code).toBe(0);
    expect((await controlRequest<{ epoch: number }>(pCtl, 'checkpoint')).epoch).toBe(2);
    expect(await p.stop()).toBe(0);
    await ev.close();
    expect(await s.stop()).toBe(0);
    const pBytes = await readFile(pImg);
    expect(pBytes.subarray(3 * MiB, 4 * MiB).equals(Buffer.alloc(MiB, 0x44))).toBe(true);
    expect(sha(await readFile(sImg))).toBe(sha(pBytes));
  }, 90_000);

  it('a second hello on the held link itself, its pings unanswered: that link is closed, the daemon keeps serving, the next link is welcomed', async () => {
    const dir = await makeTempDir();
    const sImg = join(dir, 's.img');
    await writeFile(sImg, Buffer.alloc(SIZE, 0x11));
    const sSock = join(dir, 's.sock');
    const sCtl = join(dir, 's.ctl');
    const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sCtl]);
    const link = await openLink(sSock, { size: SIZE });
    expect(link.answer).toMatchObject({ type: 'welcome' });
    const again = link.channel.request({ type: 'hello', version: 1, exportName: '', size: SIZE, protocol: 'sync', nodeId: link.nodeId, role: 'primary', gi: { current: 'abcdef0123456789', bitmap: '0000000000000000', history: [] }, epoch: 0, diskState: 'UpToDate', crashedPrimary: false, bitmapBytes: 0 } as never, 3 * LINK_PROBE_MS);
    await expect(again).rejects.toMatchObject({ code: 'ERR_PAIR_LINK_DOWN' });
    await waitFor(async () => (await pairOf(sCtl)).link === 'none', 'the link to go', { timeoutMs: 5000 });
    const next = await openLink(sSock, { size: SIZE });
    expect(next.answer.type).toBe('welcome');
    next.close();
    expect(await s.stop()).toBe(0);
  }, 60_000);
});
