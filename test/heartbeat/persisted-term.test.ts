/**
 * Terms kept across restarts (src/heartbeat/term-file.ts, IMAGE.term.json):
 * - the file itself: missing is "no terms", a save is atomic, mode 0600 and read back; a damaged
 *   file is ERR_BAD_TERM_FILE naming it, and serve-nbd refuses to start on it (exit 1);
 * - two real daemons: the primary is frozen past the bound, the secondary takes over with term 2,
 *   the old primary wakes up, hears term 2 and is demoted. kill -9 both, start the old primary
 *   again alone (nobody to hear): it reads its term file and is demoted before any client writes
 *   (qemu-io gets EIO, the disk is unchanged). Without the file it would have come back open.
 */
import { createHash } from 'node:crypto';
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadTerms, saveTerms, termFilePath } from '../../src/heartbeat/term-file.js';
import { controlRequest as request } from '../support/control.js';
import { fenceHook, startHeartbeatPair, watch } from '../support/heartbeat.js';
import { makeTempDir, run, runCli, serve, unixUri, waitFor } from '../support/spawn.js';

const SIZE = 4 << 20;
const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

interface Status {
  exports: Array<{ pair?: { role: string } }>;
  heartbeat: { term: string; termFile: string | null; io: { state: string; reason: string | null } | null };
}
const status = (ctl: string) => request<Status>(ctl, 'status');

describe('the term file', () => {
  it('missing: no terms; saved: 0600, read back; damaged: ERR_BAD_TERM_FILE naming it', async () => {
    const dir = await makeTempDir();
    const path = termFilePath(join(dir, 'disk.img'));
    expect(path).toBe(join(dir, 'disk.img.term.json'));
    expect(loadTerms(path)).toEqual({ term: 0n, seen: 0n, primarySeen: 0n });
    saveTerms(path, { term: 3n, seen: 18446744073709551615n, primarySeen: 5n });
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect(loadTerms(path)).toEqual({ term: 3n, seen: 18446744073709551615n, primarySeen: 5n });
    expect(JSON.parse(await readFile(path, 'utf8'))).toMatchObject({ version: 1, term: '3', seen: '18446744073709551615', primarySeen: '5' });
    for (const [text, why] of [
      ['{"version":1,"term":"1"', 'not JSON'],
      ['[]', 'not a JSON object'],
      ['{"version":2,"term":"1","seen":"0","primarySeen":"0"}', 'version 2, this blkrep reads version 1'],
      ['{"version":1,"term":1,"seen":"0","primarySeen":"0"}', '"term" is 1, not a decimal string'],
      ['{"version":1,"term":"1","seen":"-2","primarySeen":"0"}', '"seen" is "-2"'],
      ['{"version":1,"term":"1","seen":"0","primarySeen":"18446744073709551616"}', '"primarySeen" is "18446744073709551616"'],
    ]) {
      await writeFile(path, text!);
      expect(() => loadTerms(path)).toThrow(expect.objectContaining({ code: 'ERR_BAD_TERM_FILE', message: expect.stringContaining(`term file "${path}": ${why}`) }));
    }
  });

  it('serve-nbd with a heartbeat refuses a damaged term file beside its image: ERR_BAD_TERM_FILE, exit 1', async () => {
    const dir = await makeTempDir();
    const img = join(dir, 'p.img');
    await writeFile(img, Buffer.alloc(1 << 20));
    await writeFile(`${img}.term.json`, 'garbage');
    const r = await runCli(['serve-nbd', img, '--socket', join(dir, 'p.sock'), '--json', '--heartbeat', 'udp://127.0.0.1:9', '--node-id', 'a', '--peer-id', 'b']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout.trim().split('\n')[0]!).error).toMatchObject({ code: 'ERR_BAD_TERM_FILE', message: expect.stringContaining(`${img}.term.json`) });
  });
});

describe('a replaced primary restarted (kill -9)', () => {
  it('starts demoted from its term file, even with nobody to hear; without the file it would write', async () => {
    const dir0 = await makeTempDir();
    const hook = await fenceHook(dir0, 7);
    const pair = await startHeartbeatPair({ size: SIZE, s: ['--auto-failover', '--fence-hook', hook], p: ['--on-no-quorum', 'io-error'] });
    const pImg = join(pair.dir, 'p.img');
    expect(JSON.parse(await readFile(`${pImg}.term.json`, 'utf8'))).toMatchObject({ term: '1', primarySeen: '0' });
    expect((await status(pair.pCtl)).heartbeat).toMatchObject({ term: '1', termFile: `${pImg}.term.json` });
    const w = await watch(pair.sCtl, ['auto-failover']);
    // freeze the primary past the bound: the secondary takes over with term 2
    pair.p.child.kill('SIGSTOP');
    await waitFor(() => w.events.find((e) => e.event === 'auto-failover'), 'auto-failover', { timeoutMs: 20_000 });
    await w.client.close();
    expect((await status(pair.sCtl)).heartbeat.term).toBe('2');
    expect(JSON.parse(await readFile(join(pair.dir, 's.img.term.json'), 'utf8'))).toMatchObject({ term: '2', seen: '1', primarySeen: '1' });
    pair.p.child.kill('SIGCONT');
    await waitFor(async () => (await status(pair.pCtl)).heartbeat.io?.state === 'demoted', 'the old primary demoted');
    expect(JSON.parse(await readFile(`${pImg}.term.json`, 'utf8'))).toMatchObject({ term: '1', seen: '2', primarySeen: '2' });

    await pair.p.stop('SIGKILL');
    await pair.s.stop('SIGKILL');
    const before = sha(await readFile(pImg));
    // alone, with the same flags: it hears nobody, the file is what stops it
    const again = await serve(pair.pArgs);
    const st = await status(pair.pCtl);
    expect(st.heartbeat.term).toBe('1');
    expect(st.heartbeat.io).toMatchObject({ state: 'demoted', reason: expect.stringContaining(`the term file ${pImg}.term.json says the peer announced itself primary with term 2, above this node's 1`) });
    const w2 = await run('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x5a 0 64k']);
    expect(w2.stdout + w2.stderr).toContain('write failed: Input/output error');
    await again.stop('SIGKILL');
    expect(sha(await readFile(pImg))).toBe(before);

    // the same without the file: nothing says it was replaced (and --on-no-quorum waits for a peer)
    await rm(`${pImg}.term.json`);
    const bare = await serve(pair.pArgs.filter((a) => a !== '--on-no-quorum' && a !== 'io-error'));
    expect((await status(pair.pCtl)).heartbeat.io).toMatchObject({ state: 'open' });
    expect((await run('qemu-io', ['-f', 'raw', unixUri(pair.pSock), '-c', 'write -P 0x5b 0 64k'])).code).toBe(0);
    await bare.stop('SIGKILL');
  });
});
