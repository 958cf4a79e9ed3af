/**
 * The fence hook (--fence-hook CMD): before this node takes over from a peer it believes dead, a
 * command the operator provides makes sure the peer cannot write any more (power it off through
 * a PDU or IPMI, revoke its storage path, mark it outdated), and says so with DRBD's fence-peer
 * exit codes, so DRBD handlers (crm-fence-peer.9.sh, stonith_admin wrappers) can be reused:
 *
 *   3 the peer's disk is inconsistent   4 the peer is outdated   5 the peer is unreachable
 *   6 the peer refused (it is primary)  7 the peer was fenced (STONITH)
 *
 * Only 4 and 7 confirm the peer cannot write: the takeover proceeds on those alone, unless
 * `force` (an operator's explicit choice; automatic failover never forces). A hook that runs past
 * its timeout is killed with its whole process group and counts as failed.
 *
 * The command runs under /bin/sh -c with the peer's details in the environment: BLKREP_PEER,
 * BLKREP_NODE, BLKREP_PEER_ADDRESSES, BLKREP_EPOCH, BLKREP_GENERATION, BLKREP_RESOURCE, and
 * DRBD_PEER / DRBD_RESOURCE for existing DRBD handlers.
 */
import { spawn } from 'node:child_process';

export type FenceVerdict = 'inconsistent' | 'outdated' | 'unreachable' | 'refused' | 'fenced' | 'failed' | 'timeout';

export const FENCE_EXIT_CODES: Readonly<Record<number, FenceVerdict>> = { 3: 'inconsistent', 4: 'outdated', 5: 'unreachable', 6: 'refused', 7: 'fenced' };

export interface FenceRequest {
  command: string;
  /** this node's id */
  node: string;
  peer: string;
  /** where the peer was heard (the heartbeat URIs) */
  peerAddresses?: readonly string[];
  /** the resource (export) being taken over */
  resource?: string;
  epoch?: bigint;
  generation?: string;
  /** kill the hook after this long (default 60 s, DRBD's handler timeout is unbounded) */
  timeoutMs?: number;
  /** proceed whatever the hook says (never set by automatic failover) */
  force?: boolean;
  signal?: AbortSignal;
  /** grace between SIGTERM and SIGKILL at the timeout (default 2 s) */
  killGraceMs?: number;
}

export interface FenceResult {
  verdict: FenceVerdict;
  /** the hook's exit status (null when killed by a signal) */
  exitCode: number | null;
  signal: string | null;
  /** true only on outdated (4) or fenced (7), or any result with force */
  proceed: boolean;
  forced: boolean;
  durationMs: number;
  /** the last 4 KiB the hook wrote to stderr, for the log */
  stderr: string;
}

export const DEFAULT_FENCE_TIMEOUT_MS = 60_000;
const STDERR_KEEP = 4096;

export function verdictOf(exitCode: number | null): FenceVerdict {
  return (exitCode !== null && FENCE_EXIT_CODES[exitCode]) || 'failed';
}

/** True for the verdicts that confirm the peer cannot write. */
export function confirmsFenced(verdict: FenceVerdict): boolean {
  return verdict === 'outdated' || verdict === 'fenced';
}

export function runFenceHook(request: FenceRequest): Promise<FenceResult> {
  const started = performance.now();
  const timeoutMs = request.timeoutMs ?? DEFAULT_FENCE_TIMEOUT_MS;
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    BLKREP_NODE: request.node,
    BLKREP_PEER: request.peer,
    BLKREP_PEER_ADDRESSES: (request.peerAddresses ?? []).join(' '),
    BLKREP_RESOURCE: request.resource ?? '',
    BLKREP_EPOCH: (request.epoch ?? 0n).toString(),
    BLKREP_GENERATION: request.generation ?? '',
    DRBD_PEER: request.peer,
    DRBD_RESOURCE: request.resource ?? '',
  };
  return new Promise((resolve) => {
    // Its own process group, so a timeout kills the hook and whatever it started.
    const child = spawn('/bin/sh', ['-c', request.command], { env, stdio: ['ignore', 'ignore', 'pipe'], detached: true });
    let stderr = '';
    let timedOut = false;
    let killTimer: NodeJS.Timeout | undefined;
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => {
      stderr = (stderr + chunk).slice(-STDERR_KEEP);
    });
    const killGroup = (signal: NodeJS.Signals): void => {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, signal);
      } catch {
        // already gone
      }
    };
    const stop = (): void => {
      timedOut = true;
      killGroup('SIGTERM');
      killTimer = setTimeout(() => killGroup('SIGKILL'), request.killGraceMs ?? 2000);
    };
    const timer = setTimeout(stop, timeoutMs);
    const onAbort = (): void => stop();
    request.signal?.addEventListener('abort', onAbort, { once: true });
    const finish = (exitCode: number | null, signal: string | null, spawnError?: Error): void => {
      clearTimeout(timer);
      request.signal?.removeEventListener('abort', onAbort);
      // the group may still hold children the hook left behind after a timeout
      if (timedOut) killGroup('SIGKILL');
      if (killTimer) clearTimeout(killTimer);
      const verdict: FenceVerdict = timedOut ? 'timeout' : verdictOf(exitCode);
      const forced = request.force === true && !confirmsFenced(verdict);
      resolve({
        verdict,
        exitCode,
        signal,
        proceed: confirmsFenced(verdict) || request.force === true,
        forced,
        durationMs: Math.round(performance.now() - started),
        stderr: spawnError ? `${stderr}${spawnError.message}` : stderr,
      });
    };
    let done = false;
    const once = (exitCode: number | null, signal: string | null, spawnError?: Error): void => {
      if (done) return;
      done = true;
      child.stderr.destroy();
      finish(exitCode, signal, spawnError);
    };
    child.once('error', (err) => once(null, null, err));
    // 'close' waits for stderr too; a child the hook left in the background may hold it open, so
    // the exit status counts once stderr is done or 200 ms after the exit.
    child.once('exit', (code, signal) => {
      const late = setTimeout(() => once(code, signal), 200);
      child.once('close', () => {
        clearTimeout(late);
        once(code, signal);
      });
    });
  });
}

/** One line for the log and the event: what the hook said and what happens next. */
export function describeFence(r: FenceResult, peer: string): string {
  const how = r.verdict === 'timeout' ? 'ran past its timeout and was killed' : r.exitCode === null ? `was killed by ${r.signal ?? 'a signal'}` : `exited ${r.exitCode}`;
  const meaning: Record<FenceVerdict, string> = {
    inconsistent: "the peer's disk is inconsistent",
    outdated: 'the peer is outdated',
    unreachable: 'the peer is unreachable: not fenced',
    refused: 'the peer refused: it is primary',
    fenced: 'the peer was fenced',
    failed: 'not a fence-peer exit code (3-7): not fenced',
    timeout: 'not fenced',
  };
  // sh's own codes: the hook never ran (a path without the x bit, a name not on PATH)
  if (r.verdict === 'failed' && r.exitCode === 126) meaning.failed = 'the shell could not run it: not executable (chmod +x) — not fenced';
  if (r.verdict === 'failed' && r.exitCode === 127) meaning.failed = 'the shell could not find it: no such command — not fenced';
  const next = r.proceed ? (r.forced ? 'proceeding because forced' : 'proceeding') : 'not proceeding (only 4 "outdated" and 7 "fenced" confirm the peer cannot write)';
  return `fence hook for peer "${peer}" ${how} (${meaning[r.verdict]}); ${next}`;
}
