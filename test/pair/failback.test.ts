/**
 * Failback bounded by the bitmaps (replication.md §4–5), two daemons in separate processes:
 * the old primary restarts as `--secondary` of the promoted one and `blkrep replicate` resyncs
 * only the new primary's failback bitmap ∪ the old primary's peer bitmap (its activity log
 * replayed after kill -9), never the whole disk; the disks are equal byte for byte afterwards
 * (cmp of the image files after a clean stop). A planned switchover copies nothing. The crash
 * case runs over nbds:// with x509 client certificates too (tls-links.ts): each daemon is the
 * link's TLS server, then its client.
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client.js';
import type { PairStatus } from '../../src/pair/role.js';
import { makeTempDir, run, serve, unixUri, waitFor, type Served } from '../support/spawn.js';
import { controlRequest as request, pairOf, firstCheckpoint } from '../support/control.js';
import { pairLink, requiresTls, type LinkKind, type PairLink } from './tls-links.js';

const MiB = 1 << 20;
const SIZE = 64 * MiB;
/** the peer bitmap's activity-log extent (PersistentBitmap's default) */
const EXTENT = 4 * MiB;

interface Ev {
  event: string;
  [k: string]: unknown;
}

async function events(control: string): Promise<{ list: Ev[]; next: (name: string) => Promise<Ev>; close: () => Promise<void> }> {
  const list: Ev[] = [];
  const c = await ControlClient.connect(control);
  await c.subscribe(undefined, (e) => list.push(e as unknown as Ev));
  return {
    list,
    next: (name) => waitFor(() => list.find((e) => e.event === name), `event ${name} from ${control}`, { timeoutMs: 60_000 }),
    close: () => c.close(),
  };
}

async function writeThrough(socket: string, offset: number, byte: number, length = MiB, link?: PairLink): Promise<void> {
  const c = await NbdClient.connect({ uri: link ? link.uri(socket) : unixUri(socket), reconnect: false, closeTimeoutMs: 2000 });
  try {
    await c.write(offset, Buffer.alloc(length, byte));
    await c.flush();
  } finally {
    await c.close().catch(() => {});
  }
}

interface Pair {
  dir: string;
  a: Served;
  b: Served;
  aImg: string;
  bImg: string;
  aSock: string;
  bSock: string;
  aCtl: string;
  bCtl: string;
  link: PairLink;
}

/** A (primary) replicating to B (secondary); A's disk starts with one byte value per MiB; checkpoint 1 done. */
async function startPair(protocol: 'sync' | 'async' = 'sync', kind: LinkKind = 'clear'): Promise<Pair> {
  const link = await pairLink(kind);
  const dir = await makeTempDir();
  const aImg = join(dir, 'a.img');
  const bImg = join(dir, 'b.img');
  const content = Buffer.alloc(SIZE);
  for (let m = 0; m < SIZE / MiB; m++) content.fill(m + 1, m * MiB, (m + 1) * MiB);
  await writeFile(aImg, content);
  await writeFile(bImg, Buffer.alloc(SIZE));
  const p = { dir, aImg, bImg, aSock: join(dir, 'a.sock'), bSock: join(dir, 'b.sock'), aCtl: join(dir, 'a.ctl'), bCtl: join(dir, 'b.ctl'), link };
  const b = await serve([bImg, '--secondary', '--socket', p.bSock, '--control', p.bCtl, ...link.serverArgs]);
  expect(requiresTls(b.listeningLine, link)).toBe(true);
  const a = await serve([aImg, '--socket', p.aSock, '--control', p.aCtl, '--replicate-to', link.uri(p.bSock), '--protocol', protocol]);
  await firstCheckpoint(p.aCtl, 60_000);
  return { ...p, a, b };
}

/** B (promoted) replicates to A restarted as its secondary: the resync's two events. */
async function failBack(p: Pair): Promise<{ a2: Served; started: Ev; done: Ev }> {
  const a2 = await serve([p.aImg, '--secondary', '--socket', p.aSock, '--control', p.aCtl, ...p.link.serverArgs]);
  expect(requiresTls(a2.listeningLine, p.link)).toBe(true);
  const ev = await events(p.bCtl);
  try {
    const st = await request<PairStatus>(p.bCtl, 'replicate', { uri: p.link.uri(p.aSock), protocol: 'sync' });
    expect(st).toMatchObject({ role: 'primary', peerKind: 'blkrep' });
    const started = await ev.next('resync-started');
    const done = await ev.next('resync-done');
    // the checkpoint after the resync: A adopts B's generations
    await ev.next('checkpoint');
    return { a2, started, done };
  } finally {
    await ev.close();
  }
}

async function cmp(x: string, y: string): Promise<number> {
  return (await run('cmp', [x, y])).code ?? -1;
}

