/**
 * The crafted-image corpus (issue 14, defect 5): images made by qemu-img/qemu-io, then one header
 * or table field set to a hostile value (0, 1, huge, unaligned, past the end of the file, on
 * other metadata). For each, blkrep (open read-write, open read-only, read, write) and QEMU
 * (qemu-img check, qemu-io write) run on copies; blkrep must refuse with a BlkrepError or behave
 * as QEMU does, and never change a byte of the original file that QEMU's write leaves alone
 * (apart from the corrupt bit, when blkrep refused a write on metadata). The outcome table is
 * printed at the end.
 */
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { Qcow2Node } from '../../src/block/qcow2/index.js';
import { makeTempDir, run, runCli } from '../support/spawn.js';
import { expectClean, qemuCheck, tool, KiB, MiB } from './helpers.js';

const CS = 64 * KiB;

interface Layout {
  l1: number;
  reftable: number;
  refblock0: number;
  l2: number;
  data0: number;
  snapshots: number;
  bitmapDir: number;
}

type Base = 'plain' | 'snapshot' | 'bitmap' | 'refcount1' | 'cluster4k';

interface Case {
  name: string;
  base: Base;
  mutate: (b: Buffer, l: Layout) => void;
  /** what blkrep must do on a read-write open: refuse it, or open it */
  rw: 'refuse' | 'open';
  /** the code of the refusal (default ERR_QCOW2_CORRUPT) */
  rwCode?: string;
  /** on a write after a read-write open: the write fails with this code (else it succeeds) */
  writeCode?: string;
  /** the read-only open is refused too (the header itself cannot be parsed) */
  roRefused?: boolean;
}

const u32 = (b: Buffer, at: number, v: number): void => {
  b.writeUInt32BE(v >>> 0, at);
};
const u64 = (b: Buffer, at: number, v: bigint | number): void => {
  b.writeBigUInt64BE(BigInt(v), at);
};
const entry = (offset: number, copied = true): bigint => BigInt(offset) | (copied ? 1n << 63n : 0n);

function layoutOf(b: Buffer): Layout {
  const l1 = Number(b.readBigUInt64BE(40));
  const reftable = Number(b.readBigUInt64BE(48));
  const refblock0 = Number(b.readBigUInt64BE(reftable) & 0x00fffffffffffe00n);
  const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  const data0 = Number(b.readBigUInt64BE(l2) & 0x00fffffffffffe00n);
  let bitmapDir = 0;
  for (let at = b.readUInt32BE(100); at + 8 <= CS; ) {
    const type = b.readUInt32BE(at);
    const len = b.readUInt32BE(at + 4);
    if (type === 0) break;
    if (type === 0x23852875) bitmapDir = Number(b.readBigUInt64BE(at + 8 + 16));
    at += 8 + Math.ceil(len / 8) * 8;
  }
  return { l1, reftable, refblock0, l2, data0, snapshots: Number(b.readBigUInt64BE(64)), bitmapDir };
}

/** The 16-bit refcount of cluster c in an image file (first refcount block only). */
function refcountIn(b: Buffer, c: number): number {
  const l = layoutOf(b);
  return b.readUInt16BE(l.refblock0 + c * 2);
}

function bitmapExtAt(b: Buffer): number {
  for (let at = b.readUInt32BE(100); at + 8 <= CS; ) {
    const type = b.readUInt32BE(at);
    const len = b.readUInt32BE(at + 4);
    if (type === 0) break;
    if (type === 0x23852875) return at + 8;
    at += 8 + Math.ceil(len / 8) * 8;
  }
  throw new Error('no bitmaps extension');
}

const PAST_EOF = 64 * MiB;
const HUGE = 1n << 62n;

