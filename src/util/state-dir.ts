/**
 * Where a disk's side files go: the pair state (DISK.pair.json), the peer bitmap
 * (DISK.pair.dirty), a secondary's hidden and active disks (DISK.hidden.qcow2,
 * DISK.active.qcow2) and salvage images.
 *
 * Beside a disk that is a file, as always. A block device lives in /dev, a devtmpfs that is empty
 * after every boot (and not writable under systemd's hardening): the pair state must survive a
 * reboot, so for a block device they go to the state directory instead, under the device path
 * escaped as systemd-escape --path does (/dev/disk/by-id/wwn-0x5 → dev-disk-by\x2did-wwn\x2d0x5):
 * STATE/dev-vdb.pair.json. Name the disk by a stable path (/dev/disk/by-id/…): another path to
 * the same device is another set of files.
 *
 * The state directory: serve-nbd --state-dir, else $BLKREP_STATE_DIR, else $STATE_DIRECTORY (set
 * by systemd's StateDirectory=, which blkrep@.service uses), else /var/lib/blkrep; created 0700
 * when first needed.
 */
import { mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { BlkrepError } from '../api/errors.js';

export const DEFAULT_STATE_DIR = '/var/lib/blkrep';

let configured: string | undefined;

/** serve-nbd --state-dir (undefined: back to the environment and the default). */
export function setStateDir(dir: string | undefined): void {
  configured = dir;
}

export function stateDir(env: NodeJS.ProcessEnv = process.env): string {
  const fromSystemd = env.STATE_DIRECTORY?.split(':')[0];
  return configured ?? (env.BLKREP_STATE_DIR || undefined) ?? (fromSystemd || undefined) ?? DEFAULT_STATE_DIR;
}

/** systemd-escape --path: "/" → "-", anything but [A-Za-z0-9:_.] (and a leading ".") → \xNN. */
export function escapePath(path: string): string {
  const trimmed = path.replace(/\/+/g, '/').replace(/^\/|\/$/g, '');
  if (trimmed === '') return '-';
  let out = '';
  for (const [i, ch] of [...Buffer.from(trimmed, 'utf8')].entries()) {
    const c = String.fromCharCode(ch);
    if (c === '/') out += '-';
    else if (/[A-Za-z0-9:_]/.test(c) || (c === '.' && i > 0)) out += c;
    else out += `\\x${ch.toString(16).padStart(2, '0')}`;
  }
  return out;
}

function isBlockDevice(path: string): boolean {
  try {
    return statSync(path).isBlockDevice();
  } catch {
    return false;
  }
}

/**
 * The prefix of `disk`'s side files: `disk` itself for a file, STATE/ESCAPED for a block device
 * (the state directory made 0700 if missing; ERR_STATE_DIR when it cannot be).
 */
export function sideFileBase(disk: string): string {
  if (!isBlockDevice(disk)) return disk;
  const dir = stateDir();
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new BlkrepError('ERR_STATE_DIR', `${disk} is a block device, so its pair state goes to the state directory ${dir}, which cannot be created: ${(err as Error).message} (--state-dir or BLKREP_STATE_DIR choose another)`, {
      errno: 'EIO',
      cause: err,
      details: { disk, stateDir: dir },
    });
  }
  return join(dir, escapePath(disk));
}