describe('failback by bitmaps (two daemons, kill -9)', () => {
  it.each<LinkKind>(['clear', 'x509'])('(link %s) crash of the primary, failover, failback: copies failback bitmap ∪ the old primary\'s activity log, disks equal', async (kind) => {
    const p = await startPair('sync', kind);
    // a write before the checkpoint (forwarded, flushed), checkpoint 2, one after (forwarded, then lost at failover)
    await writeThrough(p.aSock, 0, 0xa1);
    expect((await request<{ epoch: number }>(p.aCtl, 'checkpoint')).epoch).toBe(2);
    await writeThrough(p.aSock, 8 * MiB, 0xa2);
    p.a.child.kill('SIGKILL');
    await p.a.waitExit();
    const fo = await request<{ role: string; epoch: number; bytes: number }>(p.bCtl, 'failover', {});
    expect(fo).toMatchObject({ role: 'primary', epoch: 2 });
    // the new primary writes elsewhere
    await writeThrough(p.bSock, 40 * MiB, 0xb1, MiB, p.link);
    const { a2, started, done } = await failBack(p);
    // dirty: B's failback bitmap (A's write at 8 MiB that B rolled back, B's write at 40 MiB: 1 MiB each)
    // ∪ A's peer bitmap after its activity log was replayed (the hot extents [0,4) and [8,12) MiB)
    expect(started.full).toBe(false);
    const bound = 2 * EXTENT + MiB;
    expect(started.bytes as number).toBeGreaterThanOrEqual(2 * MiB);
    expect(started.bytes as number).toBeLessThanOrEqual(bound);
    expect(done.bytes as number).toBeLessThanOrEqual(started.bytes as number);
    expect(done.bytes as number).toBeGreaterThanOrEqual(2 * MiB);
    console.log(`failback resync: ${done.bytes as number} bytes copied of a ${SIZE}-byte disk (dirty ${started.bytes as number}, bound ${bound})`);
    expect(await pairOf(p.bCtl)).toMatchObject({ role: 'primary', link: 'connected', bytesBehind: 0 });
    expect((await pairOf(p.aCtl)).gi).toEqual((await pairOf(p.bCtl)).gi);
    expect(await a2.stop()).toBe(0);
    expect(await p.b.stop()).toBe(0);
    expect(await cmp(p.aImg, p.bImg)).toBe(0);
    // and what they hold: the checkpoint at 8 MiB (A's lost write is gone), B's write at 40 MiB, A's write before the checkpoint
    const a = await readFile(p.aImg);
    expect(a.subarray(0, MiB).every((x) => x === 0xa1)).toBe(true);
    expect(a.subarray(8 * MiB, 9 * MiB).every((x) => x === 9)).toBe(true);
    expect(a.subarray(40 * MiB, 41 * MiB).every((x) => x === 0xb1)).toBe(true);
  });

  it('a planned switchover (checkpoint, clean stop, failover, failback) copies nothing', async () => {
    const p = await startPair();
    await writeThrough(p.aSock, 16 * MiB, 0xa3);
    expect((await request<{ epoch: number }>(p.aCtl, 'checkpoint')).epoch).toBe(2);
    expect(await p.a.stop()).toBe(0);
    const fo = await request<{ role: string; epoch: number; bytes: number }>(p.bCtl, 'failover', {});
    expect(fo).toMatchObject({ role: 'primary', epoch: 2, bytes: 0 });
    const { a2, started, done } = await failBack(p);
    expect(started).toMatchObject({ full: false, bytes: 0 });
    expect(done.bytes).toBe(0);
    expect(await a2.stop()).toBe(0);
    expect(await p.b.stop()).toBe(0);
    expect(await cmp(p.aImg, p.bImg)).toBe(0);
  });

  it('activity-log crash resync: kill -9 with async writes in flight, restart as primary: resyncs its activity log, not the disk', async () => {
    const p = await startPair('async');
    const c = await NbdClient.connect({ uri: unixUri(p.aSock), reconnect: false, closeTimeoutMs: 500 });
    // 64 writes of 64 KiB over [0, 8 MiB) in flight, then kill -9 without waiting for them
    const inFlight = Array.from({ length: 64 }, (_, i) => c.write(((i * 37) % 128) * 64 * 1024, Buffer.alloc(64 * 1024, 0xc0 + (i % 16))).catch(() => {}));
    await inFlight[8];
    p.a.child.kill('SIGKILL');
    await p.a.waitExit();
    await Promise.all(inFlight);
    await c.close().catch(() => {});
    const ev = await events(p.bCtl);
    const a2 = await serve([p.aImg, '--socket', p.aSock, '--control', p.aCtl, '--replicate-to', unixUri(p.bSock), '--protocol', 'async']);
    try {
      // the resync runs before the daemon listens: its figures are in status (lastResync)
      const st = await waitFor(async () => {
        const x = await pairOf(p.aCtl);
        return x.link === 'connected' && x.epoch >= 2 ? (x as PairStatus & { lastResync: { bytes: number; dirtyBytes: number; full: boolean } }) : undefined;
      }, 'A connected and checkpointed after the restart', { timeoutMs: 60_000 });
      // at most the two hot extents of the activity log ([0,4) and [4,8) MiB), never the 64 MiB disk
      expect(st.lastResync.full).toBe(false);
      expect(st.lastResync.dirtyBytes).toBeLessThanOrEqual(2 * EXTENT);
      expect(st.lastResync.bytes).toBeLessThanOrEqual(st.lastResync.dirtyBytes);
      console.log(`activity-log resync: ${st.lastResync.bytes} bytes copied of ${SIZE} (dirty ${st.lastResync.dirtyBytes})`);
      expect(ev.list.find((e) => e.event === 'replication-connected')).toMatchObject({ rule: 40, action: 'resync-bitmap' });
    } finally {
      await ev.close();
    }
    expect(await a2.stop()).toBe(0);
    expect(await p.b.stop()).toBe(0);
    expect(await cmp(p.aImg, p.bImg)).toBe(0);
  }, 180_000);
});
