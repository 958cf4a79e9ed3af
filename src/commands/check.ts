import { open } from 'node:fs/promises';
import { Args, Flags } from '@oclif/core';
import { BlkrepError } from '../api/errors.js';
import { BlkrepCommand, errorCode, EXIT_FAILURE } from '../cli/base.js';
import { forceShareFlag } from '../cli/image.js';
import { probeFormat, PROBE_BYTES } from '../block/open.js';
import type { CheckReport } from '../block/qcow2/check.js';

/** qemu-img check's exit code for an image format that has no consistency checks */
const EXIT_NOT_SUPPORTED = 63;

export default class Check extends BlkrepCommand {
  static override summary = 'Check a qcow2 image for leaked clusters and corruptions, and repair it.';

  static override description = `Does what qemu-img check does for qcow2: counts every reference the metadata makes (header, L1 and L2 tables, data and compressed clusters, snapshot tables, refcount table and blocks, bitmap directory and tables), compares the counts with the refcounts on disk and checks the COPIED flags.
A leaked cluster (refcount higher than its references: space lost after a crash, no harm to data) is printed "Leaked cluster N refcount=R reference=F"; a corruption (refcount lower than its references, a reference past the end of the file, a misaligned table) "ERROR ...". The summary on stdout is qemu-img check's: "No errors were found on the image.", the counts, the allocated/fragmented/compressed clusters and the image end offset; --json prints qemu-img check --output=json's object (corruptions and leaks only when not 0).
--repair leaks lowers the refcounts of leaked clusters (nothing points at them, so a crash at any point leaves at most a leak); --repair all also raises refcounts that are too low, fixes COPIED flags and, when a used cluster has a refcount of 0 or a refcount block is unusable, writes a new refcount structure at the end of the file and switches the header to it with one synced write, as qemu-img check -r all does. A repair then checks the image again and reports that second check; it clears the dirty and corrupt bits when no corruption is left.
The image is locked as QEMU locks it: a check is refused while another program (qemu-nbd, qemu-io, a blkrep serve-nbd) holds it for writing, unless -U/--force-share (a check of an image in use may then report leaks and errors that are only writes in progress); a repair needs the image to itself.`;

  static override examples = [
    { description: 'Check an image', command: '<%= config.bin %> <%= command.id %> disk.qcow2' },
    { description: 'Free the clusters leaked by a crash', command: '<%= config.bin %> <%= command.id %> --repair leaks disk.qcow2' },
    { description: 'Check an image qemu-nbd or blkrep serve-nbd is serving (what is in flight may show as leaks)', command: '<%= config.bin %> <%= command.id %> -U disk.qcow2' },
    { description: 'In a script: the number of leaked clusters', command: "<%= config.bin %> <%= command.id %> disk.qcow2 --json | jq '.leaks // 0'" },
  ];

  static override args = {
    image: Args.string({ description: 'the qcow2 image file', required: true }),
  };

  static override flags = {
    repair: Flags.string({ char: 'r', description: 'repair: leaks (free leaked clusters) or all (leaks and corruptions)', options: ['leaks', 'all'], helpValue: 'leaks|all' }),
    'force-share': forceShareFlag(),
  };

  /** qemu-img check: 2 and 3 report what was found, so every error is 1 ("check not completed"). */
  protected override async catch(err: Error & { exitCode?: number; oclif?: { exit?: number } }): Promise<unknown> {
    const unsupported = err instanceof BlkrepError && err.code === 'ERR_CHECK_UNSUPPORTED';
    if (errorCode(err) === 'ERR_USAGE' && !this.jsonEnabled()) {
      this.logToStderr(`blkrep: ${err.message}`);
      process.exitCode = EXIT_FAILURE;
      return undefined;
    }
    try {
      return await super.catch(err);
    } finally {
      process.exitCode = unsupported ? EXIT_NOT_SUPPORTED : EXIT_FAILURE;
    }
  }

  async run(): Promise<CheckReport & { messages: string[] }> {
    const { args, flags } = await this.parse(Check);
    const head = await readHead(args.image);
    if (probeFormat(head) !== 'qcow2') {
      throw new BlkrepError('ERR_CHECK_UNSUPPORTED', `"${args.image}" is not a qcow2 image: this image format does not support checks`, { errno: 'ENOTSUP', details: { path: args.image } });
    }
    const { checkQcow2, formatCheck } = await import('../block/qcow2/check.js');
    if (flags['force-share'] && flags.repair !== undefined) this.usageError('--force-share cannot be used with --repair: a repair writes the image, which nobody else may hold');
    const result = await checkQcow2(args.image, {
      ...(flags.repair === undefined ? {} : { repair: flags.repair as 'leaks' | 'all' }),
      ...(flags['force-share'] ? { forceShare: true } : {}),
    });
    // the per-cluster lines go to stderr, as qemu-img check prints them
    for (const m of result.messages) process.stderr.write(`${m}\n`);
    if (!this.jsonEnabled()) this.log(formatCheck(result));
    process.exitCode = result.exitCode;
    return { ...result.report, messages: result.messages };
  }
}

/** The first bytes of the file, to tell a qcow2 image from anything else. */
async function readHead(path: string): Promise<Buffer> {
  const h = await open(path, 'r').catch((err: NodeJS.ErrnoException) => {
    throw new BlkrepError('ERR_OPEN', `cannot open "${path}": ${err.message}`, { errno: 'EIO', cause: err, details: { path, syscode: err.code } });
  });
  try {
    const b = Buffer.alloc(PROBE_BYTES);
    const { bytesRead } = await h.read(b, 0, b.length, 0);
    return b.subarray(0, bytesRead);
  } finally {
    await h.close();
  }
}
