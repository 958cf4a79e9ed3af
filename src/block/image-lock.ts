/**
 * Image locks as QEMU takes them (block/file-posix.c raw_apply_lock_bytes / raw_check_lock_bytes),
 * so that blkrep refuses an image QEMU or another blkrep holds, and QEMU refuses one blkrep holds,
 * exactly where QEMU refuses QEMU.
 *
 * Every permission P (bit i of QEMU's BLK_PERM_*: 0 consistent read, 1 write, 2 write unchanged,
 * 3 resize) has two lock bytes in the file: byte 100+i, read-locked by every user holding P, and
 * byte 200+i, read-locked by every user that does not share P with others. An open
 *   1. read-locks its bytes (100+i for each permission it takes, 200+i for each it does not share),
 *   2. tests, for each permission it takes, that no one else locks 200+i ("Failed to get "write"
 *      lock"), and for each it does not share, that no one else locks 100+i ("Failed to get shared
 *      "write" lock"),
 * and on a conflict drops what it took and fails ERR_IMAGE_LOCKED. The locks are OFD locks
 * (F_OFD_SETLK through the native addon): they belong to the open file description, conflict with
 * any other open() of the file (in this process too) and are released when the file is closed, or
 * when the process dies.
 *
 * What each open takes (measured against qemu-nbd / qemu-io / qemu-img 7.2, see lockPerms):
 *   qcow2 read-write   takes consistent read, write, resize   does not share write, resize
 *   qcow2 read-only    takes consistent read                  does not share write, resize
 *   raw read-write     takes consistent read, write           does not share resize
 *   raw read-only      takes consistent read                  does not share resize
 *   backing file       takes consistent read                  does not share write, resize
 *   --force-share      takes consistent read                  shares everything (qemu-img -U)
 *
 * The kernel does not say who holds an OFD lock (F_OFD_GETLK and /proc/locks give pid -1), so the
 * error finds the holder the way lslocks does: the "lock:" lines of /proc/PID/fdinfo/FD. Processes
 * of other users are not readable without privileges; the error then says the holder is unknown.
 */
import { readFile, readdir } from 'node:fs/promises';
import { fstat } from 'node:fs';
import { BlkrepError } from '../api/errors.js';
import type { SparseOps } from './native.js';

export const PERM_CONSISTENT_READ = 0x1;
export const PERM_WRITE = 0x2;
export const PERM_WRITE_UNCHANGED = 0x4;
export const PERM_RESIZE = 0x8;
export const PERM_ALL = 0xf;
/** QEMU's bdrv_perm_names, by bit index */
export const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;

/** byte 100+i: "I hold permission i" */
export const LOCK_PERM_BASE = 100;
/** byte 200+i: "I do not share permission i" */
export const LOCK_SHARED_BASE = 200;

/** The permissions an open takes and those it lets others take, as QEMU's bitmasks. */
export interface LockPerms {
  perm: number;
  shared: number;
}

export interface LockRequest {
  format: 'raw' | 'qcow2';
  readOnly: boolean;
  /** a read-only open that shares every permission (qemu-img -U) */
  forceShare?: boolean;
  /** a backing file of a qcow2 image (QEMU's COW child) */
  backing?: boolean;
}

/** What an open takes, as QEMU's file-posix node under qemu-nbd/qemu-img takes it for the same open. */
export function lockPerms(r: LockRequest): LockPerms {
  if (r.forceShare) return { perm: PERM_CONSISTENT_READ, shared: PERM_ALL };
  if (r.backing) return { perm: PERM_CONSISTENT_READ, shared: PERM_ALL & ~(PERM_WRITE | PERM_RESIZE) };
  if (r.format === 'qcow2') {
    // the qcow2 driver's metadata child: nobody else may write or resize the file under it
    return { perm: r.readOnly ? PERM_CONSISTENT_READ : PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared: PERM_ALL & ~(PERM_WRITE | PERM_RESIZE) };
  }
  // raw shares writes as QEMU's raw driver does (no metadata to corrupt), but not resizing
  return { perm: r.readOnly ? PERM_CONSISTENT_READ : PERM_CONSISTENT_READ | PERM_WRITE, shared: PERM_ALL & ~PERM_RESIZE };
}

/** Names of the permissions in a mask, e.g. "consistent read, write". */
export function permNames(mask: number): string {
  return PERM_NAMES.filter((_, i) => mask & (1 << i)).join(', ');
}

/** A process holding a lock byte, from /proc. */
export interface LockHolder {
  pid: number;
  /** its command line (shortened), or its name */
  command?: string;
}

type Ops = Pick<SparseOps, 'setLock' | 'getLock'>;

