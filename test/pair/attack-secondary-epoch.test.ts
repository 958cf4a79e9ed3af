/**
 * Attack: a hostile (or broken, or restored-from-a-damaged-state) secondary says an epoch no
 * secondary of this primary can hold — near 2^53, past what a JSON number holds exactly.
 *
 * Before: the primary took the epoch of a DONE that did not match its CHECKPOINT{N} as "committed
 * already" and numbered its next checkpoint after it (N = 2^53: not a safe integer), and a
 * welcome's epoch likewise: every checkpoint after that failed (the pair state refuses such a
 * number), for as long as the link stayed up — checkpoints stopped for good, silently but for
 * checkpoint-failed. Now the primary checks the epoch fields of the secondary's welcome (0 to
 * MAX_EPOCH = 2^48), DONE (its epoch is N: nothing else moves the secondary's epoch while the
 * link holds it), FAILED and an abort's answer (at most N): ERR_PAIR_PROTOCOL naming the message,
 * the field and the numbers; a bad DONE degrades the link (event replication-degraded), a bad
 * welcome is refused (event pair-refused), and the reconnects back off (at least 1.6 s × 0.8
 * jitter after a refused answer, not reset by a resync that goes through). Once the secondary
 * answers sanely again, the pair goes on: checkpoints resume.
 *
 * The primary is a real daemon; the secondary is this process (test/support/scripted-secondary.ts).
 */
import { join } from 'node:path';
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { MAX_EPOCH, type PairMessage } from '../../src/pair/messages.js';
import { makeTempDir, serve, waitFor } from '../support/spawn.js';
import { controlRequest, eventsOf, pairOf } from '../support/control.js';
import { scriptedSecondary, secondarySummary, welcome } from '../support/scripted-secondary.js';

const MiB = 1 << 20;
const SIZE = 4 * MiB;
const HUGE = Number.MAX_SAFE_INTEGER; // 2^53 − 1

describe('attack: a secondary saying an epoch near 2^53', () => {
  it('a DONE with another epoch than N and a welcome past 2^48: ERR_PAIR_PROTOCOL naming the field and numbers, degrade and events, backed-off retries; then checkpoints resume', async () => {
    const dir = await makeTempDir();
    const pImg = join(dir, 'p.img');
    await writeFile(pImg, Buffer.alloc(SIZE, 0x5a));
    /** what the scripted secondary says */
    let mode: 'good' | 'done-huge' | 'welcome-huge' = 'good';
    let epoch = 0;
    const hellos: Array<{ at: number; mode: string }> = [];
    const summary = secondarySummary();
    const s = await scriptedSecondary(dir, SIZE, (m: PairMessage, ch) => {
      if (m.type === 'hello') {
        hellos.push({ at: Date.now(), mode });
        ch.send(welcome(m, SIZE, { ...summary, epoch: mode === 'welcome-huge' ? HUGE : epoch }));
      } else if (m.type === 'checkpoint') {
        if (mode === 'done-huge') ch.send({ type: 'done', re: m.seq, n: m.n, epoch: HUGE });
        else {
          epoch = m.n;
          ch.send({ type: 'done', re: m.seq, n: m.n, epoch: m.n });
        }
      } else if (m.type === 'abort') ch.send({ type: 'done', re: m.seq, n: m.n, epoch });
    });
    const pCtl = join(dir, 'p.ctl');
    const p = await serve([pImg, '--socket', join(dir, 'p.sock'), '--control', pCtl, '--replicate-to', s.uri, '--protocol', 'sync']);
    try {
      await waitFor(async () => (await pairOf(pCtl)).epoch === 1, 'checkpoint 1 after the initial sync', { timeoutMs: 30_000 });
      const ev = await eventsOf(pCtl);

      // the DONE of checkpoint 2 says epoch 2^53 − 1
      mode = 'done-huge';
      const refused = controlRequest(pCtl, 'checkpoint');
      await expect(refused).rejects.toMatchObject({ code: 'ERR_PAIR_PROTOCOL' });
      const message = `the secondary's DONE for checkpoint 2: "epoch" must be 2: DONE{N} commits N (the secondary's epoch moves only by this link's checkpoints), not ${HUGE}`;
      await expect(refused).rejects.toMatchObject({ message });
      expect(await ev.next('checkpoint-failed')).toMatchObject({ n: 2, code: 'ERR_PAIR_PROTOCOL', message });
      expect(await ev.next('replication-degraded')).toMatchObject({ code: 'ERR_PAIR_PROTOCOL', reason: `bad-answer: ${message}` });
      // the epoch stays 1 on the primary
      expect(JSON.parse(await readFile(`${pImg}.pair.json`, 'utf8'))).toMatchObject({ epoch: 1 });

      // the reconnects' welcomes say epoch 2^53 − 1: refused, pair-refused, backed off
      mode = 'welcome-huge';
      await waitFor(() => hellos.filter((h) => h.mode === 'welcome-huge').length >= 2, 'two refused welcomes', { timeoutMs: 30_000 });
      const bad = ev.events.filter((e) => e.event === 'pair-refused');
      expect(bad[0]).toMatchObject({
        code: 'ERR_PAIR_PROTOCOL',
        message: `the secondary's welcome: "epoch" must be a checkpoint number from 0 to ${MAX_EPOCH} (2^48), not ${HUGE}`,
      });
      // no tight loop: the first reconnect after the bad DONE, and each after it, waits ≥ 1.6 s × 0.8 (a timer's lower bound; load only lengthens it)
      const tried = hellos.filter((h) => h.mode === 'welcome-huge');
      expect(tried[1]!.at - tried[0]!.at).toBeGreaterThanOrEqual(1280 - 50);
      expect(await pairOf(pCtl)).toMatchObject({ epoch: 1 });

      // the secondary answers sanely again: the link comes back, checkpoints resume after epoch 1
      mode = 'good';
      // (its event, not the status: the status says epoch 2 while that checkpoint is still ending,
      // and a checkpoint asked then is that one)
      await waitFor(() => ev.events.some((e) => e.event === 'checkpoint' && e.epoch === 2), 'the link back and the checkpoint after its resync', { timeoutMs: 60_000 });
      expect(await pairOf(pCtl)).toMatchObject({ link: 'connected', epoch: 2 });
      expect((await controlRequest<{ epoch: number }>(pCtl, 'checkpoint')).epoch).toBe(3);
      expect((await s.disk.read(0, SIZE)).equals(await readFile(pImg))).toBe(true);
      await ev.close();
    } finally {
      await p.stop();
      await s.close();
    }
  }, 120_000);
});
