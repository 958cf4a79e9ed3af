/**
 * The `blkrep bitmap` commands on each kind of target — a bitmap file, a raw image's
 * IMAGE.NAME.bitmap files, a live export (--control) — with the same expectations: exact ranges,
 * idempotence ("changed": false), checkpoints; then fill's sources (JSON maps, allocation
 * above a base) and the errors a user can hit, with their exit statuses and codes.
 */
import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, serve, unixUri, type Served } from '../support/spawn.js';
import { blk, dirtyOf, fails, KiB, MiB, model, ok, qemuIo, zeroFile, type NbdinfoEntry } from './helpers.js';

const hasQemu = hasTool('qemu-io') && hasTool('qemu-img');
const SIZE = 16 * MiB;

interface Change {
  name: string;
  changed: boolean;
  bitmap: { name: string; granularity: number; enabled: boolean; dirtyBytes: number; file: string | null } | null;
}

interface Target {
  /** what goes before the command's own flags */
  args: string[];
  /** extra flags of `add` */
  add: string[];
  name: string;
  served?: Served;
}

async function dirty(t: Target, extra: string[] = []): Promise<Array<{ offset: number; length: number }>> {
  const r = await blk(['bitmap', 'dump', ...t.args, ...extra, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return dirtyOf(JSON.parse(r.stdout) as NbdinfoEntry[]);
}

const kinds: Array<[string, () => Promise<Target>]> = [
  [
    'a bitmap file',
    async () => {
      const dir = await makeTempDir();
      return { args: [join(dir, 'vdb.bitmap')], add: ['--size', '16M'], name: 'vdb' };
    },
  ],
  [
    "a raw image's bitmap files",
    async () => {
      const dir = await makeTempDir();
      const image = join(dir, 'disk.img');
      await zeroFile(image, SIZE);
      return { args: [image, '--name', 'b0'], add: [], name: 'b0' };
    },
  ],
  [
    'a live export (--control)',
    async () => {
      const dir = await makeTempDir();
      const image = join(dir, 'disk.img');
      await zeroFile(image, SIZE);
      const ctl = join(dir, 'c.sock');
      const served = await serve([image, '--socket', join(dir, 's.sock'), '--control', ctl]);
      return { args: ['--control', ctl, '--name', 'b0'], add: [], name: 'b0', served };
    },
  ],
];

describe.each(kinds)('bitmap commands on %s', (_kind, make) => {
  it('add, fill, clear, enable, disable, merge, list, remove: exact ranges, and idempotent', async () => {
    const t = await make();
    const added = await ok<Change>(['bitmap', 'add', ...t.args, ...t.add]);
    expect(added).toMatchObject({ name: t.name, changed: true, bitmap: { name: t.name, granularity: 64 * KiB, enabled: true, dirtyBytes: 0 } });
    expect(await ok<Change>(['bitmap', 'add', ...t.args, ...t.add])).toMatchObject({ changed: false });
    expect(await ok<Change>(['bitmap', 'add', ...t.args, ...t.add, '--granularity', '64K'])).toMatchObject({ changed: false });
    await fails(['bitmap', 'add', ...t.args, ...t.add, '--granularity', '4K'], 1, 'ERR_BITMAP_EXISTS', /granularity/);
    await fails(['bitmap', 'add', ...t.args, ...t.add, '--disabled'], 1, 'ERR_BITMAP_EXISTS', /enabled/);

    expect(await ok<Change>(['bitmap', 'fill', ...t.args, '--range', '1M:1', '--range', '3M:128K'])).toMatchObject({ changed: true });
    expect(await ok<Change>(['bitmap', 'fill', ...t.args, '--range', '3M:64K'])).toMatchObject({ changed: false });
    expect(await dirty(t)).toEqual([
      { offset: MiB, length: 64 * KiB },
      { offset: 3 * MiB, length: 128 * KiB },
    ]);
    // clear rounds inward: only the second granule lies wholly inside 3M+32K..3M+128K
    expect(await ok<Change>(['bitmap', 'clear', ...t.args, '--range', `${3 * MiB + 32 * KiB}:96K`])).toMatchObject({ changed: true });
    expect(await ok<Change>(['bitmap', 'clear', ...t.args, '--range', `${3 * MiB + 32 * KiB}:96K`])).toMatchObject({ changed: false });
    expect(await dirty(t)).toEqual([
      { offset: MiB, length: 64 * KiB },
      { offset: 3 * MiB, length: 64 * KiB },
    ]);

    expect(await ok<Change>(['bitmap', 'disable', ...t.args])).toMatchObject({ changed: true, bitmap: { enabled: false } });
    expect(await ok<Change>(['bitmap', 'disable', ...t.args])).toMatchObject({ changed: false });
    expect(await ok<Change>(['bitmap', 'enable', ...t.args])).toMatchObject({ changed: true, bitmap: { enabled: true } });
    expect(await ok<Change>(['bitmap', 'enable', ...t.args])).toMatchObject({ changed: false });

    // merge a bitmap file of another granularity: every touched granule becomes dirty
    const src = join(await makeTempDir(), 'src.bitmap');
    await ok(['bitmap', 'add', src, '--size', '16M', '--granularity', '4K']);
    await ok(['bitmap', 'fill', src, '--range', '8M:4K']);
    expect(await ok<Change>(['bitmap', 'merge', ...t.args, '--source-file', src])).toMatchObject({ changed: true });
    expect(await ok<Change>(['bitmap', 'merge', ...t.args, '--source-file', src])).toMatchObject({ changed: false });
    expect((await dirty(t)).at(-1)).toEqual({ offset: 8 * MiB, length: 64 * KiB });

    const list = await ok<Array<{ name: string; dirtyBytes: number; size: number }>>(['bitmap', 'list', ...t.args.filter((a, i, all) => a !== '--name' && all[i - 1] !== '--name')]);
    expect(list.map((b) => [b.name, b.dirtyBytes, b.size])).toEqual([[t.name, 3 * 64 * KiB, SIZE]]);

    // text output: header, picture, table
    const text = await blk(['bitmap', 'dump', ...t.args]);
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/dirty: 3 runs, 192 KiB \(196608 bytes\), 1\.17%/);
    expect(text.stdout).toMatch(/\n {2}\[[·▁▂▃▄▅▆▇█]{64}\]\n/);
    expect(text.stdout).toMatch(/\n +1048576 +65536\n +3145728 +65536\n +8388608 +65536\n$/);

    expect(await ok<Change>(['bitmap', 'clear', ...t.args])).toMatchObject({ changed: true, bitmap: { dirtyBytes: 0 } });
    expect(await ok<Change>(['bitmap', 'clear', ...t.args])).toMatchObject({ changed: false });
    expect(await ok<Change>(['bitmap', 'remove', ...t.args])).toEqual({ name: t.name, changed: true, bitmap: null });
    await fails(['bitmap', 'remove', ...t.args], 1, 'ERR_BITMAP_NOT_FOUND');
    expect(await ok<Change>(['bitmap', 'remove', ...t.args, '--if-exists'])).toEqual({ name: t.name, changed: false, bitmap: null });
    if (t.served) expect(await t.served.stop()).toBe(0);
  });

  it('checkpoint freezes the bits as N and records N+1; checkpoints lists them; dump --checkpoint reads one', async () => {
    const t = await make();
    await ok(['bitmap', 'add', ...t.args, ...t.add]);
    await ok(['bitmap', 'fill', ...t.args, '--range', '2M:64K']);
    const ck = await ok<{ name: string; changed: boolean; number: number; recording: number; dirtyBytes: number; path: string }>(['bitmap', 'checkpoint', ...t.args]);
    expect(ck).toMatchObject({ name: t.name, changed: true, number: 1, recording: 2, dirtyBytes: 64 * KiB });
    expect(existsSync(ck.path)).toBe(true);
    await ok(['bitmap', 'fill', ...t.args, '--range', '5M:64K']);
    const ck2 = await ok<{ number: number }>(['bitmap', 'checkpoint', ...t.args]);
    expect(ck2.number).toBe(2);
    const list = await ok<Array<{ number: number; dirtyBytes: number; createdAt: string }>>(['bitmap', 'checkpoints', ...t.args]);
    expect(list.map((c) => [c.number, c.dirtyBytes])).toEqual([
      [1, 64 * KiB],
      [2, 64 * KiB],
    ]);
    expect(Number.isNaN(Date.parse(list[0]!.createdAt))).toBe(false);
    expect(await dirty(t)).toEqual([]);
    expect(await dirty(t, ['--checkpoint', '1'])).toEqual([{ offset: 2 * MiB, length: 64 * KiB }]);
    expect(await dirty(t, ['--checkpoint', '2'])).toEqual([{ offset: 5 * MiB, length: 64 * KiB }]);
    await fails(['bitmap', 'dump', ...t.args, '--checkpoint', '7'], 1, 'ERR_CHECKPOINT_NOT_FOUND', /has no checkpoint 7 \(it has 1, 2\)/);
    const summary = await ok<{ checkpoint: number; frozen: boolean; runs: number; dirtyBytes: number }>(['bitmap', 'dump', ...t.args, '--checkpoint', '1', '--summary']);
    expect(summary).toMatchObject({ checkpoint: 1, frozen: true, runs: 1, dirtyBytes: 64 * KiB });
    // merge a checkpoint back
    expect(await ok<Change>(['bitmap', 'merge', ...t.args, '--source-file', ck.path])).toMatchObject({ changed: true, bitmap: { dirtyBytes: 64 * KiB } });
    // remove takes the checkpoints with it
    await ok(['bitmap', 'remove', ...t.args]);
    expect(existsSync(ck.path)).toBe(false);
    if (t.served) expect(await t.served.stop()).toBe(0);
  });

  it('dump --start/--length, --dirty-only and --summary', async () => {
    const t = await make();
    await ok(['bitmap', 'add', ...t.args, ...t.add]);
    await ok(['bitmap', 'fill', ...t.args, '--range', '1M:64K', '--range', '9M:1M']);
    const part = await blk(['bitmap', 'dump', ...t.args, '--start', '8M', '--length', '2M', '--json']);
    expect(JSON.parse(part.stdout)).toEqual([
      { offset: 8 * MiB, length: MiB, type: 0, description: 'clean' },
      { offset: 9 * MiB, length: MiB, type: 1, description: 'dirty' },
    ]);
    const only = await blk(['bitmap', 'dump', ...t.args, '--dirty-only', '--json']);
    expect(JSON.parse(only.stdout)).toEqual([
      { offset: MiB, length: 64 * KiB, type: 1, description: 'dirty' },
      { offset: 9 * MiB, length: MiB, type: 1, description: 'dirty' },
    ]);
    const s = await ok<Record<string, unknown>>(['bitmap', 'dump', ...t.args, '--summary']);
    expect(s).toMatchObject({ name: t.name, size: SIZE, granularity: 64 * KiB, start: 0, length: SIZE, runs: 2, dirtyBytes: MiB + 64 * KiB, percent: (100 * (MiB + 64 * KiB)) / SIZE });
    const ranged = await ok<Record<string, unknown>>(['bitmap', 'dump', ...t.args, '--summary', '--start', '8M', '--length', '2M']);
    expect(ranged).toMatchObject({ start: 8 * MiB, length: 2 * MiB, runs: 1, dirtyBytes: MiB, percent: 50 });
    if (t.served) expect(await t.served.stop()).toBe(0);
  });
});

describe('bitmap fill: sources', () => {
  it('--from-json reads nbdinfo maps (all but clean, hole, unallocated) and qemu-img maps (data), from a file or stdin', async () => {
    const dir = await makeTempDir();
    const file = join(dir, 'x.bitmap');
    await ok(['bitmap', 'add', file, '--size', '16M', '--granularity', '4K']);
    const nbdinfo = [
      { offset: 0, length: MiB, type: 3, description: 'hole,zero' },
      { offset: MiB, length: 4 * KiB, type: 0, description: 'data' },
      { offset: MiB + 4 * KiB, length: MiB, type: 0, description: 'clean' },
      { offset: 3 * MiB, length: 8 * KiB, type: 1, description: 'dirty' },
      { offset: 4 * MiB, length: 4 * KiB, type: 2, description: 'zero' },
      { offset: 5 * MiB, length: 4 * KiB, type: 0 },
      { offset: 6 * MiB, length: MiB, type: 0, description: 'unallocated' },
    ];
    const path = join(dir, 'map.json');
    await writeFile(path, JSON.stringify(nbdinfo));
    await ok(['bitmap', 'fill', file, '--from-json', path]);
    const qemuImgMap = [
      { start: 8 * MiB, length: 4 * KiB, depth: 0, present: true, zero: false, data: true, offset: 8 * MiB },
      { start: 9 * MiB, length: MiB, depth: 0, present: true, zero: true, data: false },
    ];
    await ok(['bitmap', 'fill', file, '--from-json', '-'], { input: JSON.stringify(qemuImgMap) });
    expect(await dirty({ args: [file], add: [], name: 'x' })).toEqual([
      { offset: MiB, length: 4 * KiB },
      { offset: 3 * MiB, length: 8 * KiB },
      { offset: 4 * MiB, length: 4 * KiB },
      { offset: 5 * MiB, length: 4 * KiB },
      { offset: 8 * MiB, length: 4 * KiB },
    ]);
    await writeFile(path, '{"not": "a map"}');
    await fails(['bitmap', 'fill', file, '--from-json', path], 1, 'ERR_BAD_JSON', /expected an array/);
    await fails(['bitmap', 'fill', file, '--from-json', join(dir, 'missing.json')], 1, 'ERR_OPEN', /no such file/);
  });

  it.skipIf(!hasQemu)('--from-allocation: a raw image\'s data; a qcow2 overlay above its base', async () => {
    const dir = await makeTempDir();
    const base = join(dir, 'base.img');
    await zeroFile(base, SIZE);
    await qemuIo(base, ['write -P 1 2M 64k', 'write -P 2 5M 4k']);
    const file = join(dir, 'b.bitmap');
    await ok(['bitmap', 'add', file, '--size', '16M']);
    expect(await ok<Change>(['bitmap', 'fill', file, '--from-allocation', base])).toMatchObject({ changed: true });
    expect(await dirty({ args: [file], add: [], name: 'b' })).toEqual([...model(SIZE, 64 * KiB, [{ offset: 2 * MiB, length: 64 * KiB }, { offset: 5 * MiB, length: 4 * KiB }]).dirtyRuns()]);

    const top = join(dir, 'top.qcow2');
    const c = await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top]);
    expect(c.code, c.stderr).toBe(0);
    await qemuIo(top, ['write -P 3 7M 64k', 'write -z 11M 64k'], 'qcow2');
    await ok(['bitmap', 'clear', file]);
    await ok(['bitmap', 'fill', file, '--from-allocation', top, '--base', base]);
    expect(await dirty({ args: [file], add: [], name: 'b' })).toEqual([
      { offset: 7 * MiB, length: 64 * KiB },
      { offset: 11 * MiB, length: 64 * KiB },
    ]);
    await fails(['bitmap', 'fill', file, '--from-allocation', top, '--base', join(dir, 'other.img')], 1, 'ERR_NOT_IN_CHAIN');
    const small = join(dir, 'small.img');
    await zeroFile(small, MiB);
    await fails(['bitmap', 'fill', file, '--from-allocation', small], 1, 'ERR_BITMAP_SIZE_MISMATCH', /is 1048576 bytes, bitmap "b" covers 16777216/);
  });
});

