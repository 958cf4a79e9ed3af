import { Args, Flags } from '@oclif/core';
import { BlkrepCommand, EXIT_FAILURE, EXIT_USAGE } from '../cli/base.js';
import { filterFlag, forceShareFlag, openForCommand, parseFilters } from '../cli/image.js';
import { progressBar } from '../cli/progress.js';
import { compareImages, type CompareResult } from '../image/compare.js';

export default class Compare extends BlkrepCommand {
  static override summary = 'Compare the contents of two images.';

  static override description = `Exits 0 when the two images read the same, 1 when they differ (and prints the first differing byte offset), 2 on an error, as qemu-img compare does.
Ranges that both images report as zeros are skipped without reading. When the sizes differ, the longer image must read as zeros past the end of the shorter one, unless --strict, which makes a size mismatch alone a difference.`;

  static override examples = [
    { description: 'Check a replica against its source', command: '<%= config.bin %> <%= command.id %> disk.img /mnt/replica/disk.img' },
    { description: 'Compare through a filter: reads of the first image fail in its first MiB (see blkrep-filters(7))', command: '<%= config.bin %> <%= command.id %> a.img b.img --filter-a error:ops=read,range=0-1M' },
    { description: 'In a script', command: '<%= config.bin %> <%= command.id %> a.img b.qcow2 --json | jq .identical' },
  ];

  static override args = {
    a: Args.string({ description: 'the first image', required: true }),
    b: Args.string({ description: 'the second image', required: true }),
  };

  static override flags = {
    'format-a': Flags.string({ char: 'f', description: 'format of the first image (probed when not given)', options: ['raw', 'qcow2'], helpValue: 'FORMAT' }),
    'format-b': Flags.string({ char: 'F', description: 'format of the second image (probed when not given)', options: ['raw', 'qcow2'], helpValue: 'FORMAT' }),
    'filter-a': filterFlag('stack a filter on the first image (error, delay; see blkrep-filters(7)); repeatable, the first outermost'),
    'filter-b': filterFlag('stack a filter on the second image; repeatable, the first outermost'),
    'force-share': forceShareFlag(),
    strict: Flags.boolean({ char: 's', description: 'images of different sizes are different', default: false }),
    'no-progress': Flags.boolean({ description: 'no progress bar, even on a terminal', default: false }),
  };

  /** Like qemu-img compare: 1 means "different", so an error is 2. */
  protected override async catch(err: Error & { exitCode?: number; oclif?: { exit?: number } }): Promise<unknown> {
    try {
      return await super.catch(err);
    } finally {
      process.exitCode = EXIT_USAGE;
    }
  }

  async run(): Promise<CompareResult> {
    const { args, flags } = await this.parse(Compare);
    parseFilters(flags['filter-b']);
    const a = await openForCommand(args.a, { readOnly: true, format: flags['format-a'], filters: flags['filter-a'], forceShare: flags['force-share'] });
    let result: CompareResult;
    try {
      const b = await openForCommand(args.b, { readOnly: true, format: flags['format-b'], filters: flags['filter-b'], forceShare: flags['force-share'] });
      try {
        const bar = progressBar('compare', Math.max(a.size, b.size), { enabled: !this.jsonEnabled() && !flags['no-progress'] });
        try {
          result = await compareImages(a, b, { strict: flags.strict, onProgress: (d) => bar.update(d) });
        } finally {
          bar.stop();
        }
      } finally {
        await b.close();
      }
    } finally {
      await a.close();
    }
    if (!this.jsonEnabled()) {
      if (result.sizeA !== result.sizeB && !flags.strict) this.logToStderr(`Warning: image sizes differ (${result.sizeA} and ${result.sizeB} bytes)`);
      this.log(result.identical ? 'Images are identical.' : `Images differ: ${result.reason}.`);
    }
    if (!result.identical) process.exitCode = EXIT_FAILURE;
    return result;
  }
}
