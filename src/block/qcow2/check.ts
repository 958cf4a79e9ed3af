/**
 * `blkrep check`: qemu-img check's job for qcow2 (QEMU's qcow2_check_refcounts): count every
 * reference the metadata makes (header, L1 and L2 tables, data and compressed clusters, snapshot
 * table and snapshot L1/L2 tables, refcount table and blocks, bitmap directory, tables and
 * data), compare with the refcounts on disk, check the COPIED flags; optionally repair.
 *
 *   on-disk refcount > references  → a leak (space wasted, no harm): --repair leaks|all lowers it
 *   on-disk refcount < references  → a corruption (a cluster may be handed out twice): --repair all
 *                                     raises it; a count of 0 for a used cluster rebuilds the
 *                                     refcount structure at the end of the file, as QEMU does
 *
 * Repairs are crash safe: only refcounts of clusters nothing points to are lowered; increments
 * and a rebuilt structure are written and synced before anything points at them, and the header
 * switches to a rebuilt table with one synced write. Messages and numbers follow qemu-img check.
 */
import { BlkrepError } from '../../api/errors.js';
import { HostFile, type Qcow2Container } from './file.js';
import { lockPerms } from '../image-lock.js';
import {
  AUTOCLEAR_BITMAPS,
  corrupt,
  H,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  MAX_BITMAP_DIRECTORY_BYTES,
  MAX_SNAPSHOT_TABLE_BYTES,
  parseBitmapDirectory,
  readHeader,
  parseSnapshots,
  type BitmapInfo,
  type Qcow2Header,
  type SnapshotInfo,
} from './format.js';
import { getRefcount, setRefcount } from './refcounts.js';

export type RepairMode = 'leaks' | 'all';

/** qemu-img check --output=json, field for field (leaks-fixed and corruptions-fixed with --repair) */
export interface CheckReport {
  filename: string;
  format: 'qcow2';
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  'image-end-offset'?: number;
  'total-clusters': number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
}

export interface CheckResult {
  report: CheckReport;
  /** the lines qemu-img check prints on stderr (ERROR …, Leaked cluster …, Repairing …) */
  messages: string[];
  /** with --repair: what the first pass found and fixed, before the double check */
  repaired?: { leaks: number; corruptions: number };
  /** 0 clean, 1 check not completed, 2 corruptions, 3 leaks only (qemu-img check's exit codes) */
  exitCode: 0 | 1 | 2 | 3;
}

interface Pass {
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  checkErrors: number;
  highest: number;
  allocated: number;
  fragmented: number;
  compressed: number;
  rebuild: boolean;
}

const L1E_OFFSET = 0x00fffffffffffe00n;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

class Checker {
  readonly cs: number;
  readonly perBlock: number;
  readonly order: number;
  private refs: Float64Array = new Float64Array(0);
  private nbClusters = 0;
  private next = 0;
  readonly messages: string[] = [];
  private pass!: Pass;
  private reftable: Buffer = Buffer.alloc(0);
  private snapshots: SnapshotInfo[] = [];
  private bitmaps: BitmapInfo[] = [];

  constructor(
    readonly file: Qcow2Container,
    readonly h: Qcow2Header,
  ) {
    this.cs = 2 ** h.clusterBits;
    this.order = h.refcountOrder;
    this.perBlock = (this.cs * 8) >>> h.refcountOrder;
  }

  private log(line: string): void {
    this.messages.push(line);
  }

  async load(): Promise<void> {
    const h = this.h;
    this.reftable = Buffer.alloc(h.refcountTableClusters * this.cs);
    await this.file.read(h.refcountTableOffset, this.reftable);
    if (h.nbSnapshots > 0 && h.snapshotsOffset < this.file.length) {
      const table = Buffer.alloc(Math.min(MAX_SNAPSHOT_TABLE_BYTES, this.file.length - h.snapshotsOffset));
      await this.file.read(h.snapshotsOffset, table);
      this.snapshots = parseSnapshots(this.file.path, h, table);
    }
    if (h.bitmaps && h.bitmaps.directorySize <= MAX_BITMAP_DIRECTORY_BYTES) {
      const dir = Buffer.alloc(h.bitmaps.directorySize);
      await this.file.read(h.bitmaps.directoryOffset, dir);
      this.bitmaps = parseBitmapDirectory(this.file.path, h.bitmaps, dir);
    }
  }

