/**
 * validate.ts finds the refcount blocks and L2 tables an image's tables point at by skipping zero
 * runs of the tables with a native compare (nonZeroEntries) instead of reading all 8192 entries of a
 * refcount table one by one (bench/cli-startup: the open of every `info`/`bitmap dump`). Same
 * regions as reading every entry: sparse and dense tables, entries with only flag bits set, counts
 * that end inside a 64-entry chunk, a count shorter than the buffer.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { metadataRegions, nonZeroEntries, tableEntryOffset, type LayoutInput } from '../../src/block/qcow2/validate.js';
import type { Qcow2Header } from '../../src/block/qcow2/format.js';

function naiveNonZero(table: Buffer, count: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < count; i++) if (table.readUInt32BE(i * 8) !== 0 || table.readUInt32BE(i * 8 + 4) !== 0) out.push(i);
  return out;
}

/** a table of `entries` 8-byte entries with the given ones set (offset bits, or flag bits only) */
const tableArb = fc.integer({ min: 0, max: 700 }).chain((entries) =>
  fc.record({
    entries: fc.constant(entries),
    count: fc.integer({ min: 0, max: entries }),
    set: fc.array(
      fc.record({
        index: fc.integer({ min: 0, max: Math.max(0, entries - 1) }),
        hi: fc.integer({ min: 0, max: 0xffffffff }),
        lo: fc.integer({ min: 0, max: 0xffffffff }),
      }),
      { maxLength: entries === 0 ? 0 : 40 },
    ),
  }),
);

describe('qcow2 layout: non-zero table entries', () => {
  it('finds exactly the entries that are not all zero, in order', () => {
    fc.assert(
      fc.property(tableArb, ({ entries, count, set }) => {
        const table = Buffer.alloc(entries * 8);
        for (const { index, hi, lo } of set) {
          table.writeUInt32BE(hi, index * 8);
          table.writeUInt32BE(lo, index * 8 + 4);
        }
        expect(nonZeroEntries(table, count)).toEqual(naiveNonZero(table, count));
      }),
      { numRuns: 300 },
    );
  });

  it('a 64 KiB refcount table with one block, its last entry, and one with flag bits only', () => {
    const table = Buffer.alloc(64 * 1024);
    table.writeUInt32BE(0x30000, 4); // block 0 at 192 KiB
    table.writeUInt32BE(0x1, 8189 * 8 + 4); // flag bits only: offset 0
    table.writeUInt32BE(0x1, 8191 * 8); // the last entry
    expect(nonZeroEntries(table, 8192)).toEqual([0, 8189, 8191]);
    expect(nonZeroEntries(table, 8191)).toEqual([0, 8189]);
    expect(tableEntryOffset(table, 8189)).toBe(0);
  });

  it('metadataRegions lists the same refcount blocks and L2 tables as reading every entry', () => {
    const cs = 64 * 1024;
    const reftable = Buffer.alloc(cs);
    const l1 = Buffer.alloc(16 * 8);
    reftable.writeUInt32BE(0x30000, 4);
    reftable.writeUInt32BE(0x50000, 700 * 8 + 4);
    reftable.writeUInt32BE(0x1ff, 900 * 8 + 4); // below bit 9: no offset, no region
    l1.writeUInt32BE(0x80000000, 3 * 8); // the COPIED flag alone
    l1.writeUInt32BE(0x80000000, 5 * 8);
    l1.writeUInt32BE(0x70000, 5 * 8 + 4);
    l1.writeUInt32BE(0x90000, 15 * 8 + 4);
    const header = {
      clusterBits: 16,
      l1Size: 16,
      l1TableOffset: 0x20000,
      refcountTableOffset: 0x10000,
      refcountTableClusters: 1,
      nbSnapshots: 0,
      snapshotsOffset: 0,
    } as unknown as Qcow2Header;
    const input: LayoutInput = { header, fileLength: 0xa0000, l1, reftable, snapshots: [], snapshotTableBytes: 0, bitmaps: [] };
    const tables = metadataRegions(input).filter((r) => r.field.startsWith('refcount_table[') || r.field.startsWith('L1['));
    expect(tables).toEqual([
      { what: 'refcount block 0', field: 'refcount_table[0]', offset: 0x30000, bytes: cs },
      { what: 'refcount block 700', field: 'refcount_table[700]', offset: 0x50000, bytes: cs },
      { what: 'the L2 table of L1 entry 5', field: 'L1[5]', offset: 0x70000, bytes: cs },
      { what: 'the L2 table of L1 entry 15', field: 'L1[15]', offset: 0x90000, bytes: cs },
    ]);
  });
});
