import { Args, Flags } from '@oclif/core';
import { BlkrepCommand } from '../cli/base.js';
import { filterFlag, forceShareFlag, formatFlag, openForCommand } from '../cli/image.js';
import { sizeFlag } from '../cli/flags.js';
import { progressBar } from '../cli/progress.js';
import { mapImage, type MapEntry } from '../image/map.js';

export default class MapCommand extends BlkrepCommand {
  static override summary = 'Show which parts of an image hold data, zeros or nothing.';

  static override description = `Prints the image's extents: for each run, its offset and length, the layer of the backing chain that holds it (depth 0 is the top image), and whether it reads as zeros or holds data.
With --json, the runs are printed in the shape of qemu-img map --output=json: start, length, depth, present, zero, data.`;

  static override examples = [
    { description: 'Where a sparse disk holds data', command: '<%= config.bin %> <%= command.id %> disk.img' },
    { description: 'The same as JSON, for a script', command: "<%= config.bin %> <%= command.id %> disk.img --json | jq '[.[] | select(.data)] | length'" },
    { description: 'How a tool copes when block status fails (see blkrep-filters(7))', command: '<%= config.bin %> <%= command.id %> disk.img --filter error:ops=block-status' },
    { description: 'Only the first gigabyte', command: '<%= config.bin %> <%= command.id %> disk.img --start 0 --length 1G' },
  ];

  static override args = {
    image: Args.string({ description: 'the image (a path, or memory:SIZE)', required: true }),
  };

  static override flags = {
    format: formatFlag(),
    filter: filterFlag(),
    'force-share': forceShareFlag(),
    start: sizeFlag({ description: 'map from this offset', helpValue: 'OFFSET' }),
    length: sizeFlag({ description: 'map this many bytes', helpValue: 'LENGTH' }),
    'no-progress': Flags.boolean({ description: 'no progress bar, even on a terminal', default: false }),
  };

  async run(): Promise<MapEntry[]> {
    const { args, flags } = await this.parse(MapCommand);
    const node = await openForCommand(args.image, { readOnly: true, format: flags.format, filters: flags.filter, forceShare: flags['force-share'] });
    let entries: MapEntry[];
    try {
      if (flags.start !== undefined && flags.start > node.size) this.usageError(`--start ${flags.start} is beyond the end of the image (size ${node.size})`);
      const bar = progressBar('map', node.size, { enabled: !this.jsonEnabled() && !flags['no-progress'] });
      try {
        entries = await mapImage(node, { start: flags.start, length: flags.length, onProgress: (d) => bar.update(d) });
      } finally {
        bar.stop();
      }
    } finally {
      await node.close();
    }
    if (!this.jsonEnabled()) {
      const w = Math.max(...entries.map((e) => String(e.start + e.length).length), 6);
      this.log(`${'Offset'.padStart(w)}  ${'Length'.padStart(w)}  Depth  Contents`);
      for (const e of entries) {
        const what = e.data ? 'data' : e.zero ? (e.present ? 'zero' : 'zero, unallocated') : 'unallocated';
        this.log(`${String(e.start).padStart(w)}  ${String(e.length).padStart(w)}  ${String(e.depth).padStart(5)}  ${what}`);
      }
    }
    return entries;
  }
}
