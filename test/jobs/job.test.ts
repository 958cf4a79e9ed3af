// The job state machine: transitions as data, verbs in the wrong state, exact event sequences,
// error policies, the rate limiter and the manager.
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import {
  Job, JobManager, RateLimiter, TRANSITIONS, VERBS, JOB_STATUSES, errorAction, canTransition,
  type ErrorAction, type JobEvent, type JobOptions, type IoErrorReport,
} from '../../src/jobs/job.js';

/** A job whose driver the test steers by hand. */
class StepJob extends Job {
  readonly type = 'step';
  busy = false;
  private finish!: (v: void) => void;
  private failWith!: (e: unknown) => void;
  private result = new Promise<void>((resolve, reject) => {
    this.finish = resolve;
    this.failWith = reject;
  });
  prepared = 0;
  aborted = 0;
  cleaned = 0;
  prepareError: Error | undefined;
  completeOptions: Record<string, unknown> | undefined;
  resumed = 0;

  constructor(options: Partial<JobOptions> = {}) {
    super({ id: 'job0', ...options });
    this.result.catch(() => {});
  }
  protected execute(): Promise<void> {
    return this.result;
  }
  protected override onPauseRequested(): void {
    if (!this.busy) this.reachedPausePoint();
  }
  protected override onResume(): void {
    this.resumed++;
  }
  protected override onComplete(options: Record<string, unknown>): void {
    this.completeOptions = options;
    this.finish();
  }
  protected override onCancel(hard: boolean): void {
    if (hard) this.failWith(this.signal.reason);
    else this.finish();
  }
  protected override supportsSoftCancel(): boolean {
    return true;
  }
  protected override async prepare(): Promise<void> {
    this.prepared++;
    if (this.prepareError) throw this.prepareError;
  }
  protected override async abort(): Promise<void> {
    this.aborted++;
  }
  protected override async clean(): Promise<void> {
    this.cleaned++;
  }
  // the driver's side
  idle(): void {
    this.busy = false;
    this.reachedPausePoint();
  }
  ready(synced = true): void {
    this.setReady(synced);
  }
  done(): void {
    this.finish();
  }
  crash(err: unknown): void {
    this.failWith(err);
  }
  ioError(report: IoErrorReport): ErrorAction {
    return this.handleIoError(report);
  }
  step(done: number, remaining: number): void {
    this.progress(done, remaining);
  }
}

function record(job: Job): string[] {
  const out: string[] = [];
  job.on('event', (e: JobEvent) => {
    switch (e.event) {
      case 'status-change':
        out.push(e.status);
        break;
      case 'ready':
        out.push(`ready(${e.synced})`);
        break;
      case 'error':
        out.push(`error(${e.side} ${e.operation} ${e.errno} ${e.action})`);
        break;
      case 'completed':
        out.push(e.error ? `completed(${e.error.code})` : 'completed');
        break;
      case 'cancelled':
        out.push(`cancelled(${e.consistent ? 'consistent' : 'unusable'})`);
        break;
      case 'copy-mode':
        out.push(`copy-mode(${e.from}->${e.to})`);
        break;
    }
  });
  return out;
}

function expectState(fn: () => unknown, verb: string, status: string): void {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(BlkrepError);
    expect((err as BlkrepError).code).toBe('ERR_JOB_STATE');
    expect((err as BlkrepError).details).toMatchObject({ verb, status });
    return;
  }
  throw new Error(`${verb} in ${status} did not throw`);
}

async function expectStateAsync(p: () => Promise<unknown>, verb: string, status: string): Promise<void> {
  let thrown: unknown;
  try {
    await p();
  } catch (err) {
    thrown = err;
  }
  expect(thrown).toBeInstanceOf(BlkrepError);
  expect((thrown as BlkrepError).code).toBe('ERR_JOB_STATE');
  expect((thrown as BlkrepError).details).toMatchObject({ verb, status });
}

describe('the state machine as data', () => {
  it('has QEMU\'s states, every transition goes to a known state, concluded is final', () => {
    expect([...JOB_STATUSES]).toEqual(['created', 'running', 'paused', 'ready', 'waiting', 'pending', 'aborting', 'concluded']);
    for (const s of JOB_STATUSES) for (const t of TRANSITIONS[s]) expect(JOB_STATUSES).toContain(t);
    expect(TRANSITIONS.concluded).toEqual([]);
    for (const s of JOB_STATUSES) if (s !== 'concluded') expect(canTransition(s, 'aborting') || s === 'aborting').toBe(true);
    expect(canTransition('running', 'ready')).toBe(true);
    expect(canTransition('ready', 'running')).toBe(true);
    expect(canTransition('created', 'ready')).toBe(false);
    expect(VERBS.complete).toEqual(['ready']);
    expect(VERBS.dismiss).toEqual(['concluded']);
    expect(VERBS.cancel).not.toContain('concluded');
  });
});

