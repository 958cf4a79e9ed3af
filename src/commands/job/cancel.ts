import { Flags } from '@oclif/core';
import { withSpinner } from '../../cli/spinner.js';
import { idArg, JOB_EXIT_CODES, JobCommand, jobFlags, type JobQuery } from '../../cli/job-command.js';

export default class JobCancel extends JobCommand {
  static override summary = 'Cancel a job of a running serve-nbd daemon.';

  static override description = `Before the job is ready (or with --force), the job stops at once: what it wrote to its target is not a usable copy. A ready mirror cancelled without --force first brings its target to a consistent copy of the export as of the cancel, then ends; the export stays on its image either way. Returns once the job has concluded; its state file and dirty bitmap are removed.
${JOB_EXIT_CODES}`;

  static override examples = [
    { description: 'Cancel job mirror0 (a ready mirror leaves a consistent copy)', command: '<%= config.bin %> <%= command.id %> mirror0 --control /run/blkrep/ctl.sock' },
    { description: 'Stop at once whatever state the target is in', command: '<%= config.bin %> <%= command.id %> mirror0 --force --control /run/blkrep/ctl.sock' },
  ];

  static override args = { id: idArg };
  static override flags = {
    ...jobFlags,
    force: Flags.boolean({ description: 'stop at once, even a ready mirror (its target is then not a usable copy)', default: false }),
    timeout: Flags.integer({ description: 'give up waiting after this many seconds (the cancel goes on)', default: 300, min: 1, helpValue: 'SECONDS' }),
  };

  async run(): Promise<JobQuery> {
    const { args, flags } = await this.parse(JobCancel);
    const q = await withSpinner(`job ${args.id}: cancelling…`, { enabled: !this.jsonEnabled() }, () => this.request<JobQuery>(flags.control, 'job-cancel', { id: args.id, force: flags.force }, flags.timeout));
    if (!this.jsonEnabled()) this.log(`Job ${q.id} cancelled.`);
    return q;
  }
}
