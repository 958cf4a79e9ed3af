/**
 * The pair over nbds://, two real daemons (serve-nbd --secondary with --tls-*, serve-nbd
 * --replicate-to nbds+unix://…): x509 with client certificates and an allow-list, and PSK. A
 * recording proxy sits on the link: every connection the primary opens (the pair link and the
 * data connection) sends STARTTLS as its first option, and the data written never crosses in
 * clear. A wrong client certificate or PSK key: the primary says why on stderr and as event
 * pair-refused, the secondary logs the refusal, and nothing reaches the secondary's disk.
 */
import net from 'node:net';
import { join } from 'node:path';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client.js';
import { IHAVEOPT, OPT } from '../../src/nbd/constants.js';
import type { PairStatus } from '../../src/pair/role.js';
import { makeTempDir, serve, waitFor, withTimeout, type Served } from '../support/spawn.js';
import { CLIENT_DN, makePki, type Pki } from '../support/tls-pki.js';
import { controlRequest as request, pairOf, blankPair, firstCheckpoint } from '../support/control.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const MARKER = Buffer.from('blkrep-pair-tls-marker:never-in-clear;');

let pki: Pki;
beforeAll(async () => {
  pki = makePki(await makeTempDir('file'));
});

/** A Unix-socket proxy that keeps what each connection sent towards the server. */
interface Recorder {
  path: string;
  sent: Buffer[][];
  close(): Promise<void>;
}

const recorders: Recorder[] = [];
afterEach(async () => {
  await Promise.all(recorders.splice(0).map((r) => r.close()));
});

