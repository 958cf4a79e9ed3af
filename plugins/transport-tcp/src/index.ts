/**
 * The tcp transport: NBD over TCP (the protocol's default port is 10809).
 *
 * Addresses are "host:port"; IPv6 hosts go in brackets ("[::1]:10809"). Port 0 asks the kernel
 * for a free port; the listener's `address` reports the one it got.
 *
 * Plugins import only types from the engine, so errors here are plain Errors carrying the same
 * fields as the engine's BlkrepError (`code`, `errno`, `details`); the engine adopts them as they are.
 * Aborted connects reject with the standard AbortError (`name` "AbortError", `code` "ABORT_ERR").
 */
import net from 'node:net';
import type { ConnectOptions, ListenOptions, Transport, TransportConnection, TransportListener } from 'blkrep/api';

type TransportErrno = 'EINVAL' | 'EIO' | 'EPERM';

export class TcpTransportError extends Error {
  readonly code: string;
  readonly errno: TransportErrno;
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: { errno?: TransportErrno; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'TcpTransportError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }
}

interface HostPort {
  host: string;
  port: number;
}

function badAddress(address: string, why: string): TcpTransportError {
  return new TcpTransportError('ERR_BAD_ADDRESS', `invalid tcp address "${address}": ${why}`, {
    errno: 'EINVAL',
    details: { address },
  });
}

/** Parse "host:port" or "[v6]:port". */
export function parseTcpAddress(address: string): HostPort {
  const m = /^\[([^\][]+)\]:(\d+)$/.exec(address) ?? /^([^:\][]+):(\d+)$/.exec(address);
  if (!m) {
    if (/^[^[\]]*:[^[\]]*:/.test(address)) throw badAddress(address, 'write IPv6 addresses in brackets, e.g. "[::1]:10809"');
    throw badAddress(address, 'expected "host:port", e.g. "127.0.0.1:10809" or "[::1]:10809"');
  }
  const port = Number(m[2]);
  if (port > 65535) throw badAddress(address, `port ${port} is not between 0 and 65535`);
  return { host: m[1]!, port };
}

/** "127.0.0.1:10809", "[::1]:10809" */
export function formatTcpAddress(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

function systemCode(err: unknown): string | undefined {
  const e = err as { code?: unknown; errors?: Array<{ code?: unknown }> } | undefined;
  if (typeof e?.code === 'string') return e.code;
  // Node 20's happy-eyeballs connect fails with an AggregateError of the per-address attempts.
  const first = e?.errors?.[0]?.code;
  return typeof first === 'string' ? first : undefined;
}

function abortError(what: string, reason: unknown): Error {
  const err = new Error(`${what} aborted`, { cause: reason });
  err.name = 'AbortError';
  (err as Error & { code: string }).code = 'ABORT_ERR';
  return err;
}

function listenError(address: string, err: unknown): TcpTransportError {
  const sys = systemCode(err);
  const details = { address, syscallCode: sys };
  if (sys === 'EADDRINUSE') {
    return new TcpTransportError('ERR_ADDRESS_IN_USE', `cannot listen on tcp ${address}: address in use`, { cause: err, details });
  }
  if (sys === 'EACCES' || sys === 'EPERM') {
    return new TcpTransportError('ERR_LISTEN_FAILED', `cannot listen on tcp ${address}: permission denied (ports below 1024 need privileges)`, {
      errno: 'EPERM',
      cause: err,
      details,
    });
  }
  const msg = err instanceof Error ? err.message : String(err);
  return new TcpTransportError('ERR_LISTEN_FAILED', `cannot listen on tcp ${address}: ${msg}`, { cause: err, details });
}

function bind(host: string, port: number, backlog: number | undefined, onSocket: (socket: net.Socket) => void): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    // allowHalfOpen: a peer's EOF is passed on as EOF, not turned into a close of our side too.
    const server = net.createServer({ allowHalfOpen: true }, onSocket);
    const onError = (err: Error): void => reject(err);
    server.once('error', onError);
    server.listen({ host, port, backlog }, () => {
      server.off('error', onError);
      // After listening, the only server errors are failed accepts (EMFILE …); the listener keeps
      // accepting afterwards, and the contract has no channel for them, so they must not crash
      // the daemon.
      server.on('error', () => {});
      resolve(server);
    });
  });
}

class TcpListener implements TransportListener {
  private closed = false;

  constructor(
    private readonly server: net.Server,
    readonly address: string,
  ) {}

  uri(exportName: string): string {
    // A zone id ("fe80::1%eth0") is written %25 inside a URI (RFC 6874).
    const host = this.address.startsWith('[') ? this.address.replace('%', '%25') : this.address;
    return `nbd://${host}/${encodeURIComponent(exportName)}`;
  }

  close(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      // close() shuts the listening socket at once; its callback waits for every accepted
      // connection to end, and those are not ours to wait for.
      this.server.close();
    }
    return Promise.resolve();
  }
}

function connectSocket(host: string, port: number, address: string, options: ConnectOptions): Promise<net.Socket> {
  const what = `connect to tcp ${address}`;
  const { signal, timeoutMs } = options;
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(abortError(what, signal.reason));
      return;
    }
    const socket = net.connect({ host, port, allowHalfOpen: true });
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
      fail(
        new TcpTransportError('ERR_CONNECT_FAILED', `cannot ${what}: ${err.message}`, {
          cause: err,
          details: { address, syscallCode: sys },
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
          new TcpTransportError('ERR_CONNECT_TIMEOUT', `cannot ${what}: no answer within ${timeoutMs} ms`, {
            details: { address, timeoutMs },
          }),
        );
      }, timeoutMs);
    }
  });
}

function peerOf(socket: net.Socket): string {
  const { remoteAddress, remotePort } = socket;
  return remoteAddress !== undefined && remotePort !== undefined ? formatTcpAddress(remoteAddress, remotePort) : 'tcp (peer unknown)';
}

class TcpTransport implements Transport {
  readonly name = 'tcp';
  readonly summary = 'NBD over TCP; address "host:port", IPv6 as "[::1]:10809"';

  async listen(address: string, options: ListenOptions): Promise<TransportListener> {
    const { host, port } = parseTcpAddress(address);
    let server: net.Server;
    try {
      server = await bind(host, port, options.backlog, (socket) => {
        // NBD replies are small and latency-bound: never let Nagle hold them back.
        socket.setNoDelay(true);
        options.onConnection({ stream: socket, peer: peerOf(socket) });
      });
    } catch (err) {
      throw listenError(address, err);
    }
    const bound = server.address() as net.AddressInfo;
    return new TcpListener(server, formatTcpAddress(bound.address, bound.port));
  }

  async connect(address: string, options: ConnectOptions = {}): Promise<TransportConnection> {
    const { host, port } = parseTcpAddress(address);
    if (port === 0) throw badAddress(address, 'port 0 can only be listened on, not connected to');
    const socket = await connectSocket(host, port, address, options);
    socket.setNoDelay(true);
    return { stream: socket, peer: peerOf(socket) };
  }
}

export function createTcpTransport(): Transport {
  return new TcpTransport();
}
