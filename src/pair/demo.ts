/**
 * `blkrep demo`: the whole replication pair on one machine, as two daemons (separate processes)
 * on Unix sockets in a temporary directory — start the secondary and the primary, write,
 * checkpoint, kill -9 the primary, fail over, verify byte for byte, fail back, verify again.
 *
 * Each step is a function over one context, so the command can show them as a task list on a
 * terminal and as JSON otherwise. Nothing here is special to the demo: the daemons are started
 * with the flags a user gives (printed in each step's detail), the verbs are the control verbs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, open, rm, statfs } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BlkrepError } from '../api/errors.js';
import type { BlockNode } from '../api/block.js';
import { openImage } from '../block/formats.js';
import { ControlClient } from '../control/client.js';
import { compareImages } from '../image/compare.js';

export interface DemoOptions {
  /** bytes per disk (a multiple of 1 MiB) */
  size: number;
  protocol: 'sync' | 'async';
  /** where the temporary directory goes (default: the system's) */
  parentDir?: string;
  /** leave the directory and its images in place */
  keep: boolean;
  /** `node bin/run.js` of this installation */
  bin: string;
}

export interface DemoStep {
  id: string;
  title: string;
  ms: number;
  detail: string;
}

export interface DemoResult {
  dir: string;
  kept: boolean;
  size: number;
  protocol: 'sync' | 'async';
  epoch: number;
  /** the failover view equalled the checkpoint byte for byte */
  failoverVerified: boolean;
  /** after failback the two disks are equal */
  failbackVerified: boolean;
  steps: DemoStep[];
}

interface Daemon {
  name: string;
  child: ChildProcess;
  stderr: () => string;
  control: string;
  socket: string;
}

export interface DemoContext {
  options: DemoOptions;
  dir: string;
  a: string;
  b: string;
  daemons: Map<string, Daemon>;
  epoch: number;
  failoverVerified: boolean;
  failbackVerified: boolean;
}

export interface DemoTask {
  id: string;
  title: string;
  run(ctx: DemoContext): Promise<string>;
}

const MIB = 1024 * 1024;
const WAIT_MS = 30_000;

function unixUri(socket: string): string {
  return `nbd+unix:///?socket=${socket}`;
}

async function createDisk(file: string, size: number): Promise<void> {
  const h = await open(file, 'wx', 0o600);
  try {
    await h.truncate(size);
  } finally {
    await h.close();
  }
}

/** Start `serve-nbd ARGS --json` and wait for its listening line. */
async function startDaemon(ctx: DemoContext, name: string, args: string[]): Promise<Daemon> {
  const socket = path.join(ctx.dir, `${name}.sock`);
  const control = path.join(ctx.dir, `${name}.ctl`);
  const argv = [ctx.options.bin, 'serve-nbd', ...args, '--socket', socket, '--control', control, '--json'];
  const child = spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (err += s));
  const daemon: Daemon = { name, child, stderr: () => err, control, socket };
  ctx.daemons.set(name, daemon);
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(demoError(`the ${name} daemon did not listen within ${WAIT_MS / 1000} s`, err)), WAIT_MS);
    const check = () => {
      if (out.includes('"listening"')) {
        clearTimeout(timer);
        child.stdout!.off('data', check);
        resolve();
      }
    };
    child.stdout!.on('data', check);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(demoError(`the ${name} daemon exited (code ${code}, signal ${signal}) before listening`, err));
    });
  });
  return daemon;
}

function demoError(message: string, stderr = ''): BlkrepError {
  const tail = stderr.trim().split('\n').slice(-3).join('\n');
  return new BlkrepError('ERR_DEMO', tail ? `${message}:\n${tail}` : message);
}

async function verb(daemon: Daemon, cmd: string, args: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
  const c = await ControlClient.connect(daemon.control);
  try {
    return (await c.request(cmd, args, { timeoutMs: WAIT_MS })) as Record<string, unknown>;
  } finally {
    await c.close();
  }
}

interface PairView {
  link?: string;
  bytesBehind?: number;
  epoch?: number;
  role?: string;
}

async function pairStatus(daemon: Daemon): Promise<PairView | undefined> {
  const s = (await verb(daemon, 'status')) as { exports?: Array<{ pair?: PairView }> };
  return s.exports?.[0]?.pair;
}

