import { Args } from '@oclif/core';
import { idArg, JOB_EXIT_CODES, JobCommand, jobFlags, type JobQuery } from '../../cli/job-command.js';

export default class JobSetCopyMode extends JobCommand {
  static override summary = "Change a live mirror's copy mode.";

  static override description = `background: a write of the export completes at once and its region is copied soon after. write-blocking: a write completes only once the target has it too (the mirror converges under any load, at the target's latency). auto: background, switching to write-blocking while no consistency point came for the job's max lag, and back at the next one. Each switch is a job-copy-mode event. A job that is not a mirror: ERR_JOB_UNSUPPORTED.
${JOB_EXIT_CODES}`;

  static override examples = [{ description: 'Make mirror0 converge under a heavy writer', command: '<%= config.bin %> <%= command.id %> mirror0 write-blocking --control /run/blkrep/ctl.sock' }];

  static override args = {
    id: idArg,
    mode: Args.string({ description: 'background, write-blocking or auto', required: true, options: ['background', 'write-blocking', 'auto'] }),
  };
  static override flags = { ...jobFlags };

  async run(): Promise<JobQuery> {
    const { args, flags } = await this.parse(JobSetCopyMode);
    const q = await this.request<JobQuery>(flags.control, 'job-set-copy-mode', { id: args.id, mode: args.mode }, flags.timeout);
    if (!this.jsonEnabled()) this.log(`Job ${q.id}: copy mode ${String(q.copyModeSetting)} (now ${String(q.copyMode)}).`);
    return q;
  }
}
