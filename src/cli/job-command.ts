/**
 * What the `blkrep job …`, `blkrep events` and `blkrep mirror --control` commands share: the
 * control socket flags, one request, following a job's events, and how a job is printed.
 * (Not in src/commands/: every file there is a command.)
 */
import { Args, Flags } from '@oclif/core';
import { BlkrepError } from '../api/errors.js';
import { BlkrepCommand } from './base.js';
import { progressBar, type Progress } from './progress.js';
import { startSpinner } from './spinner.js';
import { ControlClient } from '../control/client.js';
import { findControl } from './control-path.js';
import type { ControlEvent } from '../control/protocol.js';
import { formatSize } from '../util/size.js';
import type { JobInfo } from '../jobs/job.js';

export const controlFlag = Flags.string({
  char: 'c',
  description: `the daemon's control socket (serve-nbd --control): a path, or a NAME for ${'RUNDIR'}/NAME.ctl [default: $BLKREP_CONTROL, else the only socket in RUNDIR (/run/blkrep for root)]`,
  helpValue: 'PATH|NAME',
});

export const jobFlags = {
  control: controlFlag,
  timeout: Flags.integer({ description: 'give up on the daemon after this many seconds', default: 10, min: 1, helpValue: 'SECONDS' }),
};

export const idArg = Args.string({ description: 'the job id (blkrep job list)', required: true });

export type JobQuery = JobInfo & { export?: string | null };

/** The exit statuses every job command documents. */
export const JOB_EXIT_CODES = `Exit status: 0 done; 1 failure (unknown job: ERR_JOB_NOT_FOUND; a verb the job's state does not allow: ERR_JOB_STATE; the daemon not reachable: ERR_CONTROL_UNREACHABLE), 2 usage error.`;

export abstract class JobCommand extends BlkrepCommand {
  /** One request on the control socket. */
  protected async request<T>(control: string | undefined, cmd: string, args: Record<string, unknown>, timeoutSeconds: number): Promise<T> {
    const client = await ControlClient.connect(await findControl(control), { timeoutMs: timeoutSeconds * 1000 });
    try {
      return (await client.request(cmd, args, { timeoutMs: timeoutSeconds * 1000 })) as T;
    } finally {
      await client.close().catch(() => {});
    }
  }
}

function seconds(s: number | null): string {
  if (s === null) return 'unknown';
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function percent(q: JobQuery): string {
  return q.length > 0 ? `${((q.offset / q.length) * 100).toFixed(1)}%` : '100.0%';
}

/** One line per job for `job list`. */
export function jobLine(q: JobQuery): string {
  return `${q.id.padEnd(12)} ${q.type.padEnd(8)} ${String(q.export ?? '-').padEnd(12)} ${q.status.padEnd(9)} ${percent(q).padStart(6)}  ${formatSize(q.offset)} of ${formatSize(q.length)}${q.ioStatus !== 'ok' ? `  io-status ${q.ioStatus}` : ''}`;
}

/** `job show`: every field, progress with rate and ETA first. */
export function jobDetails(q: JobQuery): string[] {
  const lines = [
    `Job ${q.id} (${q.type} of export ${q.export === null || q.export === undefined ? '-' : `"${q.export}"`}): ${q.status}${q.ready && q.status === 'paused' ? ' (in step: resumes into ready)' : ''}${q.paused && q.status !== 'paused' ? ', pausing' : ''}`,
    `  progress        ${formatSize(q.offset)} of ${formatSize(q.length)} (${percent(q)})`,
    `  rate            ${formatSize(q.rate)}/s, ETA ${seconds(q.eta)}`,
    `  speed           ${q.speed === 0 ? 'unlimited' : `${formatSize(q.speed)}/s`}`,
    `  io-status       ${q.ioStatus}`,
  ];
  if (q.error) lines.push(`  error           ${q.error.code}: ${q.error.message}`);
  const shown = new Set(['id', 'type', 'export', 'status', 'ready', 'paused', 'offset', 'length', 'rate', 'eta', 'speed', 'ioStatus', 'error']);
  for (const [k, v] of Object.entries(q)) if (!shown.has(k)) lines.push(`  ${k.padEnd(15)} ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
  return lines;
}

/**
 * Follow job `id` on an already subscribed connection until `until` (ready: a job-ready with
 * synced true; done: job-completed or job-cancelled). Rejects when the job ends otherwise (an
 * error, a cancel before ready) or the daemon goes away. Shows a progress bar when enabled.
 */
export async function followJob(
  client: ControlClient,
  events: ControlEvent[],
  onEvent: { listener?: () => void },
  id: string,
  until: 'ready' | 'done',
  options: { progress: boolean; stream?: NodeJS.WriteStream },
): Promise<ControlEvent> {
  let bar: Progress | undefined;
  let interrupt: (() => void) | undefined;
  // until the job reports how much it copies (and the bar takes over), a spinner says what is awaited
  const spinner = options.progress ? startSpinner(`job ${id}: waiting until ${until}…`, { enabled: true, ...(options.stream ? { stream: options.stream } : {}) }) : undefined;
  const ticker = options.progress
    ? setInterval(() => {
        client.request('job-query', { id }).then(
          (r) => {
            const q = r as JobQuery;
            if (q.length === 0) return;
            spinner?.stop();
            bar ??= progressBar(`job ${id}`, q.length, { enabled: true });
            bar.update(q.offset);
          },
          () => {},
        );
      }, 250)
    : undefined;
  try {
    return await new Promise<ControlEvent>((resolve, reject) => {
      const check = (): boolean => {
        for (const e of events) {
          if (e.id !== id) continue;
          if (until === 'ready' && e.event === 'job-ready' && e.synced === true) return resolve(e), true;
          if (e.event === 'job-completed') {
            const err = e.error as { code: string; message: string } | undefined;
            if (err) return reject(new BlkrepError(err.code, `job ${id} failed: ${err.message}`, { errno: 'EIO' })), true;
            return resolve(e), true;
          }
          if (e.event === 'job-cancelled') {
            if (until === 'done') return resolve(e), true;
            return reject(new BlkrepError('ERR_JOB_CANCELLED', `job ${id} was cancelled before it was ready`, { errno: 'ESHUTDOWN' })), true;
          }
        }
        return false;
      };
      if (check()) return;
      onEvent.listener = () => void check();
      // Ctrl-C stops the waiting, not the job: say so, and let the bar restore the terminal.
      interrupt = () => {
        const err = new BlkrepError('ERR_INTERRUPTED', `interrupted: stopped waiting; job ${id} keeps running in the daemon (blkrep job show ${id}, blkrep job cancel ${id})`, { errno: 'EIO' });
        reject(Object.assign(err, { oclif: { exit: 130 } }));
      };
      process.once('SIGINT', interrupt);
      client.closed.then(() => reject(new BlkrepError('ERR_CONTROL_CLOSED', `the daemon went away before job ${id} was ${until}`, { errno: 'ESHUTDOWN' })));
    });
  } finally {
    if (interrupt) process.off('SIGINT', interrupt);
    if (ticker) clearInterval(ticker);
    spinner?.stop();
    bar?.stop();
  }
}
