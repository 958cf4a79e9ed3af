/**
 * The job engine (DESIGN.md §6): one state machine for every job — mirror, backup, commit —
 * named as QEMU names it, the verbs people use on a job, its events, the error policies and the
 * speed limit.
 *
 *   created ─► running ⇄ paused          (pause / resume, or an error with policy stop)
 *                 │  ▲      │
 *                 ▼  │      ▼
 *               ready ⇄ paused           (a paused ready job resumes into ready)
 *                 │
 *   running|ready ─► waiting ─► pending ─► concluded      (success: prepare, commit)
 *   any but concluded ─► aborting ─► concluded            (error, cancel)
 *
 * The transitions (TRANSITIONS) and the states each verb is allowed in (VERBS) are data; a verb
 * called in a state that does not allow it throws ERR_JOB_STATE, naming the job, the verb, the
 * state and the states that would allow it, and changes nothing.
 *
 * A job type (MirrorJob …) extends Job and implements execute(): it runs until the job's work
 * is done (resolves) or has failed (rejects). It cooperates with the engine through:
 *   - pauseRequested / reachedPausePoint(): when a pause is asked for, the driver stops starting
 *     work, lets what is in flight finish, then calls reachedPausePoint() (status → paused);
 *     onResume() is called on resume;
 *   - signal: aborted on a hard cancel (cancel before ready, or force); the driver passes it to
 *     its I/O and returns or throws as soon as it can;
 *   - handleIoError(): applies the side's policy, emits the error event, and returns the action
 *     the driver must take (ignore: retry later; stop: the job is now pausing; report: throw);
 *   - setReady(synced) / progress(done, remaining) / limiter (the speed).
 * After execute() resolves: waiting → pending → (finalize: prepare(), commit()) → concluded,
 * event completed (or cancelled, for a soft cancel of a ready job). After it rejects or a hard
 * cancel: aborting → abort() → concluded, event completed with the error (or cancelled).
 * clean() runs last either way.
 *
 * Events are emitted on the job (and relayed by JobManager) twice: every event on the channel
 * 'event' as a JobEvent (the JSON line shape: {event, id, …}), and each under its own name —
 * except 'error', which is emitted as 'io-error' because an EventEmitter throws an 'error' event
 * that nobody listens to.
 */
import { EventEmitter, setMaxListeners } from 'node:events';
import { BlkrepError, toBlkrepError, type Errno } from '../api/errors.js';
import { StateMachine, type MachineSpec } from '../util/state-machine.js';

// ------------------------------------------------------------------------------ states and verbs

export const JOB_STATUSES = ['created', 'running', 'paused', 'ready', 'waiting', 'pending', 'aborting', 'concluded'] as const;
export type JobStatus = (typeof JOB_STATUSES)[number];

