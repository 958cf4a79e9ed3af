/**
 * Attack: a second primary daemon pointed at a secondary that already has one (an operator's
 * typo, a cloned VM). The secondary must refuse it (ERR_PAIR_BUSY while the first holds the link;
 * after the first stops, the generations: a fresh disk never overwrites the replica), its writes
 * must never reach the secondary's disk, and the first pair stays equal byte for byte.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, unixUri } from '../support/spawn.js';
import { controlRequest, eventsOf, firstCheckpoint, pairOf } from '../support/control.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

function qemuIo(socket: string, command: string) {
  return run('qemu-io', ['-f', 'raw', unixUri(socket), '-c', command]);
}

describe('attack: two primaries, one secondary', () => {
  it('the second\'s start fails (ERR_PAIR_BUSY), then, the first stopped, it is refused by the generations; the secondary keeps the first\'s data byte for byte', async () => {
    const dir = await makeTempDir();
    const [p1Img, p2Img, sImg] = ['p1.img', 'p2.img', 's.img'].map((f) => join(dir, f)) as [string, string, string];
    await writeFile(p1Img, Buffer.alloc(SIZE, 0x11));
    for (const f of [p2Img, sImg]) {
      await writeFile(f, Buffer.alloc(0));
      await truncate(f, SIZE);
    }
    const sSock = join(dir, 's.sock');
    const sControl = join(dir, 's.ctl');
    const s = await serve([sImg, '--secondary', '--socket', sSock, '--control', sControl]);
    const sEv = await eventsOf(sControl);
    const p1Args = [p1Img, '--socket', join(dir, 'p1.sock'), '--control', join(dir, 'p1.ctl'), '--replicate-to', unixUri(sSock), '--protocol', 'sync'];
    const p1 = await serve(p1Args);
    await firstCheckpoint(join(dir, 'p1.ctl'));
    expect((await qemuIo(join(dir, 'p1.sock'), 'write -P 0x22 1M 1M')).code).toBe(0);
    const p2Args = ['serve-nbd', p2Img, '--socket', join(dir, 'p2.sock'), '--control', join(dir, 'p2.ctl'), '--replicate-to', unixUri(sSock), '--protocol', 'sync', '--json'];
    const busy = await runCli(p2Args);
    expect(busy.code).not.toBe(0);
    expect(JSON.parse(busy.stdout)).toMatchObject({ error: { code: 'ERR_PAIR_BUSY' } });
    expect(await sEv.next('pair-refused')).toMatchObject({ code: 'ERR_PAIR_BUSY' });
    expect(await pairOf(join(dir, 'p1.ctl'))).toMatchObject({ link: 'connected', epoch: 1 });
    expect((await controlRequest<{ epoch: number }>(join(dir, 'p1.ctl'), 'checkpoint')).epoch).toBe(2);
    // the first primary goes away: the second meets the generations (a fresh disk vs the replica)
    expect(await p1.stop()).toBe(0);
    const from = sEv.events.length;
    const gen = await runCli(p2Args);
    expect(gen.code).not.toBe(0);
    const refused = await sEv.next('pair-refused', from);
    expect(JSON.parse(gen.stdout).error.code).toBe(refused.code);
    expect(['ERR_PAIR_ROLE', 'ERR_PAIR_UNRELATED', 'ERR_PAIR_SPLIT_BRAIN']).toContain(refused.code);
    expect(sEv.events.slice(from).filter((e) => e.event === 'replication-connected')).toEqual([]);
    await sEv.close();
    expect(await s.stop()).toBe(0);
    expect(sha(await readFile(sImg))).toBe(sha(await readFile(p1Img)));
  });
});
