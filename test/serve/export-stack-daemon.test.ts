// test-export-stack-daemon: the export stack inside a serve-nbd daemon, written by qemu-io over
// NBD while filters go into and out of its slots: every write passes a slot it entered once,
// the bytes are as written, status shows the slots.
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import type { BlockNode, WriteOptions } from '../../src/api/block.js';
import { Filter } from '../../src/block/filter.js';
import { defaultTransports } from '../../src/engine/default-transports.js';
import { Daemon } from '../../src/serve/daemon.js';
import { Gate } from '../support/fault-node.js';
import { makeTempDir, run, start, unixUri } from '../support/spawn.js';

vi.setConfig({ testTimeout: 120_000 });

const KiB = 1024;
const MiB = 1024 * KiB;

/** Counts the writes it forwards; holds them at `gate` when given one. */
class Counting extends Filter {
  writes = 0;
  constructor(
    readonly driver: string,
    next: BlockNode,
    private readonly gate?: Gate,
  ) {
    super(next);
  }
  override async write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    this.writes++;
    if (this.gate) await this.gate.pass();
    return this.next.write(offset, data, o);
  }
}

let daemon: Daemon | undefined;
afterEach(async () => {
  await daemon?.stop();
  daemon = undefined;
});

describe('export stack in the daemon', () => {
  it('qemu-io writes while a filter is inserted above a held one and both are removed: each write passes each slot once, bytes as written', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.raw');
    const f = await open(image, 'w');
    await f.truncate(16 * MiB);
    await f.close();
    const sock = join(dir, 'nbd.sock');
    daemon = await Daemon.start({ exports: [{ name: 'disk', image }], listen: [{ transport: 'unix', address: sock }], transports: await defaultTransports(), autoBitmaps: false });
    const stack = daemon.exportStack('disk')!;
    // the replication slot stays empty until the export replicates (no hop for a daemon without a pair)
    expect(daemon.status().exports[0]!.stack).toEqual([
      { slot: 'tracking', driver: 'dirty-tracking' },
      { slot: 'image', driver: 'raw' },
    ]);

    const gate = new Gate();
    gate.close();
    const cbw = (await stack.insert('cbw', (below) => new Counting('held', below, gate))) as Counting;
    const N = 32;
    const writes = Array.from({ length: N }, (_, k) => ['-c', `aio_write -P ${0x40 + k} ${k * 256 * KiB} 64k`]).flat();
    const io = start('qemu-io', ['-f', 'raw', ...writes, '-c', 'aio_flush', unixUri(sock, 'disk')]);
    await gate.waitEntered(1, 60_000);
    let inserted = false;
    // the front slot, where a job's front end goes
    const replicating = stack.insert('front', (below) => new Counting('counting', below)).then((n) => {
      inserted = true;
      return n as Counting;
    });
    expect(daemon.status().exports[0]!.stack!.map((l) => l.slot)).toEqual(['front', 'tracking', 'cbw', 'image']);
    await Promise.resolve();
    expect(inserted).toBe(false);
    gate.open();
    const replication = await replicating;
    expect(await io.waitExit(60_000)).toEqual({ code: 0, signal: null });
    // every write passed the held slot once; the inserted one saw only those that entered after it
    expect(cbw.writes).toBe(N);
    expect(replication.writes).toBeLessThanOrEqual(N - gate.entered);

    expect(await stack.remove('cbw')).toBe(cbw);
    expect(await stack.remove('front')).toBe(replication);
    expect(daemon.status().exports[0]!.stack!.map((l) => l.slot)).toEqual(['tracking', 'image']);
    const more = await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x77 ${12 * MiB} 64k`, unixUri(sock, 'disk')]);
    expect(more.code, more.stderr).toBe(0);
    expect(cbw.writes).toBe(N);
    expect(replication.writes).toBeLessThanOrEqual(N);

    const reads = Array.from({ length: N }, (_, k) => ['-c', `read -P ${0x40 + k} ${k * 256 * KiB} 64k`, '-c', `read -P 0 ${k * 256 * KiB + 64 * KiB} 192k`]).flat();
    const check = await run('qemu-io', ['-f', 'raw', '-r', ...reads, '-c', `read -P 0x77 ${12 * MiB} 64k`, unixUri(sock, 'disk')]);
    expect(check.code, check.stderr).toBe(0);
    expect(check.stdout).not.toMatch(/Pattern verification failed/);
  });
});
