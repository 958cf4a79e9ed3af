/**
 * The pair key (--heartbeat-key FILE): the bytes of a file both nodes hold, at least 16 of them
 * (e.g. `head -c 32 /dev/urandom > /etc/blkrep/pair.key`). Like ssh with a private key, a file
 * that other users may read is refused: anyone who can read it can forge beats. So is a file
 * owned by another user than this one or root (whoever owns it chose the key), and anything but a
 * regular file (a FIFO, a device, a directory), checked before a byte is read.
 */
import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import { BlkrepError } from '../api/errors.js';

export const MIN_KEY_BYTES = 16;
export const MAX_KEY_BYTES = 4096;

export async function readHeartbeatKey(path: string): Promise<Buffer> {
  let handle;
  try {
    // O_NONBLOCK: a FIFO in the key's place is refused below (not a regular file) instead of
    // blocking start-up until some writer opens it
    handle = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as { code?: string }).code ?? 'EIO';
    throw new BlkrepError('ERR_HEARTBEAT_KEY', `cannot read the heartbeat key ${path}: ${code}`, { errno: 'EINVAL', cause: err, details: { path, code } });
  }
  try {
    const st = await handle.stat();
    if (!st.isFile()) throw keyError(path, 'is not a regular file', {});
    if ((st.mode & 0o077) !== 0) {
      const mode = (st.mode & 0o777).toString(8).padStart(4, '0');
      throw keyError(path, `has mode ${mode}: other users may read it; chmod 0600 it`, { mode });
    }
    // as ssh with a private key: a key owned by another user (not root) may be theirs, planted
    // (at a name in /tmp, say) to make this node accept the beats they forge
    const uid = process.getuid?.();
    if (uid !== undefined && st.uid !== uid && st.uid !== 0) {
      throw keyError(path, `is owned by uid ${st.uid}, not by this user (uid ${uid}) or root: another user could have written it; chown it`, { owner: st.uid, uid });
    }
    if (st.size > MAX_KEY_BYTES) throw keyError(path, `is ${st.size} bytes, more than ${MAX_KEY_BYTES}: not a key file`, { bytes: st.size });
    const key = await handle.readFile();
    if (key.length < MIN_KEY_BYTES) throw keyError(path, `holds ${key.length} bytes, at least ${MIN_KEY_BYTES} are needed (head -c 32 /dev/urandom > ${path})`, { bytes: key.length });
    return key;
  } finally {
    await handle.close();
  }
}

function keyError(path: string, what: string, details: Record<string, unknown>): BlkrepError {
  return new BlkrepError('ERR_HEARTBEAT_KEY', `the heartbeat key ${path} ${what}`, { errno: 'EINVAL', details: { path, ...details } });
}