describe('event sequences', () => {
  it('run, ready, complete: created → running → ready → waiting → pending → concluded', async () => {
    const job = new StepJob();
    const ev = record(job);
    expect(job.status).toBe('created');
    job.start();
    expect(job.status).toBe('running');
    job.ready();
    await job.complete({ pivot: true });
    expect(ev).toEqual(['running', 'ready(true)', 'ready', 'waiting', 'pending', 'completed', 'concluded']);
    expect(job.completeOptions).toEqual({ pivot: true });
    expect([job.prepared, job.aborted, job.cleaned]).toEqual([1, 0, 1]);
    expect(job.query()).toMatchObject({ status: 'concluded', ioStatus: 'ok', paused: false });
  });

  it('a job that finishes by itself (no ready) goes running → waiting → pending → concluded', async () => {
    const job = new StepJob();
    const ev = record(job);
    job.start();
    job.done();
    await job.whenConcluded();
    expect(ev).toEqual(['running', 'waiting', 'pending', 'completed', 'concluded']);
  });

  it('pause waits for the pause point; resume returns to where it was (running or ready)', async () => {
    const job = new StepJob();
    const ev = record(job);
    job.start();
    job.busy = true;
    const paused = job.pause();
    expect(job.status).toBe('running');
    expect(job.query().paused).toBe(true);
    job.idle();
    await paused;
    expect(job.status).toBe('paused');
    job.resume();
    expect(job.status).toBe('running');
    job.ready();
    await job.pause();
    job.resume();
    expect(job.status).toBe('ready');
    expect(job.resumed).toBe(2);
    job.done();
    await job.whenConcluded();
    expect(ev).toEqual(['running', 'paused', 'running', 'ready(true)', 'ready', 'paused', 'ready', 'waiting', 'pending', 'completed', 'concluded']);
  });

  it('a ready job that falls out of step goes back to running with ready(false)', async () => {
    const job = new StepJob();
    const ev = record(job);
    job.start();
    job.ready(true);
    job.ready(false);
    job.ready(true);
    job.ready(true); // no repeat
    await job.cancel({ force: true });
    expect(ev).toEqual(['running', 'ready(true)', 'ready', 'ready(false)', 'running', 'ready(true)', 'ready', 'aborting', 'cancelled(unusable)', 'concluded']);
  });

  it('cancel before ready aborts (target unusable); cancel of a created job too', async () => {
    const job = new StepJob();
    const ev = record(job);
    job.start();
    await job.cancel();
    expect(ev).toEqual(['running', 'aborting', 'cancelled(unusable)', 'concluded']);
    expect([job.prepared, job.aborted, job.cleaned]).toEqual([0, 1, 1]);

    const created = new StepJob();
    const ev2 = record(created);
    await created.cancel();
    expect(ev2).toEqual(['aborting', 'cancelled(unusable)', 'concluded']);
    created.start(); // starting a cancelled job does nothing
    expect(created.status).toBe('concluded');
  });

  it('cancel after ready without force ends consistent, through waiting and pending', async () => {
    const job = new StepJob();
    const ev = record(job);
    job.start();
    job.ready();
    await job.cancel();
    expect(ev).toEqual(['running', 'ready(true)', 'ready', 'waiting', 'pending', 'cancelled(consistent)', 'concluded']);
  });

  it('cancel of a paused job ends it; the pause waiter learns it', async () => {
    const job = new StepJob();
    const ev = record(job);
    job.start();
    await job.pause();
    await job.cancel();
    expect(ev).toEqual(['running', 'paused', 'aborting', 'cancelled(unusable)', 'concluded']);
  });

  it('a failing driver: aborting, completed with the error', async () => {
    const job = new StepJob();
    const ev = record(job);
    job.start();
    job.crash(new BlkrepError('ERR_X', 'boom', { errno: 'EIO' }));
    await job.whenConcluded();
    expect(ev).toEqual(['running', 'aborting', 'completed(ERR_X)', 'concluded']);
    expect(job.error?.code).toBe('ERR_X');
    expect(job.query().error).toMatchObject({ code: 'ERR_X', errno: 'EIO' });
  });

  it('prepare failing (a pivot that fails) aborts from pending, and complete() rejects', async () => {
    const job = new StepJob();
    job.prepareError = new BlkrepError('ERR_PIVOT', 'cannot pivot', { errno: 'EIO' });
    const ev = record(job);
    job.start();
    job.ready();
    await expect(job.complete()).rejects.toMatchObject({ code: 'ERR_PIVOT' });
    expect(ev).toEqual(['running', 'ready(true)', 'ready', 'waiting', 'pending', 'aborting', 'completed(ERR_PIVOT)', 'concluded']);
    expect([job.prepared, job.aborted, job.cleaned]).toEqual([1, 1, 1]);
  });

  it('without auto-finalize the job waits in pending for finalize(); without auto-dismiss it stays until dismissed', async () => {
    const manager = new JobManager();
    const job = new StepJob({ autoFinalize: false, autoDismiss: false });
    const ev = record(job);
    manager.add(job);
    job.done();
    await new Promise((r) => setImmediate(r));
    expect(job.status).toBe('pending');
    expectState(() => job.dismiss(), 'dismiss', 'pending');
    await manager.finalize('job0');
    expect(job.status).toBe('concluded');
    expect(manager.has('job0')).toBe(true);
    manager.dismiss('job0');
    expect(manager.has('job0')).toBe(false);
    expect(ev).toEqual(['running', 'waiting', 'pending', 'completed', 'concluded']);
  });
});

