/**
 * The primary when its secondary dies inside a checkpoint (the secondary's fault hook
 * BLKREP_TEST_CRASH_AT, separate processes): the checkpoint fails with ERR_PAIR_LINK_DOWN (exit 1),
 * the events say so, the primary's epoch is unchanged, client writes keep succeeding; once the
 * secondary is back the primary reconnects, resyncs by its peer bitmap, and the two disks are
 * byte-equal (qemu-img compare). In clear and over nbds:// with PSK (tls-links.ts): each return
 * of the secondary is a new TLS handshake on the link.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { NbdClient } from '../../src/nbd/client.js';
import { run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { pairOf, blankPair, firstCheckpoint } from '../support/control.js';
import { pairLink, requiresTls, type LinkKind } from './tls-links.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;

interface Ev {
  event: string;
  [k: string]: unknown;
}

describe.each<LinkKind>(['clear', 'psk'])('two daemons (link %s): the secondary dies inside a checkpoint', (kind) => {
  it('checkpoint fails ERR_PAIR_LINK_DOWN, writes go on, the secondary is resynced when back; disks equal', async () => {
    const link = await pairLink(kind);
    const { dir, sSock, pSock, sControl, pControl } = await blankPair(SIZE);
    const sArgs = [join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sControl, ...link.serverArgs];
    const s1 = await serve(sArgs);
    expect(requiresTls(s1.listeningLine, link)).toBe(true);
    const p = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pControl, '--replicate-to', link.uri(sSock)]);
    const events: Ev[] = [];
    const ec = await ControlClient.connect(pControl);
    await ec.subscribe(undefined, (e) => events.push(e as unknown as Ev));
    const next = (name: string, from: number) => waitFor(() => events.slice(from).find((e) => e.event === name), `event ${name}`, { timeoutMs: 30_000 });
    // the initial full sync is followed by checkpoint 1
    await firstCheckpoint(pControl);
    const pc = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
    try {
      // the secondary dies between checkpoints: the client never sees it; a checkpoint is refused
      let mark = events.length;
      s1.child.kill('SIGKILL');
      await s1.waitExit();
      await pc.write(4 * MiB, Buffer.alloc(2 * MiB, 0x22));
      await pc.flush();
      await next('replication-degraded', mark);
      const r = await runCli(['checkpoint', '--control', pControl, '--json']);
      expect(r.code).toBe(1);
      expect(JSON.parse(r.stdout).error.code).toBe('ERR_PAIR_LINK_DOWN');
      // back, with the fault hook: the resync copies what it missed, not the disk; the checkpoint
      // after the resync kills it at step 4
      mark = events.length;
      const s2 = await serve(sArgs, { env: { ...process.env, BLKREP_TEST_CRASH_AT: 'checkpoint-step-4' } });
      const started = await next('resync-started', mark);
      const done = await next('resync-done', mark);
      expect(started.full).toBe(false);
      expect(done.bytes as number).toBeGreaterThanOrEqual(2 * MiB);
      expect(done.bytes as number).toBeLessThanOrEqual(1.1 * (started.bytes as number));
      expect(done.bytes as number).toBeLessThan(SIZE / 2);
      const failed = await next('checkpoint-failed', mark);
      expect(failed).toMatchObject({ n: 2, code: 'ERR_PAIR_LINK_DOWN' });
      await s2.waitExit();
      expect(s2.child.signalCode).toBe('SIGKILL');
      await next('replication-degraded', mark);
      expect(await pairOf(pControl)).toMatchObject({ epoch: 1 });
      await pc.write(10 * MiB, Buffer.alloc(MiB, 0x33));
      await pc.flush();
      // back for good: resync, checkpoint 2
      mark = events.length;
      await serve(sArgs);
      await next('resync-done', mark);
      await next('checkpoint', mark);
      expect(await pairOf(pControl)).toMatchObject({ epoch: 2, link: 'connected' });
      await pc.write(12 * MiB, Buffer.alloc(MiB, 0x44));
      await pc.flush();
    } finally {
      await pc.close().catch(() => {});
      await ec.close();
    }
    expect(await p.stop()).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', join(dir, 'p.img'), join(dir, 's.img')]);
    expect(cmp.stdout).toContain('Images are identical.');
  });
});
