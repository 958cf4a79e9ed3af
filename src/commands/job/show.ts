import { idArg, JOB_EXIT_CODES, JobCommand, jobDetails, jobFlags, type JobQuery } from '../../cli/job-command.js';

export default class JobShow extends JobCommand {
  static override summary = 'Show one job of a running serve-nbd daemon: status, progress, rate, ETA.';

  static override description = `Prints the job's status, bytes done of bytes to do, the rate over the last seconds and the time left at that rate, its speed limit and io-status, then what its type adds (a mirror: sync, copy mode, granularity, dirty bytes ...). With --json, the query object as the daemon answers job-query.
A job that concluded a short while ago is still shown (status concluded).
${JOB_EXIT_CODES}`;

  static override examples = [
    { description: 'Show job mirror0', command: '<%= config.bin %> <%= command.id %> mirror0 --control /run/blkrep/ctl.sock' },
    { description: 'Its progress as a fraction, from a script', command: "<%= config.bin %> <%= command.id %> mirror0 --control /run/blkrep/ctl.sock --json | jq '.offset / .length'" },
  ];

  static override args = { id: idArg };
  static override flags = { ...jobFlags };

  async run(): Promise<JobQuery> {
    const { args, flags } = await this.parse(JobShow);
    const q = await this.request<JobQuery>(flags.control, 'job-query', { id: args.id }, flags.timeout);
    if (!this.jsonEnabled()) for (const line of jobDetails(q)) this.log(line);
    return q;
  }
}
