/**
 * The unix transport: NBD over a Unix domain socket; the address is the socket's path.
 *
 * listen() replaces a stale socket file (one nobody answers on, left by a process that died) but
 * never a live one, and never a file that is not a socket. close() removes the socket file.
 *
 * Plugins import only types from the engine, so errors here are plain Errors carrying the same
 * fields as the engine's BlkrepError (`code`, `errno`, `details`); the engine adopts them as they are.
 * Aborted connects reject with the standard AbortError (`name` "AbortError", `code` "ABORT_ERR").
 */
import { chmod, lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import { resolve as resolvePath } from 'node:path';
import type { ConnectOptions, ListenOptions, Transport, TransportConnection, TransportListener } from 'blkrep/api';

type TransportErrno = 'EINVAL' | 'EIO' | 'EPERM';

export class UnixTransportError extends Error {
  readonly code: string;
  readonly errno: TransportErrno;
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: { errno?: TransportErrno; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'UnixTransportError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }
}

/** the socket file's mode unless ListenOptions.mode says otherwise: only the daemon's user connects */
const DEFAULT_MODE = 0o600;

/** sun_path holds 108 bytes on Linux and 104 on the BSDs and macOS, the final NUL included. */
const MAX_PATH_BYTES = process.platform === 'linux' ? 107 : 103;

function checkPath(address: string): string {
  if (address === '') {
    throw new UnixTransportError('ERR_BAD_ADDRESS', 'invalid unix socket address "": expected a path', { errno: 'EINVAL' });
  }
  const bytes = Buffer.byteLength(address);
  if (bytes > MAX_PATH_BYTES) {
    throw new UnixTransportError(
      'ERR_BAD_ADDRESS',
      `invalid unix socket path "${address}": ${bytes} bytes long, the limit is ${MAX_PATH_BYTES}; use a shorter (e.g. relative) path`,
      { errno: 'EINVAL', details: { address, bytes, limit: MAX_PATH_BYTES } },
    );
  }
  return address;
}

function systemCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

function abortError(what: string, reason: unknown): Error {
  const err = new Error(`${what} aborted`, { cause: reason });
  err.name = 'AbortError';
  (err as Error & { code: string }).code = 'ABORT_ERR';
  return err;
}

function addressInUse(path: string, why: string, cause?: unknown): UnixTransportError {
  return new UnixTransportError('ERR_ADDRESS_IN_USE', `cannot listen on unix socket ${path}: address in use (${why})`, {
    cause,
    details: { address: path },
  });
}

function bind(path: string, backlog: number | undefined, onSocket: (socket: net.Socket) => void): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    // allowHalfOpen: a peer's EOF is passed on as EOF, not turned into a close of our side too.
    const server = net.createServer({ allowHalfOpen: true }, onSocket);
    const onError = (err: Error): void => reject(err);
    server.once('error', onError);
    // Bind under a umask that leaves the socket 0600 from its first moment: no window in which
    // another user could connect. listen() binds synchronously, so the umask is restored before
    // any other code runs; the chmod after listening sets the mode asked for.
    let previous: number | undefined;
    try {
      previous = process.umask(0o177);
    } catch {
      // worker threads may not change the umask; the chmod after listening still applies
    }
    try {
      server.listen({ path, backlog }, () => {
        server.off('error', onError);
        // After listening, the only server errors are failed accepts (EMFILE …); the listener keeps
        // accepting afterwards, and the contract has no channel for them, so they must not crash
        // the daemon.
        server.on('error', () => {});
        resolve(server);
      });
    } finally {
      if (previous !== undefined) process.umask(previous);
    }
  });
}

/** Does a server answer on this socket? Only a refused or vanished socket counts as "no". */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect({ path });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', (err) => {
      const code = systemCode(err);
      // EAGAIN (a full backlog), EACCES …: someone is there, or we cannot tell; either way keep it.
      resolve(!(code === 'ECONNREFUSED' || code === 'ENOENT'));
    });
  });
}

/** Remove `path` if it is a socket file nobody answers on; otherwise explain why not. */
async function removeStale(path: string, bindError: unknown): Promise<void> {
  let stat;
  try {
    stat = await lstat(path);
  } catch (err) {
    if (systemCode(err) === 'ENOENT') return; // gone meanwhile: just try again
    throw addressInUse(path, `cannot inspect it: ${(err as Error).message}`, err);
  }
  if (!stat.isSocket()) throw addressInUse(path, 'the path exists and is not a socket; refusing to replace it', bindError);
  if (await answers(path)) throw addressInUse(path, 'a server is answering on it', bindError);
  try {
    await unlink(path);
  } catch (err) {
    if (systemCode(err) !== 'ENOENT') throw addressInUse(path, `stale socket file cannot be removed: ${(err as Error).message}`, err);
  }
}

