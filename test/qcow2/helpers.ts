/**
 * Helpers for the qcow2 tests: the QEMU tools as oracles (qemu-img check/info/map/compare,
 * qemu-io), files and patterns.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { expect } from 'vitest';
import { run } from '../support/spawn.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  code: number | null;
  raw: string;
}

/** Run a QEMU tool; fails the test with its output when the exit code is not in `ok`. */
export async function tool(cmd: string, args: string[], ok: number[] = [0], timeoutMs = 30_000): Promise<string> {
  const r = await run(cmd, args, { timeoutMs });
  if (!ok.includes(r.code ?? -1)) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

export async function qemuCheck(path: string): Promise<CheckResult> {
  const r = await run('qemu-img', ['check', '--output=json', '-f', 'qcow2', path], { timeoutMs: 30_000 });
  let parsed: Record<string, unknown> = {};
  try {
    parsed = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch {
    throw new Error(`qemu-img check ${path}: exit ${r.code}, not JSON\n${r.stdout}\n${r.stderr}`);
  }
  return {
    corruptions: Number(parsed.corruptions ?? 0),
    leaks: Number(parsed.leaks ?? 0),
    checkErrors: Number(parsed['check-errors'] ?? 0),
    code: r.code,
    raw: r.stdout + r.stderr,
  };
}

/** qemu-img check finds nothing at all (no corruption, no leak). */
export async function expectClean(path: string): Promise<void> {
  const c = await qemuCheck(path);
  expect({ corruptions: c.corruptions, leaks: c.leaks, checkErrors: c.checkErrors, code: c.code }, c.raw).toEqual({
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    code: 0,
  });
}

export async function qemuInfo(path: string): Promise<Record<string, unknown>> {
  return JSON.parse(await tool('qemu-img', ['info', '--output=json', '-U', path])) as Record<string, unknown>;
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export async function qemuMap(path: string): Promise<MapEntry[]> {
  return JSON.parse(await tool('qemu-img', ['map', '--output=json', '-U', path])) as MapEntry[];
}

/** The guest contents through QEMU: qemu-img convert -O raw, read back. */
export async function qemuContents(path: string, out: string): Promise<Buffer> {
  await tool('qemu-img', ['convert', '-U', '-O', 'raw', path, out]);
  return readFile(out);
}

export async function qemuCompare(image: string, raw: Buffer, scratch: string): Promise<void> {
  await writeFile(scratch, raw);
  await tool('qemu-img', ['compare', '-U', image, '-F', 'raw', scratch]);
}

/** A deterministic, position-dependent pattern (so misplaced data shows). */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** First differing byte offset, or -1. */
export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

export function expectSame(actual: Buffer, expected: Buffer, what: string): void {
  const d = firstDiff(actual, expected);
  expect(d, `${what}: first difference at byte ${d} (got ${actual[d]}, want ${expected[d]}; lengths ${actual.length}/${expected.length})`).toBe(-1);
}
