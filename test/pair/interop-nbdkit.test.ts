/**
 * A primary replicating to a plain nbdkit target (issue 10, "Interop" and "Degrade and resync"):
 * nbdkit's file plugin behind its error and delay filters. It is a plain NBD server: no pair link,
 * so no checkpoints (said on stderr, event replication-plain, status peerKind "plain", and
 * `blkrep checkpoint` exits 1 with ERR_PAIR_NO_CHECKPOINT). While the error filter's trigger file
 * exists every write to the target fails with EIO: the primary degrades, its clients see no error,
 * the writes are tracked; once the trigger is gone it reconnects and resyncs by the peer bitmap,
 * copying at most 1.1× what was written meanwhile, and the two disks are byte-equal.
 */
import { join } from 'node:path';
import { access, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client.js';
import { makeTempDir, runCli, serve, start, unixUri, waitFor } from '../support/spawn.js';
import { pairOf } from '../support/control.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;
const CHUNK = 64 * 1024;

interface Ev {
  event: string;
  [k: string]: unknown;
}

describe('a primary replicating to nbdkit (file plugin, error and delay filters)', () => {
  it('no checkpoints (said so); a faulty target degrades without a client error; resync copies ≤ 1.1× the dirty bytes; disks equal', async () => {
    const dir = await makeTempDir();
    const pImg = join(dir, 'p.img');
    const tImg = join(dir, 't.img');
    for (const f of [pImg, tImg]) {
      await writeFile(f, Buffer.alloc(0));
      await truncate(f, SIZE);
    }
    const tSock = join(dir, 't.sock');
    const trigger = join(dir, 'fail-writes');
    start('nbdkit', ['-f', '-U', tSock, '--filter=error', '--filter=delay', 'file', tImg, 'error-pwrite=EIO', 'error-pwrite-rate=100%', `error-pwrite-file=${trigger}`, 'delay-write=2ms']);
    await waitFor(() => access(tSock).then(() => true, () => false), 'nbdkit to listen', { timeoutMs: 10_000 });
    const pSock = join(dir, 'p.sock');
    const pCtl = join(dir, 'p.ctl');
    const p = await serve([pImg, '--socket', pSock, '--control', pCtl, '--replicate-to', unixUri(tSock), '--protocol', 'sync']);
    const events: Ev[] = [];
    const ec = await ControlClient.connect(pCtl);
    await ec.subscribe(undefined, (e) => events.push(e as unknown as Ev));
    const c = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
    try {
      await waitFor(async () => (await pairOf(pCtl)).link === 'connected', 'the first copy', { timeoutMs: 30_000 });
      expect(await pairOf(pCtl)).toMatchObject({ role: 'primary', peerKind: 'plain', link: 'connected', epoch: 0 });
      expect(p.stderr()).toContain(`${unixUri(tSock)} is a plain NBD server (no blkrep pair link): replicating without checkpoints`);
      const cp = await runCli(['checkpoint', '--control', pCtl, '--json']);
      expect(cp.code).toBe(1);
      expect(JSON.parse(cp.stdout)).toEqual({ error: { code: 'ERR_PAIR_NO_CHECKPOINT', message: `${unixUri(tSock)} is a plain NBD server: no checkpoints (they need a blkrep secondary with a pair link)` } });
      await c.write(0, Buffer.alloc(MiB, 0x11));
      await c.flush();

      // the target fails every write: the next forwarded write degrades the pair, the client's write succeeds
      await writeFile(trigger, '');
      const written = new Set<number>();
      let seed = 7;
      const rnd = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
      const writeChunk = async (n: number, byte: number) => {
        await c.write(n * CHUNK, Buffer.alloc(CHUNK, byte));
        written.add(n);
      };
      await writeChunk(40, 0x22);
      await waitFor(async () => (await pairOf(pCtl)).link === 'degraded', 'the pair to degrade', { timeoutMs: 10_000 });
      expect(events.find((e) => e.event === 'replication-degraded')).toMatchObject({ export: '', peer: unixUri(tSock) });
      for (let i = 0; i < 48; i++) await writeChunk(Math.floor(rnd() * (SIZE / CHUNK)), 0x30 + (i % 64));
      await c.flush();
      const dirty = written.size * CHUNK;
      expect((await pairOf(pCtl)).bytesBehind).toBe(dirty);

      // the target heals: reconnect, resync by the bitmap
      const before = events.length;
      await rm(trigger);
      await waitFor(async () => (await pairOf(pCtl)).link === 'connected', 'the resync', { timeoutMs: 30_000 });
      const done = events.slice(before).filter((e) => e.event === 'resync-done').at(-1)!;
      expect(done).toMatchObject({ export: '', dirtyBytes: dirty });
      expect(done.bytes as number).toBeGreaterThanOrEqual(dirty);
      expect(done.bytes as number).toBeLessThanOrEqual(1.1 * dirty);
      expect((await pairOf(pCtl)).bytesBehind).toBe(0);
      // writes go on being forwarded
      await c.write(2 * MiB, Buffer.alloc(CHUNK, 0x77));
      await c.flush();
      expect((await readFile(tImg)).equals(await readFile(pImg))).toBe(true);
    } finally {
      await c.close().catch(() => {});
      await ec.close();
    }
  });
});
