// test-bitmap-man: man/blkrep-bitmap.5 renders without groff warnings, and the header and
// activity-log layouts it documents are the ones the code writes (every field read back at the
// documented offset).
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { AL_MAGIC, MAGIC, VERSION, computeLayout, encodeAlBlock, encodeHeader, type Header } from '../../src/bitmap/format.js';
import { REPO_ROOT } from '../support/spawn.js';

const PAGE = join(REPO_ROOT, 'man', 'blkrep-bitmap.5');
const text = readFileSync(PAGE, 'utf8');

/** "\fB24\-31\fR size" entries of one section: name → [first, last] byte */
function fields(section: string): Map<string, [number, number]> {
  const start = text.indexOf(`.SH ${section}\n`);
  const end = text.indexOf('\n.SH ', start + 1);
  const out = new Map<string, [number, number]>();
  for (const m of text.slice(start, end).matchAll(/^\\fB(\d+)(?:\\-(\d+))?\\fR (\w+)$/gm)) {
    out.set(m[3]!, [Number(m[1]), Number(m[2] ?? m[1])]);
  }
  return out;
}

/** the big-endian integer in bytes [first, last] */
function read(b: Buffer, [first, last]: [number, number]): number {
  return Number(BigInt('0x' + b.subarray(first, last + 1).toString('hex')));
}

describe('man/blkrep-bitmap.5', () => {
  it('renders with groff -man -ww without warnings', () => {
    for (const args of [['-man', '-ww', '-z', PAGE], ['-man', '-ww', '-z', '-Tutf8', PAGE]]) {
      const r = spawnSync('groff', args, { encoding: 'utf8' });
      expect(r.status).toBe(0);
      expect(r.stderr).toBe('');
    }
  });

  it('documents the header the code writes, field by field', () => {
    const geometry = { size: 123_456_789_000, granularity: 1 << 17, extentSize: 1 << 23, hotExtents: 300, alSlots: 6 };
    const layout = computeLayout(geometry);
    const h: Header = {
      ...geometry,
      generation: 0x0102030405,
      flags: 0b101,
      alBlockSize: layout.alBlockSize,
      session: 77,
      epoch: 9,
      createdAt: 1_700_000_000_123,
      modifiedAt: 1_700_000_999_456,
      dirtyGranules: 4242,
      crcTableOffset: layout.crcTableOffset,
      dataOffset: layout.dataOffset,
      dataLength: layout.dataLength,
    };
    const b = encodeHeader(h);
    const f = fields('HEADER');
    const expected: Record<string, number> = {
      magic: Number(BigInt('0x' + MAGIC.toString('hex'))),
      version: VERSION,
      header_length: 128,
      generation: h.generation,
      size: h.size,
      granularity_bits: 17,
      extent_bits: 23,
      al_slots: 6,
      flags: 0b101,
      hot_extents: 300,
      al_block_size: h.alBlockSize,
      session: 77,
      epoch: 9,
      created: h.createdAt,
      modified: h.modifiedAt,
      dirty_granules: 4242,
      crc_table_offset: h.crcTableOffset,
      data_offset: h.dataOffset,
      data_length: h.dataLength,
      reserved: 0,
    };
    for (const [name, value] of Object.entries(expected)) {
      expect(f.has(name), `field ${name} documented`).toBe(true);
      expect(read(b, f.get(name)!), `field ${name}`).toBe(value);
    }
    expect(f.get('header_crc')).toEqual([124, 127]);
  });

  it('documents the activity-log block the code writes', () => {
    const b = encodeAlBlock({ session: 5, sequence: 6, extents: [7, 8] }, 1 << 22, 4096);
    const f = fields('ACTIVITY LOG');
    expect(read(b, f.get('magic')!)).toBe(AL_MAGIC);
    expect(read(b, f.get('session')!)).toBe(5);
    expect(read(b, f.get('sequence')!)).toBe(6);
    expect(read(b, f.get('count')!)).toBe(2);
    expect(read(b, f.get('extent_bits')!)).toBe(22);
    expect(read(b, f.get('reserved')!)).toBe(0);
    expect(b.readBigUInt64BE(32)).toBe(7n);
    expect(f.get('crc')).toEqual([4, 7]);
  });
});
