/**
 * blkrep check against qemu-img check on the same images: clean, leaked clusters (crafted, and
 * left by kill -9 of serve-nbd under writes), refcounts too low, a cluster used twice, the
 * refcount table past the end of the file. The same lines on stderr, the same summary on stdout,
 * the same --json numbers and exit codes (0 clean, 1 not completed, 2 corruptions, 3 leaks);
 * after --repair the image is clean for qemu-img check and the guest data is intact.
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { CMD } from '../../src/nbd/constants.js';
import { RawClient, replyError } from '../support/raw-client.js';
import { makeTempDir, run, runCli, serve } from '../support/spawn.js';
import { expectClean, pattern, qemuCheck, tool, KiB, MiB } from './helpers.js';

const CS = 64 * KiB;
let dir: string;
let base: Buffer;

interface Layout {
  reftable: number;
  refblock: number;
  l1: number;
  l2: number;
}

function layoutOf(b: Buffer): Layout {
  const l1 = Number(b.readBigUInt64BE(40));
  const reftable = Number(b.readBigUInt64BE(48));
  return {
    l1,
    reftable,
    refblock: Number(b.readBigUInt64BE(reftable) & 0x00fffffffffffe00n),
    l2: Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n),
  };
}

async function crafted(name: string, mutate: (b: Buffer, l: Layout) => unknown): Promise<string> {
  let b: Buffer = Buffer.from(base);
  const grown = mutate(b, layoutOf(b));
  if (Buffer.isBuffer(grown)) b = grown;
  const path = join(dir, name);
  await writeFile(path, b);
  return path;
}

/** blkrep check and qemu-img check on two copies of `path`: outputs and exit codes. */
async function both(path: string, args: string[] = []): Promise<{ blkrep: Awaited<ReturnType<typeof run>>; qemu: Awaited<ReturnType<typeof run>>; b: string; q: string }> {
  const b = `${path}.blkrep`;
  const q = `${path}.qemu`;
  await copyFile(path, b);
  await copyFile(path, q);
  const blkrep = await runCli(['check', ...args, b], { cwd: dir });
  const qemu = await run('qemu-img', ['check', ...args, q], { cwd: dir, timeoutMs: 30_000 });
  return { blkrep, qemu, b, q };
}

const strip = (s: string, name: string): string => s.split(name).join('IMG');