const CASES: Case[] = [
  // refcount table
  { name: 'refcount_table_offset past EOF (the attack)', base: 'plain', mutate: (b) => u64(b, 48, PAST_EOF), rw: 'refuse' },
  { name: 'refcount_table_offset 0', base: 'plain', mutate: (b) => u64(b, 48, 0), rw: 'refuse', roRefused: true },
  { name: 'refcount_table_offset unaligned', base: 'plain', mutate: (b, l) => u64(b, 48, l.reftable + 512), rw: 'refuse', roRefused: true },
  { name: 'refcount_table_offset 2^62', base: 'plain', mutate: (b) => u64(b, 48, HUGE), rw: 'refuse', roRefused: true },
  { name: 'refcount table on the header', base: 'plain', mutate: (b) => u64(b, 48, 0), rw: 'refuse', roRefused: true },
  { name: 'refcount table on the L1 table', base: 'plain', mutate: (b, l) => u64(b, 48, l.l1), rw: 'refuse' },
  { name: 'refcount table on the L2 table', base: 'plain', mutate: (b, l) => u64(b, 48, l.l2), rw: 'refuse' },
  { name: 'refcount_table_clusters 0', base: 'plain', mutate: (b) => u32(b, 56, 0), rw: 'refuse', roRefused: true },
  { name: 'refcount_table_clusters 0xffffffff', base: 'plain', mutate: (b) => u32(b, 56, 0xffffffff), rw: 'refuse', roRefused: true },
  { name: 'refcount_table_clusters 2 (over its block)', base: 'plain', mutate: (b) => u32(b, 56, 2), rw: 'refuse' },
  { name: 'refcount_table[0] 0 (all clusters look free)', base: 'plain', mutate: (b, l) => u64(b, l.reftable, 0), rw: 'open' },
  { name: 'refcount_table[0] past EOF', base: 'plain', mutate: (b, l) => u64(b, l.reftable, PAST_EOF), rw: 'refuse' },
  { name: 'refcount_table[0] unaligned', base: 'plain', mutate: (b, l) => u64(b, l.reftable, l.refblock0 + 4096), rw: 'refuse' },
  { name: 'refcount_table[0] on the refcount table (self)', base: 'plain', mutate: (b, l) => u64(b, l.reftable, l.reftable), rw: 'refuse' },
  { name: 'refcount_table[0] on the L1 table', base: 'plain', mutate: (b, l) => u64(b, l.reftable, l.l1), rw: 'refuse' },
  { name: 'refcount_table[0] on the L2 table', base: 'plain', mutate: (b, l) => u64(b, l.reftable, l.l2), rw: 'refuse' },
  { name: 'refcount_table[1] on refcount block 0', base: 'plain', mutate: (b, l) => u64(b, l.reftable + 8, l.refblock0), rw: 'refuse' },
  { name: 'refcount block zeroed (metadata counted 0)', base: 'plain', mutate: (b, l) => b.fill(0, l.refblock0, l.refblock0 + CS), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  { name: 'refcount of the header 0', base: 'plain', mutate: (b, l) => b.writeUInt16BE(0, l.refblock0), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  { name: 'refcount of the L1 table 0', base: 'plain', mutate: (b, l) => b.writeUInt16BE(0, l.refblock0 + (l.l1 / CS) * 2), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  // L1 table
  { name: 'l1_table_offset past EOF', base: 'plain', mutate: (b) => u64(b, 40, PAST_EOF), rw: 'refuse' },
  { name: 'l1_table_offset 0', base: 'plain', mutate: (b) => u64(b, 40, 0), rw: 'refuse', roRefused: true },
  { name: 'l1_table_offset unaligned', base: 'plain', mutate: (b, l) => u64(b, 40, l.l1 + 8), rw: 'refuse', roRefused: true },
  { name: 'l1_table_offset 2^62', base: 'plain', mutate: (b) => u64(b, 40, HUGE), rw: 'refuse', roRefused: true },
  { name: 'L1 table on the refcount table', base: 'plain', mutate: (b, l) => u64(b, 40, l.reftable), rw: 'refuse' },
  { name: 'L1 table on refcount block 0', base: 'plain', mutate: (b, l) => u64(b, 40, l.refblock0), rw: 'refuse' },
  { name: 'l1_size 0 (too small)', base: 'plain', mutate: (b) => u32(b, 36, 0), rw: 'refuse', roRefused: true },
  { name: 'l1_size 0xffffffff', base: 'plain', mutate: (b) => u32(b, 36, 0xffffffff), rw: 'refuse', roRefused: true },
  { name: 'size 2^60 (L1 too small)', base: 'plain', mutate: (b) => u64(b, 24, 1n << 60n), rw: 'refuse', roRefused: true },
  { name: 'L1[0] past EOF', base: 'plain', mutate: (b, l) => u64(b, l.l1, entry(PAST_EOF)), rw: 'refuse' },
  { name: 'L1[0] unaligned', base: 'plain', mutate: (b, l) => u64(b, l.l1, entry(l.l2 + 512)), rw: 'refuse' },
  { name: 'L1[0] on the header', base: 'plain', mutate: (b, l) => u64(b, l.l1, entry(0x200)), rw: 'refuse' },
  { name: 'L1[0] on the refcount table', base: 'plain', mutate: (b, l) => u64(b, l.l1, entry(l.reftable)), rw: 'refuse' },
  { name: 'L1[0] on refcount block 0', base: 'plain', mutate: (b, l) => u64(b, l.l1, entry(l.refblock0)), rw: 'refuse' },
  { name: 'L1[0] on the L1 table (self)', base: 'plain', mutate: (b, l) => u64(b, l.l1, entry(l.l1)), rw: 'refuse' },
  { name: 'L1[1] on the L2 table of L1[0]', base: 'plain', mutate: (b, l) => { u32(b, 36, 2); u64(b, l.l1 + 8, entry(l.l2)); }, rw: 'refuse' },
  // L2 entries (not validated at open, as QEMU: the overlap check at write time)
  { name: 'L2[0] data on the header (offset 0, COPIED)', base: 'plain', mutate: (b, l) => u64(b, l.l2, (1n << 63n) | 0n), rw: 'open' },
  { name: 'L2[0] data on the refcount table', base: 'plain', mutate: (b, l) => u64(b, l.l2, entry(l.reftable)), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  { name: 'L2[0] data on refcount block 0', base: 'plain', mutate: (b, l) => u64(b, l.l2, entry(l.refblock0)), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  { name: 'L2[0] data on the L1 table', base: 'plain', mutate: (b, l) => u64(b, l.l2, entry(l.l1)), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  { name: 'L2[0] data on its own L2 table', base: 'plain', mutate: (b, l) => u64(b, l.l2, entry(l.l2)), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  { name: 'L2[0] data past EOF', base: 'plain', mutate: (b, l) => u64(b, l.l2, entry(PAST_EOF)), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  { name: 'L2[0] data unaligned', base: 'plain', mutate: (b, l) => u64(b, l.l2, entry(l.data0 + 512)), rw: 'open', writeCode: 'ERR_QCOW2_CORRUPT' },
  { name: 'L2[0] compressed, garbage', base: 'plain', mutate: (b, l) => u64(b, l.l2, (1n << 62n) | BigInt(l.data0)), rw: 'open' },
  { name: 'L2[0] compressed, on the header', base: 'plain', mutate: (b, l) => u64(b, l.l2, (1n << 62n) | 0x10n), rw: 'open' },
  // header fields
  { name: 'cluster_bits 0', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u32(b, 20, 0), rw: 'refuse', roRefused: true },
  { name: 'cluster_bits 8', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u32(b, 20, 8), rw: 'refuse', roRefused: true },
  { name: 'cluster_bits 22', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u32(b, 20, 22), rw: 'refuse', roRefused: true },
  { name: 'cluster_bits 0xffffffff', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u32(b, 20, 0xffffffff), rw: 'refuse', roRefused: true },
  { name: 'header_length 0', base: 'plain', mutate: (b) => u32(b, 100, 0), rw: 'refuse', roRefused: true },
  { name: 'header_length 105 (unaligned)', base: 'plain', mutate: (b) => u32(b, 100, 105), rw: 'refuse', roRefused: true },
  { name: 'header_length 0xffffffff', base: 'plain', mutate: (b) => u32(b, 100, 0xffffffff), rw: 'refuse', roRefused: true },
  { name: 'refcount_order 7', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u32(b, 96, 7), rw: 'refuse', roRefused: true },
  { name: 'version 1', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u32(b, 4, 1), rw: 'refuse', roRefused: true },
  { name: 'version 4', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u32(b, 4, 4), rw: 'refuse', roRefused: true },
  { name: 'crypt_method 1 (AES)', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u32(b, 32, 1), rw: 'refuse', roRefused: true },
  { name: 'incompatible bit 5 (unknown)', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u64(b, 72, 1n << 5n), rw: 'refuse', roRefused: true },
  { name: 'incompatible bit 1 (corrupt)', base: 'plain', mutate: (b) => u64(b, 72, 1n << 1n), rw: 'refuse' },
  { name: 'incompatible bit 0 (dirty)', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'plain', mutate: (b) => u64(b, 72, 1n), rw: 'refuse' },
  { name: 'compatible bit 7 (unknown: ignored)', base: 'plain', mutate: (b) => u64(b, 80, 1n << 7n), rw: 'open' },
  { name: 'autoclear bit 9 (unknown: cleared)', base: 'plain', mutate: (b) => u64(b, 88, 1n << 9n), rw: 'open' },
  { name: 'backing_file_offset past the cluster', base: 'plain', mutate: (b) => { u64(b, 8, CS + 8); u32(b, 16, 4); }, rw: 'refuse', roRefused: true },
  { name: 'backing_file_size 2000', base: 'plain', mutate: (b) => { u64(b, 8, 4096); u32(b, 16, 2000); }, rw: 'refuse', roRefused: true },
  { name: 'extension length 0xffffffff', base: 'plain', mutate: (b) => u32(b, b.readUInt32BE(100) + 4, 0xffffffff), rw: 'refuse', roRefused: true },
  // snapshot table
  { name: 'nb_snapshots 0xffffffff', base: 'snapshot', mutate: (b) => u32(b, 60, 0xffffffff), rw: 'refuse', roRefused: true },
  { name: 'snapshots_offset past EOF', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'snapshot', mutate: (b) => u64(b, 64, PAST_EOF), rw: 'refuse', roRefused: true },
  { name: 'snapshots_offset unaligned', base: 'snapshot', mutate: (b, l) => u64(b, 64, l.snapshots + 8), rw: 'refuse', roRefused: true },
  { name: 'snapshot table on the L1 table', rwCode: 'ERR_QCOW2_UNSUPPORTED', base: 'snapshot', mutate: (b, l) => { b.copy(b, l.l1 + CS * 0, 0, 0); u64(b, 64, l.l1); }, rw: 'refuse', roRefused: true },
  // other refcount widths and cluster sizes
  { name: '1-bit refcounts: refcount table past EOF', base: 'refcount1', mutate: (b) => u64(b, 48, PAST_EOF), rw: 'refuse' },
  { name: '1-bit refcounts: refcount_table[0] on the L1 table', base: 'refcount1', mutate: (b, l) => u64(b, l.reftable, l.l1), rw: 'refuse' },
  { name: '4 KiB clusters: refcount table past EOF', base: 'cluster4k', mutate: (b) => u64(b, 48, PAST_EOF), rw: 'refuse' },
  { name: '4 KiB clusters: L1 table on refcount block 0', base: 'cluster4k', mutate: (b, l) => u64(b, 40, l.refblock0), rw: 'refuse' },
  { name: '4 KiB clusters: L1[0] on the header', base: 'cluster4k', mutate: (b, l) => u64(b, l.l1, entry(0x200)), rw: 'refuse' },
  // bitmaps
  { name: 'bitmap directory past EOF', base: 'bitmap', mutate: (b) => u64(b, bitmapExtAt(b) + 16, PAST_EOF), rw: 'refuse', roRefused: true },
  { name: 'bitmap directory unaligned', base: 'bitmap', mutate: (b, l) => u64(b, bitmapExtAt(b) + 16, l.bitmapDir + 8), rw: 'refuse', roRefused: true },
  { name: 'bitmap directory on the L1 table', base: 'bitmap', mutate: (b, l) => { b.copy(b, l.l1, l.bitmapDir, l.bitmapDir + 64); u64(b, bitmapExtAt(b) + 16, l.l1); }, rw: 'refuse' },
  { name: 'bitmap directory size 2^40', base: 'bitmap', mutate: (b) => u64(b, bitmapExtAt(b) + 8, 1n << 40n), rw: 'refuse', roRefused: true },
  { name: 'nb_bitmaps 0', base: 'bitmap', mutate: (b) => u32(b, bitmapExtAt(b), 0), rw: 'refuse', roRefused: true },
];

interface Outcome {
  name: string;
  rw: string;
  ro: string;
  read: string;
  write: string;
  changed: string;
  qemuCheck: string;
  qemuWrite: string;
  qemuChanged: string;
}

const outcomes: Outcome[] = [];
let dir: string;
const bases = new Map<string, Buffer>();

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex').slice(0, 12);
}

/** 512-byte sectors of `before` (its length) that differ in `after`. */
function changedSectors(before: Buffer, after: Buffer): Set<number> {
  const out = new Set<number>();
  for (let s = 0; s * 512 < before.length; s++) {
    const a = before.subarray(s * 512, s * 512 + 512);
    const b = after.subarray(s * 512, s * 512 + 512);
    if (!a.equals(b)) out.add(s);
  }
  return out;
}

function codeOf(err: unknown): string {
  if (err instanceof BlkrepError) return err.code;
  throw err; // anything but a BlkrepError is a crash
}

const WRITE = Buffer.alloc(64 * KiB, 0x33);
/** guest offset of the second write: unallocated in the base images, so it allocates */
const UNALLOCATED_AT = 8 * MiB;

async function makeBase(name: Base): Promise<Buffer> {
  const path = join(dir, `base-${name}.qcow2`);
  const options = name === 'refcount1' ? ['-o', 'refcount_bits=1'] : name === 'cluster4k' ? ['-o', 'cluster_size=4096'] : [];
  await tool('qemu-img', ['create', '-q', '-f', 'qcow2', ...options, path, '64M']);
  await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0x6b 32M 64k', path]);
  if (name === 'snapshot') await tool('qemu-img', ['snapshot', '-c', 's1', path]);
  if (name === 'bitmap') await tool('qemu-img', ['bitmap', '--add', path, 'b0']);
  return readFile(path);
}

async function blkrepRun(c: Case, original: Buffer): Promise<Omit<Outcome, 'qemuCheck' | 'qemuWrite' | 'qemuChanged'> & { after: Buffer; wrote: boolean }> {
  const path = join(dir, 'blkrep.qcow2');
  await writeFile(path, original);
  const warnings: string[] = [];
  let ro = 'ok';
  let read = '-';
  try {
    const node = await Qcow2Node.open(path, { readOnly: true, backing: null, onWarning: (m) => warnings.push(m) });
    try {
      const got = await node.read(0, 64 * KiB);
      read = got.every((x) => x === 0x5a) ? 'data' : `other ${sha(got).slice(0, 6)}`;
    } catch (err) {
      read = codeOf(err);
    } finally {
      await node.close();
    }
    if (warnings.length > 0) ro = `ok, ${warnings.length} warning${warnings.length > 1 ? 's' : ''}`;
  } catch (err) {
    ro = codeOf(err);
  }
  let rw = 'ok';
  let write = '-';
  let wrote = false;
  try {
    const node = await Qcow2Node.open(path, { backing: null });
    try {
      await node.write(0, WRITE);
      await node.write(UNALLOCATED_AT, WRITE);
      await node.flush();
      write = 'ok';
      wrote = true;
    } catch (err) {
      write = codeOf(err);
      // a second write after the refusal must be refused as well, without touching the file
      await expect(node.write(2 * CS, WRITE)).rejects.toBeInstanceOf(BlkrepError);
    } finally {
      await node.close();
    }
  } catch (err) {
    rw = codeOf(err);
  }
  const after = await readFile(path);
  return { name: c.name, rw, ro, read, write, changed: '', after, wrote };
}

async function qemuRun(original: Buffer): Promise<{ check: string; write: string; after: Buffer }> {
  const path = join(dir, 'qemu.qcow2');
  await writeFile(path, original);
  const chk = await qemuCheck(path).catch(() => undefined);
  const check = chk === undefined ? 'no json' : `rc ${chk.code} c${chk.corruptions} l${chk.leaks}`;
  const r = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 64k', '-c', `write -P 0x33 ${UNALLOCATED_AT} 64k`, path], { timeoutMs: 30_000 });
  const out = (r.stdout + r.stderr).split('\n');
  const why = out.find((l) => /failed|error|can't open/i.test(l));
  const write = r.code !== 0 || why ? `fail (${(why ?? String(r.code)).replace(/^qemu-io: /, '').replace(/\/\S+\.qcow2/g, 'IMG').slice(0, 60)})` : 'ok';
  return { check, write, after: await readFile(path) };
}

describe('crafted qcow2 images', () => {
  beforeAll(async () => {
    dir = await makeTempDir('file');
    for (const b of ['plain', 'snapshot', 'bitmap', 'refcount1', 'cluster4k'] as const) bases.set(b, await makeBase(b));
  }, 60_000);

  afterAll(async () => {
    const cols: Array<keyof Outcome> = ['name', 'rw', 'ro', 'read', 'write', 'changed', 'qemuCheck', 'qemuWrite', 'qemuChanged'];
    const widths = cols.map((k) => Math.max(k.length, ...outcomes.map((o) => o[k].length)));
    const line = (vals: string[]): string => vals.map((v, i) => v.padEnd(widths[i]!)).join(' | ');
    const table = [line(cols), line(widths.map((w) => '-'.repeat(w))), ...outcomes.map((o) => line(cols.map((k) => o[k])))].join('\n');
    console.log(`crafted-image corpus: ${outcomes.length} cases (blkrep | qemu; changed = 512-byte sectors of the original file changed)\n${table}`);
  });

  it('the attack image: read-write open refused naming the field, offset and sizes; read-only opens with the same warning; no byte changed', async () => {
    const original = Buffer.from(bases.get('plain')!);
    u64(original, 48, PAST_EOF);
    const path = join(dir, 'attack.qcow2');
    await writeFile(path, original);
    const err = await Qcow2Node.open(path, { backing: null }).then(
      (n) => n.close(),
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(BlkrepError);
    expect((err as BlkrepError).code).toBe('ERR_QCOW2_CORRUPT');
    expect((err as BlkrepError).message).toBe(
      `qcow2 image "${path}" is corrupt: the refcount table (refcount_table_offset) at offset ${PAST_EOF} of ${CS} bytes lies past the end of the file (${original.length} bytes); it can only be opened read-only (see "blkrep check ${path}"; "--repair all" rebuilds a refcount structure that lies outside the file)`,
    );
    expect((err as BlkrepError).details).toMatchObject({ field: 'refcount_table_offset', offset: PAST_EOF, bytes: CS, fileLength: original.length });
    const warnings: string[] = [];
    const node = await Qcow2Node.open(path, { readOnly: true, backing: null, onWarning: (m) => warnings.push(m) });
    try {
      expect((await node.read(0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0x5a))).toBe(true);
    } finally {
      await node.close();
    }
    expect(warnings).toEqual([
      `qcow2 image "${path}": the refcount table (refcount_table_offset) at offset ${PAST_EOF} of ${CS} bytes lies past the end of the file (${original.length} bytes) (opened read-only; writing to it would be refused)`,
    ]);
    expect((await readFile(path)).equals(original)).toBe(true);
    // the way out: blkrep check --repair all rebuilds the refcount structure; then it opens and takes writes
    const repaired = await runCli(['check', '--repair', 'all', path]);
    expect(repaired.code, repaired.stdout + repaired.stderr).toBe(0);
    await expectClean(path);
    const rw = await Qcow2Node.open(path, { backing: null });
    try {
      await rw.write(UNALLOCATED_AT, WRITE);
      await rw.flush();
      expect((await rw.read(0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0x5a))).toBe(true);
    } finally {
      await rw.close();
    }
    await expectClean(path);
  });

  it('a write that would allocate over metadata fails with EIO, marks the image corrupt and writes nothing else', async () => {
    const original = Buffer.from(bases.get('plain')!);
    const l = layoutOf(original);
    original.writeUInt16BE(0, l.refblock0 + (l.l1 / CS) * 2); // the L1 table counted free
    const path = join(dir, 'overlap.qcow2');
    await writeFile(path, original);
    const node = await Qcow2Node.open(path, { backing: null });
    try {
      const err = await node.write(UNALLOCATED_AT, WRITE).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(BlkrepError);
      expect(err).toMatchObject({ code: 'ERR_QCOW2_CORRUPT', errno: 'EIO', details: { cluster: l.l1 / CS, offset: l.l1, metadata: 'the L1 table' } });
      expect((err as BlkrepError).message).toContain(`cluster ${l.l1 / CS} (offset ${l.l1}) holds the L1 table but its refcount is 0`);
      // from now on nothing is written: writes (even in place) and flush fail with the same error
      await expect(node.write(0, WRITE)).rejects.toBe(err);
      await expect(node.flush()).rejects.toBe(err);
    } finally {
      await node.close();
    }
    const after = await readFile(path);
    const expected = Buffer.from(original);
    expected.writeBigUInt64BE(expected.readBigUInt64BE(72) | 2n, 72);
    expect(after.equals(expected), 'only the corrupt bit changed').toBe(true);
    // and QEMU sees the mark: it refuses to open the image read-write
    const r = await run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 512', path], { timeoutMs: 30_000 });
    expect(r.stdout + r.stderr).toMatch(/corrupt/i);
  });

  it.each(CASES.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const original = Buffer.from(bases.get(c.base)!);
    c.mutate(original, layoutOf(original));
    const b = await blkrepRun(c, original);
    const q = await qemuRun(original);
    const bChanged = changedSectors(original, b.after);
    const qChanged = changedSectors(original, q.after);
    const outcome: Outcome = {
      ...b,
      changed: String(bChanged.size),
      qemuCheck: q.check,
      qemuWrite: q.write,
      qemuChanged: String(qChanged.size),
    };
    outcomes.push(outcome);

    // blkrep's verdict
    if (c.rw === 'refuse') {
      expect(b.rw, 'read-write open').toBe(c.rwCode ?? 'ERR_QCOW2_CORRUPT');
    } else {
      expect(b.rw, 'read-write open').toBe('ok');
    }
    if (c.roRefused) expect(b.ro).not.toMatch(/^ok/);
    else expect(b.ro, 'read-only open').toMatch(/^ok/);
    if (c.writeCode) expect(b.write).toBe(c.writeCode);

    // bytes: nothing QEMU's write leaves alone, apart from the corrupt bit blkrep sets on refusing
    for (const s of bChanged) {
      if (qChanged.has(s)) continue;
      if (s === 0) {
        const diff: number[] = [];
        for (let i = 0; i < 512; i++) if (original[i] !== b.after[i]) diff.push(i);
        expect(diff.every((i) => i >= 72 && i < 80), `header bytes changed: ${diff.join(',')}`).toBe(true);
        expect(b.after.readBigUInt64BE(72) & 2n, 'blkrep marked the image corrupt').toBe(2n);
        continue;
      }
      // written data where the guest write went, or a freed cluster given back (punched)
      expect(b.wrote, `sector ${s} (offset ${s * 512}) changed by blkrep but not by QEMU`).toBe(true);
      const sector = b.after.subarray(s * 512, s * 512 + 512);
      const cluster = Math.floor((s * 512) / CS);
      const punchedFree = sector.every((x) => x === 0) && refcountIn(b.after, cluster) === 0;
      const after = layoutOf(b.after);
      // the L2 table or refcount block that maps or counts the written clusters (QEMU's write may have failed earlier)
      const table = [after.l2, after.refblock0].includes(cluster * CS);
      expect(sector.every((x) => x === 0x33) || punchedFree || table, `sector ${s} (offset ${s * 512}) holds neither QEMU's change, the written data, a table entry nor a freed cluster`).toBe(true);
    }
    if (b.wrote) {
      // what blkrep wrote reads back through QEMU
      const path = join(dir, 'blkrep-readback.qcow2');
      await writeFile(path, b.after);
      const r = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x33 0 64k', '-c', `read -P 0x33 ${UNALLOCATED_AT} 64k`, path], { timeoutMs: 30_000 });
      expect(r.stdout + r.stderr, 'qemu-io reads back what blkrep wrote').not.toMatch(/mismatch|failed|error/i);
    }
  }, 60_000);
});
