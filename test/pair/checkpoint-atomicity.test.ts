/**
 * Checkpoint atomicity under fio (replication.md §7 B.1): fio (nbd engine, a real peer) writes
 * through a sync primary while checkpoints run; after each checkpoint the secondary's view is a
 * state the primary's disk was in.
 *
 * The oracle: fio writes the disk sequentially, 4 KiB blocks, iodepth 16, round and round, each block
 * carrying fio's verify header (--verify=crc32c: magic 0xacca, the block's offset, and numberio,
 * fio's issue counter mod 2^16). Every state of the primary's disk at a checkpoint's cut (writes
 * held, those in flight drained) is a prefix of that issue order: going round the disk, each block's
 * numberio is the one before plus 1, except at exactly one place (the wavefront: the block written
 * next still holds the previous round's); in the first round, blocks [0, w) hold 0 … w−1 and the
 * rest are unwritten. A view mixing two cuts, a lost or a duplicated write
 * breaks that.
 *
 * Async (issue 10): the same with an async primary, then kill -9 of the primary while fio writes
 * (the secondary's disk holds forwarded writes from after the last cut) and failover --to
 * checkpoint: the disk equals, byte for byte, the view read right after that checkpoint — the
 * primary's state at the cut, which the oracle checked.
 */
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { serve, start, unixUri, waitFor } from '../support/spawn.js';
import { controlRequest as request, blankPair, firstCheckpoint } from '../support/control.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;
const BLOCK = 4096;
const BLOCKS = SIZE / BLOCK;
const CHECKPOINTS = 8;

function fioArgs(socket: string, extra: string[]): string[] {
  return ['--name=cp', '--ioengine=nbd', `--uri=${unixUri(socket)}`, '--rw=write', `--bs=${BLOCK}`, '--iodepth=16', `--size=${SIZE}`, '--verify=crc32c', '--do_verify=0', '--output=/dev/null', ...extra];
}

/** What is wrong with `view` as a prefix of fio's sequential issue order (empty: nothing). */
function notAPrefix(view: Buffer): string[] {
  const seq = new Int32Array(BLOCKS);
  const wrong: string[] = [];
  for (let b = 0; b < BLOCKS; b++) {
    const h = view.subarray(b * BLOCK, b * BLOCK + 40);
    if (h.every((x) => x === 0)) {
      seq[b] = -1; // not written yet (fio's first round)
    } else if (h.readUInt16LE(0) !== 0xacca || h.readBigUInt64LE(16) !== BigInt(b * BLOCK)) {
      wrong.push(`block ${b}: not fio's block for offset ${b * BLOCK} (header ${h.subarray(0, 24).toString('hex')})`);
    } else {
      seq[b] = h.readUInt16LE(34);
    }
  }
  if (wrong.length) return wrong.slice(0, 10);
  const unwritten = seq.indexOf(-1);
  if (unwritten >= 0) {
    // the first round: blocks [0, w) written in order, the rest never
    for (let b = 0; b < BLOCKS; b++) {
      const want = b < unwritten ? b : -1;
      if (seq[b] !== want) wrong.push(`first round, unwritten from block ${unwritten}: block ${b} has numberio ${seq[b]}, not ${want}`);
    }
    return wrong.slice(0, 10);
  }
  const back = (1 - BLOCKS + 65536) % 65536;
  const breaks: string[] = [];
  for (let b = 0; b < BLOCKS; b++) {
    const next = (b + 1) % BLOCKS;
    const d = (seq[next]! - seq[b]! + 65536) % 65536;
    if (d === 1) continue;
    breaks.push(`block ${b} → ${next}: numberio ${seq[b]} → ${seq[next]}${d === back ? ' (wavefront)' : ''}`);
  }
  return breaks.length === 1 && breaks[0]!.endsWith('(wavefront)') ? [] : breaks.slice(0, 10);
}

