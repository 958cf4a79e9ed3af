/**
 * Whose bitmap file is it? A bitmap file says which regions of a disk changed; whoever can
 * replace its bits can hide a write from the next incremental backup (an old, clean copy put
 * back). So a file that another user could have written is never trusted: it loads all-dirty
 * (the next copy is a full one), with the reason in the load state that serve-nbd's listening
 * line, `status` and `bitmap list` show. Trusted: a regular file owned by the process's user or
 * by root, writable by its owner only.
 */
import type { Stats } from 'node:fs';
import type { BitmapFault } from './image.js';

export interface TrustProblem {
  fault: Extract<BitmapFault, 'foreign-owner' | 'writable-by-others'>;
  reason: string;
}

/** Why a bitmap file with these stats cannot be trusted, or undefined when it can. */
export function trustProblem(st: Pick<Stats, 'uid' | 'mode'>, uid: number | undefined = process.getuid?.()): TrustProblem | undefined {
  if (uid === undefined) return undefined; // no users to tell apart (not POSIX)
  if (st.uid !== uid && st.uid !== 0) {
    return {
      fault: 'foreign-owner',
      reason: `the file is owned by uid ${st.uid}, neither this process's user (uid ${uid}) nor root: that user could have replaced its bits`,
    };
  }
  if ((st.mode & 0o022) !== 0) {
    const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
    const who = (st.mode & 0o002) !== 0 ? 'every user' : 'its group';
    return { fault: 'writable-by-others', reason: `the file is writable by ${who} (mode ${mode}): someone else could have replaced its bits` };
  }
  return undefined;
}
