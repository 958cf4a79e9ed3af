/**
 * The operator's pass over the pair commands (session 11, task op): what a script or a person
 * running the commands by hand met, one test each.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EVENT_NAMES } from '../../src/cli/event-names.js';
import { EVENT_SCHEMAS } from '../../src/cli/output-schemas.js';
import { REPO_ROOT, makeTempDir, runCli } from '../support/spawn.js';

describe('blkrep events: --event and --until names', () => {
  it('EVENT_NAMES is the list of EVENT_SCHEMAS (every name the daemon publishes)', () => {
    expect([...EVENT_NAMES].sort()).toEqual(Object.keys(EVENT_SCHEMAS).sort());
  });

  it('a name no event has is a usage error at once (exit 2, ERR_USAGE, the names listed), not a wait until --timeout', async () => {
    const dir = await makeTempDir();
    const ctl = join(dir, 'none.ctl');
    for (const args of [['--until', 'ready'], ['--event', 'job-ready', '--event', 'job-eror']]) {
      const r = await runCli(['events', '--control', ctl, '--timeout', '600', '--json', ...args]);
      expect(r.code).toBe(2);
      const err = JSON.parse(r.stdout) as { error: { code: string; message: string } };
      expect(err.error.code).toBe('ERR_USAGE');
      expect(err.error.message).toContain(args.at(-1) === 'ready' ? '--until "ready": no event has this name (did you mean job-ready?)' : '--event "job-eror": no event has this name');
      expect(err.error.message).toContain('the names: auto-failover, bitmap-added');
    }
    const text = await runCli(['events', '--control', ctl, '--until', 'checkpoint-done']);
    expect(text.code).toBe(2);
    expect(text.stderr).toContain('--until "checkpoint-done": no event has this name');
    // a known name goes on to the control socket (here: nobody there, exit 1)
    const known = await runCli(['events', '--control', ctl, '--until', 'checkpoint', '--json']);
    expect(known.code).toBe(1);
    expect((JSON.parse(known.stdout) as { error: { code: string } }).error.code).toBe('ERR_CONTROL_UNREACHABLE');
  });
});

describe('README.md', () => {
  it('does not call split-brain policies and failback by bitmaps missing (both exist: --after-split-brain, src/pair/README.md)', () => {
    const readme = readFileSync(join(REPO_ROOT, 'README.md'), 'utf8');
    expect(readme).not.toMatch(/Not yet: split-brain/);
    expect(readme).not.toMatch(/failback bounded by bitmaps \(it copies the whole disk\)/);
    expect(readme).toContain('--after-split-brain');
  });
});
