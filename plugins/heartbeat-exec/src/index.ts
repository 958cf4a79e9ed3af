/**
 * The exec heartbeat backend: a probe, for paths blkrep cannot speak itself (a BMC, a witness
 * host, a storage array's API). Once per interval it runs a command; exit status 0 is a beat.
 *
 *   exec:CMD           e.g. exec:ping -c1 -W1 10.0.1.2
 *
 * CMD runs under /bin/sh -c, with BLKREP_NODE and BLKREP_PEER in its environment, stdin and
 * stdout closed, in a process group of its own. One run at a time: while a run lasts, the next
 * ones are skipped; a run past max(5 intervals, 2 s) is killed with its group and is no beat.
 * These beats carry no frame (they cannot be signed): the engine counts them as the peer's on
 * this path and nothing more. Nothing is sent: send() is ignored.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { HeartbeatBackend, HeartbeatOpenOptions, HeartbeatPath, HeartbeatReport } from 'blkrep/api';

export class ExecHeartbeatError extends Error {
  readonly code: string;
  readonly errno: 'EINVAL' | 'EIO';
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: { errno?: 'EINVAL' | 'EIO'; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'ExecHeartbeatError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }
}

export function parseExecUri(uri: string): string {
  if (!uri.startsWith('exec:')) throw new ExecHeartbeatError('ERR_BAD_HEARTBEAT', `invalid heartbeat URI "${uri}": the scheme is not exec: (expected exec:COMMAND)`, { errno: 'EINVAL', details: { uri } });
  const command = uri.slice('exec:'.length);
  if (command.trim() === '') throw new ExecHeartbeatError('ERR_BAD_HEARTBEAT', `invalid heartbeat URI "${uri}": no command after "exec:" (expected exec:COMMAND)`, { errno: 'EINVAL', details: { uri } });
  return command;
}

const EMPTY = Buffer.alloc(0);

class ExecPath implements HeartbeatPath {
  private timer: NodeJS.Timeout | undefined;
  private running: ChildProcess | undefined;
  private stopped = false;
  private readonly beatListeners: Array<(r: HeartbeatReport) => void> = [];
  private readonly errorListeners: Array<(e: Error) => void> = [];
  private readonly timeoutMs: number;

  constructor(
    readonly uri: string,
    private readonly command: string,
    private readonly options: HeartbeatOpenOptions,
  ) {
    this.timeoutMs = Math.max(2000, options.intervalMs * 5);
    options.signal?.addEventListener('abort', () => void this.stop(), { once: true });
  }

  onBeat(listener: (r: HeartbeatReport) => void): void {
    this.beatListeners.push(listener);
  }

  onError(listener: (e: Error) => void): void {
    this.errorListeners.push(listener);
  }

  private error(err: Error): void {
    for (const l of this.errorListeners) l(err);
  }

  async start(): Promise<void> {
    if (this.stopped || this.options.signal?.aborted) return;
    this.probe();
    this.timer = setInterval(() => this.probe(), this.options.intervalMs);
    this.timer.unref();
  }

  private probe(): void {
    if (this.running || this.stopped) return;
    const child = spawn('/bin/sh', ['-c', this.command], {
      stdio: ['ignore', 'ignore', 'pipe'],
      detached: true,
      env: { ...process.env, BLKREP_NODE: this.options.self, BLKREP_PEER: this.options.peer },
    });
    this.running = child;
    let stderr = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (chunk: string) => {
      stderr = (stderr + chunk).slice(-512);
    });
    const killer = setTimeout(() => {
      this.kill(child);
      this.error(new ExecHeartbeatError('ERR_HEARTBEAT_PROBE', `heartbeat probe "${this.command}" ran past ${this.timeoutMs} ms and was killed`, { details: { uri: this.uri } }));
    }, this.timeoutMs);
    child.once('error', (err) => {
      clearTimeout(killer);
      this.running = undefined;
      this.error(new ExecHeartbeatError('ERR_HEARTBEAT_PROBE', `heartbeat probe "${this.command}" did not start: ${err.message}`, { cause: err, details: { uri: this.uri } }));
    });
    child.once('exit', (code) => {
      clearTimeout(killer);
      this.running = undefined;
      child.stderr!.destroy();
      if (this.stopped) return;
      if (code === 0) {
        const report = { frame: EMPTY, from: 'exit 0' };
        for (const l of this.beatListeners) l(report);
      } else if (code === 127 || code === 126) {
        // the shell could not run the command at all: a configuration error, not silence
        this.error(new ExecHeartbeatError('ERR_HEARTBEAT_PROBE', `heartbeat probe "${this.command}" cannot run (exit ${code}): ${stderr.trim()}`, { details: { uri: this.uri, exitCode: code } }));
      }
    });
  }

  private kill(child: ChildProcess): void {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    const child = this.running;
    if (child && child.exitCode === null && child.signalCode === null) {
      const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      this.kill(child);
      await gone;
    }
  }

  send(): void {}
}

export function createExecHeartbeat(): HeartbeatBackend {
  return {
    name: 'exec',
    summary: 'a probe: runs exec:COMMAND once per interval, exit status 0 is a beat',
    caps: { frames: false, independentPath: true, authoritative: false },
    open: (uri, options) => new ExecPath(uri, parseExecUri(uri), options),
  };
}
