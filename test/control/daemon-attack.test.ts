/**
 * test-control-daemon-attack: hostile control clients against a real serve-nbd process. After
 * each attack the daemon is still up, an NBD client connected before it still reads back what it
 * wrote, nbdinfo still gets the size, and `status` still answers on a fresh control connection.
 */
import net from 'node:net';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { BlockNode } from '../../src/api/block.js';
import { openImage } from '../../src/block/open.js';
import { ControlClient } from '../../src/control/client.js';
import { DEFAULT_CONTROL_LIMITS, LineSplitter, MAX_REQUEST_LINE_BYTES } from '../../src/control/protocol.js';
import { makeTempDir, run, serve, unixUri, waitFor, withTimeout, type Served } from '../support/spawn.js';

vi.setConfig({ testTimeout: 60_000, hookTimeout: 30_000 });

const MiB = 1 << 20;
const SIZE = 16 * MiB;

/** A control connection speaking raw bytes. */
class Raw {
  readonly lines: unknown[] = [];
  private readonly splitter = new LineSplitter(64 * MiB);
  private waiters: Array<() => void> = [];
  readonly ended: Promise<void>;
  constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      for (const line of this.splitter.push(chunk).lines) this.lines.push(JSON.parse(line));
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on('error', () => {});
    this.ended = new Promise((resolve) => socket.once('close', () => resolve()));
  }
  static connect(path: string): Promise<Raw> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(new Raw(s)));
      s.once('error', reject);
    });
  }
  async next(): Promise<unknown> {
    while (this.lines.length === 0) await withTimeout(new Promise<void>((r) => this.waiters.push(r)), 10_000, 'a reply line');
    return this.lines.shift();
  }
}

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) / 1024;
}

