/**
 * Spawning the built CLI (`node bin/run.js …`) and the peer tools (qemu-io, nbdinfo, fio …) from
 * tests, with every wait bounded and every process and temp dir cleaned up.
 *
 * Importing this module registers vitest hooks in the importing file: processes and temp dirs
 * created with scope 'test' (the default) are killed/removed after each test, those with scope
 * 'file' after the file. A process 'exit' handler SIGKILLs anything still running, so an aborted
 * run leaves no daemons behind.
 *
 * The CLI runs from dist/: run `npm run build` first (serve() and runCli() fail fast if it is missing).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach } from 'vitest';

export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const BIN = join(REPO_ROOT, 'bin', 'run.js');
const BUILT_COMMAND = join(REPO_ROOT, 'dist', 'src', 'commands', 'serve-nbd.js');

/** How long serve() waits for the listening line. */
export const LISTEN_TIMEOUT_MS = 20_000;
/** Default bound for runCli() and run(). */
export const RUN_TIMEOUT_MS = 30_000;

export type Scope = 'test' | 'file';

// -------------------------------------------------------------------------------------------------
// bookkeeping and cleanup

interface Tracked {
  child: ChildProcess;
  scope: Scope;
}

const children = new Set<Tracked>();
const tempDirs = new Map<string, Scope>();

function alive(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

function track(child: ChildProcess, scope: Scope): void {
  const t: Tracked = { child, scope };
  children.add(t);
  child.once('exit', () => children.delete(t));
}

/** SIGKILL the tracked processes of a scope (all when undefined) and wait until they are gone. */
export async function killChildren(scope?: Scope): Promise<void> {
  const victims = [...children].filter((t) => scope === undefined || t.scope === scope);
  await Promise.all(
    victims.map(async ({ child }) => {
      if (!alive(child)) return;
      const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.kill('SIGKILL');
      await withTimeout(gone, 5000, `process ${child.pid} to die after SIGKILL`).catch(() => {});
    }),
  );
}

async function removeTempDirs(scope?: Scope): Promise<void> {
  for (const [dir, s] of [...tempDirs]) {
    if (scope !== undefined && s !== scope) continue;
    tempDirs.delete(dir);
    await rm(dir, { recursive: true, force: true });
  }
}

afterEach(async () => {
  await killChildren('test');
  await removeTempDirs('test');
});

afterAll(async () => {
  await killChildren();
  await removeTempDirs();
});

process.on('exit', () => {
  for (const { child } of children) if (alive(child)) child.kill('SIGKILL');
});

/**
 * A fresh directory under os.tmpdir(), removed after the test (or the file, for scope 'file').
 * Short names, so Unix socket paths in it stay well below the 107-byte limit.
 */
export async function makeTempDir(scope: Scope = 'test'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'blkrep-'));
  tempDirs.set(dir, scope);
  return dir;
}

// -------------------------------------------------------------------------------------------------
// waiting

export function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Poll `check` until it returns something other than undefined/false, at most `timeoutMs`.
 * A check that throws counts as "not yet"; its last error is in the timeout message.
 */
export async function waitFor<T>(
  check: () => T | undefined | false | Promise<T | undefined | false>,
  what: string,
  { timeoutMs = 10_000, intervalMs = 25 }: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() >= deadline) {
      const why = last instanceof Error ? ` (last error: ${last.message})` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${why}`);
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

// -------------------------------------------------------------------------------------------------
// running commands to completion

export interface RunResult {
  /** exit code, null when killed by a signal */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  timeoutMs?: number;
  /** written to stdin, which is then closed */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/**
 * Run a program to completion. Rejects (after SIGKILLing it) if it takes longer than timeoutMs,
 * with its output so far in the message; a non-zero exit is not an error.
 */
export function run(command: string, args: string[], options: RunOptions = {}): Promise<RunResult> {
  const { timeoutMs = RUN_TIMEOUT_MS, input, env, cwd } = options;
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env: env ?? process.env, cwd });
    track(child, 'test');
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.stdin!.on('error', () => {}); // a program that exits without reading its input
    child.stdin!.end(input ?? '');
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command} ${args.join(' ')}: no exit within ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${command}: ${err.message}`));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

function checkBuilt(): void {
  if (!existsSync(BUILT_COMMAND)) throw new Error(`${BUILT_COMMAND} is missing: run \`npm run build\` before these tests`);
}

/** `node bin/run.js ARGS…` to completion. */
export function runCli(args: string[], options: RunOptions = {}): Promise<RunResult> {
  checkBuilt();
  return run(process.execPath, [BIN, ...args], options);
}

