import { JobCommand, jobFlags } from '../cli/job-command.js';

export interface ResumeIoResult {
  /** false: nothing was suspended */
  resumed: boolean;
  /** writes that were waiting and now go */
  waiting: number;
}

export default class ResumeIo extends JobCommand {
  static override summary = "Let a primary's suspended writes go again (as drbdadm resume-io).";

  static override description = `A primary daemon holds its writes (reads go on) when serve-nbd --fencing resource-and-stonith finds its peer dead or loses its data link to it and the fence hook has not confirmed (exit 4 "outdated" or 7 "fenced") nor the link come back, or when --on-no-quorum suspend-io finds neither the peer nor a witness heard within the bound. Run this once you know the peer cannot write (you powered it off, revoked its storage): the waiting writes go on, and quorum is not checked again until the peer is heard. Prints whether writes were suspended and how many were waiting (--json: {"resumed", "waiting"}); event io-resumed.

A primary whose peer took over (a beat announced it primary with a higher term) is demoted: its writes fail with EIO for good and this command refuses (ERR_DEMOTED); restart it as a secondary.

Exit status: 0 resumed, or nothing was suspended; 1 failure (ERR_DEMOTED, ERR_NO_HEARTBEAT: the daemon has no --heartbeat, ERR_CONTROL_UNREACHABLE), 2 usage error.`;

  static override examples = [
    { description: 'The peer was powered off by hand: let the primary write again', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock' },
    { description: 'In a script: how many writes were let go', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --json | jq .waiting' },
  ];

  static override flags = { ...jobFlags };

  async run(): Promise<ResumeIoResult> {
    const { flags } = await this.parse(ResumeIo);
    const r = await this.request<ResumeIoResult>(flags.control, 'resume-io', {}, flags.timeout);
    if (!this.jsonEnabled()) this.log(r.resumed ? `Writes resumed (${r.waiting} were waiting).` : 'Writes were not suspended: nothing to resume.');
    return r;
  }
}
