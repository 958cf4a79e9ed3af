/** Flag parsers shared by commands (sizes, durations), written once as oclif custom flags. */
import { Flags } from '@oclif/core';
import { parseSize } from '../util/size.js';

export const sizeFlag = Flags.custom<number>({
  parse: async (input) => parseSize(input),
});

export const secondsFlag = Flags.custom<number>({
  parse: async (input) => {
    const v = Number(input);
    if (!Number.isFinite(v) || v <= 0) throw new Error(`expected a positive number of seconds, got "${input}"`);
    return v;
  },
});

/**
 * `--wait ready|done`, one shape for every command that starts a job (mirror, backup, commit):
 * ready = exit once the job is in step (it keeps running), done = exit once it has concluded.
 * A bare `--wait` (the boolean that backup and commit had) means done: see withBareWait.
 */
export const waitFlag = (description: string, extra: { dependsOn?: string[] } = {}) =>
  Flags.string({ description, options: ['ready', 'done'], helpValue: 'ready|done', ...extra });

/** argv with a bare `--wait` (last, or before another flag) spelled `--wait=done`, so old scripts keep working. */
export function withBareWait(argv: string[]): string[] {
  const end = argv.indexOf('--');
  return argv.map((a, i) => (a === '--wait' && (end === -1 || i < end) && (i + 1 === argv.length || argv[i + 1]!.startsWith('-')) ? '--wait=done' : a));
}

/** A duration: 500ms, 20s, 2m, 1h, or a bare number of seconds; positive. */
export function parseDuration(input: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(input);
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m?.[2] ?? 's') as 'ms' | 's' | 'm' | 'h'];
  const ms = m ? Math.round(Number(m[1]) * unit) : NaN;
  if (!Number.isFinite(ms) || ms <= 0) throw new Error(`expected a duration such as 500ms, 20s, 2m or 1h, got "${input}"`);
  return ms;
}

/** a duration flag, in milliseconds */
export const durationFlag = Flags.custom<number>({
  parse: async (input) => parseDuration(input),
});
