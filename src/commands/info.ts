import { Args, Flags } from '@oclif/core';
import { BlkrepCommand } from '../cli/base.js';
import { forceShareFlag, formatFlag } from '../cli/image.js';
import { writeStderr } from '../cli/stdio.js';
import { imageInfo, type ImageInfo } from '../image/info.js';
import { formatSize } from '../util/size.js';

export default class Info extends BlkrepCommand {
  static override summary = 'Show what an image is: format, sizes, backing chain, flags.';

  static override description = `Prints the image's format, virtual size, disk usage (the bytes its file occupies), backing chain (each layer's file and format), and for qcow2 the cluster size, refcount width and the dirty and corrupt flags.
With --json the result is shaped like qemu-img info --output=json: virtual-size, filename, format, actual-size, cluster-size, backing-filename, full-backing-filename, backing-filename-format, dirty-flag and format-specific; blkrep adds backing-chain, the layers below the image. With --backing-chain every layer is printed, and the JSON is an array, top first.
An NBD export (nbd://, nbd+unix://) is shown as qemu-img shows one: format raw, no disk usage. Backing files are not needed to show an image; a missing one is a warning (an error with --backing-chain).`;

  static override examples = [
    { description: 'An overlay and the chain below it', command: '<%= config.bin %> <%= command.id %> active.qcow2' },
    { description: 'Every layer, as JSON', command: "<%= config.bin %> <%= command.id %> active.qcow2 --backing-chain --json | jq '.[].filename'" },
    { description: 'An NBD export', command: "<%= config.bin %> <%= command.id %> 'nbd+unix:///?socket=/run/blkrep.sock'" },
    { description: 'An image a running QEMU or serve-nbd is writing (as qemu-img info -U)', command: '<%= config.bin %> <%= command.id %> -U vm.qcow2' },
  ];

  static override args = {
    image: Args.string({ description: 'the image (a path or an NBD URI)', required: true }),
  };

  static override flags = {
    format: formatFlag(),
    'backing-chain': Flags.boolean({ description: 'show every layer of the backing chain', default: false }),
    'force-share': forceShareFlag(),
  };

  async run(): Promise<ImageInfo | ImageInfo[]> {
    const { args, flags } = await this.parse(Info);
    const result = await imageInfo(args.image, {
      backingChain: flags['backing-chain'],
      forceShare: flags['force-share'],
      ...(flags.format === undefined ? {} : { format: flags.format }),
      // on stderr even with --json (oclif silences logToStderr then)
      onWarning: (m) => writeStderr(`blkrep: warning: ${m}\n`),
    });
    if (!this.jsonEnabled()) {
      const layers = Array.isArray(result) ? result : [result];
      this.log(layers.map((l) => describe(l)).join('\n\n'));
    }
    return result;
  }
}

function describe(i: ImageInfo): string {
  const lines = [`image: ${i.filename}`, `file format: ${i.format}`, `virtual size: ${formatSize(i['virtual-size'])} (${i['virtual-size']} bytes)`];
  lines.push(`disk size: ${i['actual-size'] === undefined ? 'unavailable' : formatSize(i['actual-size'])}`);
  if (i['cluster-size'] !== undefined) lines.push(`cluster_size: ${i['cluster-size']}`);
  if (i['backing-filename'] !== undefined) {
    const full = i['full-backing-filename'];
    lines.push(`backing file: ${i['backing-filename']}${full !== undefined && full !== i['backing-filename'] ? ` (actual path: ${full})` : ''}`);
    if (i['backing-filename-format'] !== undefined) lines.push(`backing file format: ${i['backing-filename-format']}`);
  }
  if (i['backing-chain'] !== undefined) lines.push(`backing chain: ${[i, ...i['backing-chain']].map((l) => `${l.filename} (${l.format})`).join(' -> ')}`);
  const d = i['format-specific']?.data;
  if (d) {
    lines.push(`dirty flag: ${i['dirty-flag'] ? 'yes' : 'no'}`);
    lines.push('Format specific information:');
    lines.push(`    compat: ${d.compat}`);
    lines.push(`    compression type: ${d['compression-type']}`);
    lines.push(`    lazy refcounts: ${d['lazy-refcounts']}`);
    lines.push(`    refcount bits: ${d['refcount-bits']}`);
    lines.push(`    corrupt: ${d.corrupt}`);
    lines.push(`    extended l2: ${d['extended-l2']}`);
    if (d.bitmaps) lines.push(`    bitmaps: ${d.bitmaps.map((b) => `${b.name} (granularity ${b.granularity}${b.flags.length ? `, ${b.flags.join(', ')}` : ''})`).join('; ')}`);
  }
  if (i.snapshots) lines.push(`snapshots: ${i.snapshots.map((s) => `${s.id} ${s.name}`).join('; ')}`);
  return lines.join('\n');
}
