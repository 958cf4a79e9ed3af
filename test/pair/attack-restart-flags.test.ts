/**
 * Attack round 3 (issue 10), restarts with changed flags, one pair through all of them (each
 * restart a clean stop or kill -9, as said): each is refused clearly (what, which numbers) or safe
 * (the disks compared byte for byte at the end, the view against the primary's disk at a
 * checkpoint).
 * - the primary: --protocol sync → async → sync
 * - the secondary: --hidden-durability strict → volatile (kill -9) → strict
 * - the secondary: --view-export added, then removed
 * - the secondary: another export name (--name): the primary's URI no longer finds the replica
 * - the secondary's disk one MiB longer: refused at start (ERR_PAIR_SIZE, the three lengths)
 * - the primary's disk one MiB longer: refused at start (ERR_BITMAP_SIZE_MISMATCH: its peer bitmap
 *   covers N bytes, the disk has M)
 */
import { readFile, truncate } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { controlRequest as request, firstCheckpoint, pairOf, stampedPair } from '../support/control.js';
import { writeFlushed } from '../support/pair-bytes.js';
import { run, serve, unixUri, waitFor, type Served } from '../support/spawn.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;

describe('attack: restarts with changed flags', () => {
  it('protocol, hidden durability, view export, export name, disk lengths: refused clearly or safe', async () => {
    const { dir, p, content } = await stampedPair(SIZE);
    const sArgs = [p.sImg, '--secondary', '--socket', p.sSock, '--control', p.sControl];
    const pArgs = (protocol: string) => [p.pImg, '--socket', p.pSock, '--control', p.pControl, '--replicate-to', unixUri(p.sSock), '--protocol', protocol];
    const procs: Served[] = [];
    const track = (x: Served) => (procs.push(x), x);
    const connected = async (what: string) => waitFor(async () => ((await pairOf(p.pControl)).link === 'connected' ? true : undefined), what, { timeoutMs: 60_000 });
    const checkpoint = async () => (await request<{ epoch: number }>(p.pControl, 'checkpoint')).epoch;
    try {
      let s = track(await serve(sArgs));
      let pr = track(await serve(pArgs('sync')));
      await firstCheckpoint(p.pControl, 60_000);

      // protocol sync → async → sync (clean stops of the primary)
      await writeFlushed(p.pSock, 0, 0x21, 64 * 1024);
      expect(await pr.stop()).toBe(0);
      pr = track(await serve(pArgs('async')));
      await connected('async primary connected');
      expect((await pairOf(p.pControl)).protocol).toBe('async');
      await writeFlushed(p.pSock, MiB, 0x22, 64 * 1024);
      await checkpoint();
      expect(await pr.stop()).toBe(0);
      pr = track(await serve(pArgs('sync')));
      await connected('sync primary connected again');
      await writeFlushed(p.pSock, 2 * MiB, 0x23, 64 * 1024);
      await checkpoint();

      // hidden durability strict → volatile: kill -9 of the secondary with copies in hidden, back volatile
      await writeFlushed(p.pSock, 3 * MiB, 0x24, 64 * 1024);
      s.child.kill('SIGKILL');
      await s.waitExit();
      s = track(await serve([...sArgs, '--hidden-durability', 'volatile']));
      await connected('the primary reconnected to the volatile secondary');
      expect(JSON.parse(await readFile(`${p.sImg}.pair.json`, 'utf8'))).toMatchObject({ volatileHidden: { bootId: expect.any(String) }, restorePointLost: null });
      await writeFlushed(p.pSock, 3 * MiB + 65536, 0x25, 64 * 1024);
      // volatile → strict after kill -9 (same boot): its copies are synced, the record goes
      s.child.kill('SIGKILL');
      await s.waitExit();
      s = track(await serve(sArgs));
      await connected('the primary reconnected to the strict secondary');
      const st1 = JSON.parse(await readFile(`${p.sImg}.pair.json`, 'utf8')) as { volatileHidden?: unknown; restorePointLost?: unknown };
      expect(st1.volatileHidden ?? null).toBeNull();
      expect(st1.restorePointLost ?? null).toBeNull();
      await checkpoint();

      // the view export added: it reads as the primary's disk at the checkpoint (no writes since)
      expect(await s.stop()).toBe(0);
      s = track(await serve([...sArgs, '--view-export', 'view', '--view-read-only']));
      await connected('reconnected with a view export');
      await checkpoint();
      const viewRaw = `${dir}/view.raw`;
      const r = await run('nbdcopy', [`nbd+unix:///view?socket=${p.sSock}`, viewRaw]);
      expect(r.code, r.stderr).toBe(0);
      const pNow = await run('nbdcopy', [unixUri(p.pSock), `${dir}/p-now.raw`]);
      expect(pNow.code, pNow.stderr).toBe(0);
      expect((await readFile(viewRaw)).equals(await readFile(`${dir}/p-now.raw`))).toBe(true);
      // and removed again
      expect(await s.stop()).toBe(0);
      s = track(await serve(sArgs));
      await connected('reconnected without the view export');
      const list = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${p.sSock}`]);
      expect(list.stdout).not.toContain('"view"');

      // another export name on the secondary: the primary's URI names ""; it stays degraded, says why, and writes go on
      expect(await s.stop()).toBe(0);
      s = track(await serve([...sArgs, '--name', 'other']));
      await waitFor(async () => ((await pairOf(p.pControl)).link !== 'connected' ? true : undefined), 'the primary not connected', { timeoutMs: 10_000 });
      await writeFlushed(p.pSock, 4 * MiB, 0x26, 64 * 1024);
      // the primary says why: the secondary has no replica export of that name
      const stOther = await waitFor(async () => {
        const x = await pairOf<{ link: string; bytesBehind: number; lastError?: string }>(p.pControl);
        return x.lastError?.includes('no replica export "" here (this secondary replicates "other")') ? x : undefined;
      }, "the primary's lastError naming both export names", { timeoutMs: 30_000 });
            expect(stOther.link).not.toBe('connected');
      expect(stOther.bytesBehind).toBeGreaterThanOrEqual(65536);
      expect(await s.stop()).toBe(0);
      s = track(await serve(sArgs));
      await connected('reconnected under the old name');
      await checkpoint();

      // the secondary's disk one MiB longer: refused at start, the three lengths named
      expect(await s.stop()).toBe(0);
      await truncate(p.sImg, SIZE + MiB);
      const longer = await serve(sArgs).catch((e: unknown) => e as Error);
      expect(longer).toBeInstanceOf(Error);
      expect((longer as Error).message).toContain('ERR_PAIR_SIZE');
      expect((longer as Error).message).toContain(`${SIZE + MiB}`);
      expect((longer as Error).message).toContain(`${SIZE}`);
      await truncate(p.sImg, SIZE);
      s = track(await serve(sArgs));
      await connected('reconnected after the length was put back');

      // the primary's disk one MiB longer: the secondary refuses the link with both lengths
      expect(await pr.stop()).toBe(0);
      await truncate(p.pImg, SIZE + MiB);
      const pl = await serve(pArgs('sync')).catch((e: unknown) => e as Error);
      if (pl instanceof Error) {
        // refused at start by its peer bitmap, both lengths named
        expect(pl.message).toContain('"code":"ERR_BITMAP_SIZE_MISMATCH"');
        expect(pl.message).toContain(`covers ${SIZE} bytes, the disk has ${SIZE + MiB}`);
      } else {
        track(pl);
        const stp = await waitFor(async () => {
          const x = await pairOf<{ link: string; refused?: { code: string; message: string } }>(p.pControl);
          return x.refused ? x : undefined;
        }, 'the primary refused', { timeoutMs: 10_000 });
        console.log(`longer primary: ${JSON.stringify(stp.refused)}`);
        expect(stp.refused!.code).toBe('ERR_PAIR_SIZE');
        expect(await pl.stop()).toBe(0);
      }
      await truncate(p.pImg, SIZE);
      pr = track(await serve(pArgs('sync')));
      await connected('the primary back at its length');
      await checkpoint();
      expect(await pr.stop()).toBe(0);
      expect(await s.stop()).toBe(0);
      expect((await run('cmp', [p.pImg, p.sImg])).code).toBe(0);
      const want = Buffer.from(content);
      const wrote: Array<[number, number]> = [[0, 0x21], [MiB, 0x22], [2 * MiB, 0x23], [3 * MiB, 0x24], [3 * MiB + 65536, 0x25], [4 * MiB, 0x26]];
      for (const [o, b] of wrote) want.fill(b, o, o + 65536);
      expect((await readFile(p.pImg)).equals(want)).toBe(true);
    } finally {
      for (const x of procs) await x.stop().catch(() => {});
    }
  }, 240_000);
});
