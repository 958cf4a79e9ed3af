/**
 * Issue 14, defect 7: `mirror --on-target-error stop` stayed paused after `job resume` when the
 * target (qemu-nbd) came back. Cause (found with scripts/target-outage.mjs): after the NBD
 * client's hold (5 s) expired, requests failed at once until its next reconnect attempt, up to
 * 10 s of backoff away; a resume in that window issued copies that failed at once, and the job
 * paused again although the server was back. Now a resume first tries the target's lost
 * connection at once (Reconnectable.retryNow → NbdClient.retryNow), then copies.
 *
 * Deterministic: a target that fails every write until retryNow() is called once the "server" is
 * back (what the NBD client does while it waits out its backoff), and an NBD client whose backoff
 * (60 s) never fires during the test.
 */
import { describe, expect, it } from 'vitest';
import type { JobEvent } from '../../src/jobs/job.js';
import { MirrorJob } from '../../src/jobs/mirror.js';
import { NbdNode } from '../../src/block/nbd.js';
import { MiB, TestDisk, firstDifference, readAll, seededSource } from './helpers.js';
import { memoryExport, nextEvent, OwnServer, rejection } from '../nbd-client/helpers.js';

/** A target reached through a connection that is lost while `down`: every request fails until retryNow() finds the server back. */
class ReconnectingDisk extends TestDisk {
  retries = 0;
  serverBack = false;
  down(): void {
    for (const op of ['write', 'writeZeroes', 'flush'] as const) this.faults.push({ op, errno: 'EIO', times: Infinity });
  }
  async retryNow(): Promise<boolean> {
    this.retries++;
    if (this.serverBack) this.faults = [];
    return this.serverBack;
  }
}

function statuses(job: MirrorJob): string[] {
  const out: string[] = [];
  job.on('event', (e: JobEvent) => {
    if (e.event === 'status-change') out.push(e.status);
  });
  return out;
}

async function until(pred: () => boolean, what: string, ms = 20_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('mirror --on-target-error stop: resume after the target came back', () => {
  it('the resume tries the lost connection first: the job does not pause again, becomes ready, the target is a copy', async () => {
    const source = await seededSource(4 * MiB, 21);
    const target = new ReconnectingDisk(4 * MiB);
    target.down();
    const job = new MirrorJob({ id: 'm0', source, target, onTargetError: 'stop' });
    const seen = statuses(job);
    job.start();
    await until(() => job.status === 'paused', 'the pause after the target error');
    expect(job.query()).toMatchObject({ paused: true, ioStatus: 'failed' });
    expect(target.retries).toBe(0);
    // the server is back; the connection is not (yet): only an attempt would find it
    target.serverBack = true;
    job.resume();
    await until(() => job.status === 'ready', 'ready after the resume');
    expect(target.retries).toBe(1);
    expect(seen.filter((s) => s === 'paused')).toEqual(['paused']);
    await job.complete();
    expect(firstDifference(await readAll(target.disk), await readAll(source))).toBe(-1);
  });

  it('a resume while the server is still away: the attempt fails, the copy fails, the job pauses again (io-status failed)', async () => {
    const source = await seededSource(4 * MiB, 22);
    const target = new ReconnectingDisk(4 * MiB);
    target.down();
    const job = new MirrorJob({ id: 'm1', source, target, onTargetError: 'stop' });
    const seen = statuses(job);
    job.start();
    await until(() => job.status === 'paused', 'the first pause');
    job.resume();
    await until(() => seen.filter((s) => s === 'paused').length === 2, 'the second pause');
    expect(target.retries).toBe(1);
    expect(job.query()).toMatchObject({ status: 'paused', ioStatus: 'failed' });
    target.serverBack = true;
    job.resume();
    await until(() => job.status === 'ready', 'ready after the second resume');
    expect(target.retries).toBe(2);
    await job.complete();
    expect(firstDifference(await readAll(target.disk), await readAll(source))).toBe(-1);
  });
});

describe('NbdClient.retryNow', () => {
  it('after the hold expired, requests fail at once even with the server back, until an attempt; retryNow makes it now', async () => {
    const s = await OwnServer.create([memoryExport('disk', MiB)]);
    // backoff of 30 to 60 s: no background attempt happens during the test
    const node = await NbdNode.open(s.uri('disk'), { holdMs: 0, backoff: { initialMs: 60_000, maxMs: 60_000 } });
    try {
      const disconnected = nextEvent(node.client, 'disconnected');
      await s.stop();
      await disconnected;
      expect(await node.retryNow()).toBe(false);
      expect(node.client.state).toBe('DISCONNECTED');
      await s.start();
      // the server is back, the client does not know it yet: this is what re-paused the job
      expect((await rejection(node.read(0, 512))).code).toBe('ERR_NBD_DISCONNECTED');
      expect(await node.retryNow()).toBe(true);
      expect(node.client.state).toBe('READY');
      await node.write(0, Buffer.alloc(512, 7));
      expect((await node.read(0, 512)).equals(Buffer.alloc(512, 7))).toBe(true);
      expect(await node.retryNow()).toBe(true);
    } finally {
      await node.close();
      await s.stop();
    }
  });
});
