/**
 * The Promela model of the mirror and its dirty bitmaps (model/mirror.pml, DESIGN §5), checked
 * exhaustively with spin at 2 sectors × 3 writes: the algorithm passes, every deliberately
 * broken variant is caught. See model/README.md.
 */
import { execFile, spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const MODEL = resolve(dirname(fileURLToPath(import.meta.url)), '../../model/mirror.pml');
const TIMEOUT = 180_000;

type Mode = 'safety' | 'cycles';

interface PanResult {
  output: string;
  errors: number;
  states: number;
  transitions: number;
  depth: number;
  seconds: number;
}

function run(cmd: string, args: string[], cwd: string): Promise<string> {
  return new Promise((res, rej) => {
    execFile(cmd, args, { cwd, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      // pan exits 0 whether or not it found errors; the output says which
      if (err) rej(new Error(`${cmd} ${args.join(' ')} failed: ${err.message}\n${stdout}\n${stderr}`));
      else res(stdout + stderr);
    });
  });
}

function num(output: string, re: RegExp): number {
  const m = re.exec(output);
  if (!m) throw new Error(`pan output lacks ${re}:\n${output}`);
  return Number(m[1]);
}

/** Why the model cannot be checked here, or undefined. Not a skip: CI installs spin through
 * scripts/setup.sh, so a missing spin is a broken machine and every test below fails. */
function missingTools(): string | undefined {
  for (const [cmd, arg] of [
    ['spin', '-V'],
    ['gcc', '--version'],
  ]) {
    const r = spawnSync(cmd, [arg], { encoding: 'utf8' });
    if (r.error || r.status !== 0) {
      return (
        `${cmd} is not installed (${r.error?.message ?? `exit ${r.status}`}): checking the model needs ` +
        `the Debian packages spin and gcc — run scripts/setup.sh (or apt-get install spin gcc)`
      );
    }
  }
  return undefined;
}
const MISSING = missingTools();

/** At most two verifications at once (the machines running this have two cores; pan uses one
 * core and up to ~1 GB each). */
let running = 0;
const queue: Array<() => void> = [];
async function limited<T>(fn: () => Promise<T>): Promise<T> {
  if (running >= 2) await new Promise<void>((r) => queue.push(r));
  running++;
  try {
    return await fn();
  } finally {
    running--;
    queue.shift()?.();
  }
}

/** spin -a, gcc, pan in a fresh directory (they write pan.*, *.trail in the cwd), removed after. */
function verify(defines: string[], mode: Mode = 'safety'): Promise<PanResult> {
  return limited(() => verifyNow(defines, mode));
}

async function verifyNow(defines: string[], mode: Mode): Promise<PanResult> {
  if (MISSING) throw new Error(MISSING);
  const dir = mkdtempSync(join(tmpdir(), 'blkrep-spin-'));
  try {
    copyFileSync(MODEL, join(dir, 'mirror.pml'));
    await run('spin', [...defines.map((d) => `-D${d}`), '-a', 'mirror.pml'], dir);
    // -w: spin's generated pan.c trips gcc's -Wstringop-overflow on the model's for loops
    await run('gcc', ['-O2', '-w', mode === 'safety' ? '-DSAFETY' : '-DNP', '-o', 'pan', 'pan.c'], dir);
    const t0 = process.hrtime.bigint();
    const output = await run('./pan', ['-m100000', ...(mode === 'cycles' ? ['-l'] : [])], dir);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const result: PanResult = {
      output,
      errors: num(output, /errors: (\d+)/),
      states: num(output, /(\d+) states, stored/),
      transitions: num(output, /(\d+) transitions/),
      depth: num(output, /depth reached (\d+)/),
      seconds,
    };
    const label = [mode, ...defines].join(' ');
    console.log(
      `spin ${label}: errors ${result.errors}, ${result.states} states, ${result.transitions} ` +
        `transitions, depth ${result.depth}, ` +
        `${seconds.toFixed(2)} s`,
    );
    return result;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The search covered the whole state space: nothing cut short by depth, memory or hash. */
function expectComplete(r: PanResult): void {
  expect(r.output).toContain('Full statespace search');
  expect(r.output).not.toMatch(/max search depth too small/);
  expect(r.output).not.toMatch(/[Ss]earch not completed/);
  expect(r.output).not.toMatch(/out of memory/);
  expect(r.output).not.toMatch(/bitstate|hash-compact/i);
}

/** Every statement of the model was reached except the unreachable ends of endless loops. */
function expectAllReached(r: PanResult): void {
  const unreached = r.output
    .split('\n')
    .filter((l) => /^\s+\S+\.pml:\d+, state \d+, "/.test(l))
    .filter((l) => !/"-end-"$/.test(l.trim()));
  expect(unreached).toEqual([]);
}

function expectCorrect(r: PanResult): void {
  expect(r.errors, r.output).toBe(0);
  expectComplete(r);
}

function expectCaught(r: PanResult, what: RegExp): void {
  expect(r.errors, r.output).toBeGreaterThanOrEqual(1);
  expect(r.output).toMatch(what);
}

// which property a counterexample violates (pan prints the asserted expression)
const CRASH_INVARIANT = /pan:1: assertion violated .*src_flushed/;
const CONSISTENCY_POINT = /pan:1: assertion violated .*cpoint/;
const RECOVERY = /pan:1: assertion violated .*tgt_cache\[0\]==src_cache\[0\]/;
const CYCLE = /pan:1: non-progress cycle/;

describe.concurrent('model/mirror.pml: the mirror and bitmap algorithm (2 sectors × 3 writes)', () => {
  it('has spin and gcc to check it with', () => {
    expect(MISSING, MISSING).toBeUndefined();
  });

  it('holds: crash invariant in every state, recovery, consistency points, convergence', { timeout: TIMEOUT }, async () => {
    const r = await verify([]);
    expectCorrect(r);
    expectAllReached(r);
    expect(r.output).toMatch(/invalid end states\s+\+/);
    // 2 sectors × 3 writes × 2 copies × 1 crash is millions of states, not a trivially small space
    expect(r.states).toBeGreaterThan(1_000_000);
  });

  it('terminates: no cycles, so with no further writes the mirror converges', { timeout: TIMEOUT }, async () => {
    const r = await verify([], 'cycles');
    expectCorrect(r);
    expect(r.output).toMatch(/non-progress cycles\s+\+/);
  });

  it('holds with two crashes', { timeout: TIMEOUT }, async () => {
    const r = await verify(['MAXCRASH=2']);
    expectCorrect(r);
    expectAllReached(r);
  });

  it('§5 to the letter (clear on the target ack) holds when target writes are FUA', { timeout: TIMEOUT }, async () => {
    expectCorrect(await verify(['CLEAR_BEFORE_TARGET_STABLE', 'TARGET_FUA']));
  });

  it('catches a bit cleared while a write is in flight', { timeout: TIMEOUT }, async () => {
    expectCaught(await verify(['BROKEN_CLEAR_IN_FLIGHT']), CONSISTENCY_POINT);
  });

  it('catches a source flush acknowledged before the bitmap is persisted', { timeout: TIMEOUT }, async () => {
    expectCaught(await verify(['BROKEN_NO_PERSIST_BEFORE_FLUSH']), CRASH_INVARIANT);
  });

  it('catches a cleared bit persisted while the target holds the data only in its cache', { timeout: TIMEOUT }, async () => {
    expectCaught(await verify(['CLEAR_BEFORE_TARGET_STABLE']), CRASH_INVARIANT);
  });

  it('catches two overlapping copies of one chunk', { timeout: TIMEOUT }, async () => {
    expectCaught(await verify(['BROKEN_OVERLAP']), CONSISTENCY_POINT);
  });

  it('catches a crashed bitmap trusted without the activity log', { timeout: TIMEOUT }, async () => {
    expectCaught(await verify(['BROKEN_NO_ACTIVITY_LOG']), RECOVERY);
  });

  it('catches an activity log recorded at completion instead of before submission', { timeout: TIMEOUT }, async () => {
    expectCaught(await verify(['BROKEN_AL_AT_ACK']), CRASH_INVARIANT);
  });

  it('catches a missing target flush at dirty count zero', { timeout: TIMEOUT }, async () => {
    expectCaught(await verify(['BROKEN_NO_TARGET_FLUSH']), CONSISTENCY_POINT);
  });

  it('catches a copy loop that never clears a bit (only the cycle check can)', { timeout: TIMEOUT }, async () => {
    // safe — nothing is ever wrongly clean — so the safety run passes...
    expectCorrect(await verify(['BROKEN_NO_PROGRESS']));
    // ...but it copies forever
    expectCaught(await verify(['BROKEN_NO_PROGRESS'], 'cycles'), CYCLE);
  });
});