describe('checkpoint atomicity under fio', () => {
  it(`sync: ${CHECKPOINTS} checkpoints while fio writes; each view is a state of the primary`, () => checkpointsUnderFio('sync'));

  it(`async: ${CHECKPOINTS} checkpoints while fio writes, each view a state of the primary; kill -9 of the primary, failover --to checkpoint: the disk is exactly the last cut`, () =>
    checkpointsUnderFio('async'));
});

async function checkpointsUnderFio(protocol: 'sync' | 'async'): Promise<void> {
  {
    const { dir, sSock, pSock, sControl, pControl } = await blankPair(SIZE);
    await serve([join(dir, 's.img'), '--secondary', '--socket', sSock, '--control', sControl, '--view-export', 'view', '--view-read-only']);
    const primary = await serve([join(dir, 'p.img'), '--socket', pSock, '--control', pControl, '--replicate-to', unixUri(sSock), '--protocol', protocol]);
    await firstCheckpoint(pControl);
    // async: at a rate the secondary keeps up with on a loaded machine (faster, the queue fills:
    // the primary degrades, ERR_PAIR_QUEUE_FULL, as it should — and there is no checkpoint to check)
    const fio = start('fio', fioArgs(pSock, ['--time_based', '--runtime=120', ...(protocol === 'async' ? ['--rate=4m'] : [])]));
    const view = await NbdClient.connect({ uri: unixUri(sSock, 'view'), reconnect: false, closeTimeoutMs: 2000 });
    const pc = await NbdClient.connect({ uri: unixUri(pSock), reconnect: false, closeTimeoutMs: 2000 });
    try {
      // fio is writing (its first block has a header) before the first checkpoint
      await waitFor(async () => {
        const h = Buffer.alloc(BLOCK);
        await pc.read(0, h);
        return h.readUInt16LE(0) === 0xacca;
      }, 'fio\'s first write', { timeoutMs: 30_000 });
      let last: Buffer | undefined;
      for (let i = 0; i < CHECKPOINTS; i++) {
        const { epoch } = await request<{ epoch: number }>(pControl, 'checkpoint');
        expect(epoch).toBe(i + 2);
        const b = Buffer.alloc(SIZE);
        await view.read(0, b);
        expect(notAPrefix(b), `checkpoint ${epoch}`).toEqual([]);
        // fio kept writing between checkpoints: each view is a later state
        expect(last?.equals(b) ?? false, `checkpoint ${epoch}: the same view as the checkpoint before`).toBe(false);
        last = b;
      }
      if (protocol === 'async') {
        // fio goes on: forwarded writes after the cut reach the secondary's disk (hidden keeps the old data)
        const s0 = await request<{ exports: Array<{ name: string; pair?: { secondary: { copiedClusters: number } } }> }>(sControl, 'status');
        await waitFor(async () => {
          const st = await request<{ exports: Array<{ name: string; pair?: { secondary: { copiedClusters: number } } }> }>(sControl, 'status');
          return st.exports.find((e) => e.pair)!.pair!.secondary.copiedClusters > s0.exports.find((e) => e.pair)!.pair!.secondary.copiedClusters;
        }, 'writes forwarded after the last checkpoint', { timeoutMs: 10_000 });
        await pc.close().catch(() => {});
        await view.close().catch(() => {});
        primary.child.kill('SIGKILL');
        await primary.waitExit();
        fio.child.kill('SIGKILL');
        const fo = await request<{ role: string; epoch: number }>(sControl, 'failover', { to: 'checkpoint' });
        expect(fo).toMatchObject({ role: 'primary', epoch: CHECKPOINTS + 1 });
        const disk = await readFile(join(dir, 's.img'));
        expect(notAPrefix(disk)).toEqual([]);
        expect(disk.equals(last!), 'the failed-over disk is the last checkpoint\'s cut').toBe(true);
      }
    } finally {
      await view.close().catch(() => {});
      await pc.close().catch(() => {});
      fio.child.kill('SIGKILL');
    }
  }
}