  /** One reference to [offset, offset+size); QEMU's qcow2_inc_refcounts_imrt. */
  private inc(offset: number, size: number): void {
    if (size <= 0) return;
    if (offset + size - this.file.length >= this.cs) {
      this.log(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${size.toString(16)}`);
      this.pass.corruptions++;
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    if (last >= this.refs.length) {
      const grown = new Float64Array(last + 1);
      grown.set(this.refs);
      this.refs = grown;
    }
    for (let c = first; c <= last; c++) this.refs[c]! += 1;
  }

  blockOffset(index: number): number {
    if (index >= this.reftable.length / 8) return 0;
    return Number(this.reftable.readBigUInt64BE(index * 8) & L1E_OFFSET);
  }

  private blockCache = new Map<number, Buffer>();

  private async block(offset: number): Promise<Buffer> {
    let b = this.blockCache.get(offset);
    if (!b) {
      b = Buffer.alloc(this.cs);
      await this.file.read(offset, b);
      this.blockCache.set(offset, b);
    }
    return b;
  }

  /** The refcount on disk (0 where there is no usable block). */
  async refcount(c: number): Promise<number> {
    const offset = this.blockOffset(Math.floor(c / this.perBlock));
    if (offset === 0 || offset % this.cs !== 0 || offset >= this.file.length) return 0;
    return getRefcount(await this.block(offset), c % this.perBlock, this.order);
  }

  /** Count every reference the metadata makes (QEMU's calculate_refcounts). */
  private async calculate(withRefcountStructure: boolean): Promise<void> {
    const h = this.h;
    this.nbClusters = Math.ceil(this.file.length / this.cs);
    this.refs = new Float64Array(this.nbClusters);
    this.next = 0;
    this.inc(0, this.cs);
    await this.l1(h.l1TableOffset, h.l1Size, true);
    for (const s of this.snapshots) await this.l1(s.l1TableOffset, s.l1Size, false);
    if (h.nbSnapshots > 0) this.inc(h.snapshotsOffset, this.snapshots.reduce((n, s) => n + s.entryBytes, 0));
    if (h.bitmaps) await this.bitmapRefs();
    if (!withRefcountStructure) return;
    this.inc(h.refcountTableOffset, h.refcountTableClusters * this.cs);
    for (let i = 0; i < this.reftable.length / 8; i++) {
      const offset = this.blockOffset(i);
      if (offset === 0) continue;
      if (offset % this.cs !== 0) {
        this.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        this.pass.corruptions++;
        continue;
      }
      if (offset >= this.file.length) {
        this.log(`ERROR refcount block ${i} is outside image`);
        this.pass.corruptions++;
        this.pass.rebuild = true;
        continue;
      }
      this.inc(offset, this.cs);
      if (this.refs[offset / this.cs] !== 1) {
        this.log(`ERROR refcount block ${i} refcount=${this.refs[offset / this.cs]}`);
        this.pass.corruptions++;
        this.pass.rebuild = true;
      }
    }
  }

  private async l1(offset: number, size: number, active: boolean): Promise<void> {
    if (size === 0) return;
    this.inc(offset, size * 8);
    const l1 = Buffer.alloc(size * 8);
    await this.file.read(offset, l1);
    for (let i = 0; i < size; i++) {
      const l2 = Number(l1.readBigUInt64BE(i * 8) & L1E_OFFSET);
      if (l2 === 0) continue;
      this.inc(l2, this.cs);
      if (l2 % this.cs !== 0) {
        this.log(`ERROR l2_offset=${l2.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
        this.pass.corruptions++;
        continue;
      }
      const table = Buffer.alloc(this.cs);
      await this.file.read(l2, table);
      this.l2(table, active);
    }
  }

  private l2(table: Buffer, active: boolean): void {
    const x = 70 - this.h.clusterBits;
    for (let j = 0; j < this.cs / 8; j++) {
      const e = table.readBigUInt64BE(j * 8);
      if (e === 0n) continue;
      if (e & COMPRESSED) {
        const v = e & ~(COPIED | COMPRESSED);
        const host = Number(v & ((1n << BigInt(x)) - 1n));
        const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(this.h.clusterBits - 8)) - 1n)) + 1;
        if (e & COPIED) {
          this.log(`ERROR: coffset=0x${host.toString(16)}: Compressed cluster has copied flag set`);
          this.pass.corruptions++;
        }
        if (active) {
          // QEMU counts compressed clusters as fragmented by nature (sectors are re-read)
          this.pass.allocated++;
          this.pass.compressed++;
          this.pass.fragmented++;
        }
        const start = host - (host % 512);
        this.inc(start, sectors * 512);
        continue;
      }
      const host = Number(e & L1E_OFFSET);
      if (host === 0) continue; // unallocated or a zero cluster without a host cluster
      if (active) {
        this.pass.allocated++;
        if (this.next !== 0 && host !== this.next) this.pass.fragmented++;
        this.next = host + this.cs;
      }
      if (host % this.cs !== 0) {
        this.log(`ERROR offset=${host.toString(16)}: Cluster is not properly aligned; L2 entry corrupted`);
        this.pass.corruptions++;
      }
      this.inc(host, this.cs);
    }
  }

  private async bitmapRefs(): Promise<void> {
    const ext = this.h.bitmaps!;
    this.inc(ext.directoryOffset, ext.directorySize);
    for (const b of this.bitmaps) {
      this.inc(b.tableOffset, b.tableSize * 8);
      const table = Buffer.alloc(b.tableSize * 8);
      await this.file.read(b.tableOffset, table);
      for (let i = 0; i < b.tableSize; i++) {
        const at = Number(table.readBigUInt64BE(i * 8) & L1E_OFFSET);
        if (at !== 0) this.inc(at, this.cs);
      }
    }
  }

  /** One pass of check (and repair): QEMU's qcow2_check_refcounts. */
  async run(fix: RepairMode | undefined): Promise<Pass> {
    this.pass = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, checkErrors: 0, highest: 0, allocated: 0, fragmented: 0, compressed: 0, rebuild: false };
    this.blockCache.clear();
    await this.calculate(true);
    const before = { ...this.pass };
    // as QEMU: compare first without fixing (the lines show what was found), then again fixing
    await this.compare(undefined);
    const p = this.pass;
    if (fix !== undefined && !p.rebuild && p.leaks + p.corruptions > 0) {
      this.pass = before;
      await this.compare(fix);
    }
    return this.finish(fix);
  }

  private async compare(fix: RepairMode | undefined): Promise<void> {
    const p = this.pass;
    const writes = new Map<number, Buffer>();
    const n = Math.max(this.nbClusters, this.refs.length);
    for (let c = 0; c < n; c++) {
      const onDisk = await this.refcount(c);
      const refs = this.refs[c] ?? 0;
      if (onDisk > 0 || refs > 0) p.highest = c;
      if (onDisk === refs) continue;
      let fixing: 'leaks' | 'corruptions' | undefined;
      if (onDisk === 0 && refs > 0) p.rebuild = true;
      else if (onDisk > refs && fix !== undefined) fixing = 'leaks';
      else if (onDisk < refs && fix === 'all') fixing = 'corruptions';
      this.log(`${fixing ? 'Repairing' : onDisk < refs ? 'ERROR' : 'Leaked'} cluster ${c} refcount=${onDisk} reference=${refs}`);
      if (fixing) {
        const offset = this.blockOffset(Math.floor(c / this.perBlock));
        const block = await this.block(offset);
        setRefcount(block, c % this.perBlock, this.order, refs);
        writes.set(offset, block);
        if (fixing === 'leaks') p.leaksFixed++;
        else p.corruptionsFixed++;
        continue;
      }
      if (onDisk < refs) p.corruptions++;
      else p.leaks++;
    }
    if (writes.size > 0) {
      // increments and decrements of unreferenced clusters: safe in any order; synced before the caller goes on
      await Promise.all([...writes].map(([offset, b]) => this.file.write(offset, b)));
      await this.file.sync();
    }
  }

  private async finish(fix: RepairMode | undefined): Promise<Pass> {
    const p = this.pass;
    if (p.rebuild && fix === 'all') {
      await this.rebuild();
      p.corruptionsFixed += p.corruptions;
      p.corruptions = 0;
      p.rebuild = false;
    } else if (p.rebuild && fix !== undefined) {
      this.log('ERROR need to rebuild refcount structures');
    }
    await this.copiedFlags(fix === 'all');
    return p;
  }

  /** QEMU's check_oflag_copied: COPIED must be set exactly when the refcount is 1. */
  private async copiedFlags(fix: boolean): Promise<void> {
    const h = this.h;
    if (h.l1Size === 0) return;
    const l1 = Buffer.alloc(h.l1Size * 8);
    await this.file.read(h.l1TableOffset, l1);
    let l1Changed = false;
    for (let i = 0; i < h.l1Size; i++) {
      const e = l1.readBigUInt64BE(i * 8);
      const l2 = Number(e & L1E_OFFSET);
      if (l2 === 0) continue;
      const rc = await this.refcount(l2 / this.cs);
      if ((rc === 1) !== ((e & COPIED) !== 0n)) {
        this.log(`${fix ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${e.toString(16)} refcount=${rc}`);
        if (fix) {
          l1.writeBigUInt64BE(rc === 1 ? e | COPIED : e & ~COPIED, i * 8);
          l1Changed = true;
          this.pass.corruptionsFixed++;
        } else this.pass.corruptions++;
      }
      if (l2 % this.cs !== 0 || l2 >= this.file.length) continue;
      const table = Buffer.alloc(this.cs);
      await this.file.read(l2, table);
      let changed = false;
      for (let j = 0; j < this.cs / 8; j++) {
        const d = table.readBigUInt64BE(j * 8);
        if (d & COMPRESSED) continue;
        const host = Number(d & L1E_OFFSET);
        if (host === 0) continue;
        const drc = await this.refcount(Math.floor(host / this.cs));
        if ((drc === 1) !== ((d & COPIED) !== 0n)) {
          this.log(`${fix ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${d.toString(16)} refcount=${drc}`);
          if (fix) {
            table.writeBigUInt64BE(drc === 1 ? d | COPIED : d & ~COPIED, j * 8);
            changed = true;
            this.pass.corruptionsFixed++;
          } else this.pass.corruptions++;
        }
      }
      if (changed) {
        await this.file.write(l2, table);
        await this.file.sync();
      }
    }
    if (l1Changed) {
      await this.file.write(h.l1TableOffset, l1);
      await this.file.sync();
    }
  }

  /**
   * A new refcount table and blocks at the end of the file, describing exactly what the metadata
   * references (plus themselves); the header switches to it with one synced write. The old
   * table and blocks become leaks, which the next pass frees.
   */
  private async rebuild(): Promise<void> {
    this.log('Rebuilding refcount structure');
    const saved = this.pass;
    this.pass = { ...saved };
    await this.calculate(false);
    this.pass = saved;
    const cs = this.cs;
    let used = this.refs.length;
    while (used > 0 && this.refs[used - 1] === 0) used--;
    const start = Math.max(Math.ceil(this.file.length / cs), used);
    let blocks = 0;
    let tableClusters = 0;
    for (;;) {
      const end = start + blocks + tableClusters;
      const nb = Math.ceil(end / this.perBlock);
      const tc = Math.ceil((nb * 8) / cs);
      if (nb === blocks && tc === tableClusters) break;
      blocks = nb;
      tableClusters = tc;
    }
    const end = start + blocks + tableClusters;
    const refs = new Float64Array(end);
    refs.set(this.refs.subarray(0, Math.min(this.refs.length, end)));
    for (let c = start; c < end; c++) refs[c] = 1;
    const table = Buffer.alloc(tableClusters * cs);
    const area = Buffer.alloc((blocks + tableClusters) * cs);
    const max = this.order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** this.order) - 1;
    for (let i = 0; i < blocks; i++) {
      const block = area.subarray(i * cs, (i + 1) * cs);
      for (let k = 0; k < this.perBlock && i * this.perBlock + k < end; k++) setRefcount(block, k, this.order, Math.min(max, refs[i * this.perBlock + k]!));
      table.writeBigUInt64BE(BigInt((start + i) * cs), i * 8);
    }
    table.copy(area, blocks * cs);
    await this.file.write(start * cs, area);
    await this.file.sync();
    const fields = Buffer.alloc(12);
    fields.writeBigUInt64BE(BigInt((start + blocks) * cs), 0);
    fields.writeUInt32BE(tableClusters, 8);
    await this.file.write(H.refcountTableOffset, fields);
    await this.file.sync();
    this.h.refcountTableOffset = (start + blocks) * cs;
    this.h.refcountTableClusters = tableClusters;
    this.reftable = table;
    this.blockCache.clear();
  }

  /** Clear the dirty and corrupt bits (after a repair that left no corruption). */
  async markConsistent(): Promise<void> {
    const bits = this.h.incompatible & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
    if (bits === this.h.incompatible) return;
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(bits);
    await this.file.write(H.incompatible, field);
    await this.file.sync();
    this.h.incompatible = bits;
  }
}

