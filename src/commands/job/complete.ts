import { Flags } from '@oclif/core';
import { idArg, JOB_EXIT_CODES, JobCommand, jobFlags, type JobQuery } from '../../jobs/job-command.js';

export default class JobComplete extends JobCommand {
  static override summary = 'Complete a ready job: a mirror pivots the export onto its target.';

  static override description = `Only a ready job can be completed. A mirror first holds new writes of the export back, copies what is still dirty and flushes the target (the target then equals the source), then pivots: the export serves the target from then on (its dirty bitmaps keep recording every write), and the held writes go on. Returns once the job has concluded.
With --no-pivot the export stays on its image and the target is left a consistent copy as of the complete.
A job that is not ready (still copying, or fallen out of step after an error) is left as it is: exit 1 with ERR_JOB_STATE.
${JOB_EXIT_CODES}`;

  static override examples = [
    { description: 'Switch the export onto the mirror target', command: '<%= config.bin %> <%= command.id %> mirror0 --control /run/blkrep/ctl.sock' },
    { description: 'Finish with a consistent copy, keep serving the source', command: '<%= config.bin %> <%= command.id %> mirror0 --no-pivot --control /run/blkrep/ctl.sock' },
  ];

  static override args = { id: idArg };
  static override flags = {
    ...jobFlags,
    pivot: Flags.boolean({ description: 'make the export serve the target (--no-pivot: keep the source, leave a consistent copy)', default: true, allowNo: true }),
    timeout: Flags.integer({ description: 'give up waiting after this many seconds (the job goes on)', default: 300, min: 1, helpValue: 'SECONDS' }),
  };

  async run(): Promise<JobQuery> {
    const { args, flags } = await this.parse(JobComplete);
    const q = await this.request<JobQuery>(flags.control, 'job-complete', { id: args.id, pivot: flags.pivot }, flags.timeout);
    if (!this.jsonEnabled()) this.log(`Job ${q.id} completed${flags.pivot ? ': the export now serves the target' : ' without pivot: the target is a consistent copy'}.`);
    return q;
  }
}