/** Poll the daemon's status until `ok` (every 50 ms, at most WAIT_MS). */
async function waitPair(daemon: Daemon, what: string, ok: (p: PairView) => boolean): Promise<PairView> {
  const deadline = Date.now() + WAIT_MS;
  let last: PairView | undefined;
  for (;;) {
    last = await pairStatus(daemon);
    if (last && ok(last)) return last;
    if (Date.now() > deadline) throw demoError(`${daemon.name}: ${what} did not happen within ${WAIT_MS / 1000} s (pair status ${JSON.stringify(last ?? null)})`, daemon.stderr());
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function withNode<T>(spec: string, readOnly: boolean, fn: (node: BlockNode) => Promise<T>): Promise<T> {
  const node = await openImage(spec, { readOnly });
  try {
    return await fn(node);
  } finally {
    await node.close();
  }
}

async function fill(spec: string, from: number, to: number, byte: number): Promise<void> {
  const chunk = Buffer.alloc(MIB, byte);
  await withNode(spec, false, async (node) => {
    for (let off = from; off < to; off += MIB) await node.write(off, chunk.subarray(0, Math.min(MIB, to - off)));
    await node.flush?.();
  });
}

/** The first offset where `spec` does not hold `expect(offset)`, or undefined. */
async function firstMismatch(spec: string, size: number, expect: (offset: number) => number): Promise<number | undefined> {
  return withNode(spec, true, async (node) => {
    for (let off = 0; off < size; off += MIB) {
      const got = await node.read(off, Math.min(MIB, size - off));
      for (let i = 0; i < got.length; i++) if (got[i] !== expect(off + i)) return off + i;
    }
    return undefined;
  });
}

async function kill(daemon: Daemon, signal: NodeJS.Signals): Promise<void> {
  if (daemon.child.exitCode !== null || daemon.child.signalCode !== null) return;
  const exited = new Promise<void>((r) => daemon.child.once('exit', () => r()));
  daemon.child.kill(signal);
  await exited;
}

const hex = (b: number) => `0x${b.toString(16).padStart(2, '0')}`;

export function demoTasks(): DemoTask[] {
  const half = (ctx: DemoContext) => ctx.options.size / 2;
  return [
    {
      id: 'disks',
      title: 'Create two empty disks',
      async run(ctx) {
        await createDisk(ctx.a, ctx.options.size);
        await createDisk(ctx.b, ctx.options.size);
        return `${ctx.a} and ${ctx.b}, ${ctx.options.size / MIB} MiB each`;
      },
    },
    {
      id: 'secondary',
      title: 'Start the secondary (host B)',
      async run(ctx) {
        await startDaemon(ctx, 'b', [ctx.b, '--secondary']);
        return `blkrep serve-nbd ${path.basename(ctx.b)} --secondary --socket b.sock --control b.ctl`;
      },
    },
    {
      id: 'primary',
      title: 'Start the primary (host A), replicating to B',
      async run(ctx) {
        const b = ctx.daemons.get('b')!;
        const a = await startDaemon(ctx, 'a', [ctx.a, '--replicate-to', unixUri(b.socket), '--protocol', ctx.options.protocol]);
        await waitPair(a, 'the pair link', (p) => p.link === 'connected');
        return `blkrep serve-nbd ${path.basename(ctx.a)} --replicate-to ${unixUri('b.sock')} --protocol ${ctx.options.protocol}`;
      },
    },
    {
      id: 'write-1',
      title: `Write ${hex(0x11)} over the whole disk through the primary`,
      async run(ctx) {
        await fill(unixUri(ctx.daemons.get('a')!.socket), 0, ctx.options.size, 0x11);
        return `${ctx.options.size / MIB} MiB written and flushed`;
      },
    },
    {
      id: 'checkpoint',
      title: 'Checkpoint',
      async run(ctx) {
        const r = await verb(ctx.daemons.get('a')!, 'checkpoint');
        ctx.epoch = Number(r['epoch']);
        return `epoch ${ctx.epoch} committed on both hosts (blkrep checkpoint --control a.ctl)`;
      },
    },
    {
      id: 'write-2',
      title: `Write ${hex(0x22)} over the second half (after the checkpoint)`,
      async run(ctx) {
        await fill(unixUri(ctx.daemons.get('a')!.socket), half(ctx), ctx.options.size, 0x22);
        return `${half(ctx) / MIB} MiB written; the secondary's hidden disk keeps the checkpoint's data`;
      },
    },
    {
      id: 'kill-primary',
      title: 'Kill the primary (kill -9)',
      async run(ctx) {
        const a = ctx.daemons.get('a')!;
        await kill(a, 'SIGKILL');
        return `pid ${a.child.pid} killed`;
      },
    },
    {
      id: 'failover',
      title: 'Fail over to the secondary, at the checkpoint',
      async run(ctx) {
        const r = await verb(ctx.daemons.get('b')!, 'failover', { to: 'checkpoint' });
        return `B is primary (blkrep failover --control b.ctl)${r['generation'] ? `, generation ${String(r['generation'])}` : ''}`;
      },
    },
    {
      id: 'verify-failover',
      title: `Verify B holds the checkpoint byte for byte (all ${hex(0x11)})`,
      async run(ctx) {
        const bad = await firstMismatch(unixUri(ctx.daemons.get('b')!.socket), ctx.options.size, () => 0x11);
        if (bad !== undefined) throw demoError(`B differs from checkpoint ${ctx.epoch} at byte ${bad}`);
        ctx.failoverVerified = true;
        return `${ctx.options.size} bytes equal`;
      },
    },
    {
      id: 'failback',
      title: 'Fail back: A restarts as secondary of B and is resynced',
      async run(ctx) {
        const a = await startDaemon(ctx, 'a', [ctx.a, '--secondary']);
        const b = ctx.daemons.get('b')!;
        await verb(b, 'replicate', { uri: unixUri(a.socket), protocol: ctx.options.protocol });
        const p = await waitPair(b, 'the resync of A', (s) => s.link === 'connected' && s.bytesBehind === 0);
        return `blkrep replicate --control b.ctl ${unixUri('a.sock')}; link ${p.link}`;
      },
    },
    {
      id: 'verify-failback',
      title: 'Stop both; verify the two disks are equal',
      async run(ctx) {
        for (const d of ctx.daemons.values()) await kill(d, 'SIGTERM');
        const r = await withNode(ctx.a, true, (a) => withNode(ctx.b, true, (b) => compareImages(a, b, { strict: true })));
        if (!r.identical) throw demoError(`after failback the disks differ: ${r.reason}`);
        ctx.failbackVerified = true;
        return `${path.basename(ctx.a)} == ${path.basename(ctx.b)}`;
      },
    },
  ];
}

export async function createContext(options: DemoOptions): Promise<DemoContext> {
  if (options.size < 2 * MIB || options.size % MIB !== 0) {
    throw new BlkrepError('ERR_USAGE', `--size ${options.size} bytes: the demo needs a multiple of 1 MiB, at least 2 MiB`, { errno: 'EINVAL' });
  }
  // both disks written whole, and the second half again in the secondary's hidden disk
  const parent = options.parentDir ?? os.tmpdir();
  const needed = options.size * 2 + options.size / 2;
  const fs = await statfs(parent).catch(() => undefined);
  if (fs && fs.bavail * fs.bsize < needed) {
    throw new BlkrepError('ERR_USAGE', `--size ${options.size} bytes: the demo writes both disks whole and half of one again (the hidden disk), ${needed} bytes, but ${parent} has ${fs.bavail * fs.bsize} bytes free (TMPDIR picks another directory)`, { errno: 'ENOSPC' });
  }
  const dir = await mkdtemp(path.join(parent, 'blkrep-demo-'));
  return { options, dir, a: path.join(dir, 'a.img'), b: path.join(dir, 'b.img'), daemons: new Map(), epoch: 0, failoverVerified: false, failbackVerified: false };
}

/** Stop every daemon the demo started (SIGKILL after 10 s), and remove the directory unless kept. */
export async function cleanUp(ctx: DemoContext): Promise<void> {
  for (const d of ctx.daemons.values()) {
    const t = setTimeout(() => d.child.kill('SIGKILL'), 10_000);
    await kill(d, 'SIGTERM').finally(() => clearTimeout(t));
  }
  if (!ctx.options.keep) await rm(ctx.dir, { recursive: true, force: true });
}
