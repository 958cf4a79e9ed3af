import { idArg, JOB_EXIT_CODES, JobCommand, jobFlags, type JobQuery } from '../../cli/job-command.js';

export default class JobResume extends JobCommand {
  static override summary = 'Resume a paused job of a running serve-nbd daemon.';

  static override description = `Continues a paused job (paused by blkrep job pause, by an I/O error with policy stop, which clears the io-status, or loaded paused from its state file when the daemon started after a crash or a restart: a mirror then copies only what its persisted dirty bitmap holds).
${JOB_EXIT_CODES}`;

  static override examples = [{ description: 'Resume job mirror0 after a restart of the daemon', command: '<%= config.bin %> <%= command.id %> mirror0 --control /run/blkrep/ctl.sock' }];

  static override args = { id: idArg };
  static override flags = { ...jobFlags };

  async run(): Promise<JobQuery> {
    const { args, flags } = await this.parse(JobResume);
    const q = await this.request<JobQuery>(flags.control, 'job-resume', { id: args.id }, flags.timeout);
    if (!this.jsonEnabled()) this.log(`Job ${q.id} is ${q.status}.`);
    return q;
  }
}
