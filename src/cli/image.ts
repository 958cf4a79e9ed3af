/** Opening images from the command line: a path (format probed or --format) or memory:SIZE. */
import { Flags } from '@oclif/core';
import type { BlockNode } from '../api/block.js';
import { openImage, type ImageFormat } from '../block/open.js';

export const formatFlag = (description = 'the image format (probed when not given)') =>
  Flags.string({ char: 'f', description, options: ['raw', 'qcow2'], helpValue: 'FORMAT' });

export async function openForCommand(spec: string, options: { readOnly: boolean; format?: string }): Promise<BlockNode> {
  return openImage(spec, { readOnly: options.readOnly, format: options.format as ImageFormat | undefined });
}
