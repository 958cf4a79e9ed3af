/**
 * qemu-io (QEMU's NBD client, -f raw on the nbd+unix URI) against `blkrep serve-nbd` on a raw
 * file: pattern writes and reads, TRIM, WRITE_ZEROES with and without NO_HOLE, FUA, FLUSH and
 * pipelined aio writes; then the backing file must hold exactly what the test computed.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { loadNative } from '../../src/block/native.js';
import { hasTool, makeTempDir, run, serve, unixUri } from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;
/** with the addon, TRIM punches a hole (reads zeros); without it, TRIM keeps the data */
const trimZeroes = loadNative() !== null;

async function qemuIo(uri: string, commands: string[], extra: string[] = []) {
  const args = ['-f', 'raw', ...extra, uri];
  for (const c of commands) args.push('-c', c);
  return run('qemu-io', args, { timeoutMs: 30_000 });
}

/** The bytes `read -v` printed, from lines like "00000010:  ab ab … ab  ................". */
function parseHexdump(out: string): { offset: number; bytes: Buffer } {
  const lines = out.split('\n').filter((l) => /^[0-9a-f]{8}:\s/.test(l));
  if (lines.length === 0) throw new Error(`no hexdump in:\n${out}`);
  const offset = parseInt(lines[0]!.slice(0, 8), 16);
  const bytes: number[] = [];
  for (const l of lines) {
    const hex = l.slice(10, 10 + 16 * 3).trim();
    for (const h of hex.split(/\s+/)) if (h) bytes.push(parseInt(h, 16));
  }
  return { offset, bytes: Buffer.from(bytes) };
}

function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

describe.skipIf(!hasTool('qemu-io'))('qemu-io against serve-nbd', () => {
  let image: string;
  let uri: string;
  let expected: Buffer;

  beforeEach(async () => {
    const dir = await makeTempDir();
    image = join(dir, 'disk.raw');
    // a recognisable starting content: byte i holds i mod 251
    expected = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i++) expected[i] = i % 251;
    await writeFile(image, expected);
    const sock = join(dir, 's.sock');
    await serve([image, '--socket', sock]);
    uri = unixUri(sock);
  });

  async function expectFile(): Promise<void> {
    const actual = await readFile(image);
    expect(actual.length).toBe(SIZE);
    const at = firstDifference(actual, expected);
    expect(at, at < 0 ? '' : `first difference at offset ${at}: file 0x${actual[at]?.toString(16)}, expected 0x${expected[at]?.toString(16)}`).toBe(-1);
  }

  it('write -P / read -P / read -v: pattern round trips, byte-exact in the file', async () => {
    const r = await qemuIo(uri, [
      'write -P 0xab 0 64k',
      'read -P 0xab 0 64k',
      'write -P 0xcd 65537 1000', // unaligned: the export's minimum block size is 1
      'read -P 0xcd 65537 1000',
      `write -P 0xef ${SIZE - 4 * KiB} 4k`, // the last block
      `read -P 0xef ${SIZE - 4 * KiB} 4k`,
      'read -v 65528 32',
    ]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/verification failed|error/i);
    expected.fill(0xab, 0, 64 * KiB);
    expected.fill(0xcd, 65537, 65537 + 1000);
    expected.fill(0xef, SIZE - 4 * KiB, SIZE);
    const dump = parseHexdump(r.stdout);
    expect(dump.offset).toBe(65528);
    expect(dump.bytes.equals(expected.subarray(65528, 65528 + 32))).toBe(true);
    await expectFile();
  });

  it('read -P with the wrong pattern fails (the check itself works)', async () => {
    const r = await qemuIo(uri, ['write -P 0x11 0 4k', 'read -P 0x12 0 4k']);
    expect(r.stdout).toMatch(/Pattern verification failed at offset 0/);
    expect(r.code).not.toBe(0);
  });

  it('discard, write -z (NO_HOLE) and write -z -u read back as zeros and land in the file', async () => {
    const r = await qemuIo(uri, [
      'write -P 0x11 1M 1M',
      'discard 1M 256k',
      'write -P 0x22 3M 1M',
      'write -z 3M 512k', // WRITE_ZEROES with NO_HOLE
      'read -P 0 3M 512k',
      'read -P 0x22 3584k 512k',
      'write -P 0x33 5M 1M',
      'write -z -u 5M 1M', // WRITE_ZEROES, may punch a hole
      'read -P 0 5M 1M',
      'write -z -u 7340033 100000', // unaligned write-zeroes
      'read -P 0 7340033 100000',
    ]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/verification failed|error/i);
    expected.fill(0x11, 1 * MiB, 2 * MiB);
    if (trimZeroes) expected.fill(0, 1 * MiB, 1 * MiB + 256 * KiB);
    expected.fill(0x22, 3 * MiB, 4 * MiB);
    expected.fill(0, 3 * MiB, 3 * MiB + 512 * KiB);
    expected.fill(0, 5 * MiB, 6 * MiB);
    expected.fill(0, 7340033, 7340033 + 100000);
    const actual = await readFile(image);
    // TRIM leaves its range unspecified; with the addon it is a hole, so zeros
    const trimmed = actual.subarray(1 * MiB, 1 * MiB + 256 * KiB);
    expect(trimmed.every((b) => b === 0) || trimmed.every((b) => b === 0x11)).toBe(true);
    await expectFile();
  });

  it('write -f (FUA), flush, and 64 pipelined aio_writes then aio_flush', async () => {
    const cmds = ['write -f -P 0x44 8M 64k', 'flush'];
    // 64 writes in flight at once, interleaved so neighbours complete out of order
    for (let i = 0; i < 64; i++) {
      const off = 9 * MiB + ((i * 37) % 64) * 8 * KiB;
      const pattern = 0x40 + (i % 64);
      cmds.push(`aio_write -P ${pattern} ${off} 8k`);
      expected.fill(pattern, off, off + 8 * KiB);
    }
    cmds.push('aio_flush');
    // overlapping aio writes are ordered only by aio_flush: rewrite one range after it
    cmds.push('aio_write -P 0x99 9M 4k', 'aio_flush', 'read -P 0x99 9M 4k');
    expected.fill(0x44, 8 * MiB, 8 * MiB + 64 * KiB);
    expected.fill(0x99, 9 * MiB, 9 * MiB + 4 * KiB);
    const r = await qemuIo(uri, cmds);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/verification failed|error/i);
    expect(r.stdout.match(/^wrote 8192\/8192 bytes/gm)?.length).toBe(64);
    await expectFile();
  });

  it('a 32 MiB write (the advertised maximum payload) in one request', async () => {
    const dir = await makeTempDir();
    const big = join(dir, 'big.raw');
    await writeFile(big, Buffer.alloc(64 * MiB));
    const sock = join(dir, 'b.sock');
    await serve([big, '--socket', sock]);
    const r = await qemuIo(unixUri(sock), ['write -P 0x5e 16M 32M', 'read -P 0x5e 16M 32M', 'read -P 0 0 16M']);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/verification failed|error/i);
    const actual = await readFile(big);
    const want = Buffer.alloc(64 * MiB);
    want.fill(0x5e, 16 * MiB, 48 * MiB);
    expect(firstDifference(actual, want)).toBe(-1);
  });
});
