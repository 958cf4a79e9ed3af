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
