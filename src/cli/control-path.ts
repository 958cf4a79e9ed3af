/**
 * Where a daemon's control socket is when the user does not say: `--control NAME` (no "/") is
 * RUNDIR/NAME.ctl; no --control at all is $BLKREP_CONTROL, else the one socket in RUNDIR.
 * RUNDIR is /run/blkrep for root and $XDG_RUNTIME_DIR/blkrep (/run/user/UID/blkrep) for
 * others, as systemd lays out runtime directories ($BLKREP_RUN_DIR overrides both). serve-nbd creates RUNDIR mode 0700 when it
 * is missing (and only RUNDIR, never a parent of it).
 */
import { mkdir, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { BlkrepError } from '../api/errors.js';

export const CONTROL_ENV = 'BLKREP_CONTROL';

export function runDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env['BLKREP_RUN_DIR']) return env['BLKREP_RUN_DIR'];
  const uid = process.getuid?.() ?? 0;
  if (uid === 0) return '/run/blkrep';
  return join(env['XDG_RUNTIME_DIR'] || `/run/user/${uid}`, 'blkrep');
}

/** A bare name (no "/") is RUNDIR/NAME.ctl; a path is itself. */
export function controlPathFor(given: string, env: NodeJS.ProcessEnv = process.env): string {
  if (given.includes('/')) return given;
  if (given === '' || given === '.' || given === '..') throw new BlkrepError('ERR_USAGE', `--control "${given}": give a path or a daemon name`, { errno: 'EINVAL' });
  return join(runDir(env), given.endsWith('.ctl') ? given : `${given}.ctl`);
}

/** For serve-nbd: the socket's path; RUNDIR is created (mode 0700) when the path is in it. */
export async function prepareControlPath(given: string, env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const path = controlPathFor(given, env);
  await ensureRunDirFor(path, env);
  return path;
}

/** Create RUNDIR (mode 0700, not its parents) when `path` is a file directly in it. */
export async function ensureRunDirFor(path: string, env: NodeJS.ProcessEnv = process.env): Promise<void> {
  const dir = runDir(env);
  if (path.startsWith(`${dir}/`) && !path.slice(dir.length + 1).includes('/')) {
    try {
      await mkdir(dir, { mode: 0o700 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new BlkrepError('ERR_FILE_CREATE', `cannot create the runtime directory ${dir}: ${(err as Error).message}`, { cause: err });
      }
    }
  }
}

/** For the live commands: the socket of the daemon meant, or a usage error saying how to name it. */
export async function findControl(given: string | undefined, env: NodeJS.ProcessEnv = process.env): Promise<string> {
  if (given !== undefined) return controlPathFor(given, env);
  const fromEnv = env[CONTROL_ENV];
  if (fromEnv) return controlPathFor(fromEnv, env);
  const dir = runDir(env);
  let names: string[] = [];
  try {
    names = (await readdir(dir)).filter((n) => n.endsWith('.ctl')).sort();
  } catch {
    // no directory: no daemon started with a bare --control name
  }
  const sockets: string[] = [];
  for (const n of names) {
    const st = await stat(join(dir, n)).catch(() => undefined);
    if (st?.isSocket()) sockets.push(n);
  }
  if (sockets.length === 1) return join(dir, sockets[0]!);
  if (sockets.length === 0) {
    throw new BlkrepError('ERR_USAGE', `no --control given, ${CONTROL_ENV} is not set, and no daemon's control socket is in ${dir}: give --control PATH (or start serve-nbd with --control NAME)`, { errno: 'EINVAL' });
  }
  throw new BlkrepError('ERR_USAGE', `no --control given and ${sockets.length} daemons have a control socket in ${dir} (${sockets.map((s) => s.slice(0, -4)).join(', ')}): say which with --control NAME`, { errno: 'EINVAL' });
}