/**
 * Whether a program is on PATH (for skipping tests whose peer is not installed on a developer's
 * machine). In CI, where scripts/setup.sh installs every peer, it is always true: a missing
 * peer there must fail the tests, not skip them.
 */
export function hasTool(name: string): boolean {
  if (process.env.CI) return true;
  return spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
}

// -------------------------------------------------------------------------------------------------
// long-running processes

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface Started {
  child: ChildProcess;
  pid: number;
  /** everything written to stdout/stderr so far */
  stdout(): string;
  stderr(): string;
  /** resolves when the process has exited and its output is complete */
  readonly exited: Promise<Exit>;
  /**
   * Send `signal` (default SIGTERM) unless it has exited, and wait for the exit (bounded; SIGKILL
   * and reject on timeout). Resolves to the exit code (null when it died of a signal).
   */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<number | null>;
  /** Wait for the exit without sending anything (bounded). */
  waitExit(timeoutMs?: number): Promise<Exit>;
}

/** Start a program that keeps running; stopped after the test (or file) at the latest. */
export function start(command: string, args: string[], options: { scope?: Scope; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Started {
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], env: options.env ?? process.env, cwd: options.cwd });
  track(child, options.scope ?? 'test');
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  child.stdin!.on('error', () => {});
  const exited = new Promise<Exit>((resolve, reject) => {
    child.once('error', (err) => reject(new Error(`cannot run ${command}: ${err.message}`)));
    child.once('close', (code, signal) => resolve({ code, signal }));
  });
  exited.catch(() => {}); // observed by whoever awaits it
  const waitExit = (timeoutMs = 20_000): Promise<Exit> =>
    withTimeout(exited, timeoutMs, `${command} (pid ${child.pid}) to exit; stderr: ${stderr}`);
  const stop = async (signal: NodeJS.Signals = 'SIGTERM', timeoutMs = 20_000): Promise<number | null> => {
    if (alive(child)) child.kill(signal);
    try {
      return (await waitExit(timeoutMs)).code;
    } catch (err) {
      child.kill('SIGKILL');
      throw err;
    }
  };
  return { child, pid: child.pid ?? -1, stdout: () => stdout, stderr: () => stderr, exited, stop, waitExit };
}

export interface ListeningLine {
  event: 'listening';
  uris: string[];
  pid: number;
}

export interface Served extends Started {
  uris: string[];
  /** the listening line exactly as printed (without the newline) */
  listeningLine: string;
}

/**
 * Start `node bin/run.js serve-nbd ARGS… --json` and wait (at most LISTEN_TIMEOUT_MS) for its
 * listening line. Rejects with the child's stderr if it exits, prints an error, or takes too long.
 */
export async function serve(args: string[], options: { scope?: Scope; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<Served> {
  checkBuilt();
  const { timeoutMs = LISTEN_TIMEOUT_MS } = options;
  const argv = [BIN, 'serve-nbd', ...args];
  if (!argv.includes('--json')) argv.push('--json');
  const p = start(process.execPath, argv, { scope: options.scope ?? 'test', env: options.env });
  const describe = (): string => `blkrep serve-nbd ${args.join(' ')}\nstdout: ${p.stdout()}\nstderr: ${p.stderr()}`;
  const firstLine = new Promise<string>((resolve, reject) => {
    const onData = (): void => {
      const nl = p.stdout().indexOf('\n');
      if (nl >= 0) {
        p.child.stdout!.off('data', onData);
        resolve(p.stdout().slice(0, nl));
      }
    };
    p.child.stdout!.on('data', onData);
    p.exited.then(
      (e) => reject(new Error(`serve-nbd exited (code ${e.code}, signal ${e.signal}) before listening\n${describe()}`)),
      reject,
    );
  });
  let line: string;
  try {
    line = await withTimeout(firstLine, timeoutMs, `the listening line of ${describe()}`);
  } catch (err) {
    p.child.kill('SIGKILL');
    throw err;
  }
  let event: ListeningLine;
  try {
    event = JSON.parse(line) as ListeningLine;
  } catch {
    p.child.kill('SIGKILL');
    throw new Error(`serve-nbd printed a line that is not JSON: ${line}\n${describe()}`);
  }
  if (event.event !== 'listening') {
    p.child.kill('SIGKILL');
    throw new Error(`serve-nbd printed ${line} instead of the listening line\n${describe()}`);
  }
  return { ...p, uris: event.uris, listeningLine: line };
}

/** nbd+unix URI for an export on a socket (A.14), for building URIs independently of the server. */
export function unixUri(socket: string, exportName = ''): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`;
}
