import { Args, Flags } from '@oclif/core';
import { BlkrepCommand } from '../cli/base.js';
import { progressBar } from '../cli/progress.js';
import { makeEmpty, type MakeEmptyResult } from '../image/make-empty.js';
import { formatSize } from '../util/size.js';

export default class MakeEmpty extends BlkrepCommand {
  static override summary = 'Drop every cluster of qcow2 overlays, so reads fall through to their backing files.';

  static override description = `Makes each IMAGE empty: every cluster becomes unallocated (not zero: reads fall through to the backing file again), and the space its clusters held is given back. Size, backing file and header extensions stay. Images are emptied in the order given: the secondary drops its disk buffers with make-empty active.qcow2 hidden.qcow2. Every image is opened and checked before the first is changed, so a wrong argument changes nothing.
An image with nothing allocated is left alone and reported with "changed": false. An image without a backing file reads as zeros afterwards.
An image that holds data and has no backing file would lose that data: on a terminal make-empty asks first; elsewhere (scripts, cron) it refuses with ERR_NOT_CONFIRMED unless --force. Nothing is changed when it refuses.
Only qcow2 images can be emptied: a raw image has no allocation map and no backing file to fall through to, so emptying it would only destroy its data; it is refused.`;

  static override examples = [
    { description: 'Drop the secondary\'s buffers at a checkpoint', command: '<%= config.bin %> <%= command.id %> active.qcow2 hidden.qcow2' },
    { description: 'Empty a qcow2 image that has no backing file (it reads as zeros afterwards)', command: '<%= config.bin %> <%= command.id %> scratch.qcow2 --force' },
    { description: 'As JSON, for a script', command: "<%= config.bin %> <%= command.id %> active.qcow2 --json | jq '.images[].freedBytes'" },
  ];

  static override strict = false;

  static override args = {
    image: Args.string({ description: 'the qcow2 images to empty, in order', required: true }),
  };

  static override flags = {
    'no-progress': Flags.boolean({ description: 'no progress bar, even on a terminal', default: false }),
    force: Flags.boolean({ description: 'empty images that have no backing file without asking (their data is lost)', default: false }),
  };

  async run(): Promise<MakeEmptyResult> {
    const { argv, flags } = await this.parse(MakeEmpty);
    const images = argv as string[];
    const bar = progressBar('make-empty', images.length, { enabled: !this.jsonEnabled() && !flags['no-progress'] && images.length > 1 });
    let result: MakeEmptyResult;
    try {
      result = await makeEmpty(images, {
        onProgress: (done) => bar.update(done),
        confirmDestroy: async (destroyed) => {
          if (flags.force) return true;
          if (!process.stdin.isTTY || !process.stderr.isTTY || this.jsonEnabled()) return false;
          const { confirm } = await import('@inquirer/prompts');
          return confirm({ message: `${destroyed.join(', ')} ${destroyed.length === 1 ? 'has' : 'have'} no backing file: emptying destroys the data. Empty anyway?`, default: false }, { output: process.stderr });
        },
      });
    } finally {
      bar.stop();
    }
    if (!this.jsonEnabled()) {
      for (const m of result.images) {
        const target = m.backingFilename === null ? 'it has no backing file, so it reads as zeros' : `reads fall through to ${m.backingFilename}`;
        this.log(m.changed ? `${m.filename}: emptied (${formatSize(m.freedBytes)} of disk given back); ${target}.` : `${m.filename}: already empty; left unchanged.`);
      }
    }
    return result;
  }
}
