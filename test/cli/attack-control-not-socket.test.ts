/**
 * Attack: `--control PATH` naming something that is not a socket (a regular file, a FIFO, a
 * directory). connect(2) says ECONNREFUSED for all of them, as for a socket a dead daemon left
 * behind; the CLI said "nothing answers on control socket PATH (left behind by a daemon that
 * stopped?)" and told the operator to start a daemon there — which refuses the path
 * (ERR_CONTROL_PATH_EXISTS). Now it says what PATH is; a real stale socket keeps its message.
 * Nothing is read from, written to or removed at PATH.
 */
import { execFileSync } from 'node:child_process';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeTempDir, runCli } from '../support/spawn.js';

async function statusError(path: string): Promise<{ code: number | null; error: { code: string; message: string } }> {
  const r = await runCli(['status', '--control', path, '--json'], { timeoutMs: 20_000 });
  return { code: r.code, error: (JSON.parse(r.stdout) as { error: { code: string; message: string } }).error };
}

describe('status --control PATH where PATH is not a socket', () => {
  it('a regular file, a FIFO, a directory: exit 1 ERR_CONTROL_UNREACHABLE saying what it is; the file is left as it was', async () => {
    const dir = await makeTempDir();
    const file = join(dir, 'ctl.file');
    await writeFile(file, 'operator data\n');
    const fifo = join(dir, 'ctl.fifo');
    execFileSync('mkfifo', [fifo]);
    const sub = join(dir, 'ctl.dir');
    await mkdir(sub);
    for (const [path, kind] of [[file, 'a regular file'], [fifo, 'a FIFO'], [sub, 'a directory']] as const) {
      const r = await statusError(path);
      expect(r.code).toBe(1);
      expect(r.error).toEqual({ code: 'ERR_CONTROL_UNREACHABLE', message: `cannot reach the blkrep daemon: ${path} is ${kind}, not a control socket; give the --control path a daemon listens on` });
    }
    expect(await readFile(file, 'utf8')).toBe('operator data\n');
  });

  it('a socket nobody listens on still says it was left behind by a daemon that stopped', async () => {
    const path = join(await makeTempDir(), 'dead.sock');
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(`${path}.tmp`, resolve));
    // moved away, the socket file outlives the server (which unlinks only the name it bound)
    await rename(`${path}.tmp`, path);
    await new Promise<void>((resolve) => server.close(() => resolve()));
    const r = await statusError(path);
    expect(r.code).toBe(1);
    expect(r.error.code).toBe('ERR_CONTROL_UNREACHABLE');
    expect(r.error.message).toContain(`nothing answers on control socket ${path} (left behind by a daemon that stopped?)`);
  });
});