function listenError(path: string, err: unknown): UnixTransportError {
  const sys = systemCode(err);
  const msg = err instanceof Error ? err.message : String(err);
  return new UnixTransportError('ERR_LISTEN_FAILED', `cannot listen on unix socket ${path}: ${msg}`, {
    errno: sys === 'EACCES' || sys === 'EPERM' ? 'EPERM' : 'EIO',
    cause: err,
    details: { address: path, syscallCode: sys },
  });
}

/** Percent-encode a path for a URI query, keeping its slashes readable. */
function encodePath(path: string): string {
  return encodeURIComponent(path).replaceAll('%2F', '/');
}

class UnixListener implements TransportListener {
  private closed = false;

  constructor(
    private readonly server: net.Server,
    readonly address: string,
    /** absolute, so close() finds the file whatever the working directory is by then */
    private readonly file: string,
    /** the socket file's inode, so close() never removes a socket someone else bound since */
    private readonly inode: bigint,
  ) {}

  uri(exportName: string): string {
    return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodePath(this.address)}`;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // close() shuts the listening socket at once; its callback waits for every accepted
    // connection to end, and those are not ours to wait for.
    this.server.close();
    try {
      const stat = await lstat(this.file, { bigint: true });
      if (stat.isSocket() && stat.ino === this.inode) await unlink(this.file);
    } catch (err) {
      if (systemCode(err) !== 'ENOENT') throw listenError(this.file, err);
    }
  }
}

function connectSocket(path: string, options: ConnectOptions): Promise<net.Socket> {
  const what = `connect to unix socket ${path}`;
  const { signal, timeoutMs } = options;
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortError(what, signal.reason));
      return;
    }
    const socket = net.connect({ path, allowHalfOpen: true });
    let timer: NodeJS.Timeout | undefined;
    const settle = (): void => {
      socket.off('connect', onConnect);
      socket.off('error', onError);
      signal?.removeEventListener('abort', onAbort);
      if (timer) clearTimeout(timer);
    };
    const fail = (err: Error): void => {
      settle();
      socket.on('error', () => {}); // a late error from the abandoned attempt has no one to go to
      socket.destroy();
      reject(err);
    };
    const onConnect = (): void => {
      settle();
      resolve(socket);
    };
    const onError = (err: Error): void => {
      const sys = systemCode(err);
      const why = sys === 'ENOENT' ? 'no such socket' : sys === 'ECONNREFUSED' ? 'nobody is listening on it' : err.message;
      fail(
        new UnixTransportError('ERR_CONNECT_FAILED', `cannot ${what}: ${why}${sys ? ` (${sys})` : ''}`, {
          errno: sys === 'EACCES' || sys === 'EPERM' ? 'EPERM' : 'EIO',
          cause: err,
          details: { address: path, syscallCode: sys },
        }),
      );
    };
    const onAbort = (): void => fail(abortError(what, signal?.reason));
    socket.once('connect', onConnect);
    socket.once('error', onError);
    signal?.addEventListener('abort', onAbort, { once: true });
    if (timeoutMs !== undefined) {
      timer = setTimeout(() => {
        fail(
          new UnixTransportError('ERR_CONNECT_TIMEOUT', `cannot ${what}: no answer within ${timeoutMs} ms`, {
            details: { address: path, timeoutMs },
          }),
        );
      }, timeoutMs);
    }
  });
}

class UnixTransport implements Transport {
  readonly name = 'unix';
  readonly summary = 'NBD over a Unix domain socket; address is the socket path';

  async listen(address: string, options: ListenOptions): Promise<TransportListener> {
    const path = checkPath(address);
    const absolute = resolvePath(path);
    const onSocket = (socket: net.Socket): void => {
      // the listening socket's path: a Unix client has no address of its own (status: the secondary's peer)
      options.onConnection({ stream: socket, peer: `unix:${absolute}` });
    };
    let server: net.Server;
    try {
      server = await bind(path, options.backlog, onSocket);
    } catch (err) {
      if (systemCode(err) !== 'EADDRINUSE') throw listenError(path, err);
      await removeStale(path, err);
      try {
        server = await bind(path, options.backlog, onSocket);
      } catch (again) {
        // Another server took the path between our removal and our bind.
        if (systemCode(again) === 'EADDRINUSE') throw addressInUse(path, 'another server bound it just now', again);
        throw listenError(path, again);
      }
    }
    let inode: bigint;
    try {
      await chmod(absolute, options.mode ?? DEFAULT_MODE);
      inode = (await lstat(absolute, { bigint: true })).ino;
    } catch (err) {
      server.close();
      throw listenError(path, err);
    }
    // Report the absolute path, unless only the relative one fits in a socket address.
    const reported = Buffer.byteLength(absolute) <= MAX_PATH_BYTES ? absolute : path;
    return new UnixListener(server, reported, absolute, inode);
  }

  async connect(address: string, options: ConnectOptions = {}): Promise<TransportConnection> {
    const path = checkPath(address);
    const socket = await connectSocket(path, options);
    return { stream: socket, peer: `unix:${path}` };
  }
}

export function createUnixTransport(): Transport {
  return new UnixTransport();
}
