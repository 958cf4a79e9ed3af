import { withSpinner } from '../cli/spinner.js';
import { Flags } from '@oclif/core';
import { JobCommand, jobFlags } from '../cli/job-command.js';

export interface CheckpointResult {
  export: string;
  epoch: number;
}

export default class Checkpoint extends JobCommand {
  static override summary = 'Take one checkpoint of a replication pair, from its primary.';

  static override description = `Asks the primary daemon behind --control for one checkpoint of the export's pair: new writes are cut (sync: held for the checkpoint's time; async: queued), every write before the cut is forwarded and replied, both disks are flushed, the secondary empties its hidden and active overlays, and both record the new epoch durably. Prints the epoch (--json: {"export", "epoch"}). At most one checkpoint runs at a time; one asked for meanwhile gets the same epoch. serve-nbd --checkpoint-interval takes them periodically.

A primary replicating to a plain NBD server (qemu-nbd, nbdkit) has no checkpoints: ERR_PAIR_NO_CHECKPOINT. With the link down (degraded, resyncing): ERR_PAIR_LINK_DOWN. No answer from the secondary within 5 s: the checkpoint is aborted (epoch unchanged), ERR_PAIR_TIMEOUT.

Exit status: 0 the checkpoint is committed on both; 1 failure (ERR_PAIR_NO_CHECKPOINT, ERR_PAIR_LINK_DOWN, ERR_PAIR_TIMEOUT, ERR_PAIR_STATE: the secondary refused it (its disk Failed, a failover of it half done, or it holds this number from another request: the next checkpoint is numbered after its epoch), ERR_PAIR_ROLE: the export is in no pair or is a secondary (only a secondary started with --accept-plain-primary, with no blkrep primary on its pair link, takes its own), ERR_NO_EXPORT, ERR_CONTROL_UNREACHABLE), 2 usage error.`;

  static override examples = [
    { description: 'Take a checkpoint of the only export of the primary', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock' },
    { description: 'Checkpoint export "db" before a backup on the secondary, and keep the epoch', command: 'epoch=$(<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --export db --json | jq .epoch)' },
  ];

  static override flags = {
    ...jobFlags,
    export: Flags.string({ char: 'e', description: 'the export (may be left out when the daemon serves one)', helpValue: 'NAME' }),
  };

  async run(): Promise<CheckpointResult> {
    const { flags } = await this.parse(Checkpoint);
    const r = await withSpinner('checkpoint: committing…', { enabled: !this.jsonEnabled() }, () => this.request<CheckpointResult>(flags.control, 'checkpoint', flags.export === undefined ? {} : { export: flags.export }, flags.timeout));
    if (!this.jsonEnabled()) this.log(`Checkpoint ${r.epoch} of export "${r.export}" committed.`);
    return r;
  }
}
