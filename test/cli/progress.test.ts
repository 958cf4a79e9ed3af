/**
 * The copy progress bar (src/cli/progress.ts): nothing off a terminal or when disabled; on a
 * terminal with TERM=dumb, plain lines at each tenth instead of a redrawn bar.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { progressBar } from '../../src/cli/progress.js';
import { fakeStream } from '../support/fake-terminal.js';

const term = process.env.TERM;
afterEach(() => {
  if (term === undefined) delete process.env.TERM;
  else process.env.TERM = term;
});

const MiB = 1024 * 1024;

describe('progressBar', () => {
  it('TERM=dumb on a terminal: one plain line per tenth reached, no escape sequences, nothing after stop', () => {
    process.env.TERM = 'dumb';
    const s = fakeStream(true);
    const bar = progressBar('mirror', 64 * MiB, { enabled: true, stream: s });
    for (const done of [1, 6.4, 6.5, 20, 63, 64]) bar.update(done * MiB);
    bar.stop();
    bar.update(64 * MiB);
    const lines = s.text().split('\n').filter(Boolean);
    expect(lines.map((l) => l.replace(/, [^,]*\/s$/, ''))).toEqual([
      'mirror: 10% 6.4 MiB of 64 MiB',
      'mirror: 30% 20 MiB of 64 MiB',
      'mirror: 90% 63 MiB of 64 MiB',
      'mirror: 100% 64 MiB of 64 MiB',
    ]);
    expect(s.text()).not.toMatch(/\x1b/);
  });

  it('writes nothing off a terminal, when disabled (--json, --no-progress) or for an empty length', () => {
    process.env.TERM = 'xterm';
    for (const [isTTY, enabled, total] of [[false, true, MiB], [true, false, MiB], [true, true, 0]] as const) {
      const s = fakeStream(isTTY);
      const bar = progressBar('backup', total, { enabled, stream: s });
      bar.update(total);
      bar.stop();
      expect(s.text()).toBe('');
    }
  });
});
