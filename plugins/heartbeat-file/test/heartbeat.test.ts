import { mkdtempSync, rmSync } from 'node:fs';
import { mkdir, readFile, stat, symlink } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Heartbeats } from '../../../src/engine/registry.js';
import { runHeartbeatCompliance } from '../../../src/testing/heartbeat-compliance.js';
import hook from '../src/hook.js';
import { createFileHeartbeat, decodeSlot, encodeSlot, parseFileUri } from '../src/index.js';

const dir = mkdtempSync(join(os.tmpdir(), 'blkrep-hbfile-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let files = 0;

runHeartbeatCompliance('file', createFileHeartbeat, {
  pair: () => {
    const uri = `file://${join(dir, `hb${files++}`)}`;
    return { a: uri, b: uri };
  },
  badUris: ['file://', 'file:///', 'file://otherhost/x', 'file:///x?slot=2', 'file:///x?mode=1', 'udp://x:1'],
});

describe('file heartbeat', () => {
  it('the smaller node id writes slot 0, unless ?slot= says otherwise', () => {
    expect(parseFileUri('file:///srv/hb', 'alpha', 'beta')).toEqual({ path: '/srv/hb', slot: 0 });
    expect(parseFileUri('file:///srv/hb', 'beta', 'alpha')).toEqual({ path: '/srv/hb', slot: 1 });
    expect(parseFileUri('file:///srv/h%20b?slot=1', 'alpha', 'beta')).toEqual({ path: '/srv/h b', slot: 1 });
    expect(() => parseFileUri('file:///srv/hb', 'same', 'same')).toThrow(expect.objectContaining({ code: 'ERR_BAD_HEARTBEAT' }));
  });

  it('creates an 8 KiB file of mode 0600 and writes the frame into its slot', async () => {
    const path = join(dir, 'layout');
    const p = createFileHeartbeat().open(`file://${path}`, { self: 'beta', peer: 'alpha', intervalMs: 50 });
    await p.start();
    p.send(Buffer.from('hello'));
    const deadline = Date.now() + 5000;
    let content = Buffer.alloc(0);
    while (Date.now() < deadline) {
      content = await readFile(path);
      if (decodeSlot(content.subarray(4096))) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    await p.stop();
    expect(content.length).toBe(8192);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    expect(decodeSlot(content.subarray(4096))?.toString()).toBe('hello');
    expect(decodeSlot(content.subarray(0, 4096))).toBeUndefined();
    expect(content.subarray(4096).equals(encodeSlot(Buffer.from('hello')))).toBe(true);
  });

  it('refuses a directory, and a symlink, with ERR_HEARTBEAT_START', async () => {
    const sub = join(dir, 'sub');
    await mkdir(sub);
    const link = join(dir, 'link');
    await symlink(join(dir, 'target'), link);
    for (const path of [sub, link]) {
      const p = createFileHeartbeat().open(`file://${path}`, { self: 'a', peer: 'b', intervalMs: 50 });
      await expect(p.start()).rejects.toMatchObject({ code: 'ERR_HEARTBEAT_START', message: expect.stringContaining(path) });
    }
  });

  it('registers itself as "file" through the blkrep:register hook', async () => {
    const heartbeats = new Heartbeats();
    await hook.call(undefined, { transports: undefined as never, heartbeats });
    expect(heartbeats.get('file').name).toBe('file');
  });
});
