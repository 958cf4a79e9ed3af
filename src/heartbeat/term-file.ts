/**
 * The term file: a node's fencing terms kept across restarts, beside its pair image
 * (`IMAGE.term.json`, mode 0600), so that a restarted old primary cannot come back with an old
 * term and win.
 *
 *   {"version":1,"term":"3","seen":"5","primarySeen":"5","incarnation":"1765152000000","savedAt":"…"}
 *
 * - `term`: the term this node announced last (it took it when it became primary);
 * - `seen`: the highest term its peer announced;
 * - `primarySeen`: the highest term its peer announced *as primary*. When it is above `term`, this
 *   node was replaced: started again as a primary it is demoted at once, before any client can
 *   write, whether or not it hears its peer.
 * - `incarnation`: the heartbeat incarnation of this node's last start; the next start's is above
 *   it whatever the wall clock says (daemon.ts startHeartbeat). Absent in older files.
 *
 * Saves are synchronous and durable (a new file beside it, fsync, rename, fsync of the directory):
 * a save happens at each heartbeat start (its incarnation) and when a term grows (a takeover, a
 * peer's higher term), and the beat that carries a new term leaves only once the file holds it.
 */
import { randomBytes } from 'node:crypto';
import { closeSync, fchmodSync, fsyncSync, openSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { BlkrepError } from '../api/errors.js';
import { CREATE_NEW_FLAGS, fileCreateError, readOwnFileSync, UntrustedFileError } from '../util/safe-file.js';

export interface Terms {
  term: bigint;
  seen: bigint;
  primarySeen: bigint;
  /**
   * The heartbeat incarnation of this node's last start (service.ts `incarnation`), when one was
   * kept: the next start's is above it whatever the wall clock says. Absent in files written
   * before it was kept (an older blkrep ignores it).
   */
  incarnation?: bigint;
}

export const NO_TERMS: Terms = { term: 0n, seen: 0n, primarySeen: 0n };

export function termFilePath(imageBase: string): string {
  return `${imageBase}.term.json`;
}

function bad(path: string, why: string, cause?: unknown): BlkrepError {
  return new BlkrepError('ERR_BAD_TERM_FILE', `term file "${path}": ${why}; it keeps this node's fencing terms across restarts: fix or remove it (removing it lets a replaced primary start as one)`, {
    errno: 'EINVAL',
    ...(cause === undefined ? {} : { cause }),
    details: { path },
  });
}

const DECIMAL = /^(0|[1-9][0-9]{0,19})$/;
const U64_MAX = (1n << 64n) - 1n;

function field(path: string, json: Record<string, unknown>, name: keyof Terms): bigint {
  const v = json[name];
  if (typeof v !== 'string' || !DECIMAL.test(v) || BigInt(v) > U64_MAX) throw bad(path, `"${name}" is ${JSON.stringify(v)}, not a decimal string from 0 to ${U64_MAX}`);
  return BigInt(v);
}

/**
 * The terms in `path`; none (all 0) when the file does not exist. Only a file this node could have
 * written is read (the image's directory may be shared): opened O_NOFOLLOW|O_NONBLOCK, it must be
 * a regular file owned by this user or root that no other user may write — a symlink or a FIFO
 * planted at the name is refused at once, never followed or waited on.
 */
export function loadTerms(path: string): Terms {
  let text: string;
  try {
    text = readOwnFileSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return { ...NO_TERMS };
    if (err instanceof UntrustedFileError) throw bad(path, `it ${err.why}: not one this node wrote, not trusted`);
    throw bad(path, `cannot read it (${code ?? (err as Error).message})`, err);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw bad(path, `not JSON (${(err as Error).message})`, err);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw bad(path, 'not a JSON object');
  const o = json as Record<string, unknown>;
  if (o.version !== 1) throw bad(path, `version ${JSON.stringify(o.version)}, this blkrep reads version 1`);
  const terms: Terms = { term: field(path, o, 'term'), seen: field(path, o, 'seen'), primarySeen: field(path, o, 'primarySeen') };
  if (o.incarnation !== undefined) terms.incarnation = field(path, o, 'incarnation');
  return terms;
}

/** Write `terms` to `path` atomically and durably (mode 0600). Throws ERR_FILE_CREATE naming the file. */
export function saveTerms(path: string, terms: Terms): void {
  const data = Buffer.from(`${JSON.stringify({ version: 1, term: terms.term.toString(), seen: terms.seen.toString(), primarySeen: terms.primarySeen.toString(), ...(terms.incarnation === undefined ? {} : { incarnation: terms.incarnation.toString() }), savedAt: new Date().toISOString() })}\n`);
  const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${randomBytes(8).toString('hex')}`);
  try {
    const fd = openSync(tmp, CREATE_NEW_FLAGS, 0o600);
    try {
      fchmodSync(fd, 0o600);
      let done = 0;
      while (done < data.length) done += writeSync(fd, data, done, data.length - done, done);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
    syncDirectory(dirname(path));
  } catch (err) {
    try {
      unlinkSync(tmp);
    } catch {
      /* never made, or renamed */
    }
    throw fileCreateError(path, 'term file', err);
  }
}

function syncDirectory(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'EINVAL' && code !== 'ENOTSUP' && code !== 'EBADF') throw err;
  } finally {
    closeSync(fd);
  }
}
