/**
 * blkrep status shows the export's dirty bitmaps for a person (name, export, granularity,
 * enabled or not, dirty bytes and percent, file or in memory, checkpoint being recorded, how it
 * was loaded) and, with --json, as the daemon's status object has them. serve-nbd runs as a
 * process with --bitmap and --control; writes come from qemu-io.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, runCli, serve, unixUri } from '../support/spawn.js';
import { KiB, MiB, ok, qemuIo, qemuIoSession, zeroFile } from './helpers.js';

const hasPeers = hasTool('qemu-io');
const SIZE = 64 * MiB;

/** The lines of the "Bitmaps:" section of `blkrep status` text output. */
async function bitmapSection(ctl: string): Promise<string[]> {
  const r = await runCli(['status', '--control', ctl]);
  expect(r.code, r.stderr).toBe(0);
  const lines = r.stdout.split('\n');
  const start = lines.findIndex((l) => l.startsWith('Bitmaps:'));
  expect(start, r.stdout).toBeGreaterThan(0);
  const end = lines.findIndex((l, i) => i > start && l === '');
  return lines.slice(start, end);
}

describe.skipIf(!hasPeers)('blkrep status: bitmaps', () => {
  it('lists each bitmap: persistent and in memory, enabled and disabled, with its dirty bytes; --json has them as BitmapInfo', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.img');
    await zeroFile(image, SIZE);
    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'c.sock');
    const s = await serve([image, '--bitmap', 'b0', '--socket', sock, '--control', ctl]);
    await qemuIo(unixUri(sock), ['write -P 1 1M 64k', 'write -P 2 10M 4k']);
    await ok(['bitmap', 'add', '--control', ctl, '--name', 'mem', '--in-memory', '--granularity', '4K']);
    await ok(['bitmap', 'fill', '--control', ctl, '--name', 'mem', '--range', '0:12K']);
    await ok(['bitmap', 'disable', '--control', ctl, '--name', 'mem']);

    expect(await bitmapSection(ctl)).toEqual([
      'Bitmaps: 2',
      '  "b0"  export ""  granularity 64 KiB, enabled, 128 KiB dirty (0.20%)',
      `      file ${image}.b0.bitmap, recording checkpoint 1, loaded clean`,
      '  "mem"  export ""  granularity 4 KiB, disabled, 12 KiB dirty (0.02%)',
      '      in memory only (lost when the daemon stops), loaded clean',
    ]);

    const status = await ok<{ bitmaps: unknown[] }>(['status', '--control', ctl]);
    expect(status.bitmaps).toEqual([
      {
        name: 'b0', export: '', persistent: true, file: `${image}.b0.bitmap`, size: SIZE, granularity: 64 * KiB, enabled: true,
        dirtyGranules: 2, dirtyBytes: 128 * KiB, percent: (100 * 128 * KiB) / SIZE, epoch: 1, frozen: false, loadState: { state: 'clean' },
      },
      {
        name: 'mem', export: '', persistent: false, file: null, size: SIZE, granularity: 4 * KiB, enabled: false,
        dirtyGranules: 3, dirtyBytes: 12 * KiB, percent: (100 * 12 * KiB) / SIZE, epoch: null, frozen: false, loadState: { state: 'clean' },
      },
    ]);
    expect(await s.stop()).toBe(0);
  });

  it('says "none" without bitmaps, and "recovered" for a bitmap loaded after kill -9', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.img');
    await zeroFile(image, SIZE);
    const sock = join(dir, 's.sock');
    const ctl = join(dir, 'c.sock');

    const plain = await serve([image, '--no-auto-bitmaps', '--socket', sock, '--control', ctl]);
    expect(await bitmapSection(ctl)).toEqual(['Bitmaps: none']);
    expect((await ok<{ bitmaps: unknown[] }>(['status', '--control', ctl])).bitmaps).toEqual([]);
    expect(await plain.stop()).toBe(0);

    const s = await serve([image, '--bitmap', 'b0', '--socket', sock, '--control', ctl]);
    const q = qemuIoSession(unixUri(sock));
    // two writes into two 4 MiB activity-log extents (0 and 2), no flush
    expect(await q.command('write -P 9 0 4096')).toContain('wrote 4096/4096 bytes');
    expect(await q.command(`write -P 9 ${9 * MiB} 4096`)).toContain('wrote 4096/4096 bytes');
    process.kill(s.pid, 'SIGKILL');
    expect((await s.waitExit(10_000)).signal).toBe('SIGKILL');
    await q.stop('SIGKILL').catch(() => {});

    const again = await serve([image, '--bitmap', 'b0', '--socket', sock, '--control', ctl]);
    const lines = await bitmapSection(ctl);
    expect(lines).toHaveLength(3);
    expect(lines[0]).toBe('Bitmaps: 1');
    // the two extents replayed make 8 MiB dirty (whatever pages were stored before the kill lie inside them)
    expect(lines[1]).toBe('  "b0"  export ""  granularity 64 KiB, enabled, 8 MiB dirty (12.50%)');
    expect(lines[2]).toBe(`      file ${image}.b0.bitmap, recording checkpoint 1, recovered after an unclean stop (2 activity-log extents replayed)`);
    const [b] = (await ok<{ bitmaps: Array<{ loadState: unknown }> }>(['status', '--control', ctl])).bitmaps;
    expect(b!.loadState).toMatchObject({ state: 'recovered', extentsReplayed: 2, pagesDistrusted: 0 });
    expect(await again.stop()).toBe(0);
  });
});
