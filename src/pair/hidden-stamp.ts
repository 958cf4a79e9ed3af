/**
 * The hidden disk's stamp: a blkrep qcow2 header extension (type 0x626b6864, "bkhd") holding 16
 * random bytes, rewritten whenever the hidden disk's content starts a new life — at each start
 * of the secondary (before the replica export takes a write) and at each checkpoint that empties
 * it (step 6) — and recorded in the pair state (`hiddenStamp`). A stale copy of the hidden disk
 * written over the same file in place (`cp --no-preserve`, `dd conv=notrunc`, a restore that
 * keeps the inode) keeps the inode the state records but carries an older stamp: refused at
 * start (ERR_PAIR_OVERLAY), as a copy under another inode is.
 *
 * Unknown header extensions are kept by QEMU (qemu-img check, commit, amend rewrite the header
 * with them) and by our qcow2 driver (it never rewrites the extension area: it writes single
 * header fields). The extension is placed last, before the end marker; a backing file name
 * after the extensions moves behind it.
 */
import { randomBytes } from 'node:crypto';
import { BlkrepError } from '../api/errors.js';
import type { Qcow2Container } from '../block/qcow2/file.js';
import { EXT_END, H, parseHeader } from '../block/qcow2/format.js';

export const EXT_BLKREP_HIDDEN = 0x626b6864;
export const STAMP_BYTES = 16;

const pad8 = (n: number): number => Math.ceil(n / 8) * 8;

export function newStamp(): string {
  return randomBytes(STAMP_BYTES).toString('hex');
}

async function cluster0Of(file: Qcow2Container): Promise<Buffer> {
  const start = Buffer.alloc(Math.min(file.length, 512));
  await file.read(0, start);
  const bits = start.length >= 24 ? start.readUInt32BE(H.clusterBits) : 9;
  const c0 = Buffer.alloc(Math.min(file.length, 2 ** (bits >= 9 && bits <= 21 ? bits : 9)));
  await file.read(0, c0);
  return c0;
}

/** The stamp extension of `file`: its value (hex) and where its 16 bytes are, or null when it has none. */
export async function readHiddenStamp(file: Qcow2Container): Promise<{ id: string; at: number } | null> {
  const c0 = await cluster0Of(file);
  const h = parseHeader(file.path, c0);
  const limit = h.backingFileOffset !== 0 ? h.backingFileOffset : c0.length;
  let at = h.headerLength;
  while (at + 8 <= limit) {
    const type = c0.readUInt32BE(at);
    const length = c0.readUInt32BE(at + 4);
    if (type === EXT_END) return null;
    if (type === EXT_BLKREP_HIDDEN && length === STAMP_BYTES && at + 8 + length <= limit) return { id: c0.subarray(at + 8, at + 8 + length).toString('hex'), at: at + 8 };
    at += 8 + pad8(length);
  }
  return null;
}

/**
 * Write stamp `id` into `file`: over the existing extension's 16 bytes (one small write), or a
 * new extension added before the end marker (cluster 0's extension area rewritten, the backing
 * file name moved behind it). Not synced: the caller's next sync makes it durable (the start's
 * own sync, the emptying's). Returns where the 16 bytes are.
 */
export async function writeHiddenStamp(file: Qcow2Container, id: string): Promise<number> {
  const data = Buffer.from(id, 'hex');
  if (data.length !== STAMP_BYTES) throw new BlkrepError('ERR_INTERNAL', `hidden disk stamp ${id} is not ${STAMP_BYTES} bytes`);
  const have = await readHiddenStamp(file);
  if (have) {
    await file.write(have.at, data);
    return have.at;
  }
  const c0 = await cluster0Of(file);
  const h = parseHeader(file.path, c0);
  const cs = 2 ** h.clusterBits;
  const limit = h.backingFileOffset !== 0 ? h.backingFileOffset : cs;
  let at = h.headerLength;
  while (at + 8 <= limit) {
    if (c0.readUInt32BE(at) === EXT_END) break;
    at += 8 + pad8(c0.readUInt32BE(at + 4));
  }
  const backing = h.backingFileOffset !== 0 ? Buffer.from(c0.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize)) : undefined;
  const ext = Buffer.alloc(8 + STAMP_BYTES + 8);
  ext.writeUInt32BE(EXT_BLKREP_HIDDEN, 0);
  ext.writeUInt32BE(STAMP_BYTES, 4);
  data.copy(ext, 8);
  if (backing) {
    // the backing file name follows the extensions: it moves past the new end first, crash-safe
    // in three steps: (1) a copy where nothing is (past the old name and the new extension), synced;
    // (2) the header's offset pointed at it, synced; (3) the extension over the old name's place
    const nameAt = pad8(Math.max(h.backingFileOffset + backing.length, at + ext.length));
    if (nameAt + backing.length > Math.min(cs, c0.length)) {
      throw new BlkrepError('ERR_PAIR_OVERLAY', `the hidden disk ${file.path} has no room in its ${cs}-byte header cluster for blkrep's stamp extension (the backing file name would end at ${nameAt + backing.length})`, { errno: 'ENOSPC', details: { hidden: file.path } });
    }
    await file.write(nameAt, backing);
    await file.sync();
    const off = Buffer.alloc(8);
    off.writeBigUInt64BE(BigInt(nameAt));
    await file.write(H.backingFileOffset, off);
    await file.sync();
  } else if (at + ext.length > Math.min(cs, c0.length)) {
    throw new BlkrepError('ERR_PAIR_OVERLAY', `the hidden disk ${file.path} has no room in its ${cs}-byte header cluster for blkrep's stamp extension`, { errno: 'ENOSPC', details: { hidden: file.path } });
  }
  await file.write(at, ext);
  return at + 8;
}
