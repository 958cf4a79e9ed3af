/**
 * Two control commands at once on a pair's export (real daemons): the second `replicate` while
 * the first is starting is refused with ERR_PAIR_STATE saying so. Before, it went on to hand the
 * old role off a second time and to attach a second replication filter, and failed with "the
 * replication filter is degraded: detach it first".
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ControlClient } from '../../src/control/client.js';
import { makeTempDir, serve, unixUri } from '../support/spawn.js';
import { controlRequest, pairOf, firstCheckpoint } from '../support/control.js';

const MiB = 1 << 20;

describe('two replicate commands at once', () => {
  it('one starts the pair; the other: ERR_PAIR_STATE "being put in a pair already"; the pair works (checkpoint, equal disks)', async () => {
    const dir = await makeTempDir();
    const p = (f: string): string => join(dir, f);
    const data = randomBytes(4 * MiB);
    await writeFile(p('p.img'), data);
    await writeFile(p('s.img'), Buffer.alloc(4 * MiB));
    const s = await serve([p('s.img'), '--secondary', '--socket', p('s.sock'), '--control', p('sctl')]);
    const primary = await serve([p('p.img'), '--socket', p('p.sock'), '--control', p('pctl')]);
    const uri = unixUri(p('s.sock'));
    // one control connection, both requests written before either is answered
    const c = await ControlClient.connect(p('pctl'));
    const both = await Promise.allSettled([c.request('replicate', { uri }, { timeoutMs: 60_000 }), c.request('replicate', { uri }, { timeoutMs: 60_000 })]);
    await c.close();
    expect(both.map((r) => r.status).sort()).toEqual(['fulfilled', 'rejected']);
    const refused = both.find((r) => r.status === 'rejected') as PromiseRejectedResult;
    expect((refused.reason as { code: string }).code).toBe('ERR_PAIR_STATE');
    expect((refused.reason as Error).message).toBe(`export "" is being put in a pair already (a replicate to ${uri} is under way): one at a time`);
    await firstCheckpoint(p('pctl'), 60_000);
    expect(await controlRequest<{ epoch: number }>(p('pctl'), 'checkpoint')).toMatchObject({ epoch: 2 });
    expect(await pairOf(p('pctl'))).toMatchObject({ link: 'connected', epoch: 2 });
    expect(await primary.stop()).toBe(0);
    expect(await s.stop()).toBe(0);
    expect((await readFile(p('s.img'))).equals(data)).toBe(true);
  }, 120_000);
});