describe('verbs in the wrong state are typed errors and change nothing', () => {
  it('complete before ready, resume when not paused, pause twice, finalize/dismiss early, anything after concluded', async () => {
    const job = new StepJob();
    const ev = record(job);
    job.start();
    await expectStateAsync(() => job.complete(), 'complete', 'running');
    expectState(() => job.resume(), 'resume', 'running');
    await expectStateAsync(() => job.finalize(), 'finalize', 'running');
    expectState(() => job.dismiss(), 'dismiss', 'running');
    await job.pause();
    expectState(() => job.pause(), 'pause', 'paused');
    await expectStateAsync(() => job.complete(), 'complete', 'paused');
    job.resume();
    expect(() => job.setSpeed(-1)).toThrow(/speed -1/);
    expect(() => job.start()).toThrow(/already been started/);
    job.done();
    await job.whenConcluded();
    for (const [verb, call] of [
      ['pause', () => job.pause()],
      ['resume', () => job.resume()],
      ['set-speed', () => job.setSpeed(1)],
    ] as const) expectState(call, verb, 'concluded');
    await expectStateAsync(() => job.cancel(), 'cancel', 'concluded');
    await expectStateAsync(() => job.complete(), 'complete', 'concluded');
    expect(ev).toEqual(['running', 'paused', 'running', 'waiting', 'pending', 'completed', 'concluded']);
  });

  it('the error names the job, the verb, the state and what would allow it', async () => {
    const job = new StepJob({ id: 'mirror7' });
    job.start();
    await expect(job.complete()).rejects.toThrow('job mirror7 is running: complete needs it to be ready');
    await job.cancel();
  });

  it('a bad id is refused', () => {
    expect(() => new StepJob({ id: 'a b' })).toThrow(BlkrepError);
  });
});

describe('error policies (DESIGN §6)', () => {
  it('maps policy and errno to an action', () => {
    expect(errorAction('report', 'EIO')).toBe('report');
    expect(errorAction('ignore', 'ENOSPC')).toBe('ignore');
    expect(errorAction('stop', 'EIO')).toBe('stop');
    expect(errorAction('enospc', 'ENOSPC')).toBe('stop');
    expect(errorAction('enospc', 'EIO')).toBe('report');
  });

  const err = (errno: 'EIO' | 'ENOSPC') => new BlkrepError('ERR_INJECTED', `injected ${errno}`, { errno });

  it('stop pauses with io-status; resume clears it', async () => {
    const job = new StepJob({ onTargetError: 'enospc', onSourceError: 'stop' });
    const ev = record(job);
    job.start();
    expect(job.ioError({ side: 'target', operation: 'write', offset: 0, length: 4096, error: err('ENOSPC') })).toBe('stop');
    expect(job.status).toBe('paused');
    expect(job.query()).toMatchObject({ ioStatus: 'nospace', paused: true });
    job.resume();
    expect(job.query()).toMatchObject({ ioStatus: 'ok', paused: false, status: 'running' });
    expect(job.ioError({ side: 'source', operation: 'read', offset: 0, length: 1, error: err('EIO') })).toBe('stop');
    expect(job.query()).toMatchObject({ ioStatus: 'failed', status: 'paused' });
    job.resume();
    expect(job.ioError({ side: 'target', operation: 'flush', offset: 0, length: 0, error: err('EIO') })).toBe('report');
    job.crash(job.error);
    await job.whenConcluded();
    expect(ev).toEqual([
      'running', 'error(target write ENOSPC stop)', 'paused', 'running', 'error(source read EIO stop)', 'paused', 'running',
      'error(target flush EIO report)', 'aborting', 'completed(ERR_INJECTED)', 'concluded',
    ]);
  });

  it('ignore is an event and nothing else', async () => {
    const job = new StepJob({ onSourceError: 'ignore' });
    const events: JobEvent[] = [];
    job.on('io-error', (e: JobEvent) => events.push(e));
    job.start();
    expect(job.ioError({ side: 'source', operation: 'read', offset: 65536, length: 65536, error: err('EIO') })).toBe('ignore');
    expect(job.status).toBe('running');
    expect(events).toEqual([
      { event: 'error', id: 'job0', type: 'step', side: 'source', operation: 'read', errno: 'EIO', action: 'ignore', offset: 65536, length: 65536, message: 'injected EIO' },
    ]);
    await job.cancel();
  });
});

