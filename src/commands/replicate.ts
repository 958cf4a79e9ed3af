import { Args, Flags } from '@oclif/core';
import { JobCommand, jobFlags } from '../cli/job-command.js';
import { secondsFlag, sizeFlag } from '../cli/flags.js';
import { absolutePathsUri } from '../cli/socket-uri.js';
import type { PairStatus } from '../pair/role.js';
import { pairLine } from './status.js';

export default class Replicate extends JobCommand {
  static override summary = "Start replicating a running export to a secondary.";

  static override description = `Makes the export of the serve-nbd daemon behind --control the primary of a replication pair, as serve-nbd --replicate-to does at start: used after a failover to protect the new primary, for failback, or to replicate an export that was served alone. URI is the secondary's replica export (blkrep serve-nbd --secondary), or a plain NBD server (qemu-nbd, nbdkit: replicated without checkpoints); relative paths in it (socket=, tls-certificates=, tls-psk-file=) are taken from the current directory (the daemon is sent absolute ones).

The daemon first copies what the secondary misses (the regions in the peer bitmap IMAGE.pair.dirty, or the whole disk the first time) while the export keeps serving, then forwards every write (--protocol sync: a write completes when both disks have it; async: after the local write, in order through a --queue of that many bytes; a write that does not fit waits for room with --on-congestion block, the default, as DRBD's, or replication degrades and resyncs later with pull-ahead; both flags are refused with --protocol sync). Returns once replication is set up (the copy may still run: follow blkrep events for resync-done and replication-connected); prints the pair's status (--json: the PairStatus object, as blkrep status --json shows under exports[i].pair).

Exit status: 0 replicating (or connecting: an unreachable secondary is retried with backoff); 1 failure (ERR_BAD_URI, ERR_PAIR_SIZE: the disks differ in size, ERR_PAIR_STATE: the export is in a pair already, ERR_PAIR_ROLE: the disk is a secondary's, ERR_IMAGE_LOCKED: another process has the raw disk open for writing (a pair's disk is written only through the pair: see IMAGE LOCKS in blkrep(1)), the secondary's refusal code such as ERR_PAIR_BUSY or ERR_PAIR_SPLIT_BRAIN, ERR_NO_EXPORT, ERR_CONTROL_UNREACHABLE), 2 usage error.`;

  static override examples = [
    { description: 'After a failover, protect the new primary with the repaired old one', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock nbd://old-primary:10809/disk' },
    { description: 'Replicate export "db" asynchronously to a qemu-nbd on a Unix socket', command: "<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --export db --protocol async 'nbd+unix:///?socket=/run/qemu-nbd.sock'" },
  ];

  static override args = {
    uri: Args.string({ description: "the secondary's replica export (an NBD URI)", required: true }),
  };

  static override flags = {
    ...jobFlags,
    export: Flags.string({ char: 'e', description: 'the export (may be left out when the daemon serves one)', helpValue: 'NAME' }),
    protocol: Flags.string({ description: 'sync: a write completes when both disks have it; async: after the local write', options: ['sync', 'async'], default: 'sync', helpValue: 'sync|async' }),
    queue: sizeFlag({ description: 'with --protocol async: memory of the writes waiting to be forwarded (payloads and 512 bytes each) [default: 8M]', helpValue: 'SIZE' }),
    'on-congestion': Flags.string({ description: "with --protocol async, a write that does not fit in the queue: block (default, DRBD's: it waits for room) or pull-ahead (replication degrades, a resync follows)", options: ['block', 'pull-ahead'], helpValue: 'block|pull-ahead' }),
    'congestion-timeout': secondsFlag({ description: 'with --on-congestion block: a waiting write lets the secondary reply to nothing for this many seconds before replication degrades [default: 10]', helpValue: 'SECONDS' }),
  };

  async run(): Promise<PairStatus> {
    const { args, flags } = await this.parse(Replicate);
    const uri = absolutePathsUri(args.uri);
    const congestionFlag = flags['on-congestion'] !== undefined ? `--on-congestion ${flags['on-congestion']}` : flags['congestion-timeout'] !== undefined ? '--congestion-timeout' : undefined;
    if (congestionFlag && flags.protocol === 'sync') this.usageError(`${congestionFlag} needs --protocol async: a sync primary has no queue (every write waits for the secondary)`);
    if (flags['congestion-timeout'] !== undefined && flags['on-congestion'] === 'pull-ahead') this.usageError('--congestion-timeout is for --on-congestion block: pull-ahead never waits');
    if (flags['congestion-timeout'] !== undefined && flags['congestion-timeout'] < 0.1) this.usageError(`--congestion-timeout ${flags['congestion-timeout']} is below 0.1 seconds`);
    const status = await this.request<PairStatus>(
      flags.control,
      'replicate',
      { uri, protocol: flags.protocol, ...(flags.export === undefined ? {} : { export: flags.export }), ...(flags.queue === undefined ? {} : { queue: flags.queue }),
        ...(flags['on-congestion'] === undefined ? {} : { onCongestion: flags['on-congestion'] }),
        ...(flags['congestion-timeout'] === undefined ? {} : { congestionTimeout: Math.round(flags['congestion-timeout'] * 1000) }),
      },
      flags.timeout,
    );
    if (!this.jsonEnabled()) this.log(`Replicating: ${pairLine(status)}`);
    return status;
  }
}
