/**
 * The test fault hook of the checkpoint's crash rules (PAIR-SPEC): with the environment variable
 * BLKREP_TEST_CRASH_AT=checkpoint-step-4|5|6|7, the daemon kills itself with SIGKILL at the end of
 * that step of a checkpoint on the secondary (replication.md §2), as a power cut there would; with
 * BLKREP_TEST_CRASH_AT=failover-<step> (FailoverStep), at the start of that step of a promotion;
 * with BLKREP_TEST_CRASH_COUNT=K at the K-th checkpoint reaching it (so after checkpoint 1, the initial sync's).
 * Without the variable this does nothing. It is a test hook, not a feature: never set it in
 * production. BLKREP_TEST_BOOT_ID_FILE (readBootId, below) fakes a reboot.
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { BlkrepError } from '../api/errors.js';

export type CrashPoint = 'hidden-stamp-written' | 'checkpoint-step-4' | 'checkpoint-step-5' | 'checkpoint-step-6' | 'checkpoint-step-7' | `failover-${string}`;

/** BLKREP_TEST_CRASH_COUNT=K: the K-th time the point is reached in the process (default the first) */
let reached = 0;
export function crashPoint(point: CrashPoint): void {
  if (process.env.BLKREP_TEST_CRASH_AT !== point) return;
  if (++reached < Number(process.env.BLKREP_TEST_CRASH_COUNT || 1)) return;
  process.kill(process.pid, 'SIGKILL');
  // nothing more may happen in this process while the signal lands
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10_000);
}

/**
 * The fault hook of failure cases 6 and 7 (replication.md §4): with BLKREP_TEST_FAIL_AT set to a
 * step of the failover (`failover-<step>`, FailoverStep) or `checkpoint-step-6` (emptying the
 * hidden disk in a checkpoint, after the active disk) or `cbw-copy` (a copy-before-write of the
 * secondary, after its read and hidden write: the replica write fails ERR_PAIR_CBW), that step fails with an I/O error the
 * first time it runs in the process, as a disk failing once would (so a retry can succeed); with
 * BLKREP_TEST_FAIL_UNTIL=FILE as well, every time until FILE exists.
 * Without the variable this does nothing; a test hook, not a feature.
 */
const fired = new Set<string>();
/** times each fault point was reached (BLKREP_TEST_FAIL_COUNT) */
const reachedFault = new Map<string, number>();
export function faultPoint(point: string): void {
  if (!fires(point)) return;
  throw faultError(point);
}

/**
 * faultPoint for an async step, with two more knobs: BLKREP_TEST_FAIL_COUNT=K fails the K-th time
 * the point is reached (not the first), and BLKREP_TEST_HOLD_UNTIL=FILE holds the failing step
 * until FILE exists, then fails it (a request kept in flight while the test does something else,
 * without a timing guess). Undefined (nothing to await) when the point does not fire.
 */
export function heldFaultPoint(point: string): Promise<never> | undefined {
  if (!fires(point)) return undefined;
  const hold = process.env.BLKREP_TEST_HOLD_UNTIL;
  if (!hold) return Promise.reject(faultError(point));
  return (async () => {
    while (!existsSync(hold)) await new Promise((r) => setTimeout(r, 10));
    throw faultError(point);
  })();
}

function fires(point: string): boolean {
  if (process.env.BLKREP_TEST_FAIL_AT !== point) return false;
  // BLKREP_TEST_FAIL_UNTIL=FILE: the step fails every time it runs until FILE exists (a disk failing for a while)
  const until = process.env.BLKREP_TEST_FAIL_UNTIL;
  if (until ? existsSync(until) : fired.has(point)) return false;
  const n = (reachedFault.get(point) ?? 0) + 1;
  reachedFault.set(point, n);
  if (n < Number(process.env.BLKREP_TEST_FAIL_COUNT || 1)) return false;
  fired.add(point);
  return true;
}

function faultError(point: string): BlkrepError {
  return new BlkrepError('ERR_TEST_FAULT', `injected fault at ${point} (BLKREP_TEST_FAIL_AT)`, { errno: 'EIO' });
}

/**
 * The boot id a volatile hidden disk is recorded under (state.ts `volatileHidden`): the kernel's
 * /proc/sys/kernel/random/boot_id, new at every boot. Test hook: BLKREP_TEST_BOOT_ID_FILE names
 * another file to read it from, so a test can fake "the host rebooted" (a host crash) without
 * one; never set it in production. Null when it cannot be read.
 */
export const BOOT_ID_FILE = '/proc/sys/kernel/random/boot_id';
export async function readBootId(): Promise<{ id: string | null; file: string; error?: string }> {
  const file = process.env.BLKREP_TEST_BOOT_ID_FILE || BOOT_ID_FILE;
  try {
    const id = (await readFile(file, 'utf8')).trim();
    return id === '' ? { id: null, file, error: 'empty' } : { id, file };
  } catch (err) {
    return { id: null, file, error: (err as Error).message };
  }
}
