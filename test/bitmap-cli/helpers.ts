/**
 * Helpers of the bitmap CLI tests: `blkrep bitmap …` and serve-nbd as processes (through
 * test/support/spawn.ts: bounded, cleaned up), nbdinfo maps, a model of what a bitmap must hold.
 */
import { truncate, writeFile } from 'node:fs/promises';
import { expect } from 'vitest';
import { DirtyBitmap, type Run } from '../../src/bitmap/dirty-bitmap.js';
import { ControlClient } from '../../src/control/client.js';
import { run, runCli, start, waitFor, type RunResult, type Started } from '../support/spawn.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export interface NbdinfoEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

/** A sparse file of `size` zero bytes. */
export async function zeroFile(path: string, size: number): Promise<void> {
  await writeFile(path, '');
  await truncate(path, size);
}

export interface CliResult extends RunResult {
  /** stdout parsed as JSON (undefined when it is not) */
  json: unknown;
}

/** `blkrep ARGS…`; stdout parsed as JSON when it is. */
export async function blk(args: string[], options: { input?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  const r = await runCli(args, { timeoutMs: options.timeoutMs ?? 30_000, ...(options.input === undefined ? {} : { input: options.input }) });
  let json: unknown;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    json = undefined;
  }
  return { ...r, json };
}

/** `blkrep ARGS… --json` that must succeed; its JSON result. */
export async function ok<T = Record<string, unknown>>(args: string[], options: { input?: string } = {}): Promise<T> {
  const r = await blk([...args, '--json'], options);
  if (r.code !== 0) throw new Error(`blkrep ${args.join(' ')} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r.json as T;
}

/** `blkrep ARGS… --json` that must fail with `code` (exit status) and error `errCode`. */
export async function fails(args: string[], exitCode: number, errCode: string, message?: RegExp): Promise<string> {
  const r = await blk([...args, '--json']);
  expect(r.code, `blkrep ${args.join(' ')}: ${r.stdout} ${r.stderr}`).toBe(exitCode);
  const body = r.json as { error: { code: string; message: string } } | undefined;
  if (body === undefined) throw new Error(`blkrep ${args.join(' ')} printed no JSON\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  expect(Object.keys(body)).toEqual(['error']);
  expect(body.error.code).toBe(errCode);
  if (message) expect(body.error.message).toMatch(message);
  return body.error.message;
}

/** `nbdinfo --map=CONTEXT --json URI`, as text (what blkrep bitmap dump --json must equal). */
export async function nbdinfoMapText(uri: string, context: string): Promise<string> {
  const r = await run('nbdinfo', [`--map=${context}`, '--json', uri], { timeoutMs: 20_000 });
  if (r.code !== 0) throw new Error(`nbdinfo --map=${context} ${uri} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

/** The nbdinfo entries a bitmap holding `model` has (clean and dirty alternating). */
export function entriesOf(model: DirtyBitmap): NbdinfoEntry[] {
  const out: NbdinfoEntry[] = [];
  let pos = 0;
  for (const [length, dirty] of model.statusRuns(0, model.size)) {
    out.push({ offset: pos, length, type: dirty ? 1 : 0, description: dirty ? 'dirty' : 'clean' });
    pos += length;
  }
  return out;
}

/** The dirty runs of nbdinfo entries. */
export function dirtyOf(entries: NbdinfoEntry[]): Run[] {
  return entries.filter((e) => e.type === 1).map((e) => ({ offset: e.offset, length: e.length }));
}

export function model(size: number, granularity = 64 * KiB, writes: Run[] = []): DirtyBitmap {
  const b = new DirtyBitmap(size, { granularity });
  for (const w of writes) b.set(w.offset, w.length);
  return b;
}

/** One request on the control socket. */
export async function control<T = unknown>(path: string, cmd: string, args: Record<string, unknown> = {}): Promise<T> {
  const c = await ControlClient.connect(path, { timeoutMs: 5000 });
  try {
    return (await c.request(cmd, args, { timeoutMs: 10_000 })) as T;
  } finally {
    await c.close();
  }
}

const PROMPT = 'qemu-io> ';
const prompts = (out: string): number => out.split(PROMPT).length - 1;

/** qemu-io kept running on `uri`, fed one command at a time (see test/cli/serve.test.ts). */
export function qemuIoSession(uri: string): Started & { command(cmd: string): Promise<string> } {
  const p = start('qemu-io', ['-f', 'raw', uri]);
  let queue = Promise.resolve('');
  const command = (cmd: string): Promise<string> => {
    queue = queue.then(async () => {
      await waitFor(() => prompts(p.stdout()) >= 1 || p.child.exitCode !== null, 'the qemu-io prompt', { timeoutMs: 15_000 });
      const before = p.stdout().length;
      const n = prompts(p.stdout());
      p.child.stdin!.write(`${cmd}\n`);
      await waitFor(() => prompts(p.stdout()) > n, `qemu-io to finish "${cmd}" (stdout: ${p.stdout()}, stderr: ${p.stderr()})`, { timeoutMs: 15_000 });
      return p.stdout().slice(before);
    });
    return queue;
  };
  return Object.assign(p, { command });
}

/** qemu-io -c CMD… on `uri` to completion. */
export async function qemuIo(uri: string, commands: string[], format = 'raw'): Promise<string> {
  const r = await run('qemu-io', ['-f', format, uri, ...commands.flatMap((c) => ['-c', c])], { timeoutMs: 20_000 });
  if (r.code !== 0 || /fail|error/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${commands.join('; ')}: ${r.stdout} ${r.stderr}`);
  return r.stdout;
}
