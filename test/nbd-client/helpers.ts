/**
 * Servers for the NBD client tests: qemu-nbd and nbdkit as child processes (killed after each test
 * by test/support/spawn.ts), blkrep's own NbdServer in-process on a Unix socket that can be stopped
 * and started again on the same path (for reconnect tests), and bounded waits on client events.
 */
import { EventEmitter, once } from 'node:events';
import net from 'node:net';
import { join } from 'node:path';
import { completeNode } from '../../src/block/node.js';
import { MemoryNode } from '../../src/block/memory.js';
import type { BlockNode, CompleteBlockNode } from '../../src/api/block.js';
import { NbdServer } from '../../src/nbd/server.js';
import type { ExportOptions } from '../../src/nbd/export.js';
import { makeTempDir, start, waitFor, withTimeout, type Started } from '../support/spawn.js';

export { pattern } from '../nbd/helpers.js';

/** Whether something accepts connections on a Unix socket. */
export function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ path });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export interface PeerServer {
  proc: Started;
  socket: string;
  uri: string;
  dir: string;
}

/** `nbdkit -f -U SOCK ARGS…` (plugin and filter arguments in ARGS), ready to accept. */
export async function startNbdkit(args: string[], options: { dir?: string; socket?: string } = {}): Promise<PeerServer> {
  const dir = options.dir ?? (await makeTempDir());
  const socket = options.socket ?? join(dir, 'k.sock');
  const proc = start('nbdkit', ['-f', '-U', socket, ...args]);
  await waitFor(async () => (proc.child.exitCode === null ? answers(socket) : Promise.reject(new Error(`nbdkit exited: ${proc.stderr()}`))), 'nbdkit to listen', { timeoutMs: 10_000 });
  return { proc, socket, uri: `nbd+unix:///?socket=${socket}`, dir };
}

/**
 * `qemu-nbd -f raw -k SOCK -t -e 8 ARGS… FILE`, ready to accept: persistent, so probes do not stop
 * it, and shared by up to 8 clients (its default of 1 makes a second client wait for the first).
 */
export async function startQemuNbd(file: string, args: string[] = [], options: { socket?: string; exportName?: string; format?: 'raw' | 'qcow2' } = {}): Promise<PeerServer> {
  const dir = options.socket ? '' : await makeTempDir();
  const socket = options.socket ?? join(dir, 'q.sock');
  const name = options.exportName ?? '';
  const proc = start('qemu-nbd', ['-f', options.format ?? 'raw', '-k', socket, '-t', '-e', '8', ...(name ? ['-x', name] : []), ...args, file]);
  await waitFor(async () => (proc.child.exitCode === null ? answers(socket) : Promise.reject(new Error(`qemu-nbd exited: ${proc.stderr()}`))), 'qemu-nbd to listen', { timeoutMs: 10_000 });
  return { proc, socket, uri: `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`, dir };
}

/**
 * blkrep's NbdServer in-process on a Unix socket. stop() drops every connection at once (as a
 * crash would) and closes the listener; start() listens again on the same path with the same
 * exports (their nodes are never closed here, so data survives a restart).
 */
export class OwnServer {
  srv: NbdServer | undefined;
  private listener: net.Server | undefined;

  private constructor(
    readonly socket: string,
    private readonly exports: ExportOptions[],
  ) {}

  static async create(exports: ExportOptions[], socket?: string): Promise<OwnServer> {
    const path = socket ?? join(await makeTempDir(), 'own.sock');
    const s = new OwnServer(path, exports);
    await s.start();
    return s;
  }

  uri(exportName = ''): string {
    return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${this.socket}`;
  }

  async start(): Promise<void> {
    const srv = new NbdServer({ exports: this.exports });
    const listener = net.createServer({ allowHalfOpen: true }, (sock) => srv.attach({ stream: sock, peer: 'test' }));
    await new Promise<void>((resolve, reject) => {
      listener.once('error', reject);
      listener.listen(this.socket, () => {
        listener.removeListener('error', reject);
        resolve();
      });
    });
    this.srv = srv;
    this.listener = listener;
  }

  async stop(): Promise<void> {
    const { srv, listener } = this;
    this.srv = undefined;
    this.listener = undefined;
    srv?.destroyAll('test stop');
    if (listener) await new Promise<void>((resolve) => listener.close(() => resolve()));
  }

  connections(): number {
    return this.srv?.status().connections.length ?? 0;
  }
}

/** A node that is never really closed (the server closes export nodes on shutdown). */
export function keepOpen(node: CompleteBlockNode): CompleteBlockNode {
  return { ...node, close: async () => {} };
}

export function memoryExport(name: string, size: number, tweak?: (node: CompleteBlockNode) => CompleteBlockNode): ExportOptions & { node: CompleteBlockNode } {
  const node = keepOpen(completeNode(new MemoryNode(size) as BlockNode));
  return { name, node: tweak ? tweak(node) : node };
}

/** The next `event` from `emitter`, or a rejection after `ms`. */
export async function nextEvent<T = unknown>(emitter: EventEmitter<any>, event: string, ms = 10_000): Promise<T> {
  const [value] = await withTimeout(once(emitter, event), ms, `event "${event}"`);
  return value as T;
}

/** A promise's rejection (fails the test if it resolves). */
export async function rejection(p: Promise<unknown>): Promise<Error & { code?: string; errno?: string; details?: Record<string, unknown> }> {
  try {
    await p;
  } catch (err) {
    return err as Error & { code?: string; errno?: string };
  }
  throw new Error('expected a rejection, but the promise resolved');
}
