/** Opening images from the command line: a path (format probed or --format) or memory:SIZE. */
import { Flags } from '@oclif/core';
import type { BlockNode } from '../api/block.js';
import { openImage, type ImageFormat } from '../block/open.js';

export const formatFlag = (description = 'the image format (probed when not given)') =>
  Flags.string({ char: 'f', description, options: ['raw', 'qcow2'], helpValue: 'FORMAT' });

/**
 * -U/--force-share, for commands that only read an image (as qemu-img info -U): open it although
 * another process (QEMU, blkrep serve-nbd) holds it for writing.
 */
export const forceShareFlag = () =>
  Flags.boolean({
    char: 'U',
    description: 'open the image even when another process (QEMU, a blkrep serve-nbd) holds it for writing, sharing every permission as qemu-img -U does; what is read may be changing under it',
    default: false,
  });

export async function openForCommand(spec: string, options: { readOnly: boolean; format?: string; forceShare?: boolean }): Promise<BlockNode> {
  return openImage(spec, { readOnly: options.readOnly, format: options.format as ImageFormat | undefined, ...(options.forceShare ? { forceShare: true } : {}) });
}
