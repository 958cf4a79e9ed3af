import { Flags } from '@oclif/core';
import { BlkrepError } from '../api/errors.js';
import { BlkrepCommand } from '../cli/base.js';
import { ControlClient } from '../control/client.js';
import type { ControlEvent } from '../control/protocol.js';
import { controlFlag } from '../cli/job-command.js';
import { findControl } from '../cli/control-path.js';
import type { JobInfo } from '../jobs/job.js';
import { unknownEventName } from '../cli/event-names.js';

/** What is true now, as the events that made it so, each marked "now": true. */
export function currentStateEvents(jobs: readonly JobInfo[]): ControlEvent[] {
  const time = new Date().toISOString();
  const events: ControlEvent[] = [];
  for (const j of jobs) {
    const common = { id: j.id, type: j.type, ...(typeof j['export'] === 'string' ? { export: j['export'] } : {}), now: true, time };
    events.push({ event: 'job-status-change', ...common, status: j.status, previous: null } as ControlEvent);
    if (j.ready) events.push({ event: 'job-ready', ...common, synced: true } as ControlEvent);
  }
  return events;
}

export default class Events extends BlkrepCommand {
  static override summary = "Print a running serve-nbd daemon's events as JSON lines.";

  static override description = `Subscribes to the events of the daemon behind --control and prints each on stdout as one JSON object per line (NDJSON), as the daemon sends it: {"event": NAME, ...fields, "time": ISO-8601}.
Job events are job-status-change (status, previous), job-ready (synced true: caught up; false: fell out of step), job-copy-mode (from, to, reason), job-error (side, operation, errno, action, offset, length, message), job-completed (length, offset, speed, error?), and job-cancelled (consistent); each carries the job's id, type and export. The daemon also sends connection, disconnect, refused, bitmap-... and shutdown events.
--job-id ID keeps only the events of that job; --event NAME (repeatable) only those events (a name no event has is a usage error, exit 2, that lists the names). --until NAME stops after the first such event (of the job, with --job-id) and exits 0, so a script can wait for a mirror to be ready; --count N stops after N events. --timeout gives up (exit 1) after that many seconds.
--now first prints the current state as events, each with "now": true (as drbdsetup events2 --now): a job-status-change (previous null) for every job, and a job-ready for each job that is ready; then the events as they come. --until looks at the current state first whether or not --now is given, so waiting for job-ready of a job that is already ready returns at once.
Exit status: 0 when the --until event (or the --count-th event) arrived, or on SIGINT/SIGTERM; 1 on timeout, when the daemon goes away, or when it cannot be reached; 2 usage error.`;

  static override examples = [
    { description: 'Watch everything the daemon does', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock' },
    { description: 'Wait (at most 10 minutes) until mirror0 is ready, then complete it', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --job-id mirror0 --until job-ready --timeout 600 && <%= config.bin %> job complete mirror0 --control /run/blkrep/ctl.sock' },
    { description: 'Only the errors of every job', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --event job-error' },
    { description: 'The current state of every job, then what changes', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --now' },
  ];

  static override flags = {
    control: controlFlag,
    'job-id': Flags.string({ char: 'j', aliases: ['job'], description: 'only the events of this job', helpValue: 'ID' }),
    event: Flags.string({ description: 'only events of this name (repeatable)', multiple: true, helpValue: 'NAME' }),
    until: Flags.string({ char: 'u', description: 'exit 0 after the first event of this name (e.g. job-ready, job-completed)', helpValue: 'NAME' }),
    count: Flags.integer({ charAliases: ['n'], description: 'exit 0 after this many events', min: 1, helpValue: 'N' }),
    timeout: Flags.integer({ description: 'exit 1 when the --until event has not come after this many seconds', min: 1, helpValue: 'SECONDS' }),
    now: Flags.boolean({ description: 'first print the current state (every job\'s status, and job-ready for jobs that are ready) as events with "now": true', default: false }),
  };

  async run(): Promise<undefined> {
    const { flags } = await this.parse(Events);
    for (const [flag, names] of [['event', flags.event ?? []], ['until', flags.until === undefined ? [] : [flags.until]]] as const) {
      for (const name of names) {
        const bad = unknownEventName(flag, name);
        if (bad) this.usageError(bad);
      }
    }
    const control = await findControl(flags.control);
    const client = await ControlClient.connect(control, { timeoutMs: 10_000 });
    let n = 0;
    let over = false;
    let resolveDone!: (err?: BlkrepError) => void;
    const done = new Promise<BlkrepError | undefined>((resolve) => (resolveDone = resolve));
    const finish = (err?: BlkrepError): void => {
      over = true;
      resolveDone(err);
    };
    const onEvent = (e: ControlEvent): void => {
      // nothing after the --until (or --count-th) event, even when more came in the same read
      if (over) return;
      if (flags['job-id'] !== undefined && e.id !== flags['job-id']) return;
      if (flags.event && !flags.event.includes(e.event) && e.event !== flags.until) return;
      process.stdout.write(`${JSON.stringify(e)}\n`);
      n++;
      if (flags.until !== undefined && e.event === flags.until) finish();
      else if (flags.count !== undefined && n >= flags.count) finish();
    };
    const onSignal = (): void => finish();
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    const timer =
      flags.timeout === undefined
        ? undefined
        : setTimeout(() => finish(new BlkrepError('ERR_TIMEOUT', `no ${flags.until ?? 'event'}${flags['job-id'] ? ` of job ${flags['job-id']}` : ''} after ${flags.timeout} s`, { errno: 'EIO' })), flags.timeout * 1000);
    void client.closed.then(() => finish(new BlkrepError('ERR_CONTROL_CLOSED', `the daemon at ${control} went away`, { errno: 'ESHUTDOWN' })));
    try {
      await client.subscribe(flags.event && !flags.until ? flags.event : flags.event ? [...flags.event, flags.until!] : undefined, onEvent);
      // Subscribed first, then the current state: nothing can fall between the two.
      if (flags.now || flags.until !== undefined) {
        const jobs = (await client.request('job-list', {}, { timeoutMs: 10_000 })) as JobInfo[];
        for (const e of currentStateEvents(jobs)) {
          if (flags.now) onEvent(e);
          else if (e.event === flags.until) onEvent(e);
        }
      }
      const err = await done;
      if (err) throw err;
    } finally {
      if (timer) clearTimeout(timer);
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      await client.close().catch(() => {});
    }
    return undefined;
  }
}
