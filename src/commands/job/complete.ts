import { Flags } from '@oclif/core';
import { withSpinner } from '../../cli/spinner.js';
import { idArg, JOB_EXIT_CODES, JobCommand, jobFlags, type JobQuery } from '../../cli/job-command.js';

/** What completing a job of this type did, for a person. */
function completion(type: string, pivot: boolean): string {
  if (type === 'commit') return ': the base holds the overlay\'s data and the overlay is empty';
  if (type !== 'mirror') return '';
  return pivot ? ': the export now serves the target' : ' without pivot: the target is a consistent copy';
}

export default class JobComplete extends JobCommand {
  static override summary = 'Complete a ready job: a mirror pivots the export onto its target, an active commit empties the overlay.';

  static override description = `Only a ready job can be completed. A mirror first holds new writes of the export back, copies what is still dirty and flushes the target (the target then equals the source), then pivots: the export serves the target from then on (its dirty bitmaps keep recording every write), and the held writes go on. Returns once the job has concluded.
With --no-pivot the export stays on its image and the target is left a consistent copy as of the complete.
A job that is not ready (still copying, or fallen out of step after an error) is left as it is: exit 1 with ERR_JOB_STATE.
An active commit (blkrep commit --control) completes the same way without a pivot: once the base holds everything, the overlay is made empty while writes wait, and the export goes on writing into it.
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
    const q = await withSpinner(`job ${args.id}: completing…`, { enabled: !this.jsonEnabled() }, () => this.request<JobQuery>(flags.control, 'job-complete', { id: args.id, pivot: flags.pivot }, flags.timeout));
    if (!this.jsonEnabled()) this.log(`Job ${q.id} completed${completion(q.type, flags.pivot)}.`);
    return q;
  }
}
