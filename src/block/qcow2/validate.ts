/**
 * Open-time validation of the metadata layout, as QEMU's qcow2_do_open, validate_table_offset and
 * qcow2_check_metadata_overlap see it: every metadata table (header, L1, refcount table, refcount
 * blocks, L2 tables, snapshot table and snapshot L1 tables, bitmap directory and bitmap tables)
 * must lie inside the file and must not overlap another one. A table past the end of the file
 * reads as zeros — for the refcount table that means "every cluster is free", and the first
 * allocation would land on the header — so a read-write open of such an image is refused. A
 * read-only open only reads, and is allowed with a warning per problem.
 *
 * Pure apart from the tables it is given: the caller (image.ts) reads them.
 */
import { corrupt, type BitmapInfo, type Qcow2Header, type SnapshotInfo } from './format.js';

/** One metadata table on disk: what it is, the header field or table entry that locates it. */
export interface MetadataRegion {
  what: string;
  /** the field or entry that points at it, e.g. "refcount_table_offset", "L1[3]" */
  field: string;
  offset: number;
  bytes: number;
}

export interface LayoutProblem {
  /** the field or entry at fault */
  field: string;
  message: string;
  details: Record<string, unknown>;
}

export interface LayoutInput {
  header: Qcow2Header;
  fileLength: number;
  l1: Buffer;
  reftable: Buffer;
  snapshots: SnapshotInfo[];
  /** bytes of the snapshot table, as parsed */
  snapshotTableBytes: number;
  bitmaps: BitmapInfo[];
}

/** Offset of an L1 or refcount table entry (bits 9–55), 0 when absent. */
export function tableEntryOffset(table: Buffer, index: number): number {
  const hi = table.readUInt32BE(index * 8) & 0x00ffffff;
  const lo = table.readUInt32BE(index * 8 + 4);
  return hi * 0x100000000 + ((lo & ~0x1ff) >>> 0);
}

const ZERO_ENTRIES = Buffer.alloc(512);

/**
 * Indexes of the first `count` entries of a table of 8-byte entries that are not all zero bytes, in
 * order. Zero runs are skipped 64 entries at a time by a native compare: a refcount table is a whole
 * cluster (8192 entries at 64 KiB) of which a small image uses one, and reading each entry in
 * JavaScript made V8 optimize that loop (and the readers it calls) at every open — some 30 ms of
 * compiler CPU in a `blkrep info` or `bitmap dump` that otherwise takes ~100 ms over node's own
 * start (bench/cli-startup).
 */
export function nonZeroEntries(table: Buffer, count: number): number[] {
  const out: number[] = [];
  const bytes = count * 8;
  for (let start = 0; start < bytes; start += ZERO_ENTRIES.length) {
    const end = Math.min(start + ZERO_ENTRIES.length, bytes);
    if (table.compare(ZERO_ENTRIES, 0, end - start, start, end) === 0) continue;
    for (let i = start / 8; i < end / 8; i++) {
      if (table.readUInt32BE(i * 8) !== 0 || table.readUInt32BE(i * 8 + 4) !== 0) out.push(i);
    }
  }
  return out;
}

