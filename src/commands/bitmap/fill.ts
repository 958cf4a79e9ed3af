import { Flags } from '@oclif/core';
import { BlkrepError } from '../../api/errors.js';
import { BitmapCommand, forceFlag, nameFlag, storeFlags, targetArg } from '../../cli/bitmap-command.js';
import type { BitmapChange } from '../../bitmap/ops.js';
import { allocationRuns, parseRange, rangesFromJsonFile } from '../../bitmap/ranges.js';
import type { Run } from '../../bitmap/dirty-bitmap.js';

export default class BitmapFill extends BitmapCommand {
  static override summary = 'Mark regions of a dirty bitmap dirty.';

  static override description = `Sets the bits of bitmap NAME for some regions, so that the next copy includes them, whether the bitmap is enabled or not. Every granule a region touches becomes dirty. Exactly one of:

--range OFFSET:LENGTH (repeatable; sizes take suffixes) dirties those ranges.

--all dirties the whole disk (the next copy is a full one).

--from-allocation IMAGE dirties what IMAGE allocates (for a raw image, everything but its holes); with --base BASE, only what the layers of IMAGE's backing chain above BASE allocate (zero clusters count: they hide what is below them). This is the blockdev-dirty-fill of the 2012 live-mirroring proposal: after a snapshot, what changed since BASE. IMAGE must have the bitmap's size.

--from-json FILE (or - for stdin) dirties the ranges of a JSON map: nbdinfo --map --json output, entries {offset, length, type, description}, all except those whose description has the word "clean", "hole" or "unallocated" (so "data", "dirty", "zero", and entries without a description, are dirtied: when in doubt, dirty); or qemu-img map --output=json output, entries {start, length, data, ...}, those with "data": true.

Filling regions that are dirty already succeeds and changes nothing ("changed": false).`;

  static override examples = [
    { description: 'Dirty the first MiB and a range at 1 GiB', command: '<%= config.bin %> <%= command.id %> disk.img --name b0 --range 0:1M --range 1G:64K' },
    { description: 'The replica is lost: copy everything next time', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --name b0 --all' },
    { description: 'Dirty what an overlay holds above its base', command: '<%= config.bin %> <%= command.id %> base.img.b0.bitmap --from-allocation top.qcow2 --base base.img' },
    { description: 'Dirty what another server reports as dirty', command: "nbdinfo --map=qemu:dirty-bitmap:b0 --json 'nbd+unix:///?socket=/run/qemu.sock' | <%= config.bin %> <%= command.id %> disk.img --name b0 --from-json -" },
  ];

  static override args = { target: targetArg };

  static override flags = {
    ...storeFlags,
    name: nameFlag(),
    range: Flags.string({ charAliases: ['r'], description: 'dirty OFFSET:LENGTH (sizes take suffixes: 1G:64K)', helpValue: 'OFFSET:LENGTH', multiple: true, multipleNonGreedy: true }),
    all: Flags.boolean({ description: 'dirty the whole disk', default: false }),
    'from-allocation': Flags.string({ description: 'dirty what IMAGE allocates (above --base)', helpValue: 'IMAGE' }),
    base: Flags.string({ description: 'with --from-allocation: only what lies above BASE in the backing chain', helpValue: 'BASE', dependsOn: ['from-allocation'] }),
    'from-json': Flags.string({ description: 'dirty the ranges of a map printed by nbdinfo --map --json or qemu-img map --output=json (- for stdin)', helpValue: 'FILE' }),
    force: forceFlag,
  };

  async run(): Promise<BitmapChange> {
    const { args, flags } = await this.parse(BitmapFill);
    const modes = [flags.range !== undefined, flags.all, flags['from-allocation'] !== undefined, flags['from-json'] !== undefined].filter(Boolean).length;
    if (modes !== 1) this.usageError('give exactly one of --range, --all, --from-allocation and --from-json');
    const ranges = flags.range?.map(parseRange);
    return this.withStore(args.target, flags, async (store) => {
      const name = await store.resolve(flags.name);
      let what: { ranges?: Run[]; all?: boolean };
      if (flags.all) what = { all: true };
      else if (ranges) what = { ranges };
      else if (flags['from-json'] !== undefined) what = { ranges: await rangesFromJsonFile(flags['from-json']) };
      else {
        const info = (await store.list()).find((b) => b.name === name);
        const alloc = await allocationRuns(flags['from-allocation']!, flags.base);
        if (info && info.size !== alloc.size) {
          throw new BlkrepError('ERR_BITMAP_SIZE_MISMATCH', `${flags['from-allocation']} is ${alloc.size} bytes, bitmap "${name}" covers ${info.size}`, {
            errno: 'EINVAL',
            details: { size: info.size, imageSize: alloc.size },
          });
        }
        what = { ranges: alloc.runs };
      }
      const change = await store.fill(name, what);
      this.report(change, store, 'Filled', 'Already dirty there');
      return change;
    });
  }
}