/** Every transition the state machine allows. */
export const TRANSITIONS: Readonly<Record<JobStatus, readonly JobStatus[]>> = {
  created: ['running', 'aborting'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running', 'ready', 'aborting'],
  ready: ['running', 'paused', 'waiting', 'aborting'],
  waiting: ['pending', 'aborting'],
  pending: ['concluded', 'aborting'],
  aborting: ['concluded'],
  concluded: [],
};

export const JOB_VERBS = ['pause', 'resume', 'complete', 'cancel', 'set-speed', 'finalize', 'dismiss', 'change'] as const;
export type JobVerb = (typeof JOB_VERBS)[number];

/** The states each verb may be called in (as QEMU's JobVerbTable, without standby). */
export const VERBS: Readonly<Record<JobVerb, readonly JobStatus[]>> = {
  pause: ['created', 'running', 'ready'],
  resume: ['created', 'running', 'paused', 'ready'],
  complete: ['ready'],
  cancel: ['created', 'running', 'paused', 'ready', 'waiting', 'pending'],
  'set-speed': ['created', 'running', 'paused', 'ready'],
  finalize: ['pending'],
  dismiss: ['concluded'],
  change: ['created', 'running', 'paused', 'ready'],
};

export function canTransition(from: JobStatus, to: JobStatus): boolean {
  return TRANSITIONS[from].includes(to);
}

// -------------------------------------------------------------------------------- error policy

/** What to do about an I/O error, per side (DESIGN.md §6). */
export const ERROR_POLICIES = ['report', 'ignore', 'stop', 'enospc'] as const;
export type ErrorPolicy = (typeof ERROR_POLICIES)[number];
/** What was done about an error. */
export type ErrorAction = 'report' | 'ignore' | 'stop';
export type IoStatus = 'ok' | 'failed' | 'nospace';
export type JobSide = 'source' | 'target';

/**
 * report: the job ends in error. ignore: the region stays dirty and is retried later. stop: the
 * job pauses (io-status failed or nospace) until resumed. enospc: stop on ENOSPC, report otherwise.
 */
export function errorAction(policy: ErrorPolicy, errno: Errno): ErrorAction {
  switch (policy) {
    case 'report':
      return 'report';
    case 'ignore':
      return 'ignore';
    case 'stop':
      return 'stop';
    case 'enospc':
      return errno === 'ENOSPC' ? 'stop' : 'report';
  }
}

export function parseErrorPolicy(value: string): ErrorPolicy {
  if ((ERROR_POLICIES as readonly string[]).includes(value)) return value as ErrorPolicy;
  throw new BlkrepError('ERR_USAGE', `error policy "${value}" is not one of ${ERROR_POLICIES.join(', ')}`, { errno: 'EINVAL' });
}

// -------------------------------------------------------------------------------- rate limiter

export interface Clock {
  /** milliseconds, monotonic */
  now(): number;
}

export const systemClock: Clock = { now: () => performance.now() };

/**
 * A token bucket for the job's speed (bytes per second; 0 = unlimited). The bucket holds at
 * most `burstMs` worth of tokens. reserve(n) takes n tokens at once and may leave the bucket in
 * debt (so one request larger than the bucket still goes through); it returns how long to wait
 * before the NEXT reservation may proceed — 0 when the bucket was not in debt.
 */
export class RateLimiter {
  private rate = 0;
  private tokens = 0;
  private last: number;

  constructor(
    bytesPerSecond = 0,
    private readonly clock: Clock = systemClock,
    readonly burstMs = 100,
  ) {
    this.last = clock.now();
    this.setRate(bytesPerSecond);
  }

  get bytesPerSecond(): number {
    return this.rate;
  }

  setRate(bytesPerSecond: number): void {
    checkSpeed(bytesPerSecond);
    this.refill();
    this.rate = bytesPerSecond;
    this.tokens = Math.min(this.tokens, this.capacity);
  }

  private get capacity(): number {
    return (this.rate * this.burstMs) / 1000;
  }

  private refill(): void {
    const now = this.clock.now();
    if (this.rate > 0) this.tokens = Math.min(this.capacity, this.tokens + ((now - this.last) * this.rate) / 1000);
    this.last = now;
  }

  /** ms to wait before bytes may be reserved (0: now); does not take anything */
  delay(): number {
    if (this.rate === 0) return 0;
    this.refill();
    return this.tokens >= 0 ? 0 : Math.ceil((-this.tokens * 1000) / this.rate);
  }

  /** Take `bytes` tokens whatever the bucket holds (it may go into debt). */
  take(bytes: number): void {
    if (this.rate === 0) return;
    this.refill();
    this.tokens -= bytes;
  }

  /** Take `bytes` tokens if the bucket is not in debt; returns 0 when taken, else the ms to wait. */
  tryReserve(bytes: number): number {
    const wait = this.delay();
    if (wait > 0) return wait;
    if (this.rate > 0) this.tokens -= bytes;
    return 0;
  }
}

export function checkSpeed(speed: number): void {
  if (!Number.isSafeInteger(speed) || speed < 0) {
    throw new BlkrepError('ERR_JOB_INVALID', `speed ${speed} is not a number of bytes per second ≥ 0 (0 = unlimited)`, { errno: 'EINVAL', details: { speed } });
  }
}

// ------------------------------------------------------------------------------------- events

interface EventBase {
  id: string;
  type: string;
}

export type JobEvent =
  | (EventBase & { event: 'status-change'; status: JobStatus; previous: JobStatus })
  | (EventBase & { event: 'ready'; synced: boolean })
  | (EventBase & { event: 'copy-mode'; from: string; to: string; reason: string })
  | (EventBase & {
      event: 'error';
      side: JobSide;
      operation: string;
      errno: Errno;
      action: ErrorAction;
      offset: number;
      length: number;
      message: string;
    })
  | (EventBase & { event: 'completed'; length: number; offset: number; speed: number; error?: { code: string; message: string; errno: Errno } })
  | (EventBase & { event: 'cancelled'; length: number; offset: number; speed: number; consistent: boolean });

export type JobEventName = JobEvent['event'];
/** A JobEvent without the fields the job fills in. */
export type JobEventBody = JobEvent extends infer E ? (E extends JobEvent ? Omit<E, 'id' | 'type'> : never) : never;
export type JobEventOf<N extends JobEventName> = Extract<JobEvent, { event: N }>;

/** The EventEmitter name each event is emitted under besides 'event'. */
export function channelOf(name: JobEventName): string {
  return name === 'error' ? 'io-error' : name;
}

// --------------------------------------------------------------------------------------- info

export interface JobInfo {
  id: string;
  type: string;
  status: JobStatus;
  /** bytes the job expects to process in all (grows when a mirror's source is written) */
  length: number;
  /** bytes processed so far */
  offset: number;
  /** speed limit in bytes per second, 0 = unlimited */
  speed: number;
  /** a pause has been asked for (by the user, or by an error with policy stop) */
  paused: boolean;
  ioStatus: IoStatus;
  /** seconds to go at the recent rate, null when unknown */
  eta: number | null;
  /** bytes per second over the last few seconds */
  rate: number;
  ready: boolean;
  autoFinalize: boolean;
  autoDismiss: boolean;
  error?: { code: string; message: string; errno: Errno };
  /** what the job type adds (a mirror: sync, copy mode, granularity, dirty bytes …) */
  [extra: string]: unknown;
}

export interface JobOptions {
  id: string;
  /** bytes per second, 0 = unlimited (default) */
  speed?: number;
  onSourceError?: ErrorPolicy;
  onTargetError?: ErrorPolicy;
  /** go from pending to concluded without waiting for finalize() (default true) */
  autoFinalize?: boolean;
  /** leave the manager once concluded (default true) */
  autoDismiss?: boolean;
  clock?: Clock;
}

export interface IoErrorReport {
  side: JobSide;
  operation: string;
  offset: number;
  length: number;
  error: unknown;
}

const RATE_WINDOW_MS = 5000;

/**
 * A job's state machine (src/util/state-machine.ts): TRANSITIONS and VERBS; a verb in a state
 * that does not allow it is ERR_JOB_STATE, a transition not in the table ERR_JOB_INTERNAL.
 */
function jobMachine(job: Job): MachineSpec<JobStatus, JobVerb> {
  return {
    name: `job ${job.id}`,
    transitions: TRANSITIONS,
    calls: VERBS,
    wrongState: (verb, status, allowed, why) => {
      const message = why ?? `job ${job.id} is ${status}: ${verb} needs it to be ${allowed.join(' or ')}`;
      return new BlkrepError('ERR_JOB_STATE', message, { errno: 'EINVAL', details: { id: job.id, verb, status, allowed: [...allowed] } });
    },
    badTransition: (from, to) => {
      return new BlkrepError('ERR_JOB_INTERNAL', `job ${job.id}: no transition from ${from} to ${to}`, { errno: 'EINVAL', details: { from, to } });
    },
  };
}

// ----------------------------------------------------------------------------------------- Job

export abstract class Job extends EventEmitter {
  abstract readonly type: string;
  readonly id: string;
  readonly onSourceError: ErrorPolicy;
  readonly onTargetError: ErrorPolicy;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  readonly limiter: RateLimiter;
  protected readonly clock: Clock;

  private readonly machine = new StateMachine(jobMachine(this), 'created', (status, previous) => {
    this.emitEvent({ event: 'status-change', status, previous });
  });
  private _ready = false;
  private _ioStatus: IoStatus = 'ok';
  private _pauseRequested = false;
  /** the status a paused job resumes into */
  private resumeTo: 'running' | 'ready' = 'running';
  private _offset = 0;
  private _remaining = 0;
  private samples: Array<[number, number]> = [];
  private failure: BlkrepError | undefined;
  private softCancel = false;
  private hardCancel = false;
  private readonly abortController = new AbortController();
  private pauseWaiters: Array<{ resolve: () => void; reject: (e: unknown) => void }> = [];
  private finalizeGate: (() => void) | undefined;
  private readonly concludedP: Promise<void>;
  private resolveDone!: () => void;
  private started = false;

  constructor(options: JobOptions) {
    super();
    if (!/^[\w.:-]{1,128}$/.test(options.id)) {
      throw new BlkrepError('ERR_JOB_INVALID', `job id "${options.id}" must be 1 to 128 letters, digits, '_', '-', '.', ':'`, { errno: 'EINVAL' });
    }
    this.id = options.id;
    this.onSourceError = options.onSourceError ?? 'report';
    this.onTargetError = options.onTargetError ?? 'report';
    this.autoFinalize = options.autoFinalize ?? true;
    this.autoDismiss = options.autoDismiss ?? true;
    this.clock = options.clock ?? systemClock;
    this.limiter = new RateLimiter(options.speed ?? 0, this.clock);
    this.concludedP = new Promise((resolve) => (this.resolveDone = resolve));
    // every request in flight listens on the signal
    setMaxListeners(0, this.abortController.signal);
  }

  // ------------------------------------------------------------------------------- what it is

  get status(): JobStatus {
    return this.machine.state;
  }

  private get _status(): JobStatus {
    return this.machine.state;
  }

  /** the job has caught up at least once and is in step now (a mirror's complete is possible) */
  get isReady(): boolean {
    return this._ready;
  }

  get ioStatus(): IoStatus {
    return this._ioStatus;
  }

  get pauseRequested(): boolean {
    return this._pauseRequested;
  }

  /** aborted on a hard cancel */
  get signal(): AbortSignal {
    return this.abortController.signal;
  }

  /** a cancel was asked for (hard or soft) */
  get cancelRequested(): boolean {
    return this.softCancel || this.hardCancel;
  }

  get isHardCancelled(): boolean {
    return this.hardCancel;
  }

  /** the error the job ended with (after concluded) */
  get error(): BlkrepError | undefined {
    return this.failure;
  }

  /** resolves when the job has concluded (never rejects: see error) */
  whenConcluded(): Promise<void> {
    return this.concludedP;
  }

  query(): JobInfo {
    this.beforeQuery();
    const rate = this.rate();
    const eta = this._remaining === 0 ? 0 : rate > 0 ? this._remaining / rate : null;
    return {
      id: this.id,
      type: this.type,
      status: this._status,
      length: this._offset + this._remaining,
      offset: this._offset,
      speed: this.limiter.bytesPerSecond,
      paused: this._pauseRequested,
      ioStatus: this._ioStatus,
      eta: eta === null ? null : Math.round(eta * 10) / 10,
      rate: Math.round(rate),
      ready: this._ready,
      autoFinalize: this.autoFinalize,
      autoDismiss: this.autoDismiss,
      ...(this.failure ? { error: { code: this.failure.code, message: this.failure.message, errno: this.failure.errno } } : {}),
      ...this.extraInfo(),
    };
  }

  // ------------------------------------------------------------------------------------ verbs

  /** Throws ERR_JOB_STATE unless `verb` is allowed in the current state. */
  protected checkVerb(verb: JobVerb): void {
    this.machine.check(verb);
  }

  /** created → running: execute() starts. */
  start(): void {
    if (this.started) throw new BlkrepError('ERR_JOB_STATE', `job ${this.id} has already been started`, { errno: 'EINVAL', details: { id: this.id } });
    this.started = true;
    if (this._status !== 'created') return; // cancelled before it started
    this.transition('running');
    void this.runToEnd();
  }

  /**
   * Ask the job to pause. Resolves when it has (status paused): what was in flight has finished.
   * Rejects if the job ends before it pauses.
   */
  pause(): Promise<void> {
    this.checkVerb('pause');
    if (this._pauseRequested) throw this.machine.wrongState('pause', `job ${this.id} is already paused`);
    return this.requestPause();
  }

  private requestPause(): Promise<void> {
    this._pauseRequested = true;
    const p = new Promise<void>((resolve, reject) => this.pauseWaiters.push({ resolve, reject }));
    p.catch(() => {});
    if (this._status === 'created') {
      // not started: it pauses as soon as it is started
    } else {
      this.onPauseRequested();
    }
    return p;
  }

  /** Resume a paused job (or withdraw a pause not yet reached); clears the io-status. */
  resume(): void {
    this.checkVerb('resume');
    if (!this._pauseRequested) throw this.machine.wrongState('resume', `job ${this.id} is not paused`);
    this._pauseRequested = false;
    this._ioStatus = 'ok';
    for (const w of this.pauseWaiters.splice(0)) w.reject(new BlkrepError('ERR_JOB_RESUMED', `job ${this.id} was resumed before it paused`, { errno: 'EINVAL' }));
    if (this._status === 'paused') this.transition(this.resumeTo);
    this.onResume();
  }

  /** Set the speed limit (bytes per second, 0 = unlimited). */
  setSpeed(speed: number): void {
    this.checkVerb('set-speed');
    checkSpeed(speed);
    this.limiter.setRate(speed);
    this.onSpeedChanged();
  }

  /** Complete a ready job (a mirror pivots). Resolves when the job has concluded; rejects with its error. */
  async complete(options: Record<string, unknown> = {}): Promise<void> {
    this.checkVerb('complete');
    if (this.cancelRequested) throw this.machine.wrongState('complete', `job ${this.id} is being cancelled`);
    this.onComplete(options);
    await this.concludedP;
    if (this.failure) throw this.failure;
    if (this.hardCancel) throw new BlkrepError('ERR_JOB_CANCELLED', `job ${this.id} was cancelled before it completed`, { errno: 'ESHUTDOWN', details: { id: this.id } });
  }

  /**
   * Cancel. Before ready, or with force: the job stops at once (aborting) and its target is not
   * a usable copy. A ready job cancelled without force (a mirror) first brings its target to a
   * consistent copy as of the cancel, then concludes. Resolves when concluded.
   */
  async cancel(options: { force?: boolean } = {}): Promise<void> {
    this.checkVerb('cancel');
    const hard = options.force === true || !this._ready || !this.supportsSoftCancel();
    if (this._status === 'created') {
      this.hardCancel = true;
      this.abortController.abort(new BlkrepError('ERR_JOB_CANCELLED', `job ${this.id} was cancelled`, { errno: 'ESHUTDOWN' }));
      this.transition('aborting');
      await this.conclude();
      return this.concludedP;
    }
    if (hard) {
      this.hardCancel = true;
      this.abortController.abort(new BlkrepError('ERR_JOB_CANCELLED', `job ${this.id} was cancelled`, { errno: 'ESHUTDOWN' }));
      if (this._status === 'pending' && this.finalizeGate) this.finalizeGate();
    } else {
      this.softCancel = true;
    }
    if (this._pauseRequested) {
      // a paused job is resumed to end; its pause waiters learn it will not pause
      this._pauseRequested = false;
      for (const w of this.pauseWaiters.splice(0)) w.reject(new BlkrepError('ERR_JOB_CANCELLED', `job ${this.id} was cancelled`, { errno: 'ESHUTDOWN' }));
      if (this._status === 'paused') this.transition(hard ? 'aborting' : this.resumeTo);
    }
    this.onCancel(hard);
    await this.concludedP;
  }

  /** pending → concluded, for a job created with autoFinalize false. */
  async finalize(): Promise<void> {
    this.checkVerb('finalize');
    this.finalizeGate?.();
    await this.concludedP;
    if (this.failure) throw this.failure;
  }

  /** Leave the manager (concluded jobs only); the manager listens for 'dismissed'. */
  dismiss(): void {
    this.checkVerb('dismiss');
    this.emit('dismissed', this);
  }

  // ------------------------------------------------------------------- for the job's driver

  /** The job's work. Resolves when done, rejects when failed; see the file comment. */
  protected abstract execute(): Promise<void>;

  /** A pause was asked for: stop starting work; call reachedPausePoint() once idle. */
  protected onPauseRequested(): void {}
  protected onResume(): void {}
  protected onSpeedChanged(): void {}
  /** complete() was called in ready (checked already). */
  protected onComplete(_options: Record<string, unknown>): void {
    throw new BlkrepError('ERR_JOB_UNSUPPORTED', `a ${this.type} job cannot be completed`, { errno: 'ENOTSUP' });
  }
  /** cancel() was called; `hard`: signal is aborted. A soft cancel must end with a consistent target. */
  protected onCancel(_hard: boolean): void {}
  /** whether cancel of a ready job without force ends with a consistent target (mirror: yes) */
  protected supportsSoftCancel(): boolean {
    return false;
  }
  /** After success, in pending: may fail (the job then aborts). A mirror pivots here. */
  protected async prepare(): Promise<void> {}
  /** After prepare() succeeded. */
  protected async commit(): Promise<void> {}
  /** After failure or hard cancel. */
  protected async abort(): Promise<void> {}
  /** Last, whatever the outcome. */
  protected async clean(): Promise<void> {}
  protected extraInfo(): Record<string, unknown> {
    return {};
  }
  /** query() is about to read the progress: bring it up to date. */
  protected beforeQuery(): void {}

  /** The driver is idle and a pause was asked for: status → paused. */
  protected reachedPausePoint(): void {
    if (!this._pauseRequested || this._status === 'paused') return;
    if (this._status !== 'running' && this._status !== 'ready') return;
    this.resumeTo = this._status;
    this.transition('paused');
    for (const w of this.pauseWaiters.splice(0)) w.resolve();
  }

  /** Caught up (synced true: running → ready) or fallen out of step (synced false: ready → running). */
  protected setReady(synced: boolean): void {
    if (synced === this._ready && (this._status === 'ready') === synced) return;
    if (this._status === 'paused') {
      if (this._ready === synced) return;
      this._ready = synced;
      this.resumeTo = synced ? 'ready' : 'running';
      this.emitEvent({ event: 'ready', synced });
      return;
    }
    if (this._status !== 'running' && this._status !== 'ready') return;
    this._ready = synced;
    this.emitEvent({ event: 'ready', synced });
    this.transition(synced ? 'ready' : 'running');
  }

  /** Bytes done so far and bytes still to do (the length is their sum). */
  protected progress(done: number, remaining: number): void {
    this._offset = done;
    this._remaining = Math.max(0, remaining);
    const now = this.clock.now();
    this.samples.push([now, done]);
    while (this.samples.length > 2 && now - this.samples[1]![0] > RATE_WINDOW_MS) this.samples.shift();
    if (this.samples.length > 256) this.samples.splice(1, this.samples.length - 256);
  }

  private rate(): number {
    if (this.samples.length < 2) return 0;
    const [t0, d0] = this.samples[0]!;
    const [t1, d1] = this.samples[this.samples.length - 1]!;
    return t1 > t0 ? ((d1 - d0) * 1000) / (t1 - t0) : 0;
  }

  /**
   * An I/O error: apply the side's policy, emit the error event, and say what the driver must do.
   * report: the job fails (the driver throws); stop: the job is pausing now (the driver stops
   * starting work and calls reachedPausePoint()); ignore: the driver retries the region later.
   */
  protected handleIoError(report: IoErrorReport): ErrorAction {
    const err = toBlkrepError(report.error);
    const policy = report.side === 'source' ? this.onSourceError : this.onTargetError;
    const action = this.hardCancel ? 'report' : errorAction(policy, err.errno);
    this.emitEvent({
      event: 'error',
      side: report.side,
      operation: report.operation,
      errno: err.errno,
      action,
      offset: report.offset,
      length: report.length,
      message: err.message,
    });
    if (action === 'stop') {
      this._ioStatus = err.errno === 'ENOSPC' ? 'nospace' : 'failed';
      if (!this._pauseRequested) void this.requestPause();
    } else if (action === 'report') {
      this.failure ??= err;
    }
    return action;
  }

  /** Record the error the job fails with (the first one wins). */
  protected fail(err: unknown): void {
    this.failure ??= toBlkrepError(err);
  }

  protected emitEvent(event: JobEventBody): void {
    const full = { ...event, id: this.id, type: this.type } as JobEvent;
    this.emit(channelOf(full.event), full);
    this.emit('event', full);
  }

  // ------------------------------------------------------------------------------ internals

  private transition(to: JobStatus): void {
    this.machine.goto(to);
  }

  private async runToEnd(): Promise<void> {
    let ok = true;
    try {
      if (this._pauseRequested) this.onPauseRequested();
      await this.execute();
    } catch (err) {
      ok = false;
      this.fail(err);
    }
    if (this.hardCancel || this.failure) ok = false;
    if (ok) {
      if (this._status === 'paused') this.transition(this.resumeTo);
      this.transition('waiting');
      this.transition('pending');
      if (!this.autoFinalize && !this.hardCancel) await new Promise<void>((resolve) => (this.finalizeGate = resolve));
      if (this.hardCancel) ok = false;
      else {
        try {
          await this.prepare();
          await this.commit();
        } catch (err) {
          this.fail(err);
          ok = false;
        }
      }
    }
    if (!ok) {
      this.transition('aborting');
      try {
        await this.abort();
      } catch (err) {
        this.fail(err);
      }
    }
    await this.conclude();
  }

  private async conclude(): Promise<void> {
    try {
      await this.clean();
    } catch (err) {
      this.fail(err);
    }
    for (const w of this.pauseWaiters.splice(0)) {
      w.reject(this.failure ?? new BlkrepError('ERR_JOB_STATE', `job ${this.id} ended before it paused`, { errno: 'EINVAL' }));
    }
    const { length, offset, speed } = this.query();
    if (this.hardCancel || (this.softCancel && !this.failure)) {
      this.emitEvent({ event: 'cancelled', length, offset, speed, consistent: !this.hardCancel });
    } else {
      this.emitEvent({
        event: 'completed',
        length,
        offset,
        speed,
        ...(this.failure ? { error: { code: this.failure.code, message: this.failure.message, errno: this.failure.errno } } : {}),
      });
    }
    this._ready = false;
    this._pauseRequested = false;
    this.transition('concluded');
    this.resolveDone();
    if (this.autoDismiss) this.emit('dismissed', this);
  }
}

// ---------------------------------------------------------------------------------- JobManager

/**
 * The jobs of one process (the serve-nbd daemon, or one offline command): ids are unique, every
 * job's events are relayed on 'event', and a concluded job leaves when dismissed (automatically
 * unless created with autoDismiss false).
 */
export class JobManager extends EventEmitter {
  private readonly jobs = new Map<string, Job>();
  /** per type, so the first backup is backup0 whatever ran before it */
  private readonly counters = new Map<string, number>();

  /** An id not in use, "mirror0", "mirror1" …, numbered per type. */
  newId(type: string): string {
    for (;;) {
      const n = this.counters.get(type) ?? 0;
      this.counters.set(type, n + 1);
      const id = `${type}${n}`;
      if (!this.jobs.has(id)) return id;
    }
  }

  /** Take a created job in, start it (unless start is false), relay its events. */
  add(job: Job, options: { start?: boolean } = {}): Job {
    if (this.jobs.has(job.id)) throw new BlkrepError('ERR_JOB_EXISTS', `a job with id ${job.id} exists already`, { errno: 'EINVAL', details: { id: job.id } });
    this.jobs.set(job.id, job);
    job.on('event', (e: JobEvent) => this.emit('event', e));
    job.once('dismissed', () => {
      if (this.jobs.get(job.id) === job) this.jobs.delete(job.id);
      this.emit('dismissed', job.id);
    });
    if (options.start !== false) job.start();
    return job;
  }

  get(id: string): Job {
    const job = this.jobs.get(id);
    if (!job) throw new BlkrepError('ERR_JOB_NOT_FOUND', `no job with id ${id} (jobs: ${[...this.jobs.keys()].join(', ') || 'none'})`, { errno: 'EINVAL', details: { id } });
    return job;
  }

  has(id: string): boolean {
    return this.jobs.has(id);
  }

  list(): JobInfo[] {
    return [...this.jobs.values()].map((j) => j.query());
  }

  query(id: string): JobInfo {
    return this.get(id).query();
  }

  pause(id: string): Promise<void> {
    return this.get(id).pause();
  }

  resume(id: string): void {
    this.get(id).resume();
  }

  setSpeed(id: string, speed: number): void {
    this.get(id).setSpeed(speed);
  }

  complete(id: string, options?: Record<string, unknown>): Promise<void> {
    return this.get(id).complete(options);
  }

  cancel(id: string, options?: { force?: boolean }): Promise<void> {
    return this.get(id).cancel(options);
  }

  finalize(id: string): Promise<void> {
    return this.get(id).finalize();
  }

  dismiss(id: string): void {
    this.get(id).dismiss();
  }

  /** Cancel (force) every job and wait for them to conclude. */
  async shutdown(): Promise<void> {
    await Promise.all(
      [...this.jobs.values()].map(async (j) => {
        if (VERBS.cancel.includes(j.status)) await j.cancel({ force: true }).catch(() => {});
        await j.whenConcluded();
      }),
    );
  }
}
