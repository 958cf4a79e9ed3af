import { idArg, JOB_EXIT_CODES, JobCommand, jobFlags, type JobQuery } from '../../cli/job-command.js';

export default class JobPause extends JobCommand {
  static override summary = 'Pause a job of a running serve-nbd daemon.';

  static override description = `Asks the job to pause and returns once it has: the operations in flight finished, nothing new is started (a paused mirror still records the export's writes, so nothing is lost). A job can be paused when it is created, running or ready; blkrep job resume continues it.
${JOB_EXIT_CODES}`;

  static override examples = [{ description: 'Pause job mirror0', command: '<%= config.bin %> <%= command.id %> mirror0 --control /run/blkrep/ctl.sock' }];

  static override args = { id: idArg };
  static override flags = { ...jobFlags };

  async run(): Promise<JobQuery> {
    const { args, flags } = await this.parse(JobPause);
    const q = await this.request<JobQuery>(flags.control, 'job-pause', { id: args.id }, flags.timeout);
    if (!this.jsonEnabled()) this.log(`Job ${q.id} is ${q.status}.`);
    return q;
  }
}
