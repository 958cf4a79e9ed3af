/**
 * The tcp heartbeat backend: beats on a TCP connection, for networks that drop or filter UDP.
 *
 *   tcp://PEER:PORT[?listen=ADDR:PORT]
 *
 * Each node listens on `listen` (default: PEER's port on every address, as udp) and connects to
 * PEER:PORT; it writes its beats on the connection it opened and reads the peer's on the one it
 * accepted, each frame a 2-byte big-endian length and the frame. Liveness is the beats
 * themselves, never TCP keepalive (Node has no TCP_USER_TIMEOUT; a frozen peer keeps its
 * connection up for minutes).
 *
 * A beat that cannot go at once is dropped, never queued: while there is no connection (one is
 * being made, at most one attempt per interval, each bounded by 2 intervals or 1 s), or while the
 * peer leaves over 4 KiB unread (it is frozen; the connection is cut after 4 intervals of that).
 * An accepted connection that sends a frame over 256 bytes is cut; at most 4 accepted
 * connections are kept (a new one closes the oldest), so a reconnecting peer never piles them up.
 */
import net from 'node:net';
import type { HeartbeatBackend, HeartbeatOpenOptions, HeartbeatPath, HeartbeatReport } from 'blkrep/api';

const MAX_FRAME = 256;
const MAX_UNSENT = 4096;
const MAX_ACCEPTED = 4;

export class TcpHeartbeatError extends Error {
  readonly code: string;
  readonly errno: 'EINVAL' | 'EIO';
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: { errno?: 'EINVAL' | 'EIO'; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'TcpHeartbeatError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }
}

interface Endpoint {
  host: string;
  port: number;
}

export interface TcpTarget {
  peer: Endpoint;
  listen: Endpoint;
}

function bad(uri: string, why: string): TcpHeartbeatError {
  return new TcpHeartbeatError('ERR_BAD_HEARTBEAT', `invalid heartbeat URI "${uri}": ${why} (expected tcp://PEER:PORT[?listen=ADDR:PORT])`, { errno: 'EINVAL', details: { uri } });
}

function parseEndpoint(uri: string, text: string, what: string, minPort: number): Endpoint {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d*)$/.exec(text);
  if (!m) throw bad(uri, `${what} "${text}" is not HOST:PORT`);
  const host = m[1] ?? m[2]!;
  if (m[1] !== undefined && !net.isIPv6(host)) throw bad(uri, `${what} "${text}" is not an IPv6 address in brackets`);
  const port = m[3]!;
  if (!/^\d{1,5}$/.test(port) || Number(port) < minPort || Number(port) > 65535) throw bad(uri, `${what} port "${port}" is not a number from ${minPort} to 65535`);
  return { host, port: Number(port) };
}

export function parseTcpUri(uri: string): TcpTarget {
  if (!uri.startsWith('tcp://')) throw bad(uri, 'the scheme is not tcp://');
  const rest = uri.slice('tcp://'.length);
  const q = rest.indexOf('?');
  const authority = q < 0 ? rest : rest.slice(0, q);
  const query = new URLSearchParams(q < 0 ? '' : rest.slice(q + 1));
  if (authority.endsWith('/')) throw bad(uri, 'a tcp heartbeat has no path');
  const peer = parseEndpoint(uri, authority, 'peer', 1);
  for (const key of query.keys()) if (key !== 'listen') throw bad(uri, `unknown parameter "${key}"`);
  const listenText = query.get('listen');
  const listen = listenText === null ? { host: net.isIPv6(peer.host) ? '::' : '0.0.0.0', port: peer.port } : parseEndpoint(uri, listenText, 'listen', 0);
  return { peer, listen };
}

/** Splits an accepted connection's bytes into frames. */
function reader(socket: net.Socket, onFrame: (frame: Buffer) => void, onBad: (why: string) => void): void {
  let pending: Buffer = Buffer.alloc(0);
  socket.on('data', (chunk: Buffer) => {
    pending = pending.length ? Buffer.concat([pending, chunk]) : chunk;
    while (pending.length >= 2) {
      const length = pending.readUInt16BE(0);
      if (length > MAX_FRAME) {
        onBad(`a frame of ${length} bytes, more than ${MAX_FRAME}`);
        socket.destroy();
        return;
      }
      if (pending.length < 2 + length) break;
      onFrame(Buffer.from(pending.subarray(2, 2 + length)));
      pending = pending.subarray(2 + length);
    }
  });
}

class TcpPath implements HeartbeatPath {
  private server: net.Server | undefined;
  private out: net.Socket | undefined;
  private connecting = false;
  private lastAttempt = -Infinity;
  /** since when the peer has left too much unread (undefined: it reads) */
  private cloggedSince: number | undefined;
  private readonly accepted: net.Socket[] = [];
  private stopped = false;
  private readonly beatListeners: Array<(r: HeartbeatReport) => void> = [];
  private readonly errorListeners: Array<(e: Error) => void> = [];