/**
 * Check a qcow2 image (and repair it with `repair`). Opens the file itself: read-only to check,
 * read-write to repair. A header that cannot be parsed is an error (the check did not run).
 */
export async function checkQcow2(path: string, options: { repair?: RepairMode; file?: Qcow2Container; forceShare?: boolean } = {}): Promise<CheckResult> {
  if (options.forceShare && options.repair !== undefined) {
    throw new BlkrepError('ERR_USAGE', `cannot repair "${path}" with --force-share: a repair writes the image, which needs it to be held by nobody else (as qemu-img check -r refuses -U)`, { errno: 'EINVAL', details: { path } });
  }
  // locked as QEMU locks it (image-lock.ts): a check reads consistently, a repair writes
  const lock = lockPerms({ format: 'qcow2', readOnly: options.repair === undefined, forceShare: options.forceShare === true });
  const file = options.file ?? (await HostFile.open(path, { readOnly: options.repair === undefined, lock }));
  try {
    const h = await readHeader(file);
    if (options.repair !== undefined && h.version !== 3) {
      throw new BlkrepError('ERR_QCOW2_UNSUPPORTED', `cannot repair "${path}": only qcow2 version 3 images are repaired`, { errno: 'ENOTSUP', details: { path, version: h.version } });
    }
    if (h.cryptMethod !== 0 || h.incompatible & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | (1n << 3n))) {
      throw new BlkrepError('ERR_QCOW2_UNSUPPORTED', `cannot check "${path}": it uses features blkrep does not implement (encryption or incompatible bits 0x${h.incompatible.toString(16)})`, {
        errno: 'ENOTSUP',
        details: { path },
      });
    }
    if (h.autoclear & AUTOCLEAR_BITMAPS && !h.bitmaps) throw corrupt(path, 'autoclear bit 0 is set without a bitmaps extension');
    const checker = new Checker(file, h);
    await checker.load();
    let pass = await checker.run(options.repair);
    let repaired: { leaks: number; corruptions: number } | undefined;
    if (options.repair !== undefined) {
      repaired = { leaks: pass.leaksFixed, corruptions: pass.corruptionsFixed };
      // double check, as qemu-img check -r does; a rebuild leaves the old structure as leaks, freed here
      for (let i = 0; i < 3 && pass.leaksFixed + pass.corruptionsFixed > 0; i++) {
        pass = await checker.run(options.repair);
        repaired.leaks += pass.leaksFixed;
        repaired.corruptions += pass.corruptionsFixed;
      }
      if (pass.corruptions === 0 && pass.checkErrors === 0 && !pass.rebuild) await checker.markConsistent();
    }
    const cs = checker.cs;
    // qemu-img check --output=json: counts that are 0 are left out (check-errors and total-clusters stay)
    const report: CheckReport = {
      'image-end-offset': (pass.highest + 1) * cs,
      'total-clusters': Math.ceil(h.size / cs),
      ...(pass.corruptions > 0 ? { corruptions: pass.corruptions } : {}),
      ...(pass.leaks > 0 ? { leaks: pass.leaks } : {}),
      'check-errors': pass.checkErrors,
      ...(repaired && repaired.leaks > 0 ? { 'leaks-fixed': repaired.leaks } : {}),
      ...(repaired && repaired.corruptions > 0 ? { 'corruptions-fixed': repaired.corruptions } : {}),
      ...(pass.allocated > 0 ? { 'allocated-clusters': pass.allocated } : {}),
      ...(pass.fragmented > 0 ? { 'fragmented-clusters': pass.fragmented } : {}),
      ...(pass.compressed > 0 ? { 'compressed-clusters': pass.compressed } : {}),
      filename: path,
      format: 'qcow2',
    };
    const exitCode = pass.checkErrors > 0 || (pass.rebuild && options.repair !== undefined) ? 1 : pass.corruptions > 0 ? 2 : pass.leaks > 0 ? 3 : 0;
    return { report, messages: checker.messages, ...(repaired ? { repaired } : {}), exitCode };
  } finally {
    if (!options.file) await file.close();
  }
}