async function recorder(path: string, target: string): Promise<Recorder> {
  const sent: Buffer[][] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((down) => {
    const chunks: Buffer[] = [];
    sent.push(chunks);
    const up = net.connect(target);
    sockets.add(down).add(up);
    down.on('data', (b: Buffer) => chunks.push(Buffer.from(b)));
    down.pipe(up);
    up.pipe(down);
    const end = (): void => {
      down.destroy();
      up.destroy();
    };
    down.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const r: Recorder = {
    path,
    sent,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
  recorders.push(r);
  return r;
}

interface TlsPair {
  dir: string;
  s: Served;
  p: Served;
  sControl: string;
  pControl: string;
  pSock: string;
  sSock: string;
  rec: Recorder;
}

/**
 * The secondary with `secondaryTls`, the primary replicating through the recorder with the tls-*
 * query `query`. `connected`: wait for checkpoint 1 (else return at once).
 */
async function startPair(secondaryTls: string[], query: string, connected: boolean): Promise<TlsPair> {
  const { dir, sSock, pSock, sControl, pControl } = await blankPair(SIZE);
  const s = await serve([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view', ...secondaryTls]);
  const rec = await recorder(join(dir, 'proxy.sock'), sSock);
  const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pControl, '--replicate-to', `nbds+unix:///?socket=${rec.path}&${query}`]);
  if (connected) {
    await firstCheckpoint(pControl);
  }
  return { dir, s, p, sControl, pControl, pSock, sSock, rec };
}

function markerData(length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += MARKER.length) MARKER.copy(b, i);
  return b;
}

/** Every connection opened its options with STARTTLS (after the 4 bytes of client flags). */
function expectStartTlsFirst(rec: Recorder): void {
  expect(rec.sent.length).toBeGreaterThanOrEqual(1);
  for (const chunks of rec.sent) {
    const bytes = Buffer.concat(chunks);
    expect(bytes.length).toBeGreaterThanOrEqual(20);
    expect(bytes.readBigUInt64BE(4)).toBe(IHAVEOPT);
    expect(bytes.readUInt32BE(12)).toBe(OPT.STARTTLS);
    expect(bytes.readUInt32BE(16)).toBe(0);
  }
}

function sawInClear(rec: Recorder, needle: Buffer): boolean {
  return rec.sent.some((chunks) => Buffer.concat(chunks).includes(needle));
}

/** Write through the primary, checkpoint, and read the secondary's view back over nbds. */
async function replicateAndCheck(pair: TlsPair, viewQuery: string): Promise<void> {
  const data = markerData(2 * MiB);
  const pc = await NbdClient.connect({ uri: `nbd+unix:///?socket=${pair.pSock}`, reconnect: false });
  await pc.write(MiB, data);
  await pc.flush();
  await pc.close();
  expect(await request<{ epoch: number }>(pair.pControl, 'checkpoint')).toEqual({ export: '', epoch: 2 });
  const view = await NbdClient.connect({ uri: `nbds+unix:///view?socket=${pair.sSock}&${viewQuery}`, reconnect: false });
  const back = Buffer.alloc(data.length);
  await view.read(MiB, back);
  await view.close();
  expect(back.equals(data)).toBe(true);
  expect(await pairOf<PairStatus & { lastError?: string }>(pair.pControl)).toMatchObject({ role: 'primary', link: 'connected', peerKind: 'blkrep', epoch: 2 });
  // both the pair link and the data connection went through the proxy, inside TLS
  expect(pair.rec.sent.length).toBeGreaterThanOrEqual(2);
  expectStartTlsFirst(pair.rec);
  expect(sawInClear(pair.rec, MARKER)).toBe(false);
}

/** Subscribe to the primary's events and wait for the first `name` (a retry comes within 10 s ± 20 %). */
async function nextEvent(control: string, name: string, timeoutMs = 30_000): Promise<Record<string, unknown>> {
  const c = await ControlClient.connect(control);
  try {
    return await withTimeout(
      new Promise<Record<string, unknown>>((resolve) => {
        void c.subscribe([name], (e: Record<string, unknown>) => resolve(e));
      }),
      timeoutMs,
      `event ${name}`,
    );
  } finally {
    await c.close();
  }
}

describe('the pair over nbds:// (two daemons)', () => {
  it('x509 with a client certificate the secondary checks against its allow-list: replicates, checkpoints, nothing in clear', async () => {
    const pair = await startPair(['--tls-certificates', pki.good, '--tls-authz', CLIENT_DN], `tls-certificates=${pki.client}`, true);
    expect(JSON.parse(pair.s.listeningLine)).toMatchObject({ tls: { mode: 'require', kind: 'x509+verify-peer' } });
    await replicateAndCheck(pair, `tls-certificates=${pki.client}`);
  });

  it('PSK: replicates, checkpoints, nothing in clear', async () => {
    const pair = await startPair(['--tls-psk', pki.psk], `tls-psk-file=${pki.psk}&tls-username=alice`, true);
    expect(JSON.parse(pair.s.listeningLine)).toMatchObject({ tls: { mode: 'require', kind: 'psk' } });
    await replicateAndCheck(pair, `tls-psk-file=${pki.psk}&tls-username=alice`);
  });

  it('a client certificate from a rogue CA with the allowed DN: refused, said on stderr and as pair-refused; nothing forwarded', async () => {
    const pair = await startPair(['--tls-certificates', pki.good, '--tls-authz', CLIENT_DN], `tls-certificates=${pki.rogue}`, false);
    const pc = await NbdClient.connect({ uri: `nbd+unix:///?socket=${pair.pSock}`, reconnect: false });
    await pc.write(0, markerData(256 * 1024));
    await pc.flush();
    await pc.close();
    const event = await nextEvent(pair.pControl, 'pair-refused');
    expect(event).toMatchObject({ export: '', code: expect.stringMatching(/^ERR_TLS_(REJECTED|HANDSHAKE)$/) });
    await waitFor(() => /replication to nbds\+unix:.*TLS/.test(pair.p.stderr()), 'the refusal on the primary\'s stderr');
    await waitFor(() => /TLS handshake failed/.test(pair.s.stderr()), 'the refusal on the secondary\'s stderr');
    // the primary retries (backoff from 100 ms): between attempts degraded, during one connecting; never further
    const st = await pairOf<PairStatus & { lastError?: string }>(pair.pControl);
    expect(['degraded', 'connecting']).toContain(st.link);
    expect(st.lastError).toMatch(/^ERR_TLS_(REJECTED|HANDSHAKE): /);
    expectStartTlsFirst(pair.rec);
    expect(sawInClear(pair.rec, MARKER)).toBe(false);
    expect((await readFile(join(pair.dir, 's.img'))).includes(MARKER)).toBe(false);
  });

  it('a wrong PSK key: refused, said on stderr and as pair-refused, without the key; nothing forwarded', async () => {
    const pair = await startPair(['--tls-psk', pki.psk], `tls-psk-file=${pki.wrongPsk}&tls-username=alice`, false);
    const event = await nextEvent(pair.pControl, 'pair-refused');
    expect(event).toMatchObject({ export: '', code: 'ERR_TLS_HANDSHAKE' });
    const st = await pairOf<PairStatus & { lastError?: string }>(pair.pControl);
    expect(['degraded', 'connecting']).toContain(st.link);
    expect(st.lastError).toMatch(/^ERR_TLS_HANDSHAKE: /);
    expect(pair.p.stderr()).not.toContain(pki.pskKeyHex);
    expect(pair.s.stderr()).not.toContain(pki.pskKeyHex);
    expectStartTlsFirst(pair.rec);
  });

  it('nbds:// to a secondary without TLS: refused (ERR_NBD_TLS_UNSUPPORTED), never falls back to clear text', async () => {
    const pair = await startPair([], `tls-certificates=${pki.client}`, false);
    const event = await nextEvent(pair.pControl, 'pair-refused');
    expect(event).toMatchObject({ export: '', code: 'ERR_NBD_TLS_UNSUPPORTED' });
    expect(['degraded', 'connecting']).toContain((await pairOf<PairStatus & { lastError?: string }>(pair.pControl)).link);
    expectStartTlsFirst(pair.rec);
  });

  it('a missing certificates directory in the URI: the primary does not start (ERR_TLS_CREDENTIALS)', async () => {
    const dir = await makeTempDir();
    await writeFile(join(dir, 'p.img'), Buffer.alloc(0));
    await truncate(join(dir, 'p.img'), SIZE);
    const err = await serve([join(dir, 'p.img'), '--socket', join(dir, 'p.sock'), '--replicate-to', `nbds+unix:///?socket=${join(dir, 'none.sock')}&tls-certificates=${join(dir, 'nope')}`]).then(
      () => undefined,
      (e: Error) => e,
    );
    expect(err?.message).toMatch(/ERR_TLS_CREDENTIALS/);
    expect(err?.message).toMatch(/nope: no such directory/);
  });
});
