/**
 * BlockNode.fileRange (src/api/block.ts), what serve-nbd's splice replies ask for: a raw file
 * gives one and stays open until it is released; a filter gives none unless its reads pass
 * through unchanged (dirty tracking, the export stack's entry, which counts it as a request in
 * flight, so a slot change waits for it); filters that change or check reads (error, delay,
 * a job's front end) give none.
 */
import os from 'node:os';
import path from 'node:path';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { Filter } from '../../src/block/filter.js';
import { DelayFilter } from '../../src/block/filters/delay.js';
import { ErrorFilter } from '../../src/block/filters/error.js';
import { DirtyTrackingNode } from '../../src/block/filters/tracking.js';
import { loadNative } from '../../src/block/native.js';
import { completeNode } from '../../src/block/node.js';
import { RawNode } from '../../src/block/raw.js';
import { ExportStack } from '../../src/serve/export-stack.js';

const MiB = 1024 * 1024;
let dir: string | undefined;
let raw: RawNode | undefined;

afterEach(async () => {
  await raw?.close();
  raw = undefined;
  if (dir) await rm(dir, { recursive: true, force: true });
  dir = undefined;
});

async function open(native = loadNative()): Promise<RawNode> {
  dir = await mkdtemp(path.join(os.tmpdir(), 'blkrep-file-range-'));
  const image = path.join(dir, 'disk.raw');
  await writeFile(image, Buffer.alloc(4 * MiB, 7));
  raw = await RawNode.open(image, { native });
  return raw;
}

/** whether `p` settled within a few turns of the event loop (what a close or an insertion with nothing in flight needs) */
async function isSettled(p: Promise<unknown>): Promise<boolean> {
  let settled = false;
  void p.then(() => (settled = true), () => (settled = true));
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
  return settled;
}

class Passing extends Filter {
  readonly driver = 'passing';
}

describe('BlockNode.fileRange', () => {
  it('a raw file gives one; close() waits for its release; once closing, none', async () => {
    const node = await open();
    const range = node.fileRange(MiB, MiB);
    expect(range).toBeDefined();
    const closing = node.close();
    expect(await isSettled(closing)).toBe(false);
    expect(node.fileRange(0, MiB)).toBeUndefined();
    range!.release();
    range!.release(); // a second release changes nothing
    await closing;
    raw = undefined;
  });

  it('a range past the end is refused as a read is', async () => {
    const node = await open();
    expect(() => node.fileRange(4 * MiB - 512, 1024)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE', errno: 'EINVAL' }));
    // nothing was taken: close() does not wait
    await node.close();
    raw = undefined;
  });

  it('none without the addon (the portable fallback)', async () => {
    const node = await open(null);
    expect(node.fileRange(0, MiB)).toBeUndefined();
  });

  it('completeNode() forwards it; dirty tracking passes it; error, delay and a plain filter give none', async () => {
    const node = await open();
    for (const n of [completeNode(node), new DirtyTrackingNode(node)]) {
      const r = n.fileRange?.(0, MiB);
      expect(r).toBeDefined();
      r!.release();
    }
    for (const n of [new ErrorFilter(node), new DelayFilter(node), new Passing(node)]) expect(n.fileRange(0, MiB)).toBeUndefined();
  });

  it("the export stack's entry passes it and counts it in flight: a slot insertion waits for its release", async () => {
    const node = await open();
    const stack = new ExportStack(node, { name: 'e' });
    const range = stack.top.fileRange?.(0, MiB);
    expect(range).toBeDefined();
    const inserted = stack.insert('tracking', (below) => new DirtyTrackingNode(below));
    expect(await isSettled(inserted)).toBe(false);
    range!.release();
    await inserted;
    // through the tracking slot now
    const again = stack.top.fileRange?.(0, MiB);
    expect(again).toBeDefined();
    again!.release();
  });
});