/** Every metadata table of the image, as the header and the tables in memory locate them. */
export function metadataRegions(input: LayoutInput): MetadataRegion[] {
  const h = input.header;
  const cs = 2 ** h.clusterBits;
  const out: MetadataRegion[] = [{ what: 'the header', field: 'header', offset: 0, bytes: cs }];
  if (h.l1Size > 0) out.push({ what: 'the L1 table', field: 'l1_table_offset', offset: h.l1TableOffset, bytes: h.l1Size * 8 });
  out.push({ what: 'the refcount table', field: 'refcount_table_offset', offset: h.refcountTableOffset, bytes: h.refcountTableClusters * cs });
  if (h.nbSnapshots > 0) out.push({ what: 'the snapshot table', field: 'snapshots_offset', offset: h.snapshotsOffset, bytes: Math.max(1, input.snapshotTableBytes) });
  input.snapshots.forEach((s, i) => {
    if (s.l1Size > 0) out.push({ what: `the L1 table of snapshot ${i}`, field: `snapshot[${i}].l1_table_offset`, offset: s.l1TableOffset, bytes: s.l1Size * 8 });
  });
  if (h.bitmaps && h.bitmaps.directorySize > 0) {
    out.push({ what: 'the bitmap directory', field: 'bitmap_directory_offset', offset: h.bitmaps.directoryOffset, bytes: h.bitmaps.directorySize });
  }
  input.bitmaps.forEach((b) => {
    if (b.tableSize > 0) out.push({ what: `the table of bitmap "${b.name}"`, field: `bitmap["${b.name}"].bitmap_table_offset`, offset: b.tableOffset, bytes: b.tableSize * 8 });
  });
  for (const i of nonZeroEntries(input.reftable, Math.floor(input.reftable.length / 8))) {
    const offset = tableEntryOffset(input.reftable, i);
    if (offset !== 0) out.push({ what: `refcount block ${i}`, field: `refcount_table[${i}]`, offset, bytes: cs });
  }
  for (const i of nonZeroEntries(input.l1, h.l1Size)) {
    const offset = tableEntryOffset(input.l1, i);
    if (offset !== 0) out.push({ what: `the L2 table of L1 entry ${i}`, field: `L1[${i}]`, offset, bytes: cs });
  }
  return out;
}

/**
 * Problems with the layout: tables not cluster aligned, lying past the end of the file, or
 * overlapping each other or the header. Empty when the layout is sound.
 */
export function layoutProblems(input: LayoutInput): LayoutProblem[] {
  const cs = 2 ** input.header.clusterBits;
  const fileEnd = Math.ceil(input.fileLength / cs) * cs;
  const problems: LayoutProblem[] = [];
  const regions = metadataRegions(input);
  for (const r of regions) {
    const details = { field: r.field, offset: r.offset, bytes: r.bytes, fileLength: input.fileLength };
    if (r.offset % cs !== 0) {
      problems.push({ field: r.field, message: `${r.what} (${r.field}) at offset ${r.offset} is not aligned to the cluster size ${cs}`, details });
    } else if (r.offset + r.bytes > fileEnd) {
      // QEMU writes only the used part of a table's last cluster: the file may end inside it
      problems.push({
        field: r.field,
        message: `${r.what} (${r.field}) at offset ${r.offset} of ${r.bytes} bytes lies past the end of the file (${input.fileLength} bytes)`,
        details,
      });
    }
  }
  // overlaps, cluster-granular: sort by first cluster, compare each with the furthest-reaching one before it
  const spans = regions
    .filter((r) => r.offset % cs === 0)
    .map((r) => ({ r, first: r.offset / cs, end: Math.ceil((r.offset + r.bytes) / cs) }))
    .sort((a, b) => a.first - b.first || a.end - b.end);
  let reach: (typeof spans)[number] | undefined;
  for (const s of spans) {
    if (reach && s.first < reach.end) {
      const a = reach.r;
      const b = s.r;
      problems.push({
        field: b.field,
        message: `${b.what} (${b.field}) at offset ${b.offset} of ${b.bytes} bytes overlaps ${a.what} (${a.field}) at offset ${a.offset} of ${a.bytes} bytes`,
        details: { field: b.field, offset: b.offset, bytes: b.bytes, overlaps: a.field, overlapsOffset: a.offset, overlapsBytes: a.bytes },
      });
      if (problems.length >= 64) break;
    }
    if (!reach || s.end > reach.end) reach = s;
  }
  return problems;
}

/**
 * Refuse a read-write open of an image whose layout is unsound (the error names the first
 * problem: field, offset, numbers); on a read-only open hand each problem to `warn`.
 */
export function validateLayout(path: string, input: LayoutInput, readOnly: boolean, warn: (message: string) => void): void {
  const problems = layoutProblems(input);
  if (problems.length === 0) return;
  if (readOnly) {
    for (const p of problems) warn(`qcow2 image "${path}": ${p.message} (opened read-only; writing to it would be refused)`);
    return;
  }
  const first = problems[0]!;
  const more = problems.length > 1 ? ` (and ${problems.length - 1} more problem${problems.length > 2 ? 's' : ''})` : '';
  throw corrupt(path, `${first.message}${more}; it can only be opened read-only (see "blkrep check ${path}"; "--repair all" rebuilds a refcount structure that lies outside the file)`, {
    ...first.details,
    problems: problems.length,
  });
}
