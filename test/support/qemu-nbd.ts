/**
 * qemu-nbd started and ready: its image open, its image locks taken, serving.
 *
 * qemu-nbd binds and listens on its socket BEFORE it opens the image (strace of qemu-nbd 7.2:
 * bind, listen, then the image's open and one F_OFD_SETLK per lock byte), so the socket's
 * existence says nothing about the image's locks: a test that waits for the socket and then
 * expects blkrep to be refused races qemu-nbd's open (on a loaded machine blkrep won, once in a
 * while). A client that connects is safe (the handshake waits for the main loop), but qemu-nbd
 * without --persistent exits when its first client leaves. Its --pid-file is written after the
 * export is set up, right before the main loop: the pid in it is the readiness signal.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { start, waitFor, type Scope, type Started } from './spawn.js';

export interface QemuNbd extends Started {
  /** the unix socket it serves on */
  socket: string;
}

/**
 * `qemu-nbd -k DIR/NAME.sock --pid-file NAME.pid ARGS…`, run in `dir` (the pid file's name is
 * relative, so that the command line, which lock errors quote up to 100 characters, stays short;
 * qemu-nbd wants the socket's path absolute); resolves once the pid file holds its pid. Stopped
 * after the test at the latest, as start() does.
 */
export async function startQemuNbd(dir: string, args: string[], options: { name?: string; scope?: Scope; timeoutMs?: number } = {}): Promise<QemuNbd> {
  const name = options.name ?? `q${Math.random().toString(36).slice(2, 6)}`;
  const pidFile = `${name}.pid`;
  const socket = join(dir, `${name}.sock`);
  const q = start('qemu-nbd', ['-k', socket, '--pid-file', pidFile, ...args], { cwd: dir, ...(options.scope ? { scope: options.scope } : {}) });
  await waitFor(
    async () => {
      if (q.child.exitCode !== null || q.child.signalCode !== null) return true;
      const text = await readFile(join(dir, pidFile), 'utf8').catch(() => '');
      return text.trim() === String(q.pid) || undefined;
    },
    `qemu-nbd ${args.join(' ')} to open its image (pid file)`,
    { timeoutMs: options.timeoutMs ?? 15_000 },
  );
  if (q.child.exitCode !== null || q.child.signalCode !== null) {
    throw new Error(`qemu-nbd ${args.join(' ')} exited (${q.child.exitCode ?? q.child.signalCode}) before serving: ${q.stderr()}`);
  }
  return { ...q, socket };
}
