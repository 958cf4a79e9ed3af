import { Args } from '@oclif/core';
import { idArg, JOB_EXIT_CODES, JobCommand, jobFlags, type JobQuery } from '../../cli/job-command.js';
import { formatSize, parseSize } from '../../util/size.js';

export default class JobSetSpeed extends JobCommand {
  static override summary = "Change a job's speed limit.";

  static override description = `Sets the most bytes per second the job copies (its data; zero ranges are not counted), 0 for no limit. Takes effect at once, in any state but concluded.
${JOB_EXIT_CODES}`;

  static override examples = [
    { description: 'Limit job mirror0 to 50 MiB/s', command: '<%= config.bin %> <%= command.id %> mirror0 50M --control /run/blkrep/ctl.sock' },
    { description: 'Remove the limit', command: '<%= config.bin %> <%= command.id %> mirror0 0 --control /run/blkrep/ctl.sock' },
  ];

  static override args = {
    id: idArg,
    speed: Args.string({ description: 'bytes per second (K, M, G suffixes), 0 = unlimited', required: true }),
  };
  static override flags = { ...jobFlags };

  async run(): Promise<JobQuery> {
    const { args, flags } = await this.parse(JobSetSpeed);
    let speed: number;
    try {
      speed = parseSize(args.speed, 'speed');
    } catch (err) {
      this.usageError((err as Error).message);
    }
    const q = await this.request<JobQuery>(flags.control, 'job-set-speed', { id: args.id, speed }, flags.timeout);
    if (!this.jsonEnabled()) this.log(`Job ${q.id}: speed ${q.speed === 0 ? 'unlimited' : `${formatSize(q.speed)}/s`}.`);
    return q;
  }
}
