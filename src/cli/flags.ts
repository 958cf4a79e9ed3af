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
