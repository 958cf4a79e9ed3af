/**
 * The pair on two daemons, separate processes (serve-nbd --secondary, serve-nbd --replicate-to),
 * with kill -9 of the primary:
 * - QEMU's tests/unit/test-replication.c secondary scenarios as far as both sides allow
 *   (replication.md §7 A), patterns 0x11/0x22/0x33, exact byte equality. The images are 16 MiB
 *   (QEMU's are 64 MiB; the halves are what matter): "local" writes are the primary's forwarded
 *   writes, "top" is the secondary's view export.
 * (The seeded random-instant failovers are in two-daemons-random.test.ts.)
 * Both scenarios run in clear and over nbds:// with x509 client certificates (tls-links.ts).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { serve, unixUri, type Served } from '../support/spawn.js';
import { pairLink, requiresTls, type LinkKind, type PairLink } from './tls-links.js';
import { controlRequest as request, pairOf, blankPair, firstCheckpoint } from '../support/control.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;
const HALF = SIZE / 2;

interface Pair {
  dir: string;
  s: Served;
  p: Served;
  sControl: string;
  pControl: string;
  sSock: string;
  pSock: string;
  link: PairLink;
}

async function startPair(protocol: 'sync' | 'async', kind: LinkKind): Promise<Pair> {
  const link = await pairLink(kind);
  const { dir, sSock, pSock, sControl, pControl } = await blankPair(SIZE);
  // secondary first (replication.md §2 "Start")
  const s = await serve([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view', ...link.serverArgs]);
  expect(requiresTls(s.listeningLine, link)).toBe(true);
  const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pControl, '--replicate-to', link.uri(sSock), '--protocol', protocol]);
  // connected, and checkpoint 1 — the one after the initial sync — committed
  await firstCheckpoint(pControl);
  return { dir, s, p, sControl, pControl, sSock, pSock, link };
}

async function client(socket: string, name = '', link?: PairLink): Promise<NbdClient> {
  return NbdClient.connect({ uri: link ? link.uri(socket, name) : unixUri(socket, name), reconnect: false, closeTimeoutMs: 2000 });
}

async function read(c: NbdClient, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await c.read(offset, b);
  return b;
}

function pattern(byte: number, length: number): Buffer {
  return Buffer.alloc(length, byte);
}

/** first offset where `b` is not all `byte`, or -1 */
function mismatch(b: Buffer, byte: number): number {
  for (let i = 0; i < b.length; i++) if (b[i] !== byte) return i;
  return -1;
}

describe.each<LinkKind>(['clear', 'x509'])('two daemons (link %s): test-replication.c secondary scenarios', (kind) => {
  it('s/start, s/stop: view = checkpoint + own writes; failover to the checkpoint: [0,½) = 0x33, [½,1) = 0x11', async () => {
    const pair = await startPair('sync', kind);
    const pc = await client(pair.pSock);
    // fill "local" with 0x11 (through the primary), checkpoint: the secondary's restore point
    await pc.write(0, pattern(0x11, SIZE));
    await pc.flush();
    expect(await request<{ epoch: number }>(pair.pControl, 'checkpoint')).toEqual({ export: '', epoch: 2 });
    const view = await client(pair.sSock, 'view', pair.link);
    expect(mismatch(await read(view, 0, SIZE), 0x11)).toBe(-1);
    // write 0x22 "local" [½,1): the view still reads 0x11 there (the hidden disk has the old data)
    await pc.write(HALF, pattern(0x22, HALF));
    await pc.flush();
    expect(mismatch(await read(view, HALF, HALF), 0x11)).toBe(-1);
    // write 0x33 "top" [0,½)
    await view.write(0, pattern(0x33, HALF));
    await view.flush();
    expect(mismatch(await read(view, 0, HALF), 0x33)).toBe(-1);
    await view.close();
    await pc.close().catch(() => {});
    // s/stop: the primary dies; failover commits the view into the disk
    pair.p.child.kill('SIGKILL');
    await pair.p.waitExit();
    const fo = await request<{ role: string; epoch: number; to: string }>(pair.sControl, 'failover', {});
    expect(fo).toMatchObject({ role: 'primary', epoch: 2, to: 'checkpoint' });
    const sc = await client(pair.sSock, '', pair.link);
    const all = await read(sc, 0, SIZE);
    expect(mismatch(all.subarray(0, HALF), 0x33)).toBe(-1);
    expect(mismatch(all.subarray(HALF), 0x11)).toBe(-1);
    await sc.close();
  });

  it('s/do_checkpoint: a checkpoint makes the view show the primary\'s second half (0x22)', async () => {
    const pair = await startPair('async', kind);
    const pc = await client(pair.pSock);
    await pc.write(0, pattern(0x11, SIZE));
    await pc.flush();
    expect((await request<{ epoch: number }>(pair.pControl, 'checkpoint')).epoch).toBe(2);
    await pc.write(HALF, pattern(0x22, HALF));
    await pc.flush();
    const view = await client(pair.sSock, 'view', pair.link);
    expect(mismatch(await read(view, HALF, HALF), 0x11)).toBe(-1);
    expect((await request<{ epoch: number }>(pair.pControl, 'checkpoint')).epoch).toBe(3);
    expect(mismatch(await read(view, HALF, HALF), 0x22)).toBe(-1);
    expect(mismatch(await read(view, 0, HALF), 0x11)).toBe(-1);
    expect(await pairOf(pair.pControl)).toMatchObject({ role: 'primary', epoch: 3, link: 'connected', peerKind: 'blkrep', protocol: 'async' });
    await view.close();
    await pc.close();
  });
});
