/**
 * Attack: a job state file planted beside an image in a shared directory. At start serve-nbd loads
 * every IMAGE.job-ID.json beside each export's image as a paused job. Another user who can write
 * in that directory could plant one: a FIFO made start-up hang before the listening line (readFile
 * waits for a writer), and a file of theirs would be loaded as a job the operator never asked for.
 * Now only a regular file owned by the daemon's user (or root) that nobody else may write is
 * read; anything else is refused, logged and renamed IMAGE.job-ID.json.failed, and serving starts.
 */
import { execFileSync } from 'node:child_process';
import { chmod, chown, lstat, symlink, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, serve, waitFor } from '../support/spawn.js';

async function planted(make: (state: string) => Promise<void>): Promise<{ stderr: string; state: string }> {
  const dir = await makeTempDir();
  const image = join(dir, 'disk.img');
  await writeFile(image, '');
  await truncate(image, 1024 * 1024);
  const state = `${image}.job-x.json`;
  await make(state);
  // bounded: serve() rejects if the listening line does not come within its timeout
  const s = await serve([image, '--socket', join(dir, 's'), '--control', join(dir, 'c')], { timeoutMs: 20_000 });
  await waitFor(() => s.stderr().includes(`job state file ${state} not loaded`), 'the refusal on stderr');
  await s.stop();
  // kept for a look under another name, never loaded again
  await lstat(`${state}.failed`);
  return { stderr: s.stderr(), state };
}

const TRUST = 'not one this daemon wrote (it writes them mode 0600), not trusted';

describe('serve-nbd: job state files it did not write are not loaded', () => {
  it('a FIFO: start-up does not wait on it; refused, renamed .failed', async () => {
    const { stderr, state } = await planted(async (p) => void execFileSync('mkfifo', [p]));
    expect(stderr).toContain(`job state file "${state}" is not a regular file: ${TRUST}`);
  });

  it('a symlink (to a file that is not a job state): never followed', async () => {
    const { stderr, state } = await planted(async (p) => symlink('/etc/hostname', p));
    expect(stderr).toContain(`job state file "${state}" is a symlink: ${TRUST}`);
  });

  it('a file other users may write (mode 0666)', async () => {
    const { stderr, state } = await planted(async (p) => {
      await writeFile(p, '{}');
      await chmod(p, 0o666);
    });
    expect(stderr).toContain(`job state file "${state}" has mode 0666: other users may write it: ${TRUST}`);
  });

  it.skipIf(process.getuid?.() !== 0)('a file owned by another user (mode 0600)', async () => {
    const { stderr, state } = await planted(async (p) => {
      await writeFile(p, '{}', { mode: 0o600 });
      await chown(p, 65534, 65534);
    });
    expect(stderr).toContain(`job state file "${state}" is owned by uid 65534, not by this daemon's user (uid 0): ${TRUST}`);
  });
});
