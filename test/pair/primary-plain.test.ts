/**
 * The primary (serve-nbd --replicate-to) against a plain NBD target, qemu-nbd: the first
 * replication copies the disk, writes are forwarded (sync and async), a lost target degrades
 * replication without failing a client write and the restarted one is resynced by the peer
 * bitmap; the CLI's errors (bad URI, sizes differ, checkpoint without a pair link, a second
 * replicate, checkpoint of an export in no pair); failover on the primary, then replicate again.
 */
import { existsSync } from 'node:fs';
import { rm, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import type { PairStatus } from '../../src/pair/role.js';
import { initialState } from '../../src/pair/state.js';
import { makeTempDir, run, runCli, serve, start, unixUri, waitFor, withTimeout, type Started } from '../support/spawn.js';

const MiB = 1 << 20;
const SIZE = 32 * MiB;

interface Ev {
  event: string;
  [k: string]: unknown;
}

async function qemuNbd(image: string, socket: string): Promise<Started> {
  await rm(socket, { force: true });
  const p = start('qemu-nbd', ['-f', 'raw', '-k', socket, '--persistent', '--shared=4', image]);
  await waitFor(() => existsSync(socket), `qemu-nbd listening on ${socket}`);
  return p;
}

async function events(control: string): Promise<{ list: Ev[]; client: ControlClient; next: (name: string, after?: number) => Promise<Ev> }> {
  const client = await ControlClient.connect(control);
  const list: Ev[] = [];
  await client.subscribe(undefined, (e) => list.push(e as unknown as Ev));
  const next = (name: string, after = 0) => waitFor(() => list.slice(after).find((e) => e.event === name), `event ${name}`, { timeoutMs: 20_000 });
  return { list, client, next };
}

/** the export's pair status, as `status --json` has it (straight from the control socket: polled) */
async function pairStatus(control: string): Promise<PairStatus> {
  const client = await ControlClient.connect(control);
  try {
    return ((await client.request('status')) as { exports: Array<{ pair?: PairStatus }> }).exports[0]!.pair!;
  } finally {
    await client.close();
  }
}

async function qemuIo(uri: string, cmds: string[]): Promise<void> {
  const r = await run('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])]);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
}

async function setupDisks(dir: string): Promise<{ p: string; s: string }> {
  const p = join(dir, 'p.img');
  const s = join(dir, 's.img');
  // the primary holds data the secondary does not: the first replication copies it
  const seed = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += MiB) seed.fill((i / MiB) % 251 + 1, i, i + 4096);
  await writeFile(p, seed);
  await writeFile(s, Buffer.alloc(0));
  await truncate(s, SIZE);
  return { p, s };
}

describe('primary → qemu-nbd (a plain NBD target)', () => {
  for (const protocol of ['sync', 'async'] as const) {
    it(`${protocol}: copies the disk first, forwards writes; qemu-img compare finds the disks identical`, async () => {
      const dir = await makeTempDir();
      const { p, s } = await setupDisks(dir);
      const ssock = join(dir, 's.sock');
      const psock = join(dir, 'p.sock');
      const control = join(dir, 'c.sock');
      const q = await qemuNbd(s, ssock);
      const d = await serve([p, '--socket', psock, '--control', control, '--replicate-to', unixUri(ssock), '--protocol', protocol]);
      expect(d.stderr()).toContain('is a plain NBD server (no blkrep pair link): replicating without checkpoints');
      await waitFor(async () => (await pairStatus(control)).link === 'connected', 'the link to be connected');
      await qemuIo(unixUri(psock), ['write -P 0x11 0 1M', 'write -P 0x22 3M 64k', 'write -z 8M 1M', 'discard 12M 1M', 'flush']);
      const r = await runCli(['status', '--control', control, '--json']);
      expect(r.code).toBe(0);
      const ex = (JSON.parse(r.stdout) as { exports: Array<{ pair?: PairStatus; stack?: Array<{ slot: string; driver: string }> }> }).exports[0]!;
      expect(ex.pair).toMatchObject({ role: 'primary', protocol, link: 'connected', peerKind: 'plain', peer: unixUri(ssock), epoch: 0, diskState: 'UpToDate' });
      // the replication filter sits in its slot once the export replicates (absent before: no hop)
      expect(ex.stack?.map((l) => l.slot)).toContain('replication');
      expect(await d.stop()).toBe(0);
      expect(await q.stop()).toBe(0);
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', p, s]);
      expect(cmp.stdout).toContain('Images are identical.');
      expect(cmp.code).toBe(0);
    });
  }

  it('a lost target never fails a write: degraded, tracked, resynced by the peer bitmap when it is back', async () => {
    const dir = await makeTempDir();
    const { p, s } = await setupDisks(dir);
    const ssock = join(dir, 's.sock');
    const psock = join(dir, 'p.sock');
    const control = join(dir, 'c.sock');
    let q = await qemuNbd(s, ssock);
    const d = await serve([p, '--socket', psock, '--control', control, '--replicate-to', unixUri(ssock), '--protocol', 'async']);
    const ev = await events(control);
    try {
      await waitFor(async () => (await pairStatus(control)).link === 'connected', 'the link to be connected');
      await q.stop('SIGKILL');
      const mark = ev.list.length;
      // 3 MiB written while the secondary is gone: every write succeeds
      await qemuIo(unixUri(psock), ['write -P 0x33 2M 1M', 'write -P 0x44 20M 2M', 'flush']);
      const degraded = await ev.next('replication-degraded', mark);
      expect(degraded.reason).toMatch(/^forward-failed: /);
      // the primary retries the dead server (backoff from 100 ms): degraded, or connecting during an attempt
      const st = await pairStatus(control);
      expect(['degraded', 'connecting']).toContain(st.link);
      expect(st.bytesBehind).toBeGreaterThanOrEqual(3 * MiB);
      q = await qemuNbd(s, ssock);
      const started = await ev.next('resync-started', mark);
      const done = await ev.next('resync-done', mark);
      await ev.next('replication-connected', mark);
      expect(started.full).toBe(false);
      // resync copies what was dirty, not the disk
      expect(done.bytes as number).toBeLessThanOrEqual(1.1 * (started.bytes as number));
      expect(done.bytes as number).toBeGreaterThanOrEqual(3 * MiB);
      expect(done.bytes as number).toBeLessThan(SIZE / 4);
      await qemuIo(unixUri(psock), ['write -P 0x55 30M 64k', 'flush']);
    } finally {
      await ev.client.close();
    }
    expect(await d.stop()).toBe(0);
    expect(await q.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', p, s]);
    expect(cmp.stdout).toContain('Images are identical.');
  });

  it('checkpoint on a plain target: ERR_PAIR_NO_CHECKPOINT, exit 1; replicate while replicating: ERR_PAIR_STATE', async () => {
    const dir = await makeTempDir();
    const { p, s } = await setupDisks(dir);
    const ssock = join(dir, 's.sock');
    const control = join(dir, 'c.sock');
    await qemuNbd(s, ssock);
    await serve([p, '--socket', join(dir, 'p.sock'), '--control', control, '--replicate-to', unixUri(ssock)]);
    const r = await runCli(['checkpoint', '--control', control, '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout).error.code).toBe('ERR_PAIR_NO_CHECKPOINT');
    const text = await runCli(['checkpoint', '--control', control]);
    expect(text.code).toBe(1);
    expect(text.stderr).toContain('is a plain NBD server: no checkpoints');
    const again = await runCli(['replicate', '--control', control, unixUri(ssock), '--json']);
    expect(again.code).toBe(1);
    expect(JSON.parse(again.stdout).error.code).toBe('ERR_PAIR_STATE');
  });

  it('failover on the primary stops forwarding and keeps serving; replicate resyncs what was written meanwhile', async () => {
    const dir = await makeTempDir();
    const { p, s } = await setupDisks(dir);
    const ssock = join(dir, 's.sock');
    const psock = join(dir, 'p.sock');
    const control = join(dir, 'c.sock');
    let q = await qemuNbd(s, ssock);
    const d = await serve([p, '--socket', psock, '--control', control, '--replicate-to', unixUri(ssock)]);
    await waitFor(async () => (await pairStatus(control)).link === 'connected', 'the link to be connected');
    const before = (await pairStatus(control)).gi.current;
    const client = await ControlClient.connect(control);
    const fo = (await client.request('failover', {})) as { role: string; dryRun: boolean; gi: { current: string; bitmap: string } };
    await client.close();
    expect(fo).toMatchObject({ role: 'primary', dryRun: false });
    expect(fo.gi.current).not.toBe(before);
    expect(fo.gi.bitmap).toBe(before);
    expect((await pairStatus(control)).link).toBe('none');
    // the secondary is gone for good: its server stops; writes go on, tracked
    await q.stop();
    await qemuIo(unixUri(psock), ['write -P 0x66 5M 1M', 'flush']);
    expect((await pairStatus(control)).bytesBehind).toBe(MiB);
    q = await qemuNbd(s, ssock);
    const rep = await runCli(['replicate', '--control', control, unixUri(ssock), '--json']);
    expect(rep.code).toBe(0);
    expect(JSON.parse(rep.stdout)).toMatchObject({ role: 'primary', protocol: 'sync', peer: unixUri(ssock) });
    await waitFor(async () => (await pairStatus(control)).link === 'connected', 'the link to be connected again');
    expect(await d.stop()).toBe(0);
    expect(await q.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', p, s]);
    expect(cmp.stdout).toContain('Images are identical.');
  });
});

describe('serve-nbd --replicate-to: errors', () => {
  it('a bad URI: ERR_BAD_URI, exit 1, nothing served', async () => {
    const dir = await makeTempDir();
    const r = await runCli(['serve-nbd', 'memory:1M', '--socket', join(dir, 'p.sock'), '--replicate-to', 'http://example.com/x', '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout.trim().split('\n').pop()!).error.code).toBe('ERR_BAD_URI');
  });

  it('a disk that checkpointed with a blkrep secondary never falls back to a plain server at the same place: ERR_PAIR_ROLE, exit 1', async () => {
    const dir = await makeTempDir();
    const { p, s } = await setupDisks(dir);
    // the pair state of a primary that took checkpoints (epoch 3) with a blkrep secondary, now promoted elsewhere
    const st = initialState('primary');
    await writeFile(`${p}.pair.json`, JSON.stringify({ ...st, epoch: 3, diskState: 'UpToDate', gi: { ...st.gi, current: '1234567890abcdef' } }));
    const ssock = join(dir, 's.sock');
    await qemuNbd(s, ssock);
    const r = await withTimeout(runCli(['serve-nbd', p, '--socket', join(dir, 'p.sock'), '--replicate-to', unixUri(ssock), '--json']), 30_000, 'serve-nbd to fail');
    expect(r.code).toBe(1);
    const err = JSON.parse(r.stdout.trim().split('\n').pop()!).error;
    expect(err.code).toBe('ERR_PAIR_ROLE');
    expect(err.message).toMatch(/no longer offers the pair link/);
  });

  it('a secondary of another size: ERR_PAIR_SIZE with both sizes, exit 1', async () => {
    const dir = await makeTempDir();
    const { p } = await setupDisks(dir);
    const small = join(dir, 'small.img');
    await writeFile(small, Buffer.alloc(0));
    await truncate(small, SIZE / 2);
    const ssock = join(dir, 's.sock');
    await qemuNbd(small, ssock);
    const r = await withTimeout(runCli(['serve-nbd', p, '--socket', join(dir, 'p.sock'), '--replicate-to', unixUri(ssock), '--json']), 30_000, 'serve-nbd to fail');
    expect(r.code).toBe(1);
    const err = JSON.parse(r.stdout.trim().split('\n').pop()!).error;
    expect(err.code).toBe('ERR_PAIR_SIZE');
    expect(err.message).toContain(`is ${SIZE / 2} bytes and the disk is ${SIZE}`);
  });

  it('an in-memory image cannot be replicated (no place for the peer bitmap): ERR_PAIR_STATE', async () => {
    const dir = await makeTempDir();
    const r = await runCli(['serve-nbd', 'memory:1M', '--socket', join(dir, 'p.sock'), '--replicate-to', unixUri(join(dir, 'none.sock')), '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout.trim().split('\n').pop()!).error.code).toBe('ERR_PAIR_STATE');
  });

  it('checkpoint and failover of an export in no pair: ERR_PAIR_ROLE', async () => {
    const dir = await makeTempDir();
    const control = join(dir, 'c.sock');
    const img = join(dir, 'd.img');
    await writeFile(img, Buffer.alloc(MiB));
    await serve([img, '--socket', join(dir, 'p.sock'), '--control', control]);
    const r = await runCli(['checkpoint', '--control', control, '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout).error.code).toBe('ERR_PAIR_ROLE');
  });
});
