import { Flags } from '@oclif/core';
import { controlFlag, JobCommand } from '../cli/job-command.js';
import type { FailoverResult } from '../pair/role.js';
import { formatSize } from '../util/size.js';

export default class Failover extends JobCommand {
  static override summary = 'Fail over a replication pair: promote the secondary, or tell the primary its secondary is gone.';

  static override description = `On a secondary (serve-nbd --secondary), promotes it: the primary's pair link is closed (it is told to demote) and the replica export removed, so the old primary can no longer write; the view is committed into the disk (the hidden disk's clusters, then the active disk's on top), flushed, the overlays emptied; a new generation is recorded (the pair state's role becomes primary) and a failback bitmap "failback" is started with every cluster the hidden and active disks held; the disk is then served read-write under the replica export's name. The view export is removed (its data is in the disk now). A primary still connected is told to demote, which means it stops forwarding: without --heartbeat it keeps serving its clients read-write (it tracks their writes; the two disks are then written apart, a split brain when it connects again, see --after-split-brain in blkrep-serve-nbd(1)), so stop it or its clients first; with --heartbeat it hears the new primary's term and fails every write (event demoted).
--to checkpoint (the default) fails over to the last committed checkpoint plus the secondary's own writes. --to latest keeps what the primary last wrote (the hidden disk is dropped): only when the primary replicated with --protocol sync and no resync was running. An Outdated secondary (its primary degraded since the last checkpoint), or one a resync was copying into, fails over only with --force (to the checkpoint exactly: the hidden disk kept it).
If a step fails (the disk cannot be written, say) the failover stops there: the event failover-failed names the step, the old primary stays refused, the view export is served again (reads show the checkpoint; its writes go to the active disk and are committed later); the intent is recorded in the pair state, so a daemon restart keeps refusing primaries. Fix the cause and run failover --retry: it finishes the failover with the target it recorded (redoing the commit is idempotent: the overlays are emptied only once the commit is flushed and recorded).
--dry-run changes nothing and explains what would happen: the rule, the direction, the bytes committed, the bytes of the primary's writes after the checkpoint that would be dropped (text, or JSON with --json).
On a primary, failover means "the secondary is gone": forwarding stops, the export keeps being served and its writes are tracked for the resync.
Exit status: 0 done (or the dry run's explanation); 1 failure (ERR_PAIR_OUTDATED: Outdated, or a resync was copying into the disk, without --force; ERR_PAIR_INCONSISTENT: Inconsistent with no checkpoint to roll back to, never promoted; ERR_PAIR_STATE: --to latest not safe, or a Failed disk; ERR_PAIR_FAILOVER_FAILED: a step failed, see --retry; ERR_PAIR_STATE also: --retry with no failover half done, or a different --to while one is; ERR_PAIR_ROLE: not in a pair, or promoted already; ERR_CONTROL_UNREACHABLE: no daemon); 2 usage error.`;

  static override examples = [
    { description: 'See what a failover would do', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --dry-run' },
    { description: 'Promote the secondary to its last checkpoint', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock' },
    { description: 'Promote keeping every write a sync primary acknowledged', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --to latest' },
    { description: 'Finish a failover that failed halfway (failover-failed) once its cause is fixed', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --retry' },
    { description: 'From a script: the new generation', command: "<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --json | jq -r .gi.current" },
  ];

  static override flags = {
    control: controlFlag,
    export: Flags.string({ char: 'e', description: 'the paired export (when the daemon has several)', helpValue: 'NAME' }),
    to: Flags.string({ description: 'checkpoint: the last committed checkpoint; latest: what a sync primary last wrote', options: ['checkpoint', 'latest'], default: 'checkpoint' }),
    'dry-run': Flags.boolean({ description: 'change nothing; explain what would happen', default: false }),
    force: Flags.boolean({ description: 'fail over an Outdated secondary (its primary degraded since the last checkpoint), or one a resync was copying into, to the checkpoint', default: false }),
    retry: Flags.boolean({ description: 'finish a failover that failed halfway, with the target it recorded', default: false }),
    timeout: Flags.integer({ description: 'give up on the daemon after this many seconds', default: 60, min: 1, helpValue: 'SECONDS' }),
  };

  async run(): Promise<FailoverResult> {
    const { flags } = await this.parse(Failover);
    const r = await this.request<FailoverResult>(
      flags.control,
      'failover',
      { ...(flags.export === undefined ? {} : { export: flags.export }), to: flags.to, dryRun: flags['dry-run'], force: flags.force, ...(flags.retry ? { retry: true } : {}) },
      flags.timeout,
    );
    if (!this.jsonEnabled()) {
      if (r.dryRun) {
        this.log(`Dry run (${String(r.rule ?? 'failover')}): ${r.explanation}`);
        this.log(`  would commit ${formatSize(r.bytes)}; direction: ${String(r.direction ?? 'this node becomes the primary')}`);
      } else {
        this.log(`Failed over to ${r.to === 'latest' ? 'the latest write' : `checkpoint ${r.epoch}`} in ${r.ms} ms: ${formatSize(r.bytes)} committed; this node is the ${r.role} now (generation ${r.gi.current}).`);
      }
    }
    return r;
  }
}