  constructor(
    readonly uri: string,
    private readonly target: TcpTarget,
    private readonly options: HeartbeatOpenOptions,
  ) {
    options.signal?.addEventListener('abort', () => void this.stop(), { once: true });
  }

  onBeat(listener: (r: HeartbeatReport) => void): void {
    this.beatListeners.push(listener);
  }

  onError(listener: (e: Error) => void): void {
    this.errorListeners.push(listener);
  }

  private error(err: Error): void {
    for (const l of this.errorListeners) l(err);
  }

  async start(): Promise<void> {
    if (this.stopped || this.options.signal?.aborted) return;
    const { listen } = this.target;
    const server = net.createServer((socket) => this.accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err) => {
        reject(new TcpHeartbeatError('ERR_HEARTBEAT_START', `cannot listen for heartbeats of ${this.uri} on tcp ${listen.host}:${listen.port}: ${(err as { code?: string }).code ?? err.message}`, { cause: err, details: { uri: this.uri, listen } }));
      });
      server.listen({ port: listen.port, host: listen.host }, () => resolve());
    });
    server.removeAllListeners('error');
    server.on('error', (err) => this.error(err));
    if (this.stopped) server.close();
    else this.server = server;
  }

  private accept(socket: net.Socket): void {
    if (this.stopped) {
      socket.destroy();
      return;
    }
    this.accepted.push(socket);
    while (this.accepted.length > MAX_ACCEPTED) this.accepted.shift()!.destroy();
    const from = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`;
    socket.on('error', () => {});
    socket.once('close', () => {
      const i = this.accepted.indexOf(socket);
      if (i >= 0) this.accepted.splice(i, 1);
    });
    reader(
      socket,
      (frame) => {
        if (this.stopped) return;
        const report = { frame, from };
        for (const l of this.beatListeners) l(report);
      },
      (why) => this.error(new TcpHeartbeatError('ERR_HEARTBEAT_FRAME', `heartbeat connection from ${from} cut: ${why}`, { details: { uri: this.uri, from } })),
    );
  }

  private connect(): void {
    const now = performance.now();
    if (this.connecting || now - this.lastAttempt < this.options.intervalMs) return;
    this.connecting = true;
    this.lastAttempt = now;
    const { peer } = this.target;
    const socket = net.connect({ host: peer.host, port: peer.port });
    socket.setNoDelay(true);
    socket.setTimeout(Math.max(1000, this.options.intervalMs * 2));
    const fail = (why: string, cause?: unknown): void => {
      socket.destroy();
      if (this.out === socket) this.out = undefined;
      this.connecting = false;
      if (!this.stopped) this.error(new TcpHeartbeatError('ERR_HEARTBEAT_SEND', `heartbeat connection to tcp ${peer.host}:${peer.port}: ${why}`, { cause, details: { uri: this.uri } }));
    };
    socket.once('timeout', () => fail('connect timed out'));
    socket.once('error', (err) => fail((err as { code?: string }).code ?? err.message, err));
    socket.once('close', () => {
      if (this.out === socket) this.out = undefined;
      this.connecting = false;
    });
    socket.once('connect', () => {
      socket.setTimeout(0);
      this.connecting = false;
      if (this.stopped) {
        socket.destroy();
        return;
      }
      this.out = socket;
      this.cloggedSince = undefined;
    });
    // the peer never writes on this connection; data from it is ignored
    socket.on('data', () => {});
  }

  send(frame: Buffer): void {
    if (this.stopped) return;
    const socket = this.out;
    if (!socket) {
      this.connect();
      return;
    }
    if (socket.writableLength > MAX_UNSENT) {
      const now = performance.now();
      this.cloggedSince ??= now;
      if (now - this.cloggedSince > this.options.intervalMs * 4) {
        this.out = undefined;
        socket.destroy();
        this.error(new TcpHeartbeatError('ERR_HEARTBEAT_SEND', `heartbeat connection to tcp ${this.target.peer.host}:${this.target.peer.port} cut: the peer has not read for ${Math.round(now - this.cloggedSince)} ms`, { details: { uri: this.uri } }));
      }
      return;
    }
    this.cloggedSince = undefined;
    const header = Buffer.alloc(2);
    header.writeUInt16BE(frame.length);
    socket.write(Buffer.concat([header, frame]));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.out?.destroy();
    this.out = undefined;
    for (const s of this.accepted.splice(0)) s.destroy();
    const server = this.server;
    this.server = undefined;
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

export function createTcpHeartbeat(): HeartbeatBackend {
  return {
    name: 'tcp',
    summary: 'beats on a TCP connection to tcp://PEER:PORT, the peer\'s received on ?listen=ADDR:PORT (default: the same port)',
    caps: { frames: true, independentPath: true, authoritative: false },
    open: (uri, options) => {
      const target = parseTcpUri(uri);
      return new TcpPath(uri, target, options);
    },
  };
}
