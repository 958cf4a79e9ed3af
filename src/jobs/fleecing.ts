/**
 * Image fleecing on a socket of its own: serve a backup job's point-in-time view
 * (BackupJob.snapshotNode) read-only over NBD on a Unix socket, for as long as the job runs.
 *
 * This is the `--fleecing-socket PATH` case only. By default (`--fleecing-export NAME` alone) the
 * view is an export of the serve-nbd daemon itself, on the daemon's own listeners: the job adds
 * it with JobContext.addExport (NbdServer.addExport) and it is removed when the job concludes —
 * see src/jobs/backup-daemon.ts. Here the view gets a small server of its own: one export,
 * read-only, on `socket` (mode 0600, refused if the path exists).
 */
import { chmod, lstat } from 'node:fs/promises';
import net from 'node:net';
import { BlkrepError } from '../api/errors.js';
import type { BlockNode } from '../api/block.js';
import { completeNode } from '../block/node.js';
import { NbdServer, type Logger } from '../nbd/server.js';

export interface FleecingServer {
  /** the export's name */
  readonly name: string;
  readonly socket: string;
  /** nbd+unix:///NAME?socket=PATH */
  readonly uri: string;
  readonly server: NbdServer;
  /** Stop serving: connections are closed, the socket file removed. */
  close(): Promise<void>;
}

export async function serveSnapshot(node: BlockNode, options: { name: string; socket: string; log?: Logger }): Promise<FleecingServer> {
  const { name, socket } = options;
  try {
    await lstat(socket);
    throw new BlkrepError('ERR_ADDRESS_IN_USE', `cannot serve the snapshot on ${socket}: the path exists`, { errno: 'EINVAL', details: { socket } });
  } catch (err) {
    if (err instanceof BlkrepError) throw err;
  }
  const server = new NbdServer({ exports: [{ name, node: completeNode(node), readOnly: true, description: node.description }], ...(options.log ? { log: options.log } : {}) });
  const listener = net.createServer((stream) => server.attach({ stream, peer: 'unix' }));
  await new Promise<void>((resolve, reject) => {
    listener.once('error', (err) => reject(new BlkrepError('ERR_LISTEN', `cannot serve the snapshot on ${socket}: ${err.message}`, { errno: 'EIO', cause: err })));
    // bound under umask 0177: the socket is 0600 from its first moment (the snapshot is the disk's data)
    let previous: number | undefined;
    try {
      previous = process.umask(0o177);
    } catch {
      // worker threads may not change the umask; the chmod below still applies
    }
    try {
      listener.listen({ path: socket }, () => resolve());
    } finally {
      if (previous !== undefined) process.umask(previous);
    }
  });
  await chmod(socket, 0o600).catch(() => {});
  let closing: Promise<void> | undefined;
  return {
    name,
    socket,
    uri: `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
    server,
    close: () => {
      closing ??= (async () => {
        const closed = new Promise<void>((resolve) => listener.close(() => resolve()));
        server.destroyAll('the backup job ended');
        await server.shutdown().catch(() => {});
        await closed;
      })();
      return closing;
    },
  };
}
