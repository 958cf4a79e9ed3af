/**
 * qemu-img against `blkrep serve-nbd`: bulk reads (convert from an export, which walks block
 * status), bulk writes (convert -n into an export, with zero detection → WRITE_ZEROES), and
 * compare (exit 0 identical, 1 different, naming the first differing offset).
 */
import { randomBytes } from 'node:crypto';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasTool, makeTempDir, run, serve, unixUri } from '../support/spawn.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 24 * MiB;

/** Random data with zero runs and a hole-sized gap, so both data and zero paths are exercised. */
function mixedContent(): Buffer {
  const b = randomBytes(SIZE);
  b.fill(0, 2 * MiB, 6 * MiB); // a large zero run (becomes a hole / WRITE_ZEROES)
  b.fill(0, 10 * MiB + 512, 10 * MiB + 64 * KiB); // a small unaligned one
  b.fill(0, SIZE - 1 * MiB, SIZE); // zeros at the end
  return b;
}

async function qemuImg(...args: string[]) {
  return run('qemu-img', args, { timeoutMs: 60_000 });
}

describe.skipIf(!hasTool('qemu-img'))('qemu-img against serve-nbd', () => {
  it('convert -O raw from an export reproduces the served file', async () => {
    const dir = await makeTempDir();
    const src = join(dir, 'served.raw');
    const content = mixedContent();
    await writeFile(src, content);
    // punch a real hole too: extend the file sparsely by 8 MiB
    await truncate(src, SIZE + 8 * MiB);
    const sock = join(dir, 's.sock');
    await serve([src, '--socket', sock]);
    const out = join(dir, 'out.raw');
    const r = await qemuImg('convert', '-f', 'raw', '-O', 'raw', unixUri(sock), out);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    const got = await readFile(out);
    expect(got.length).toBe(SIZE + 8 * MiB);
    expect(got.subarray(0, SIZE).equals(content)).toBe(true);
    expect(got.subarray(SIZE).every((b) => b === 0)).toBe(true);
  });

  it('convert -n from a file into an export writes it byte for byte', async () => {
    const dir = await makeTempDir();
    const target = join(dir, 'target.raw');
    // start from non-zero garbage, so zero runs in the source must really be written as zeros
    await writeFile(target, Buffer.alloc(SIZE, 0x5a));
    const sock = join(dir, 's.sock');
    await serve([target, '--socket', sock]);
    const src = join(dir, 'src.raw');
    const content = mixedContent();
    await writeFile(src, content);
    const r = await qemuImg('convert', '-n', '-f', 'raw', '-O', 'raw', src, unixUri(sock));
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect((await readFile(target)).equals(content)).toBe(true);
  });

  it('compare: exit 0 when identical, 1 with the first differing offset when not', async () => {
    const dir = await makeTempDir();
    const served = join(dir, 'served.raw');
    const content = mixedContent();
    await writeFile(served, content);
    const sock = join(dir, 's.sock');
    await serve([served, '--socket', sock, '--read-only']);
    const copy = join(dir, 'copy.raw');
    await writeFile(copy, content);

    const same = await qemuImg('compare', '-f', 'raw', '-F', 'raw', unixUri(sock), copy);
    expect(same.code, same.stdout + same.stderr).toBe(0);
    expect(same.stdout).toMatch(/Images are identical/);

    const differing = Buffer.from(content);
    const at = 17 * MiB + 12345;
    differing[at] = differing[at]! ^ 0xff;
    await writeFile(copy, differing);
    const diff = await qemuImg('compare', '-f', 'raw', '-F', 'raw', unixUri(sock), copy);
    expect(diff.code, diff.stdout + diff.stderr).toBe(1);
    // qemu-img compares in sectors and reports the first differing 512-byte sector's offset
    expect(diff.stdout).toContain(`Content mismatch at offset ${at - (at % 512)}!`);

    // a byte in a zero run of the export that the file has as data
    const inZeroRun = Buffer.from(content);
    inZeroRun[3 * MiB] = 1;
    await writeFile(copy, inZeroRun);
    const diff2 = await qemuImg('compare', '-f', 'raw', '-F', 'raw', unixUri(sock), copy);
    expect(diff2.code).toBe(1);
    expect(diff2.stdout).toContain(`Content mismatch at offset ${3 * MiB}!`);
  });
});
