import { Args, Flags } from '@oclif/core';
import { BlkrepCommand } from '../cli/base.js';
import { formatFlag } from '../cli/image.js';
import { createImage, parseCreateOptions, type CreateFormat, type CreateResult } from '../image/create.js';
import { parseSize, formatSize } from '../util/size.js';

export default class Create extends BlkrepCommand {
  static override summary = 'Create a raw or qcow2 image, optionally over a backing file.';

  static override description = `Creates IMAGE of SIZE bytes (suffixes K, M, G, T; rounded up to a multiple of 512). The format is qcow2 unless -f raw is given; a raw image is a sparse file. A qcow2 image may have a backing file (-b), which unallocated clusters read through; SIZE then defaults to the backing file's size. A relative backing name is stored as given and resolved against IMAGE's directory, as qemu-img does; its format is probed unless -F names it, and is stored in the image either way.

An existing IMAGE is never replaced silently. If it already has the parameters asked for (format, size, cluster size, refcount width, backing file and its format) the command succeeds without touching it and reports "changed": false, so running it again is harmless; otherwise it fails and names what differs. --force replaces any existing file. The new image is written under a temporary name and renamed into place, so a failure never leaves a half-made image.`;

  static override examples = [
    { description: 'A 10 GiB qcow2 image', command: '<%= config.bin %> <%= command.id %> disk.qcow2 10G' },
    { description: 'A sparse raw file', command: '<%= config.bin %> <%= command.id %> -f raw disk.img 10G' },
    { description: 'An overlay over a raw disk (the size is the backing file\'s)', command: '<%= config.bin %> <%= command.id %> -b disk.img -F raw active.qcow2' },
    { description: 'Small clusters, as JSON for a script', command: '<%= config.bin %> <%= command.id %> -o cluster_size=4K hidden.qcow2 1G --json | jq .changed' },
  ];

  static override args = {
    image: Args.string({ description: 'the image file to create', required: true }),
    size: Args.string({ description: 'virtual size (e.g. 10G); optional with a backing file' }),
  };

  static override flags = {
    format: formatFlag('the format of the new image [default: qcow2]'),
    backing: Flags.string({ char: 'b', description: 'backing file (qcow2 only): a path, relative to the image\'s directory, or an NBD URI', helpValue: 'BACKING' }),
    'backing-format': Flags.string({ char: 'F', description: 'the backing file\'s format (probed when not given)', options: ['raw', 'qcow2'], helpValue: 'FORMAT', dependsOn: ['backing'] }),
    options: Flags.string({ char: 'o', description: 'qcow2 options: cluster_size=SIZE (512 to 2M, default 64K), refcount_bits=N (1 to 64, default 16)', helpValue: 'KEY=VALUE[,...]', multiple: true, multipleNonGreedy: true }),
    force: Flags.boolean({ description: 'replace IMAGE if it exists, whatever it holds', default: false }),
  };

  async run(): Promise<CreateResult> {
    const { args, flags } = await this.parse(Create);
    let size: number | undefined;
    if (args.size !== undefined) {
      try {
        size = parseSize(args.size, 'size');
      } catch (err) {
        this.usageError((err as Error).message);
      }
    }
    const format = (flags.format ?? 'qcow2') as CreateFormat;
    const result = await createImage(args.image, {
      format,
      ...(size === undefined ? {} : { size }),
      ...(flags.backing === undefined ? {} : { backing: flags.backing }),
      ...(flags['backing-format'] === undefined ? {} : { backingFormat: flags['backing-format'] }),
      ...parseCreateOptions(flags.options ?? []),
      force: flags.force,
    });
    if (!this.jsonEnabled()) {
      const what = `${result.format}, ${formatSize(result['virtual-size'])} (${result['virtual-size']} bytes)${result['backing-filename'] ? `, backing file ${result['backing-filename']} (${result['backing-filename-format']})` : ''}`;
      this.log(result.changed ? `Created ${args.image}: ${what}.` : `${args.image} already exists as asked (${what}); left unchanged.`);
    }
    return result;
  }
}
