/**
 * "A stale primary can never write to the new primary" (issue 10; src/pair/data-token.ts): every
 * role change retires the pair link's writer token. A data connection that holds a retired token
 * keeps its socket, but its writes get EPERM and nothing is written; a new connection with it is
 * refused at NBD_OPT_GO (NBD_REP_ERR_POLICY, "stale pair token"); the replica export's own name is
 * read-only for plain NBD clients (nbdinfo, qemu-io) and does not list the writer export.
 *
 * Real processes: the secondary daemon, a real primary daemon, and this test as the old primary
 * (its pair link and its data connection through the token, as a blkrep primary opens them).
 */
import { join } from 'node:path';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { replicaWriterExport } from '../../src/pair/data-token.js';
import { makeTempDir, run, serve, unixUri, waitFor, type Served } from '../support/spawn.js';
import { controlRequest as request, pairOf } from '../support/control.js';
import { openLink, writerClient } from './scripted-primary.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;

async function setUp(): Promise<{ dir: string; sDisk: string; sSock: string; sControl: string; served: Served }> {
  const dir = await makeTempDir();
  const sDisk = join(dir, 's.img');
  await writeFile(sDisk, Buffer.alloc(SIZE, 0x11));
  const sSock = join(dir, 's.sock');
  const sControl = join(dir, 's.ctl');
  const served = await serve([sDisk, '--secondary', '--socket', sSock, '--control', sControl]);
  return { dir, sDisk, sSock, sControl, served };
}

function client(socket: string, name = ''): Promise<NbdClient> {
  return NbdClient.connect({ uri: unixUri(socket, name), reconnect: false, closeTimeoutMs: 2000 });
}

