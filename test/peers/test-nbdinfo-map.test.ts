/**
 * nbdinfo --map (base:allocation through NBD_CMD_BLOCK_STATUS) on a sparse raw file whose holes
 * we made ourselves, then after TRIM and WRITE_ZEROES sent by qemu-io.
 *
 * Exact extents need the native addon (SEEK_DATA/SEEK_HOLE, fallocate); without it the raw
 * driver reports data everywhere except detected zero blocks, and only the weaker assertions run.
 */
import { open, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { loadNative } from '../../src/block/native.js';
import { hasTool, makeTempDir, run, serve, unixUri } from '../support/spawn.js';

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const HOLE_ZERO = 3;
const DATA = 0;
/** where the test file has data: everything else was never written */
const DATA_RUNS: Array<[number, number, number]> = [
  // [offset, length, fill byte]
  [1 * MiB, 64 * KiB, 0xa1],
  [4 * MiB, 128 * KiB, 0xb2],
  [SIZE - 64 * KiB, 64 * KiB, 0xc3],
];

const sparse = loadNative() !== null;

async function nbdMap(uri: string): Promise<MapEntry[]> {
  const r = await run('nbdinfo', ['--map', '--json', uri], { timeoutMs: 15_000 });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** The map covers [0, size) without gaps, and every extent claiming ZERO really reads as zeros. */
function checkConsistent(map: MapEntry[], contents: Buffer): void {
  let at = 0;
  for (const e of map) {
    expect(e.offset).toBe(at);
    expect(e.length).toBeGreaterThan(0);
    if (e.type & 2) {
      const slice = contents.subarray(e.offset, e.offset + e.length);
      expect(slice.every((b) => b === 0), `extent at ${e.offset}+${e.length} claims zero but has data`).toBe(true);
    }
    at += e.length;
  }
  expect(at).toBe(contents.length);
}

/** the type at `offset` */
function typeAt(map: MapEntry[], offset: number): number {
  const e = map.find((x) => offset >= x.offset && offset < x.offset + x.length);
  if (!e) throw new Error(`no extent covers ${offset}`);
  return e.type;
}

describe.skipIf(!hasTool('nbdinfo'))('nbdinfo --map on a sparse raw file', () => {
  let image: string;
  let uri: string;

  beforeEach(async () => {
    const dir = await makeTempDir();
    image = join(dir, 'sparse.raw');
    await writeFile(image, '');
    await truncate(image, SIZE);
    const fh = await open(image, 'r+');
    try {
      for (const [off, len, fill] of DATA_RUNS) await fh.write(Buffer.alloc(len, fill), 0, len, off);
    } finally {
      await fh.close();
    }
    const sock = join(dir, 's.sock');
    await serve([image, '--socket', sock]);
    uri = unixUri(sock);
  });

  it('reports holes and data at the offsets written', async () => {
    const map = await nbdMap(uri);
    checkConsistent(map, await readFile(image));
    for (const [off, len] of DATA_RUNS) {
      expect(typeAt(map, off) & 2, `data at ${off}`).toBe(0);
      expect(typeAt(map, off + len - 1) & 2, `data at ${off + len - 1}`).toBe(0);
    }
    if (!sparse) return;
    expect(map.map(({ offset, length, type }) => ({ offset, length, type }))).toEqual([
      { offset: 0, length: 1 * MiB, type: HOLE_ZERO },
      { offset: 1 * MiB, length: 64 * KiB, type: DATA },
      { offset: 1 * MiB + 64 * KiB, length: 3 * MiB - 64 * KiB, type: HOLE_ZERO },
      { offset: 4 * MiB, length: 128 * KiB, type: DATA },
      { offset: 4 * MiB + 128 * KiB, length: 4 * MiB - 192 * KiB, type: HOLE_ZERO },
      { offset: SIZE - 64 * KiB, length: 64 * KiB, type: DATA },
    ]);
    expect(map.find((e) => e.type === HOLE_ZERO)!.description).toBe('hole,zero');
    expect(map.find((e) => e.type === DATA)!.description).toBe('data');
  });

  it('the text map lists the same extents', async () => {
    const r = await run('nbdinfo', ['--map', uri], { timeoutMs: 15_000 });
    expect(r.code, r.stderr).toBe(0);
    const rows = r.stdout
      .trim()
      .split('\n')
      .map((l) => l.trim().split(/\s+/));
    const json = await nbdMap(uri);
    expect(rows.map((c) => [Number(c[0]), Number(c[1]), Number(c[2])])).toEqual(json.map((e) => [e.offset, e.length, e.type]));
  });

  it.skipIf(!hasTool('qemu-io'))('after TRIM and WRITE_ZEROES the map shows zeros there, consistently with reads', async () => {
    const io = await run(
      'qemu-io',
      [
        '-f', 'raw', uri,
        '-c', `discard ${4 * MiB} ${64 * KiB}`, // TRIM the first half of the 128K run
        '-c', `write -z -u ${SIZE - 64 * KiB} ${64 * KiB}`, // WRITE_ZEROES, may punch
        '-c', `write -z ${1 * MiB} ${64 * KiB}`, // WRITE_ZEROES with NO_HOLE
        '-c', `read -P 0 ${1 * MiB} ${64 * KiB}`,
        '-c', `read -P 0 ${SIZE - 64 * KiB} ${64 * KiB}`,
        '-c', `read -P 0xb2 ${4 * MiB + 64 * KiB} ${64 * KiB}`,
      ],
      { timeoutMs: 15_000 },
    );
    expect(io.code, io.stdout + io.stderr).toBe(0);
    expect(io.stdout).not.toMatch(/fail/i);

    const contents = await readFile(image);
    const map = await nbdMap(uri);
    checkConsistent(map, contents);
    // zeroed ranges read as zeros on the file itself
    expect(contents.subarray(1 * MiB, 1 * MiB + 64 * KiB).every((b) => b === 0)).toBe(true);
    expect(contents.subarray(SIZE - 64 * KiB).every((b) => b === 0)).toBe(true);
    // the untouched half of the trimmed run is still data
    expect(contents.subarray(4 * MiB + 64 * KiB, 4 * MiB + 128 * KiB).every((b) => b === 0xb2)).toBe(true);
    expect(typeAt(map, 4 * MiB + 64 * KiB)).toBe(DATA);
    if (!sparse) return;
    // punched: trim and write-zeroes without NO_HOLE
    expect(typeAt(map, 4 * MiB)).toBe(HOLE_ZERO);
    expect(typeAt(map, 4 * MiB + 64 * KiB - 1)).toBe(HOLE_ZERO);
    expect(typeAt(map, SIZE - 64 * KiB)).toBe(HOLE_ZERO);
    expect(typeAt(map, SIZE - 1)).toBe(HOLE_ZERO);
    // NO_HOLE keeps the range allocated; whether the filesystem reports its unwritten blocks as a
    // hole (ext4) or as data (tmpfs) is its business, but it must never be HOLE without ZERO
    expect(typeAt(map, 1 * MiB)).not.toBe(1);
  });
});