/** The summary qemu-img check prints on stdout. */
export function formatCheck(r: CheckResult): string {
  const rep = r.report;
  const lines: string[] = [];
  if (r.repaired && r.repaired.leaks + r.repaired.corruptions > 0) {
    lines.push('The following inconsistencies were found and repaired:', '', `    ${r.repaired.leaks} leaked clusters`, `    ${r.repaired.corruptions} corruptions`, '', 'Double checking the fixed image now...');
  }
  const corruptions = rep.corruptions ?? 0;
  const leaks = rep.leaks ?? 0;
  if (corruptions === 0 && leaks === 0 && rep['check-errors'] === 0) lines.push('No errors were found on the image.');
  if (corruptions > 0) lines.push('', `${corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  if (leaks > 0) lines.push('', `${leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  if (rep['check-errors'] > 0) lines.push('', `${rep['check-errors']} internal errors have occurred during the check.`);
  const total = rep['total-clusters'];
  const pct = (n: number, of: number): string => (of === 0 ? 0 : (100 * n) / of).toFixed(2);
  const allocated = rep['allocated-clusters'] ?? 0;
  if (total > 0) {
    lines.push(
      `${allocated}/${total} = ${pct(allocated, total)}% allocated, ${pct(rep['fragmented-clusters'] ?? 0, allocated)}% fragmented, ${pct(rep['compressed-clusters'] ?? 0, allocated)}% compressed clusters`,
    );
  }
  if (rep['image-end-offset'] !== undefined) lines.push(`Image end offset: ${rep['image-end-offset']}`);
  return lines.join('\n');
}
