/**
 * One control-socket request from a test (connect, request, close), and the pair status of a
 * daemon's export in a pair: what the two-daemon tests of the pair and heartbeat ask again and again.
 */
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ControlClient } from '../../src/control/client.js';
import type { PairStatus } from '../../src/pair/role.js';
import { makeTempDir, waitFor } from './spawn.js';

export async function controlRequest<T>(control: string, cmd: string, args: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<T> {
  const c = await ControlClient.connect(control);
  try {
    return (await c.request(cmd, args, { timeoutMs })) as T;
  } finally {
    await c.close();
  }
}

/** `status` → the pair status of the daemon's export that is in a pair. */
export async function pairOf<T = PairStatus>(control: string): Promise<T> {
  const s = await controlRequest<{ exports: Array<{ pair?: PairStatus }> }>(control, 'status');
  return s.exports.find((e) => e.pair)!.pair! as T;
}

/** An event as the control socket sends it. */
export interface DaemonEvent {
  event: string;
  [k: string]: unknown;
}

/** The events of a daemon from now on, and a wait for the next one of a name (from index `from`). */
export async function eventsOf(control: string, timeoutMs = 30_000) {
  const events: DaemonEvent[] = [];
  const client = await ControlClient.connect(control);
  await client.subscribe(undefined, (e) => events.push(e as unknown as DaemonEvent));
  const next = (name: string, from = 0) => waitFor(() => events.slice(from).find((e) => e.event === name), `event ${name}`, { timeoutMs });
  return { events, next, close: () => client.close() };
}

/** Wait for checkpoint 1, the one after a pair's initial sync, to have ended (lastCheckpointAgeMs is set then: a request before would join it). */
export async function firstCheckpoint(control: string, timeoutMs = 30_000): Promise<void> {
  await waitFor(async () => {
    const st = await pairOf(control);
    return st.epoch === 1 && st.lastCheckpointAgeMs !== null;
  }, 'checkpoint 1 after the initial sync', { timeoutMs });
}

/** The files of a two-daemon pair in `dir`: disks, sockets and control sockets of the primary (p) and the secondary (s). */
export function pairPaths(dir: string) {
  const at = (name: string) => join(dir, name);
  return { pImg: at('p.img'), sImg: at('s.img'), pSock: at('p.sock'), sSock: at('s.sock'), pControl: at('p.ctl'), sControl: at('s.ctl') };
}

/** A new temp dir with a pair's files (pairPaths), both disks `size` bytes of zeroes (sparse files). */
export async function blankPair(size: number) {
  const dir = await makeTempDir();
  await sparseImages(dir, size);
  return { dir, ...pairPaths(dir) };
}

/** Sparse raw images DIR/NAME of `size` bytes. */
export async function sparseImages(dir: string, size: number, names: string[] = ['p.img', 's.img']): Promise<void> {
  for (const f of names) {
    await writeFile(join(dir, f), Buffer.alloc(0));
    await truncate(join(dir, f), size);
  }
}

/**
 * A new temp dir with a pair's files (pairPaths): the primary's disk of `size` bytes holds byte
 * m + 1 in each MiB m (`content`), the secondary's zeroes (its initial full sync copies it all).
 */
export async function stampedPair(size: number) {
  const dir = await makeTempDir();
  const p = pairPaths(dir);
  const content = Buffer.alloc(size);
  for (let m = 0; m < size / 2 ** 20; m++) content.fill(m + 1, m * 2 ** 20, (m + 1) * 2 ** 20);
  await writeFile(p.pImg, content);
  await writeFile(p.sImg, Buffer.alloc(size));
  return { dir, p, content };
}
