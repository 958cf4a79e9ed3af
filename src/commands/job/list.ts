import { Flags } from '@oclif/core';
import { JOB_EXIT_CODES, JobCommand, jobFlags, jobLine, type JobQuery } from '../../cli/job-command.js';

export default class JobList extends JobCommand {
  static override summary = 'List the jobs of a running serve-nbd daemon.';

  static override description = `Asks the daemon behind --control for its jobs (those running, paused, ready or being completed) and prints one line each: id, type, export, status, progress. With --json, the query object of each job (as blkrep job show --json prints it).
A job loaded from its state file when the daemon started is listed as paused until blkrep job resume.
${JOB_EXIT_CODES}`;

  static override examples = [
    { description: 'List the jobs', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock' },
    { description: 'The ids of the paused jobs, from a script', command: "<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --json | jq -r '.[] | select(.status == \"paused\") | .id'" },
  ];

  static override flags = {
    ...jobFlags,
    export: Flags.string({ char: 'e', description: 'only the jobs of this export', helpValue: 'NAME' }),
  };

  async run(): Promise<JobQuery[]> {
    const { flags } = await this.parse(JobList);
    const jobs = await this.request<JobQuery[]>(flags.control, 'job-list', flags.export === undefined ? {} : { export: flags.export }, flags.timeout);
    if (!this.jsonEnabled()) {
      if (jobs.length === 0) this.log('No jobs.');
      else {
        this.log(`${'ID'.padEnd(12)} ${'TYPE'.padEnd(8)} ${'EXPORT'.padEnd(12)} ${'STATUS'.padEnd(9)} PROGRESS`);
        for (const q of jobs) this.log(jobLine(q));
      }
    }
    return jobs;
  }
}
