/**
 * The secondary's order chain belongs to a writer (a pair link's data connection), not to the
 * replica export (cbw-filter.ts `writer()`): a request of a retired sync link that fails while
 * still in flight fails none of the next link's writes.
 *
 * Before, one chain spanned links: the primary reconnecting async (its hello's `protocol`), its
 * first write, queued behind the old link's failing request, was refused ERR_PAIR_ORDER — a
 * spurious degrade and resync on the primary, for a write of a link it no longer holds.
 *
 * The secondary is a real daemon; its fault hook (crash-hook.ts) fails the second copy-before-write
 * (BLKREP_TEST_FAIL_COUNT=2) after holding it in flight until a file exists
 * (BLKREP_TEST_HOLD_UNTIL), so the old link's request is still queued when the new link writes —
 * no timing guess. The primary is this process (scripted-primary.ts): a sync link, then an async one.
 * The new link's write is also not applied before the retired link's request finished (the rule
 * that a retired writer's writes never land after the new writer's): it resolves only after the
 * hold ends, and the disk holds it, not the failed one.
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, serve, waitFor } from '../support/spawn.js';
import { eventsOf, pairOf } from '../support/control.js';
import { freshTuple } from '../../src/pair/generations.js';
import { openLink, writerClient } from './scripted-primary.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const K64 = 65536;
/** the secondary's replica writes taken and not finished (status) */
const inFlight = async (ctl: string): Promise<number> => (await pairOf<{ secondary: { writesInFlight: number } }>(ctl)).secondary.writesInFlight;

describe('a reconnect that switches sync → async: the old link\'s failing request', () => {
  it('fails only on its own link: the new async link\'s first write is applied after it finished, not refused ERR_PAIR_ORDER', async () => {
    const dir = await makeTempDir();
    const disk = join(dir, 'disk.img');
    await writeFile(disk, Buffer.alloc(SIZE, 0x11));
    const socket = join(dir, 'nbd.sock');
    const ctl = join(dir, 's.ctl');
    const release = join(dir, 'release');
    const s = await serve([disk, '--secondary', '--socket', socket, '--control', ctl], {
      env: { ...process.env, BLKREP_TEST_FAIL_AT: 'cbw-copy', BLKREP_TEST_FAIL_COUNT: '2', BLKREP_TEST_HOLD_UNTIL: release },
    });
    const ev = await eventsOf(ctl);
    const gi = freshTuple();
    const nodeId = 'primary-a';
    // the sync link, checkpoint 1 (nothing written: no copy yet)
    const link1 = await openLink(socket, { size: SIZE, protocol: 'sync', gi, nodeId, answerPings: true });
    expect(link1.answer.type).toBe('welcome');
    const c1 = await writerClient(socket, link1);
    expect(await link1.checkpoint(1)).toMatchObject({ type: 'done', n: 1, epoch: 1 });
    // copy-before-write on: the first copy goes through; the second is held in flight, then fails
    await c1.write(2 * MiB, Buffer.alloc(K64, 0x22));
    const held = c1.write(MiB, Buffer.alloc(K64, 0x23));
    const heldDone = held.then(() => 'applied', (e: { errno?: string }) => e.errno ?? String(e));
    await waitFor(async () => (await inFlight(ctl)) === 1, 'the held request in flight', { timeoutMs: 10_000 });

    // the link drops, the primary reconnects async (same node, same generations): a new writer
    link1.close();
    await waitFor(async () => (await pairOf<{ link: string }>(ctl)).link === 'none', 'the old link to go', { timeoutMs: 10_000 });
    const link2 = await openLink(socket, { size: SIZE, protocol: 'async', gi, nodeId, answerPings: true });
    expect(link2.answer.type).toBe('welcome');
    const c2 = await writerClient(socket, link2);
    // a cluster copied this epoch: nothing to copy, only the order chain could hold it
    const next = c2.write(2 * MiB + 4096, Buffer.alloc(4096, 0x24));
    const nextDone = next.then(() => 'applied', (e: { errno?: string; message?: string }) => `${e.errno}: ${e.message}`);
    await waitFor(async () => (await inFlight(ctl)) === 2, 'the new link\'s write waiting behind the old one', { timeoutMs: 10_000 });
    // let the held copy fail
    await writeFile(release, '');
    expect(await heldDone).toBe('EIO');
    expect(await nextDone).toBe('applied');
    await c2.flush();
    // the secondary's degrades: the old link's close, its failed copy; no ERR_PAIR_ORDER
    const degraded = ev.events.filter((e) => e.event === 'replication-degraded' && e.code !== undefined);
    expect(degraded.map((e) => e.code)).toEqual(['ERR_PAIR_CBW']);
    expect(String(degraded[0]!.reason)).toContain(`copy-before-write of cluster 16 (bytes ${MiB}–${MiB + K64})`);
    expect(await pairOf(ctl)).toMatchObject({ link: 'connected', secondary: { writesInFlight: 0 } });
    await c1.close().catch(() => {});
    await c2.close();
    link2.close();
    await ev.close();
    expect(await s.stop()).toBe(0);
    // the disk: the new link's write over the first copied cluster, the failed write not applied
    const bytes = await readFile(disk);
    const want = Buffer.alloc(SIZE, 0x11);
    want.fill(0x22, 2 * MiB, 2 * MiB + K64);
    want.fill(0x24, 2 * MiB + 4096, 2 * MiB + 8192);
    expect(bytes.equals(want)).toBe(true);
  }, 60_000);
});