describe('bitmap commands: errors', () => {
  it('missing files, wrong sizes, unknown names, bad ranges, wrong targets', async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.img');
    await zeroFile(image, SIZE);
    await fails(['bitmap', 'dump', join(dir, 'nothing.bitmap')], 1, 'ERR_BITMAP_NOT_FOUND', /no bitmap file/);
    await fails(['bitmap', 'add', join(dir, 'nothing.bitmap')], 2, 'ERR_USAGE', /does not exist: give --size/);
    await fails(['bitmap', 'dump', image], 1, 'ERR_BITMAP_NOT_FOUND', /has no bitmaps \(add one with: blkrep bitmap add/);
    await fails(['bitmap', 'add', image], 2, 'ERR_USAGE', /--name is required/);
    await ok(['bitmap', 'add', image, '--name', 'b0']);
    await ok(['bitmap', 'add', image, '--name', 'b1']);
    await fails(['bitmap', 'dump', image], 2, 'ERR_USAGE', /has 2 bitmaps: say which with --name \("b0", "b1"\)/);
    await fails(['bitmap', 'dump', image, '--name', 'nope'], 1, 'ERR_BITMAP_NOT_FOUND', /has no bitmap "nope"/);
    await fails(['bitmap', 'dump', `${image}.b0.bitmap`, '--name', 'nope'], 1, 'ERR_BITMAP_NOT_FOUND', /holds bitmap "b0", not "nope"/);
    await fails(['bitmap', 'add', image, '--name', 'a/b'], 1, 'ERR_BITMAP_NAME', /contains "\/"/);

    // bad ranges: malformed is a usage error, past the end a failure
    await fails(['bitmap', 'fill', image, '--name', 'b0', '--range', 'abc'], 2, 'ERR_USAGE', /is not OFFSET:LENGTH/);
    await fails(['bitmap', 'fill', image, '--name', 'b0', '--range', '1M:x'], 2, 'ERR_USAGE', /invalid range length "x"/);
    await fails(['bitmap', 'fill', image, '--name', 'b0', '--range', '16M:1'], 1, 'ERR_OUT_OF_RANGE', /beyond the end of the disk \(size 16777216\)/);
    await fails(['bitmap', 'clear', image, '--name', 'b0', '--range', '15M:2M'], 1, 'ERR_OUT_OF_RANGE');
    await fails(['bitmap', 'fill', image, '--name', 'b0', '--range', '0:1', '--all'], 2, 'ERR_USAGE', /exactly one of/);
    await fails(['bitmap', 'fill', image, '--name', 'b0'], 2, 'ERR_USAGE', /exactly one of/);
    await fails(['bitmap', 'add', image, '--name', 'b2', '--granularity', '100'], 2, 'ERR_USAGE', /not a power of two/);

    // a bitmap file beside the image that does not cover it
    await ok(['bitmap', 'add', join(dir, 'other.bitmap'), '--size', '1M']);
    const { rename } = await import('node:fs/promises');
    await rename(join(dir, 'other.bitmap'), `${image}.small.bitmap`);
    await fails(['bitmap', 'dump', image, '--name', 'small'], 1, 'ERR_BITMAP_SIZE_MISMATCH', /covers 1048576 bytes, the disk has 16777216/);

    // targets that have no bitmap files
    await fails(['bitmap', 'list', 'memory:1G'], 2, 'ERR_USAGE', /--control/);
    await fails(['bitmap', 'list', image, '--export', 'x'], 2, 'ERR_USAGE', /--export needs --control/);
    await fails(['bitmap', 'list', image, '--control', join(dir, 'c.sock')], 2, 'ERR_USAGE', /either TARGET/);
    await fails(['bitmap', 'list', '--control', join(dir, 'c.sock')], 1, 'ERR_CONTROL_UNREACHABLE', /no control socket/);
    await fails(['bitmap', 'list'], 2, 'ERR_USAGE', /say where the bitmap is/);
    // read-only checkpoints
    await ok(['bitmap', 'checkpoint', image, '--name', 'b0']);
    await fails(['bitmap', 'fill', `${image}.b0.bitmap.ckpt-1`, '--all'], 1, 'ERR_BITMAP_READ_ONLY', /read-only/);

    // without --json: the message on stderr, the same statuses
    const text = await blk(['bitmap', 'dump', image, '--name', 'nope']);
    expect(text.code).toBe(1);
    expect(text.stdout).toBe('');
    expect(text.stderr).toMatch(/^blkrep: image .* has no bitmap "nope"/);
    const usage = await blk(['bitmap', 'fill', image, '--name', 'b0', '--range', 'abc']);
    expect(usage.code).toBe(2);
  });

  it.skipIf(!hasQemu)("a qcow2 image: its own bitmaps (more in test/qcow2/test-qcow2-bitmaps.test.ts), but no checkpoints", async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.qcow2');
    const r = await run('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16M']);
    expect(r.code).toBe(0);
    await ok(['bitmap', 'add', image, '--name', 'b0']);
    expect((await ok<Array<{ name: string }>>(['bitmap', 'list', image])).map((b) => b.name)).toEqual(['b0']);
    for (const cmd of ['checkpoint', 'checkpoints']) {
      await fails(['bitmap', cmd, image, '--name', 'b0'], 1, 'ERR_NOT_SUPPORTED', /have no checkpoints.*merge/);
    }
  });

  it("a file a daemon has open is read as recovered and changed only through --control (or --force)", async () => {
    const dir = await makeTempDir();
    const image = join(dir, 'disk.img');
    await zeroFile(image, SIZE);
    const sock = join(dir, 's.sock');
    const s = await serve([image, '--bitmap', 'b0', '--socket', sock, '--control', join(dir, 'c.sock')]);
    await qemuIo(unixUri(sock), ['write 1M 4k']);
    await fails(['bitmap', 'fill', image, '--name', 'b0', '--range', '0:1'], 1, 'ERR_BITMAP_IN_USE', /use --control PATH --export NAME/);
    await fails(['bitmap', 'remove', image, '--name', 'b0'], 1, 'ERR_BITMAP_IN_USE');
    const summary = await ok<{ loadState: { state: string }; dirtyBytes: number }>(['bitmap', 'dump', image, '--summary']);
    expect(summary.loadState.state).toBe('recovered');
    expect(summary.dirtyBytes).toBeGreaterThanOrEqual(64 * KiB);
    expect(await s.stop()).toBe(0);
    expect(await ok<Change>(['bitmap', 'fill', image, '--range', '0:1'])).toMatchObject({ changed: true });
    expect(await dirty({ args: [image], add: [], name: 'b0' })).toEqual([
      { offset: 0, length: 64 * KiB },
      { offset: MiB, length: 64 * KiB },
    ]);
  });
});
