/** Helpers shared by the image command tests (qemu-img and qemu-io as the oracle). */
import { expect } from 'vitest';
import { run } from '../support/spawn.js';

export interface MapRun {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

/** qemu-img map's runs without host offsets, adjacent runs with the same fields merged. */
export function mergeQemuMap(text: string): MapRun[] {
  const out: MapRun[] = [];
  for (const { start, length, depth, present, zero, data } of JSON.parse(text) as MapRun[]) {
    const last = out[out.length - 1];
    if (last && last.start + last.length === start && last.depth === depth && last.present === present && last.zero === zero && last.data === data) last.length += length;
    else out.push({ start, length, depth, present, zero, data });
  }
  return out;
}

/** Run each command in `dir`; each must exit 0. */
export async function sh(dir: string, ...commands: string[][]): Promise<void> {
  for (const [cmd, ...args] of commands) {
    const r = await run(cmd!, args, { cwd: dir });
    expect(r.code, `${cmd} ${args.join(' ')}: ${r.stdout}${r.stderr}`).toBe(0);
  }
}

/** qemu-img create -f qcow2 [-o cluster_size=CS] [-b BACKING -F FMT] NAME [SIZE] */
export const qcow2 = (name: string, size: string, backing?: [string, string], cs?: string): string[] => [
  'qemu-img', 'create', '-f', 'qcow2', ...(cs ? ['-o', `cluster_size=${cs}`] : []), ...(backing ? ['-b', backing[0], '-F', backing[1]] : []), name, ...(size ? [size] : []),
];

/** qemu-io -f FMT -c CMD… IMAGE */
export const io = (fmt: string, image: string, ...cmds: string[]): string[] => ['qemu-io', '-f', fmt, ...cmds.flatMap((c) => ['-c', c]), image];

/** qemu-img map of an image, merged. */
export async function qemuMap(image: string, cwd: string): Promise<MapRun[]> {
  const q = await run('qemu-img', ['map', '--output=json', image], { cwd });
  expect(q.code, q.stderr).toBe(0);
  return mergeQemuMap(q.stdout);
}

/** qemu-img check: exit 0, no corruptions and no leaks (exit 3 and leaks allowed with allowLeaks). */
export async function qemuCheckClean(image: string, cwd: string, options: { allowLeaks?: boolean } = {}): Promise<void> {
  const r = await run('qemu-img', ['check', '--output=json', image], { cwd });
  expect(options.allowLeaks ? [0, 3] : [0], `qemu-img check ${image}: ${r.stdout}\n${r.stderr}`).toContain(r.code);
  const c = JSON.parse(r.stdout);
  expect(c['corruptions'] ?? 0).toBe(0);
  if (!options.allowLeaks) expect(c['leaks'] ?? 0).toBe(0);
}

/** qemu-img compare of two images (formats given, so nothing is probed): true when identical. */
export async function qemuSame(a: [string, string], b: [string, string], cwd: string): Promise<boolean> {
  const r = await run('qemu-img', ['compare', '-f', a[1], '-F', b[1], a[0], b[0]], { cwd });
  expect(r.code === 0 || r.code === 1, r.stderr).toBe(true);
  return r.code === 0;
}
