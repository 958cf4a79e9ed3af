/**
 * The wait spinner (src/cli/spinner.ts, ora): drawn only on a terminal, never with --json or
 * TERM=dumb; cleared and the cursor shown again when the wait ends, by success or by failure.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { spinnerShown, startSpinner, withSpinner } from '../../src/cli/spinner.js';
import { followJob } from '../../src/cli/job-command.js';
import { fakeStream } from '../support/fake-terminal.js';

const term = process.env.TERM;
afterEach(() => {
  if (term === undefined) delete process.env.TERM;
  else process.env.TERM = term;
});

describe('withSpinner', () => {
  it('on a terminal: draws the text, hides the cursor, then clears the line and shows the cursor again', async () => {
    process.env.TERM = 'xterm-256color';
    const s = fakeStream(true);
    const r = await withSpinner('job mirror0: completing…', { enabled: true, stream: s }, async () => 42);
    expect(r).toBe(42);
    const t = s.text();
    expect(t).toContain('job mirror0: completing…');
    expect(t).toContain('\x1b[?25l');
    expect(t.endsWith('\x1b[?25h')).toBe(true);
  });

  it('clears up the same way when the wait fails, and passes the error on', async () => {
    process.env.TERM = 'xterm';
    const s = fakeStream(true);
    const err = Object.assign(new Error('no such job'), { code: 'ERR_JOB_NOT_FOUND' });
    await expect(withSpinner('waiting', { enabled: true, stream: s }, async () => Promise.reject(err))).rejects.toBe(err);
    expect(s.text().endsWith('\x1b[?25h')).toBe(true);
  });

  it('writes nothing off a terminal, with --json (enabled false) or with TERM=dumb', async () => {
    process.env.TERM = 'xterm';
    for (const [isTTY, enabled, termValue] of [[false, true, 'xterm'], [true, false, 'xterm'], [true, true, 'dumb']] as const) {
      process.env.TERM = termValue;
      const s = fakeStream(isTTY);
      expect(spinnerShown({ enabled, stream: s })).toBe(false);
      expect(await withSpinner('waiting', { enabled, stream: s }, async () => 'done')).toBe('done');
      expect(s.text()).toBe('');
    }
  });
});

describe('--wait: a spinner until the job reports its length', () => {
  it('followJob draws "waiting until done" while the job has no length yet, and clears it when the job ends', async () => {
    process.env.TERM = 'xterm';
    const s = fakeStream(true);
    const events: Array<Record<string, unknown>> = [];
    const hook: { listener?: () => void } = {};
    let closed!: () => void;
    const client = { request: async () => ({ offset: 0, length: 0 }), closed: new Promise<void>((r) => (closed = r)) };
    const follow = followJob(client as never, events as never, hook, 'backup0', 'done', { progress: true, stream: s });
    expect(s.text()).toContain('job backup0: waiting until done…');
    expect(s.text()).toContain('\x1b[?25l');
    events.push({ event: 'job-completed', id: 'backup0', type: 'backup' });
    hook.listener!();
    await expect(follow).resolves.toMatchObject({ event: 'job-completed' });
    expect(s.text().endsWith('\x1b[?25h')).toBe(true);
    closed();
  });

  it('startSpinner: nothing off a terminal; stop() twice is harmless', () => {
    const off = fakeStream(false);
    startSpinner('x', { enabled: true, stream: off }).stop();
    expect(off.text()).toBe('');
    process.env.TERM = 'xterm';
    const on = fakeStream(true);
    const sp = startSpinner('waiting', { enabled: true, stream: on });
    sp.stop();
    const after = on.text();
    sp.stop();
    expect(on.text()).toBe(after);
    expect(after).toContain('waiting');
  });
});