describe('serve-nbd survives hostile control clients', () => {
  let dir: string;
  let ctl: string;
  let nbdSock: string;
  let daemon: Served;
  let nbd: BlockNode;
  const data = Buffer.alloc(64 * 1024);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;

  beforeAll(async () => {
    dir = await makeTempDir('file');
    ctl = join(dir, 'ctl');
    nbdSock = join(dir, 'nbd');
    daemon = await serve([`memory:${SIZE}`, '--socket', nbdSock, '--control', ctl], { scope: 'file' });
    nbd = await openImage(unixUri(nbdSock));
    await nbd.write!(MiB, data);
  });
  afterAll(async () => {
    await nbd?.close?.();
  });

  /** Everything a well-behaved client does still works. */
  async function stillServes(): Promise<void> {
    expect(daemon.child.exitCode).toBeNull();
    expect((await nbd.read(MiB, data.length)).equals(data)).toBe(true);
    const info = await run('nbdinfo', ['--size', unixUri(nbdSock)]);
    expect(info.stdout.trim()).toBe(String(SIZE));
    const c = await ControlClient.connect(ctl);
    try {
      expect(await c.request('status')).toMatchObject({ control: ctl });
    } finally {
      await c.close();
    }
  }

  it('a 3000-deep id: id null and ERR_BAD_REQUEST, not a crash', async () => {
    const r = await Raw.connect(ctl);
    const line = `{"id":${'['.repeat(3000)}${']'.repeat(3000)},"cmd":"status"}\n`;
    expect(line.length).toBeGreaterThan(6000);
    r.socket.write(line);
    expect(await r.next()).toEqual({
      id: null,
      ok: false,
      error: { code: 'ERR_BAD_REQUEST', message: `"id" must be a string or a number, got an array of 1; the reply's id is null` },
    });
    // deep values where arguments go are named, never echoed
    const deep = `${'['.repeat(3000)}${']'.repeat(3000)}`;
    r.socket.write(`{"id":2,"cmd":"job-start","args":{"type":"mirror","target":${deep}}}\n`);
    expect(await r.next()).toEqual({ id: 2, ok: false, error: { code: 'ERR_BAD_REQUEST', message: 'job-start: "target" must be a non-empty string, got an array of 1' } });
    r.socket.write(`{"id":3,"cmd":"status","args":{"x":${deep}}}\n`);
    expect(await r.next()).toMatchObject({ id: 3, ok: true, result: { control: ctl } });
    r.socket.write(`{"id":"x","cmd":${deep}}\n`);
    expect(await r.next()).toEqual({ id: 'x', ok: false, error: { code: 'ERR_BAD_REQUEST', message: 'request has no "cmd" (a command name string), got an array of 1' } });
    r.socket.destroy();
    await stillServes();
  });

  it('a line over the limit: ERR_LINE_TOO_LONG, then only that connection is closed', async () => {
    const r = await Raw.connect(ctl);
    r.socket.write(Buffer.alloc(MAX_REQUEST_LINE_BYTES + 1, 0x5b)); // '[' …
    expect(await r.next()).toEqual({
      id: null,
      ok: false,
      error: { code: 'ERR_LINE_TOO_LONG', message: `request line is longer than ${MAX_REQUEST_LINE_BYTES} bytes; closing the connection` },
    });
    await withTimeout(r.ended, 10_000, 'the connection to close');
    await stillServes();
  });

  it('more control clients than the limit: the extra ones get ERR_CONTROL_BUSY and are closed; a freed place is taken again', async () => {
    const max = DEFAULT_CONTROL_LIMITS.maxClients;
    const held = await Promise.all(Array.from({ length: max }, () => Raw.connect(ctl)));
    // each answers, so the daemon has counted it
    for (const [i, r] of held.entries()) r.socket.write(`{"id":${i},"cmd":"job-types"}\n`);
    for (const [i, r] of held.entries()) expect(await r.next()).toMatchObject({ id: i, ok: true });
    const extra = await Raw.connect(ctl);
    expect(await extra.next()).toEqual({
      id: null,
      ok: false,
      error: { code: 'ERR_CONTROL_BUSY', message: `the daemon has ${max} control connections, the limit is ${max}; try again later` },
    });
    await withTimeout(extra.ended, 10_000, 'the refused connection to close');
    const busy = await ControlClient.connect(ctl);
    await expect(busy.request('status')).rejects.toMatchObject({ code: 'ERR_CONTROL_BUSY' });
    await busy.close();
    expect((await nbd.read(MiB, data.length)).equals(data)).toBe(true);
    for (const r of held) r.socket.destroy();
    await Promise.all(held.map((r) => r.ended));
    await waitFor(async () => {
      const c = await ControlClient.connect(ctl);
      try {
        return (await c.request('job-types')) !== undefined;
      } finally {
        await c.close();
      }
    }, 'a control place to be free again');
    await stillServes();
  });

  it('clients that send requests and never read the replies: the daemon stops reading them, its memory stays bounded', async () => {
    const before = rssMiB(daemon.pid);
    const n = 50;
    const spam = Buffer.from('{"id":1,"cmd":"status"}\n'.repeat(80_000)); // 1.9 MB of requests, ~1 KB replies each
    const clients = await Promise.all(Array.from({ length: n }, () => Raw.connect(ctl)));
    for (const c of clients) {
      c.socket.pause();
      c.socket.write(spam);
    }
    // Each client's writes stall once the daemon stops reading it (its buffers are full).
    await waitFor(() => clients.every((c) => c.socket.writableLength > 0), 'every spamming client to be blocked by the daemon', { timeoutMs: 30_000 });
    const during = rssMiB(daemon.pid);
    await stillServes();
    for (const c of clients) c.socket.destroy();
    console.log(`control spam: ${n} clients never reading, RSS ${before.toFixed(0)} MiB before, ${during.toFixed(0)} MiB while they hold on`);
    expect(during - before).toBeLessThan(200);
  });

  it('a burst of 500 pipelined requests on one connection: each answered once, by its id', async () => {
    const r = await Raw.connect(ctl);
    let text = '';
    for (let i = 0; i < 500; i++) text += `{"id":${i},"cmd":"job-list"}\n`;
    r.socket.write(text);
    const ids = new Set<number>();
    while (ids.size < 500) {
      const reply = (await r.next()) as { id: number; ok: boolean; result: unknown };
      expect(reply).toEqual({ id: reply.id, ok: true, result: [] });
      ids.add(reply.id);
    }
    r.socket.destroy();
    await stillServes();
  });
});