interface Conflict {
  byte: number;
  /** the permission's name */
  lock: string;
  /** 'use': another user does not share a permission we take; 'share': another user takes one we do not share */
  kind: 'use' | 'share';
  pid: number;
}

/** The lock bytes held by one open file description of an image. */
export class ImageLock {
  private constructor(
    private readonly ops: Ops,
    private readonly fd: number,
    readonly path: string,
    private held: LockPerms,
  ) {}

  /**
   * Take `want` on fd (an open file of `path`), or fail ERR_IMAGE_LOCKED holding nothing. With
   * `ops` null (no native addon) nothing is locked and undefined is returned.
   */
  static async acquire(ops: Ops | null, fd: number, path: string, want: LockPerms): Promise<ImageLock | undefined> {
    if (!ops) return undefined;
    const lock = new ImageLock(ops, fd, path, { perm: 0, shared: PERM_ALL });
    await lock.update(want);
    return lock;
  }

  /** what is held now */
  get perms(): LockPerms {
    return { ...this.held };
  }

  /**
   * Change what is held, as QEMU's permission update: take the union of the old and new bytes,
   * check the new permissions against everyone else, then drop what the new ones do not need.
   * On a conflict the old locks are kept and ERR_IMAGE_LOCKED is thrown.
   */
  async update(want: LockPerms): Promise<void> {
    const old = this.held;
    let conflict: Conflict | undefined;
    try {
      this.apply(old.perm | want.perm, ~old.shared | ~want.shared);
      conflict = this.check(want);
    } catch (err) {
      this.revert(old);
      if ((err as { code?: string }).code !== 'EAGAIN') throw this.failure(err);
      // a conflicting (write) lock on one of our bytes: not QEMU's, but a lock all the same
      conflict = { byte: -1, lock: 'consistent read', kind: 'use', pid: -1 };
    }
    if (conflict) {
      this.revert(old);
      throw await this.lockedError(conflict, want);
    }
    this.apply(want.perm, ~want.shared);
    this.held = { perm: want.perm, shared: want.shared };
  }

  /** Drop every lock byte (closing the file does too). */
  release(): void {
    try {
      this.apply(0, 0);
    } catch {
      // closing the fd releases them anyway
    }
    this.held = { perm: 0, shared: PERM_ALL };
  }

  // ---------------------------------------------------------------------------------------------

  /** Hold exactly bytes 100+i for each bit of perm and 200+i for each bit of unshared. */
  private apply(perm: number, unshared: number): void {
    for (let i = 0; i < PERM_NAMES.length; i++) {
      const bit = 1 << i;
      const hasPerm = (this.held.perm & bit) !== 0;
      if ((perm & bit) !== 0 && !hasPerm) this.ops.setLock(this.fd, LOCK_PERM_BASE + i, 1, 'read');
      if ((perm & bit) === 0 && hasPerm) this.ops.setLock(this.fd, LOCK_PERM_BASE + i, 1, 'unlock');
      this.held = { ...this.held, perm: (this.held.perm & ~bit) | (perm & bit) };
      const hasUnshared = (this.held.shared & bit) === 0;
      if ((unshared & bit) !== 0 && !hasUnshared) this.ops.setLock(this.fd, LOCK_SHARED_BASE + i, 1, 'read');
      if ((unshared & bit) === 0 && hasUnshared) this.ops.setLock(this.fd, LOCK_SHARED_BASE + i, 1, 'unlock');
      this.held = { ...this.held, shared: (this.held.shared & ~bit) | (~unshared & bit) };
    }
  }

  private revert(old: LockPerms): void {
    try {
      this.apply(old.perm, ~old.shared);
    } catch {
      // best effort: the error that brought us here says more
    }
  }

  /** raw_check_lock_bytes: the first conflict, or undefined. */
  private check(want: LockPerms): Conflict | undefined {
    for (let i = 0; i < PERM_NAMES.length; i++) {
      if (!(want.perm & (1 << i))) continue;
      const held = this.ops.getLock(this.fd, LOCK_SHARED_BASE + i, 1, 'write');
      if (held) return { byte: LOCK_SHARED_BASE + i, lock: PERM_NAMES[i]!, kind: 'use', pid: held.pid };
    }
    for (let i = 0; i < PERM_NAMES.length; i++) {
      if (want.shared & (1 << i)) continue;
      const held = this.ops.getLock(this.fd, LOCK_PERM_BASE + i, 1, 'write');
      if (held) return { byte: LOCK_PERM_BASE + i, lock: PERM_NAMES[i]!, kind: 'share', pid: held.pid };
    }
    return undefined;
  }

  private failure(err: unknown): BlkrepError {
    const code = (err as { code?: string }).code;
    return new BlkrepError('ERR_IMAGE_LOCK', `cannot lock "${this.path}": ${err instanceof Error ? err.message : String(err)}`, {
      errno: 'EIO',
      cause: err,
      details: { path: this.path, ...(code ? { syscode: code } : {}) },
    });
  }

