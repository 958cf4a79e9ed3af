/**
 * The daemon's job registry: the switch node under it, and the job-* control verbs' errors
 * (serve-nbd as a process; the mirror type itself is tested in live-mirror.test.ts).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MemoryNode } from '../../src/block/memory.js';
import { SwitchNode } from '../../src/block/filters/switch.js';
import { ControlClient } from '../../src/control/client.js';
import { makeTempDir, serve } from '../support/spawn.js';
import type { BlockNode } from '../../src/api/block.js';

/** A node whose writes wait until released. */
function gated(inner: BlockNode): { node: BlockNode; release: () => void; pending: () => number } {
  let waiters: Array<() => void> = [];
  const node = Object.create(inner) as BlockNode;
  node.write = async (offset, data, o) => {
    await new Promise<void>((resolve) => waiters.push(resolve));
    return inner.write(offset, data, o);
  };
  return {
    node,
    release: () => {
      for (const w of waiters.splice(0)) w();
    },
    pending: () => waiters.length,
  };
}

describe('SwitchNode', () => {
  it('in-flight requests finish on the old backend, new ones go to the new one; switchTo resolves when the old one is idle', async () => {
    const a = new MemoryNode(1 << 20);
    const b = new MemoryNode(1 << 20);
    const ga = gated(a);
    const sw = new SwitchNode(ga.node);
    const w1 = sw.write(0, Buffer.alloc(4096, 1));
    expect(ga.pending()).toBe(1);
    let drained = false;
    const switched = sw.switchTo(b).then(() => (drained = true));
    await sw.write(4096, Buffer.alloc(4096, 2));
    expect((await b.read(4096, 4096)).equals(Buffer.alloc(4096, 2))).toBe(true);
    expect((await a.read(4096, 4096)).equals(Buffer.alloc(4096, 0))).toBe(true);
    await Promise.resolve();
    expect(drained).toBe(false);
    ga.release();
    await w1;
    await switched;
    expect(drained).toBe(true);
    expect((await a.read(0, 4096)).equals(Buffer.alloc(4096, 1))).toBe(true);
    expect((await b.read(0, 4096)).equals(Buffer.alloc(4096, 0))).toBe(true);
    expect(() => sw.switchTo(new MemoryNode(4096))).toThrow(/cannot switch an export of 1048576 bytes/);
  });
});

async function request(path: string, cmd: string, args: Record<string, unknown> = {}): Promise<{ ok: true; result: unknown } | { ok: false; code: string; message: string }> {
  const c = await ControlClient.connect(path, { timeoutMs: 5000 });
  try {
    return { ok: true, result: await c.request(cmd, args, { timeoutMs: 10_000 }) };
  } catch (err) {
    const e = err as { code: string; message: string };
    return { ok: false, code: e.code, message: e.message };
  } finally {
    await c.close();
  }
}

describe('job-* control verbs', () => {
  it('list, types, and the errors of every verb on unknown jobs and bad requests', async () => {
    const dir = await makeTempDir();
    const ctl = join(dir, 'ctl');
    await serve(['memory:16M', '--socket', join(dir, 'nbd'), '--control', ctl]);
    expect(await request(ctl, 'job-list')).toEqual({ ok: true, result: [] });
    const types = await request(ctl, 'job-types');
    expect(types.ok && (types.result as string[]).includes('mirror')).toBe(true);
    for (const cmd of ['job-query', 'job-pause', 'job-resume', 'job-complete', 'job-cancel']) {
      expect(await request(ctl, cmd, { id: 'nope' })).toEqual({ ok: false, code: 'ERR_JOB_NOT_FOUND', message: 'no job with id nope (jobs: none)' });
      expect(await request(ctl, cmd, {})).toEqual({ ok: false, code: 'ERR_BAD_REQUEST', message: `${cmd}: "id" (the job id, a string) is required` });
    }
    expect(await request(ctl, 'job-set-speed', { id: 'nope', speed: 1 })).toMatchObject({ ok: false, code: 'ERR_JOB_NOT_FOUND' });
    expect(await request(ctl, 'job-set-speed', { id: 'nope' })).toMatchObject({ ok: false, code: 'ERR_BAD_REQUEST' });
    expect(await request(ctl, 'job-start', {})).toMatchObject({ ok: false, code: 'ERR_BAD_REQUEST' });
    expect(await request(ctl, 'job-start', { type: 'nope' })).toMatchObject({ ok: false, code: 'ERR_JOB_INVALID', message: expect.stringMatching(/^no job type "nope" \(types: .*mirror/) });
    expect(await request(ctl, 'job-start', { type: 'mirror', export: 'x', target: 'memory:16M' })).toMatchObject({ ok: false, code: 'ERR_NO_EXPORT' });
    expect(await request(ctl, 'job-start', { type: 'mirror' })).toEqual({ ok: false, code: 'ERR_BAD_REQUEST', message: 'job-start: "target" (an image path or NBD URI to mirror onto) is required' });
    expect(await request(ctl, 'job-start', { type: 'mirror', target: 'memory:8M' })).toMatchObject({ ok: false, code: 'ERR_SIZE_MISMATCH' });
    expect(await request(ctl, 'job-list')).toEqual({ ok: true, result: [] });
  });
});