describe('the replica export\'s writer token (a stale primary never writes)', () => {
  it('plain NBD clients read the replica export and cannot write it; the writer export is not listed', async () => {
    const { sSock } = await setUp();
    const link = await openLink(sSock, { size: SIZE });
    expect(link.answer).toMatchObject({ type: 'welcome' });
    const token = (link.answer as { dataToken?: string }).dataToken;
    expect(token).toMatch(/^[0-9a-f]{32}$/);
    // nbdinfo: the replica export is there, read-only, and the writer export is not listed
    const list = await run('nbdinfo', ['--list', '--json', unixUri(sSock)]);
    expect(list.code, list.stderr).toBe(0);
    const exports = (JSON.parse(list.stdout) as { exports: Array<{ 'export-name': string; is_read_only: boolean }> }).exports;
    expect(exports.map((e) => e['export-name'])).toEqual(['']);
    expect(exports[0]!.is_read_only).toBe(true);
    // qemu-io reads it (0x11) and a write is refused: EPERM, nothing written
    const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x11 0 1M', unixUri(sSock)]);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout).not.toContain('Pattern verification failed');
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x66 0 64k', unixUri(sSock)]);
    expect(w.code).not.toBe(0);
    expect(w.stderr + w.stdout).toContain('Permission denied');
    // with the token, qemu-io writes (a real NBD client as a primary's data connection)
    const tw = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 64k 64k', unixUri(sSock, replicaWriterExport('', token!))]);
    expect(tw.code, tw.stderr + tw.stdout).toBe(0);
    const c = await client(sSock);
    const b = Buffer.alloc(128 * 1024);
    await c.read(0, b);
    await c.close();
    expect(b.subarray(0, 65536).equals(Buffer.alloc(65536, 0x11))).toBe(true);
    expect(b.subarray(65536).equals(Buffer.alloc(65536, 0x22))).toBe(true);
    link.close();
  });

  it('the token is the writer\'s credential: the daemon\'s log and status show the writer export redacted', async () => {
    const { sSock, sControl, served } = await setUp();
    const link = await openLink(sSock, { size: SIZE });
    const token = (link.answer as { dataToken: string }).dataToken;
    const writer = await writerClient(sSock, link);
    await writer.write(0, Buffer.alloc(4096, 0x44));
    const status = await request<{ connections: Array<{ export: string | null }> }>(sControl, 'status');
    expect(status.connections.map((c) => c.export)).toContain('@pair-token=…');
    expect(JSON.stringify(status)).not.toContain(token);
    await writer.close();
    link.close();
    await waitFor(async () => (await pairOf(sControl)).link === 'none', 'the link to close', { timeoutMs: 5000 });
    expect(served.stderr()).toContain('export "@pair-token=…" added');
    expect(served.stderr() + served.stdout()).not.toContain(token);
  });

  it('the old primary keeps its data connection across a new link and a failover: each write gets EPERM, nothing written; reconnecting with its token is refused', async () => {
    const { dir, sDisk, sSock, sControl } = await setUp();
    // the old primary (this process): link, data connection with its token, one write
    const old = await openLink(sSock, { size: SIZE });
    const token = (old.answer as { dataToken: string }).dataToken;
    const stale = await writerClient(sSock, old);
    await stale.write(0, Buffer.alloc(65536, 0x22));
    await stale.flush();

    // role change 1: its link goes (a partition), a real primary daemon takes the secondary
    old.close();
    await waitFor(async () => (await pairOf(sControl)).link === 'none', 'the old link to close', { timeoutMs: 5000 });
    const pDisk = join(dir, 'p.img');
    await writeFile(pDisk, Buffer.alloc(0));
    await truncate(pDisk, SIZE);
    await writeFile(pDisk, Buffer.alloc(MiB, 0x33));
    await truncate(pDisk, SIZE);
    const pControl = join(dir, 'p.ctl');
    await serve([pDisk, '--socket', join(dir, 'p.sock'), '--control', pControl, '--replicate-to', unixUri(sSock)]);
    await waitFor(async () => {
      const st = await pairOf(pControl);
      return st.epoch === 1 && st.lastCheckpointAgeMs !== null;
    }, 'the new primary\'s checkpoint 1', { timeoutMs: 30_000 });
    const expected = await readFile(pDisk);

    // the stale writer's next write: EPERM, its connection still open (a read on it works)
    await expect(stale.write(2 * MiB, Buffer.alloc(65536, 0x99))).rejects.toMatchObject({ errno: 'EPERM' });
    await expect(stale.writeZeroes(3 * MiB, 65536)).rejects.toMatchObject({ errno: 'EPERM' });
    const back = Buffer.alloc(4096);
    await stale.read(2 * MiB, back);
    expect(back.equals(Buffer.alloc(4096, 0))).toBe(true);
    // reconnecting with the retired token is refused at NBD_OPT_GO, with the reason
    const refused = await client(sSock, replicaWriterExport('', token)).then(
      () => undefined,
      (err: Error & { code?: string }) => err,
    );
    expect(refused).toMatchObject({ code: 'ERR_NBD_HANDSHAKE' });
    expect(refused!.message).toBe(
      `the NBD server refused export "@pair-token=${token}" with ERR_POLICY: stale pair token for export "": the pair link from unix:${sSock} closed (pair link to unix:${sSock} closed by the peer); a primary writes the replica only with the token of its current pair link`,
    );
    expect((await readFile(sDisk)).equals(expected)).toBe(true);

    // role change 2: failover; the new primary's writer is fenced as well, the stale one still
    const fo = await request<{ role: string }>(sControl, 'failover', { to: 'checkpoint' });
    expect(fo.role).toBe('primary');
    await expect(stale.write(4 * MiB, Buffer.alloc(65536, 0x99))).rejects.toMatchObject({ errno: 'EPERM' });
    await stale.close().catch(() => {});
    expect((await readFile(sDisk)).equals(expected)).toBe(true);
    // the new primary (the old one's peer) saw the promotion and tracks: its writes stay its own
    await waitFor(async () => (await pairOf(pControl)).link === 'degraded', 'the primary to degrade', { timeoutMs: 10_000 });
    const pc = await client(join(dir, 'p.sock'));
    await pc.write(5 * MiB, Buffer.alloc(65536, 0x77));
    await pc.flush();
    await pc.close();
    expect((await readFile(sDisk)).equals(expected)).toBe(true);
  });
});