describe('blkrep check', () => {
  beforeAll(async () => {
    dir = await makeTempDir('file');
    const path = join(dir, 'base.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', path, '64M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0x6b 32M 64k', path]);
    base = await readFile(path);
  });

  const cases: Array<{ name: string; mutate: (b: Buffer, l: Layout) => unknown; code: number }> = [
    { name: 'clean', mutate: () => {}, code: 0 },
    // two clusters appended to the file, counted but used by nothing: leaks (as a crash leaves them)
    {
      name: 'leaks',
      mutate: (b, l) => {
        const end = b.length / CS;
        b.writeUInt16BE(1, l.refblock + end * 2);
        b.writeUInt16BE(2, l.refblock + (end + 1) * 2);
        return Buffer.concat([b, Buffer.alloc(2 * CS, 0x77)]);
      },
      code: 3,
    },
    // a refcount of 0 for a used cluster: a corruption that needs a rebuilt refcount structure
    { name: 'refcount-zero', mutate: (b, l) => b.writeUInt16BE(0, l.refblock + 7 * 2), code: 2 },
    // two L2 entries point at cluster 8 (refcount 1): too low, and COPIED wrong on both
    { name: 'used-twice', mutate: (b, l) => b.writeBigUInt64BE(b.readBigUInt64BE(l.l2 + 3 * 8), l.l2 + 4 * 8), code: 2 },
    // the attack image of issue 14: the refcount table past the end of the file
    { name: 'reftable-past-eof', mutate: (b) => b.writeBigUInt64BE(BigInt(16 * MiB), 48), code: 2 },
  ];

  it.each(cases)('$name: the same report and exit code ($code) as qemu-img check, as text and as JSON', async ({ name, mutate, code }) => {
    const path = await crafted(`${name}.qcow2`, mutate);
    const text = await both(path);
    expect(text.qemu.code).toBe(code);
    expect(text.blkrep.code, text.blkrep.stderr).toBe(code);
    expect(strip(text.blkrep.stdout, text.b)).toBe(strip(text.qemu.stdout, text.q));
    expect(strip(text.blkrep.stderr, text.b)).toBe(strip(text.qemu.stderr, text.q));
    if (code === 0) expect(text.blkrep.stdout).toContain('No errors were found on the image.');

    const json = await both(path, ['--output=json']);
    const r = await runCli(['check', '--json', json.b], { cwd: dir });
    expect(r.code).toBe(code);
    const mine = JSON.parse(r.stdout) as Record<string, unknown>;
    const theirs = JSON.parse(json.qemu.stdout) as Record<string, unknown>;
    expect(mine.messages).toEqual(text.blkrep.stderr.split('\n').filter((l) => l !== ''));
    delete mine.messages;
    expect({ ...mine, filename: 'IMG' }).toEqual({ ...theirs, filename: 'IMG' });
  });

  it('an image with an internal snapshot, compressed clusters and a persistent bitmap holding dirty bits: the same report as qemu-img check', async () => {
    const path = join(dir, 'rich.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', path, '64M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', path]);
    await tool('qemu-img', ['snapshot', '-c', 's1', path]);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 256k', '-c', 'write -c -P 0x44 8M 64k', path]);
    await tool('qemu-img', ['bitmap', '--add', path, 'b0']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write 4M 1M', path]);
    const info = JSON.parse(await tool('qemu-img', ['info', '--output=json', path])) as { snapshots?: unknown[]; 'format-specific': { data: { bitmaps?: unknown[] } } };
    expect(info.snapshots).toHaveLength(1);
    expect(info['format-specific'].data.bitmaps).toHaveLength(1);
    const r = await both(path);
    expect(r.qemu.code).toBe(0);
    expect(r.blkrep.code, r.blkrep.stderr).toBe(0);
    expect(strip(r.blkrep.stdout, r.b)).toBe(strip(r.qemu.stdout, r.q));
    expect(r.blkrep.stdout).toMatch(/compressed clusters/);
    // a leak among them is found as qemu-img check finds it, and freed keeping the snapshot and
    // the bitmap. (QEMU 7.2's own check -r leaks on this image counts the snapshot's clusters as
    // leaks and drops the snapshot, so the repair is compared with qemu-img check afterwards.)
    const b = await readFile(path);
    const l = layoutOf(b);
    const end = Math.ceil(b.length / CS);
    b.writeUInt16BE(1, l.refblock + end * 2);
    const leaky = join(dir, 'rich-leak.qcow2');
    await writeFile(leaky, Buffer.concat([b, Buffer.alloc(end * CS - b.length), Buffer.alloc(CS, 1)]));
    const found = await both(leaky);
    expect([found.blkrep.code, found.qemu.code]).toEqual([3, 3]);
    expect(strip(found.blkrep.stdout, found.b)).toBe(strip(found.qemu.stdout, found.q));
    expect(strip(found.blkrep.stderr, found.b)).toBe(`Leaked cluster ${end} refcount=1 reference=0\n`);
    const repaired = await runCli(['check', '--repair', 'leaks', leaky]);
    expect(repaired.code, repaired.stdout + repaired.stderr).toBe(0);
    expect(repaired.stderr).toBe(`Leaked cluster ${end} refcount=1 reference=0\nRepairing cluster ${end} refcount=1 reference=0\n`);
    await expectClean(leaky);
    const after = JSON.parse(await tool('qemu-img', ['info', '--output=json', leaky])) as typeof info;
    expect(after.snapshots).toEqual(info.snapshots);
    expect(after['format-specific'].data.bitmaps).toEqual(info['format-specific'].data.bitmaps);
  });

  it.each([
    ['leaks', 'leaks', 0],
    ['leaks', 'all', 0],
    ['refcount-zero', 'leaks', 1],
    ['refcount-zero', 'all', 0],
    ['used-twice', 'all', 0],
    ['reftable-past-eof', 'all', 0],
  ] as const)('%s --repair %s: exit %i as qemu-img check -r, then qemu-img check finds nothing and the data is intact', async (name, mode, code) => {
    const c = cases.find((x) => x.name === name)!;
    const path = await crafted(`${name}-r${mode}.qcow2`, c.mutate);
    const r = await both(path, ['-r', mode]);
    expect(r.qemu.code).toBe(code);
    expect(r.blkrep.code, r.blkrep.stdout + r.blkrep.stderr).toBe(code);
    if (code !== 0) {
      expect(r.blkrep.stderr).toContain('ERROR need to rebuild refcount structures');
      return;
    }
    // the first lines (what was found and repaired) are qemu-img's; placement of a rebuilt structure may differ
    expect(r.blkrep.stdout.split('\n').slice(0, 7)).toEqual(r.qemu.stdout.split('\n').slice(0, 7));
    await expectClean(r.b);
    // the guest data, as QEMU reads it
    const read = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0x6b 32M 64k', r.b], { timeoutMs: 30_000 });
    expect(read.stdout + read.stderr).not.toMatch(/mismatch|fail|error/i);
    // and the corrupt and dirty bits are clear
    expect((await readFile(r.b)).readBigUInt64BE(72) & 3n).toBe(0n);
  });

  it('errors: not a qcow2 image (63), a missing file, a header it cannot parse, a bad --repair value (1)', async () => {
    const raw = join(dir, 'disk.raw');
    await writeFile(raw, Buffer.alloc(1 * MiB));
    const notQcow2 = await runCli(['check', '--json', raw]);
    expect(notQcow2.code).toBe(63);
    expect(JSON.parse(notQcow2.stdout)).toEqual({ error: { code: 'ERR_CHECK_UNSUPPORTED', message: `"${raw}" is not a qcow2 image: this image format does not support checks` } });
    const missing = await runCli(['check', '--json', join(dir, 'missing.qcow2')]);
    expect(missing.code).toBe(1);
    expect(JSON.parse(missing.stdout).error.code).toBe('ERR_OPEN');
    const bad = await crafted('bad-header.qcow2', (b) => b.writeUInt32BE(0, 56));
    const badHeader = await runCli(['check', '--json', bad]);
    expect(badHeader.code).toBe(1);
    expect(JSON.parse(badHeader.stdout).error).toEqual({ code: 'ERR_QCOW2_CORRUPT', message: `qcow2 image "${bad}" is corrupt: refcount_table_clusters is 0: the image has no refcount table` });
    const usage = await runCli(['check', '--repair', 'some', bad]);
    expect(usage.code).toBe(1);
    expect(usage.stderr).toMatch(/Expected --repair=some to be one of: leaks, all/);
  });

  it('an image served read-write is locked: check refuses it (ERR_IMAGE_LOCKED), -U checks it anyway, -U with --repair is refused; once served no more, a repair runs', async () => {
    const image = join(dir, 'served.qcow2');
    await copyFile(join(dir, 'base.qcow2'), image);
    const s = await serve([image, '--socket', join(dir, 'served.sock')]);
    try {
      const locked = await runCli(['check', '--json', image]);
      expect(locked.code).toBe(1);
      const err = JSON.parse(locked.stdout).error as { code: string; message: string };
      expect(err.code).toBe('ERR_IMAGE_LOCKED');
      expect(err.message).toContain(`pid ${s.pid}`);
      const shared = await runCli(['check', '-U', '--json', image]);
      expect(shared.code, shared.stderr).toBe(0);
      expect(JSON.parse(shared.stdout)).toMatchObject({ filename: image, 'check-errors': 0 });
      const repair = await runCli(['check', '-U', '--repair', 'leaks', image]);
      expect(repair.code).toBe(1);
      expect(repair.stderr).toContain('--force-share cannot be used with --repair');
    } finally {
      await s.stop();
    }
    const after = await runCli(['check', '--repair', 'leaks', image]);
    expect(after.code, after.stdout + after.stderr).toBe(0);
  }, 60_000);

  it('leaks left by kill -9 of serve-nbd under writes: blkrep check and qemu-img check count the same after each kill; --repair leaks cleans them', async () => {
    const image = join(dir, 'killed.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', image, '64M']);
    const sock = join(dir, 'k.sock');
    let x = 20261205;
    const random = (): number => {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      return (x >>> 0) / 2 ** 32;
    };
    const seen: number[] = [];
    for (let round = 0; round < 5; round++) {
      const s = await serve([image, '--socket', sock]);
      const { client } = await RawClient.open(sock);
      try {
        // batches of allocating writes, each followed by a FLUSH; the kill comes after the
        // third batch's writes are acknowledged, while its FLUSH (a writeback cycle) runs
        for (let batch = 0; batch < 3; batch++) {
          const cookies = [];
          for (let i = 0; i < 32; i++) {
            const offset = Math.floor(random() * 1024) * CS;
            cookies.push(client.send(CMD.WRITE, { offset, data: pattern(CS, round * 1000 + batch * 100 + i) }));
          }
          for (const c of cookies) expect(replyError(await client.readReply(c, 10_000))).toBe(0);
          const flush = client.send(CMD.FLUSH);
          if (batch < 2) expect(replyError(await client.readReply(flush, 10_000))).toBe(0);
        }
      } finally {
        process.kill(s.pid, 'SIGKILL');
        client.destroy();
        await s.waitExit(10_000);
      }
      const q = await qemuCheck(image);
      const b = await runCli(['check', '--json', image]);
      const mine = JSON.parse(b.stdout) as Record<string, number>;
      expect({ corruptions: mine.corruptions ?? 0, leaks: mine.leaks ?? 0, code: b.code }, q.raw).toEqual({ corruptions: q.corruptions, leaks: q.leaks, code: q.code });
      expect(q.corruptions).toBe(0);
      seen.push(q.leaks);
    }
    console.log(`leaked clusters after each kill -9 (never reused: they keep a refcount, so they add up): ${seen.join(' → ')}`);
    expect([...seen].sort((a, b) => a - b), 'leaks never go down without a repair').toEqual(seen);
    const repaired = await runCli(['check', '--repair', 'leaks', image]);
    expect(repaired.code, repaired.stdout + repaired.stderr).toBe(0);
    await expectClean(image);
  }, 120_000);
});
