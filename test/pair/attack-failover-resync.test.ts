/**
 * Attack: the secondary is failed over while a resync is copying into it (two real daemons, the
 * primary killed with -9 mid-resync). replication.md §2/§3: during a resync the secondary's disk
 * is Inconsistent, but its hidden disk keeps the last checkpoint (resync writes go through
 * copy-before-write), so it stays promotable to exactly that checkpoint; the primary wrote after
 * it (the outage the resync copies), so, as an Outdated secondary, it fails over only with
 * --force, and says so. (A full initial sync into a disk that never committed a checkpoint is
 * never promotable, forced or not: test/pair/initial-sync.test.ts.)
 */
import { createHash } from 'node:crypto';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';
import { eventsOf, firstCheckpoint, pairOf, pairPaths } from '../support/control.js';
import { seededRandom as rng } from '../../src/block/filters/error.js';

const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 32 * MiB;
const BLOCKS = 256;

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

function pattern(seed: number, length: number): Buffer {
  const r = rng(seed);
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) b.writeUInt32LE(Math.floor(r() * 0x100000000) >>> 0, i);
  return b;
}

async function blank(path: string): Promise<void> {
  await writeFile(path, Buffer.alloc(0));
  await truncate(path, SIZE);
}

interface FailoverOut {
  code: number;
  json: { error?: { code: string; message: string }; allowed?: boolean; rule?: string; epoch?: number; explanation?: string; refusal?: { code: string; message: string }; role?: string };
}

async function failover(control: string, ...flags: string[]): Promise<FailoverOut> {
  const r = await runCli(['failover', '--control', control, '--json', ...flags]);
  return { code: r.code ?? -1, json: JSON.parse(r.stdout) as FailoverOut['json'] };
}

describe('attack: failover racing a resync', () => {
  it('bitmap resync after an outage, primary killed -9 mid-resync: failover refuses without --force (ERR_PAIR_OUTDATED, says a resync was copying and what --force holds), also after the secondary is killed -9 and restarted; --force gives checkpoint 1 exactly', async () => {
    const dir = await makeTempDir();
    const { pImg, sImg, pSock, sSock, pControl, sControl } = pairPaths(dir);
    const cp1 = pattern(3, SIZE);
    await writeFile(pImg, cp1);
    await blank(sImg);
    const sArgs = [sImg, '--secondary', '--socket', sSock, '--control', sControl];
    let s = await serve(sArgs);
    const p = await serve([pImg, '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock)]);
    await firstCheckpoint(pControl);
    expect(await s.stop()).toBe(0);
    await waitFor(async () => (await pairOf(pControl)).link === 'degraded', 'the primary degraded');
    // the outage: 256 distinct 64 KiB blocks of the 512 (step 79 is odd)
    const cmds: string[] = [];
    for (let i = 0; i < BLOCKS; i++) cmds.push('-c', `write -P ${(i % 250) + 1} ${((i * 79) % 512) * 64 * KiB} 64k`);
    expect((await run('qemu-io', ['-f', 'raw', unixUri(pSock), ...cmds, '-c', 'flush'])).code).toBe(0);
    const pEv = await eventsOf(pControl, 60_000);
    s = await serve([...sArgs, '--filter', 'delay:write=2000,at=disk']);
    expect(await pEv.next('resync-started')).toMatchObject({ full: false, bytes: BLOCKS * 64 * KiB });
    await waitFor(async () => {
      const st = await pairOf(pControl);
      return st.link === 'resyncing' && st.bytesBehind < BLOCKS * 64 * KiB && st.bytesBehind > 0;
    }, 'the resync under way', { timeoutMs: 30_000, intervalMs: 50 });
    await pEv.close();
    p.child.kill('SIGKILL');
    await p.waitExit();
    await waitFor(async () => (await pairOf(sControl)).link === 'none', 'the secondary to see the link drop');
    expect(await pairOf(sControl)).toMatchObject({ epoch: 1, diskState: 'Inconsistent' });

    const dry = await failover(sControl, '--dry-run');
    expect(dry.code).toBe(0);
    expect(dry.json).toMatchObject({ allowed: false, rule: 'refused-outdated', epoch: 1, refusal: { code: 'ERR_PAIR_OUTDATED' } });
    const refused = await failover(sControl);
    expect(refused.code).toBe(1);
    expect(refused.json.error!.code).toBe('ERR_PAIR_OUTDATED');
    expect(refused.json.error!.message).toContain('a resync from the primary was copying into it');
    expect(refused.json.error!.message).toContain('--force fails over to checkpoint 1');
    const forcedDry = await failover(sControl, '--dry-run', '--force');
    expect(forcedDry.json).toMatchObject({ allowed: true, rule: 'failover-to-checkpoint', epoch: 1 });
    expect(forcedDry.json.explanation).toMatch(/^fail over to checkpoint 1 exactly, though a resync was copying into the disk/);
    const latest = await failover(sControl, '--force', '--to', 'latest');
    expect(latest.code).toBe(1);
    expect(latest.json.error!.code).toBe('ERR_PAIR_STATE');
    // the secondary crashes too (kill -9 inside the resync's copies) and comes back on a disk at full speed
    s.child.kill('SIGKILL');
    await s.waitExit();
    s = await serve(sArgs);
    expect(await pairOf(sControl)).toMatchObject({ epoch: 1, diskState: 'Inconsistent', link: 'none' });
    expect((await failover(sControl)).json.error!.code).toBe('ERR_PAIR_OUTDATED');
    const forced = await failover(sControl, '--force');
    expect(forced.code).toBe(0);
    expect(forced.json).toMatchObject({ role: 'primary', epoch: 1 });
    expect(await s.stop()).toBe(0);
    // exactly checkpoint 1: no block of the outage the resync had copied survives the failover
    expect(sha(await readFile(sImg))).toBe(sha(cp1));
  }, 120_000);
});
