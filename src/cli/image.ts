/**
 * Opening images from the command line: a path (format probed or --format) or memory:SIZE, with
 * the filters of --filter stacked on it (blkrep-filters(7); the first --filter outermost).
 */
import { Flags } from '@oclif/core';
import type { BlockNode } from '../api/block.js';
import { openImage, type ImageFormat, type OpenImageOptions } from '../block/open.js';
import { parseFilterSpec, stackFilters, type FilterSpec } from '../block/filters/spec.js';

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

/** --filter NAME:KEY=VALUE,... (repeatable, the first outermost): a filter over the image */
export const filterFlag = (description = 'stack a filter on the image (error, delay; see blkrep-filters(7)); repeatable, the first outermost') =>
  Flags.string({ description, helpValue: 'NAME:KEY=VALUE,...', multiple: true });

/** Parse every --filter value (ERR_BAD_FILTER naming the key, the value and what was expected). */
export function parseFilters(specs: readonly string[] | undefined): FilterSpec[] {
  return (specs ?? []).map(parseFilterSpec);
}

/**
 * Open an image for a command, with its filters: the specs are checked before anything is
 * opened; closing the node returned closes the image.
 */
export async function openImageWithFilters(spec: string, options: OpenImageOptions, filters?: readonly string[]): Promise<BlockNode> {
  const parsed = parseFilters(filters);
  const node = await openImage(spec, options);
  return stackFilters(node, parsed);
}

export async function openForCommand(spec: string, options: { readOnly: boolean; format?: string; filters?: readonly string[]; forceShare?: boolean }): Promise<BlockNode> {
  return openImageWithFilters(spec, { readOnly: options.readOnly, format: options.format as ImageFormat | undefined, ...(options.forceShare ? { forceShare: true } : {}) }, options.filters);
}