  private async lockedError(c: Conflict, want: LockPerms): Promise<BlkrepError> {
    const found = c.pid > 0 ? [await describe(c.pid)] : c.byte >= 0 ? await findHolders(this.fd, c.byte) : [];
    // /proc lists this process too when it holds the byte itself (an update of a lock it holds):
    // the conflict is with the others
    const others = found.filter((h) => h.pid !== process.pid);
    const holders = others.length > 0 ? others : found;
    const who =
      holders.length === 0
        ? 'another process (not one this user can see in /proc)'
        : holders.map((h) => `pid ${h.pid}${h.command ? ` (${h.command})` : ''}`).join(', ');
    const what =
      c.byte < 0
        ? `${who} holds a conflicting lock on it`
        : c.kind === 'use'
          ? `failed to get "${c.lock}" lock: ${who} has it open and does not share "${c.lock}"`
          : `failed to get shared "${c.lock}" lock: ${who} has it open with "${c.lock}" permission`;
    const hint = (want.perm & PERM_WRITE) === 0 && want.shared !== PERM_ALL ? ' (--force-share reads it anyway, as qemu-img -U does)' : '';
    return new BlkrepError('ERR_IMAGE_LOCKED', `image "${this.path}" is in use: ${what}${hint}`, {
      errno: 'EPERM',
      details: { path: this.path, lock: c.lock, kind: c.kind, byte: c.byte, holders },
    });
  }
}

// -----------------------------------------------------------------------------------------------
// who holds it: /proc

/** Processes with an open file of fd's file that holds a lock covering `byte` (bounded search). */
export async function findHolders(fd: number, byte: number, limit = 4): Promise<LockHolder[]> {
  let id: string;
  try {
    id = await fileId(fd);
  } catch {
    return [];
  }
  const deadline = Date.now() + 5000;
  const found: LockHolder[] = [];
  let pids: string[];
  try {
    pids = (await readdir('/proc')).filter((p) => /^\d+$/.test(p));
  } catch {
    return [];
  }
  for (const pid of pids) {
    if (found.length >= limit || Date.now() > deadline) break;
    let fds: string[];
    try {
      fds = await readdir(`/proc/${pid}/fdinfo`);
    } catch {
      continue;
    }
    for (const f of fds) {
      const text = await readFile(`/proc/${pid}/fdinfo/${f}`, 'utf8').catch(() => '');
      if (!text.includes(id)) continue;
      if (holdsByte(text, id, byte)) {
        found.push(await describe(Number(pid)));
        break;
      }
    }
  }
  return found;
}

/** Whether fdinfo text has a "lock:" line on file `id` ("MAJ:MIN:INO") covering byte. */
export function holdsByte(fdinfo: string, id: string, byte: number): boolean {
  for (const line of fdinfo.split('\n')) {
    if (!line.startsWith('lock:')) continue;
    // lock:	1: OFDLCK ADVISORY  READ -1 fe:00:2146747 100 101
    const f = line.trim().split(/\s+/);
    const at = f.indexOf(id);
    if (at < 0) continue;
    const start = Number(f[at + 1]);
    const end = f[at + 2] === 'EOF' ? Infinity : Number(f[at + 2]);
    if (byte >= start && byte <= end) return true;
  }
  return false;
}

/** "MAJ:MIN:INO" as /proc/locks and fdinfo print a file (major and minor in hex, at least 2 digits). */
async function fileId(fd: number): Promise<string> {
  const st = await new Promise<import('node:fs').BigIntStats>((resolve, reject) => fstat(fd, { bigint: true }, (err, s) => (err ? reject(err) : resolve(s))));
  const dev = st.dev;
  // glibc's gnu_dev_major / gnu_dev_minor
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  const hex = (n: bigint) => n.toString(16).padStart(2, '0');
  return `${hex(major)}:${hex(minor)}:${st.ino}`;
}

async function describe(pid: number): Promise<LockHolder> {
  try {
    const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter(Boolean).join(' ');
    if (cmdline) return { pid, command: cmdline.length > 100 ? `${cmdline.slice(0, 97)}...` : cmdline };
  } catch {
    // gone, or not ours to read
  }
  try {
    return { pid, command: (await readFile(`/proc/${pid}/comm`, 'utf8')).trim() };
  } catch {
    return { pid };
  }
}

/** The lock a node holds on its file (RawNode, Qcow2Node), if any. */
export function lockOf(node: unknown): ImageLock | undefined {
  const lock = (node as { imageLock?: unknown } | null)?.imageLock;
  return lock instanceof ImageLock ? lock : undefined;
}
