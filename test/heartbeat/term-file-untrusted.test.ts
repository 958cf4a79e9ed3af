/**
 * Attack: the term file (IMAGE.term.json, beside the image) planted by another user of a shared
 * directory. A FIFO at the name hung serve-nbd --heartbeat at start (readFileSync of a FIFO blocks
 * the event loop until a writer opens it); a file of theirs set this node's fencing terms (a huge
 * primarySeen demotes a primary at every start). Now only a regular file owned by the daemon's
 * user (or root) that no other user may write is read: anything else is ERR_BAD_TERM_FILE, exit 1,
 * at once, naming the file and what is wrong — as a damaged term file is.
 */
import { execFileSync } from 'node:child_process';
import { chmod, chown, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli } from '../support/spawn.js';

const GOOD = '{"version":1,"term":"1","seen":"1","primarySeen":"99","savedAt":"2026-12-07T00:00:00Z"}\n';

async function startWith(plant: (termFile: string, dir: string) => Promise<void>): Promise<{ code: number | null; message: string; termFile: string }> {
  const dir = await makeTempDir();
  const img = join(dir, 'p.img');
  await writeFile(img, Buffer.alloc(1 << 20));
  const termFile = `${img}.term.json`;
  await plant(termFile, dir);
  // bounded: a hang is a failure (runCli kills it and rejects)
  const r = await runCli(['serve-nbd', img, '--socket', join(dir, 'p.sock'), '--json', '--heartbeat', 'udp://127.0.0.1:9', '--node-id', 'a', '--peer-id', 'b'], { timeoutMs: 15_000 });
  const error = (JSON.parse(r.stdout.trim().split('\n')[0]!) as { error: { code: string; message: string } }).error;
  expect(error.code).toBe('ERR_BAD_TERM_FILE');
  return { code: r.code, message: error.message, termFile };
}

describe('serve-nbd --heartbeat: a term file it did not write is refused at once (ERR_BAD_TERM_FILE, exit 1)', () => {
  it('a FIFO', async () => {
    const r = await startWith(async (p) => void execFileSync('mkfifo', [p]));
    expect(r.code).toBe(1);
    expect(r.message).toContain(`term file "${r.termFile}": it is not a regular file: not one this node wrote, not trusted;`);
  });

  it('a symlink to a valid term file: not followed', async () => {
    const r = await startWith(async (p, dir) => {
      await writeFile(join(dir, 'elsewhere.json'), GOOD, { mode: 0o600 });
      await symlink(join(dir, 'elsewhere.json'), p);
    });
    expect(r.code).toBe(1);
    expect(r.message).toContain(`term file "${r.termFile}": it is a symlink: not one this node wrote, not trusted;`);
  });

  it('a valid term file others may write (0666)', async () => {
    const r = await startWith(async (p) => {
      await writeFile(p, GOOD);
      await chmod(p, 0o666);
    });
    expect(r.code).toBe(1);
    expect(r.message).toContain(`term file "${r.termFile}": it has mode 0666: other users may write it: not one this node wrote, not trusted;`);
  });

  it.skipIf(process.getuid?.() !== 0)('a valid term file owned by another user (0600)', async () => {
    const r = await startWith(async (p) => {
      await writeFile(p, GOOD, { mode: 0o600 });
      await chown(p, 65534, 65534);
    });
    expect(r.code).toBe(1);
    expect(r.message).toContain(`term file "${r.termFile}": it is owned by uid 65534, not by this daemon's user (uid 0): not one this node wrote, not trusted;`);
  });
});