describe('query', () => {
  it('reports length, offset, speed and an ETA from the recent rate', async () => {
    let now = 0;
    const job = new StepJob({ clock: { now: () => now }, speed: 1000 });
    job.start();
    job.step(0, 1000);
    now = 1000;
    job.step(100, 900);
    expect(job.query()).toMatchObject({ type: 'step', status: 'running', length: 1000, offset: 100, speed: 1000, rate: 100, eta: 9 });
    job.setSpeed(0);
    expect(job.query().speed).toBe(0);
    await job.cancel();
  });
});

describe('RateLimiter', () => {
  it('lets a burst through, then spaces reservations at the rate', () => {
    let now = 0;
    const rl = new RateLimiter(1000, { now: () => now }, 100);
    expect(rl.tryReserve(100)).toBe(0); // a full bucket of 100 ms = 100 bytes... starts empty
    expect(rl.tryReserve(500)).toBe(100); // in debt by 100: 100 ms
    now = 100;
    expect(rl.tryReserve(500)).toBe(0); // back to 0: may go, now 500 in debt
    expect(rl.delay()).toBe(500);
    now = 700;
    expect(rl.delay()).toBe(0);
    rl.setRate(0);
    expect(rl.tryReserve(1e12)).toBe(0);
  });

  it('moves the number of bytes the rate allows over a long run', () => {
    let now = 0;
    const rl = new RateLimiter(1 << 20, { now: () => now });
    let moved = 0;
    while (now < 10_000) {
      const wait = rl.tryReserve(65536);
      if (wait === 0) moved += 65536;
      else now += wait;
    }
    expect(moved / (1 << 20)).toBeGreaterThan(9.9);
    expect(moved / (1 << 20)).toBeLessThan(10.3);
  });
});

describe('JobManager', () => {
  it('numbers ids per type (the first backup is backup0 after any mirrors); a taken id is skipped', () => {
    const m = new JobManager();
    expect(m.newId('mirror')).toBe('mirror0');
    expect(m.newId('mirror')).toBe('mirror1');
    expect(m.newId('backup')).toBe('backup0');
    m.add(new StepJob({ id: 'backup1' }), { start: false });
    expect(m.newId('backup')).toBe('backup2');
    expect(m.newId('mirror')).toBe('mirror2');
  });

  it('unique ids, list, unknown ids, relay of events, auto-dismiss', async () => {
    const m = new JobManager();
    const events: JobEvent[] = [];
    m.on('event', (e: JobEvent) => events.push(e));
    const id = m.newId('step');
    expect(id).toBe('step0');
    const job = new StepJob({ id });
    m.add(job);
    expect(() => m.add(new StepJob({ id }))).toThrow(expect.objectContaining({ code: 'ERR_JOB_EXISTS' }));
    expect(() => m.get('nope')).toThrow(expect.objectContaining({ code: 'ERR_JOB_NOT_FOUND' }));
    expect(m.list().map((j) => [j.id, j.status])).toEqual([['step0', 'running']]);
    m.setSpeed(id, 5);
    expect(m.query(id).speed).toBe(5);
    await m.pause(id);
    m.resume(id);
    await m.cancel(id);
    expect(m.has(id)).toBe(false);
    expect(events.map((e) => e.event)).toEqual(['status-change', 'status-change', 'status-change', 'status-change', 'cancelled', 'status-change']);
  });

  it('shutdown cancels everything', async () => {
    const m = new JobManager();
    const a = m.add(new StepJob({ id: 'a' }));
    const b = m.add(new StepJob({ id: 'b' }));
    (b as StepJob).ready();
    await m.shutdown();
    expect([a.status, b.status]).toEqual(['concluded', 'concluded']);
  });
});
