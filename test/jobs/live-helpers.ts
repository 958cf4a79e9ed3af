/**
 * Helpers of the live-mirror and job CLI tests: a raw image with data, a writer that keeps
 * writing an export over NBD (and the content it must have), control requests and event capture.
 */
import { writeFile, open } from 'node:fs/promises';
import type { BlockNode } from '../../src/api/block.js';
import { openImage } from '../../src/block/open.js';
import { ControlClient } from '../../src/control/client.js';
import type { ControlEvent } from '../../src/control/protocol.js';
import { randomBytes, rng } from './helpers.js';
import { run } from '../support/spawn.js';

export const MiB = 1 << 20;

/** A sparse raw file of `size` bytes with `dataBytes` of random data in 1 MiB pieces spread over it; returns its content. */
export async function rawImage(path: string, size: number, seed = 1, dataFraction = 0.5): Promise<Buffer> {
  const content = Buffer.alloc(size);
  const r = rng(seed);
  for (let off = 0; off < size; off += MiB) if (r() < dataFraction) randomBytes(r, MiB).copy(content, off);
  await writeFile(path, Buffer.alloc(0));
  const fh = await open(path, 'r+');
  try {
    await fh.truncate(size);
    for (let off = 0; off < size; off += MiB) {
      const piece = content.subarray(off, off + MiB);
      if (piece.some((b) => b !== 0)) await fh.write(piece, 0, piece.length, off);
    }
  } finally {
    await fh.close();
  }
  return content;
}

export async function emptyImage(path: string, size: number): Promise<void> {
  await writeFile(path, Buffer.alloc(0));
  const fh = await open(path, 'r+');
  await fh.truncate(size);
  await fh.close();
}

/**
 * Writers (one per slice of the disk, so their writes never overlap) writing random 4–64 KiB
 * blocks through NBD until stopped; `expected` is the disk's content as they left it.
 */
export class Writer {
  private stopFlag = false;
  private loops: Promise<void>[] = [];
  writes = 0;
  bytes = 0;
  error: unknown;
  private constructor(
    readonly node: BlockNode,
    readonly expected: Buffer,
  ) {}

  static async start(uri: string, expected: Buffer, options: { workers?: number; seed?: number; region?: [number, number]; pauseMs?: number } = {}): Promise<Writer> {
    const node = await openImage(uri);
    const w = new Writer(node, expected);
    const workers = options.workers ?? 4;
    const [lo, hi] = options.region ?? [0, expected.length];
    const slice = Math.floor((hi - lo) / workers / 65536) * 65536;
    for (let i = 0; i < workers; i++) w.loops.push(w.loop(lo + i * slice, slice, rng((options.seed ?? 7) * 100 + i), options.pauseMs ?? 0));
    return w;
  }

  private async loop(base: number, span: number, r: () => number, pauseMs: number): Promise<void> {
    try {
      while (!this.stopFlag) {
        const len = (1 + Math.floor(r() * 16)) * 4096;
        const off = base + Math.floor(r() * ((span - len) / 4096)) * 4096;
        const data = randomBytes(r, len);
        await this.node.write(off, data);
        data.copy(this.expected, off);
        this.writes++;
        this.bytes += len;
        if (pauseMs > 0) await new Promise((res) => setTimeout(res, pauseMs));
      }
    } catch (err) {
      this.error ??= err;
    }
  }

  /** Stop, wait for the writes in flight, flush; throws the first write error. */
  async stop(options: { flush?: boolean; ignoreErrors?: boolean } = {}): Promise<void> {
    this.stopFlag = true;
    await Promise.all(this.loops);
    if (options.flush !== false && !this.error) await this.node.flush?.();
    await this.node.close().catch(() => {});
    if (this.error && !options.ignoreErrors) throw this.error;
  }

  /** Wait until at least n more writes were done. */
  async waitWrites(n: number): Promise<void> {
    const target = this.writes + n;
    while (this.writes < target) {
      if (this.error) throw this.error;
      await new Promise((res) => setTimeout(res, 5));
    }
  }
}

export async function control<T = unknown>(path: string, cmd: string, args: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<T> {
  const c = await ControlClient.connect(path, { timeoutMs: 5000 });
  try {
    return (await c.request(cmd, args, { timeoutMs })) as T;
  } finally {
    await c.close();
  }
}

/** A control connection subscribed to every event, collecting them. */
export async function eventLog(path: string): Promise<{ events: ControlEvent[]; waitFor: (name: string, pred?: (e: ControlEvent) => boolean, timeoutMs?: number) => Promise<ControlEvent>; close: () => Promise<void> }> {
  const c = await ControlClient.connect(path, { timeoutMs: 5000 });
  const events: ControlEvent[] = [];
  const waiters: Array<() => void> = [];
  await c.subscribe(undefined, (e) => {
    events.push(e);
    for (const w of waiters.splice(0)) w();
  });
  const waitFor = async (name: string, pred: (e: ControlEvent) => boolean = () => true, timeoutMs = 60_000): Promise<ControlEvent> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = events.find((e) => e.event === name && pred(e));
      if (found) return found;
      if (Date.now() > deadline) throw new Error(`timed out waiting for event ${name}; got ${events.map((e) => e.event).join(', ')}`);
      await new Promise<void>((resolve) => {
        waiters.push(resolve);
        setTimeout(resolve, 200);
      });
    }
  };
  return { events, waitFor, close: () => c.close() };
}

/** qemu-img compare of two raw images: exit 0 when identical. */
export async function qemuCompare(a: string, b: string): Promise<{ code: number | null; stdout: string }> {
  const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b], { timeoutMs: 60_000 });
  return { code: r.code, stdout: r.stdout + r.stderr };
}
