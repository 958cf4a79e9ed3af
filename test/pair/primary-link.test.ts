/**
 * The primary's pair link against a scripted secondary in-process (an NBD server whose pair link
 * option answers as the test says, over a memory disk): hello's fields, a refusal, a checkpoint
 * the secondary fails, one it never answers (5 s: abort{n}, ERR_PAIR_TIMEOUT), the epoch only
 * moving on done.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { freshTuple } from '../../src/pair/generations.js';
import { PAIR_LINK_VERSION, PairChannel, type PairMessage } from '../../src/pair/messages.js';
import { PrimaryRole } from '../../src/pair/primary.js';
import { ReplicationFilter } from '../../src/pair/replication-filter.js';
import { makeTempDir, waitFor } from '../support/spawn.js';
import { scriptedSecondary as scriptedSecondaryAt, type SecondaryScript } from '../support/scripted-secondary.js';

const SIZE = 4 << 20;

type Script = SecondaryScript;

const scriptedSecondary = (dir: string, script: Script) => scriptedSecondaryAt(dir, SIZE, script);

const summary = { nodeId: 'scripted', role: 'secondary' as const, gi: freshTuple(), epoch: 0, diskState: 'UpToDate' as const, crashedPrimary: false, bitmapBytes: 0 };

function welcoming(onCheckpoint: (m: Extract<PairMessage, { type: 'checkpoint' }>, ch: PairChannel) => void): Script {
  return (m, ch) => {
    if (m.type === 'hello') ch.send({ type: 'welcome', re: m.seq, version: PAIR_LINK_VERSION, size: SIZE, ...summary, decision: { rule: 20, action: 'resync-full', explanation: 'scripted' } });
    if (m.type === 'checkpoint') onCheckpoint(m, ch);
    if (m.type === 'abort') ch.send({ type: 'done', re: m.seq, n: m.n, epoch: 0 });
  };
}

async function primary(dir: string, uri: string, events: Array<{ event: string; [k: string]: unknown }>) {
  const filter = new ReplicationFilter(new MemoryNode(SIZE), { protocol: 'sync' });
  return PrimaryRole.start({
    exportName: '',
    imagePath: join(dir, 'p.img'),
    filter,
    uri,
    publish: (event, fields) => events.push({ event, ...fields }),
  });
}

describe('the primary on a scripted secondary', () => {
  it('says hello with its disk, generation and protocol; done{n} moves the epoch', async () => {
    const dir = await makeTempDir();
    const s = await scriptedSecondary(dir, welcoming((m, ch) => ch.send({ type: 'done', re: m.seq, n: m.n, epoch: m.n })));
    const events: Array<{ event: string; [k: string]: unknown }> = [];
    const p = await primary(dir, s.uri, events);
    try {
      const hello = s.received.find((m) => m.type === 'hello') as Extract<PairMessage, { type: 'hello' }>;
      expect(hello).toMatchObject({ version: PAIR_LINK_VERSION, exportName: '', size: SIZE, protocol: 'sync', role: 'primary', epoch: 0, diskState: 'UpToDate' });
      expect(hello.gi.current).toMatch(/^[0-9a-f]{16}$/);
      expect(hello.gi.current).not.toBe(freshTuple().current);
      // the checkpoint after the initial (full) resync
      await waitFor(() => events.some((e) => e.event === 'checkpoint'), 'checkpoint 1 (its event: the checkpoint has ended)');
      expect(events.map((e) => e.event)).toEqual(['resync-started', 'resync-done', 'replication-connected', 'checkpoint']);
      expect(events[0]).toMatchObject({ full: true, bytes: SIZE });
      // the primary's steps, timed: the hold (steps 1–2 and the secondary's 3–7) and the state write after it
      const steps = (events[3] as unknown as { steps: Record<string, number> }).steps;
      expect(Object.keys(steps).sort()).toEqual(['drainMs', 'flushMs', 'heldMs', 'preflushMs', 'secondaryMs', 'stateMs']);
      for (const v of Object.values(steps)) expect(v).toBeGreaterThanOrEqual(0);
      expect(steps.heldMs).toBeGreaterThanOrEqual(steps.secondaryMs!);
      expect(await p.checkpoint()).toEqual({ epoch: 2 });
      expect(p.status()).toMatchObject({ role: 'primary', link: 'connected', epoch: 2, peerKind: 'blkrep' });
    } finally {
      await p.close();
      await s.close();
    }
  });

  it('failed{n}: the error code of the secondary, checkpoint-failed, epoch unchanged', async () => {
    const dir = await makeTempDir();
    let fail = false;
    const s = await scriptedSecondary(
      dir,
      welcoming((m, ch) => ch.send(fail ? { type: 'failed', re: m.seq, n: m.n, code: 'ERR_INJECTED', message: 'scripted failure' } : { type: 'done', re: m.seq, n: m.n, epoch: m.n })),
    );
    const events: Array<{ event: string; [k: string]: unknown }> = [];
    const p = await primary(dir, s.uri, events);
    try {
      await waitFor(() => events.some((e) => e.event === 'checkpoint'), 'checkpoint 1 (its event: the checkpoint has ended)');
      fail = true;
      await expect(p.checkpoint()).rejects.toMatchObject({ code: 'ERR_INJECTED', message: 'the secondary failed checkpoint 2: scripted failure' });
      expect(events.at(-1)).toMatchObject({ event: 'checkpoint-failed', n: 2, code: 'ERR_INJECTED' });
      expect(p.status().epoch).toBe(1);
      expect(p.status().link).toBe('connected');
    } finally {
      await p.close();
      await s.close();
    }
  });

  it('no answer within 5 s: abort{n}, ERR_PAIR_TIMEOUT, epoch unchanged', async () => {
    const dir = await makeTempDir();
    let answer = true;
    const s = await scriptedSecondary(
      dir,
      welcoming((m, ch) => {
        if (answer) ch.send({ type: 'done', re: m.seq, n: m.n, epoch: m.n });
      }),
    );
    const events: Array<{ event: string; [k: string]: unknown }> = [];
    const p = await primary(dir, s.uri, events);
    try {
      await waitFor(() => events.some((e) => e.event === 'checkpoint'), 'checkpoint 1 (its event: the checkpoint has ended)');
      answer = false;
      await expect(p.checkpoint()).rejects.toMatchObject({ code: 'ERR_PAIR_TIMEOUT' });
      expect(s.received.filter((m) => m.type === 'abort')).toEqual([expect.objectContaining({ type: 'abort', n: 2 })]);
      expect(p.status().epoch).toBe(1);
    } finally {
      await p.close();
      await s.close();
    }
  }, 30_000);

  it('a refusal (ERR_PAIR_BUSY) fails the start with that code and publishes pair-refused', async () => {
    const dir = await makeTempDir();
    const s = await scriptedSecondary(dir, (m, ch) => {
      if (m.type === 'hello') ch.send({ type: 'refuse', re: m.seq, code: 'ERR_PAIR_BUSY', message: 'another primary holds the pair link' });
    });
    const events: Array<{ event: string; [k: string]: unknown }> = [];
    try {
      await expect(primary(dir, s.uri, events)).rejects.toMatchObject({ code: 'ERR_PAIR_BUSY', message: expect.stringContaining('refused the pair link: another primary holds the pair link') });
      expect(events).toEqual([expect.objectContaining({ event: 'pair-refused', code: 'ERR_PAIR_BUSY' })]);
    } finally {
      await s.close();
    }
  });
});
