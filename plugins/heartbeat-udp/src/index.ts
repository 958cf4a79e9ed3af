/**
 * The udp heartbeat backend (the default): each beat is one datagram to the peer.
 *
 *   udp://PEER:PORT[?listen=ADDR:PORT]
 *
 * Beats go to PEER:PORT; the peer's beats are received on `listen`, by default the same port on
 * every address (0.0.0.0:PORT, or [::]:PORT for an IPv6 peer), as corosync's knet does, so the
 * same URI with the other host's name works on both nodes. Two nodes on one host give each other
 * their own `listen`. Several NICs are several paths: one --heartbeat per address.
 *
 * Datagrams that do not fit a beat (over 256 bytes) are dropped unread; everything else is
 * reported as it came (the engine checks the signature). A send that fails (no route, ICMP
 * unreachable) is given to onError and the path goes on.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import type { HeartbeatBackend, HeartbeatOpenOptions, HeartbeatPath, HeartbeatReport } from 'blkrep/api';

const MAX_FRAME = 256;

export class UdpHeartbeatError extends Error {
  readonly code: string;
  readonly errno: 'EINVAL' | 'EIO';
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: { errno?: 'EINVAL' | 'EIO'; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'UdpHeartbeatError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }
}

interface Endpoint {
  host: string;
  port: number;
}

export interface UdpTarget {
  peer: Endpoint;
  listen: Endpoint;
}

function bad(uri: string, why: string): UdpHeartbeatError {
  return new UdpHeartbeatError('ERR_BAD_HEARTBEAT', `invalid heartbeat URI "${uri}": ${why} (expected udp://PEER:PORT[?listen=ADDR:PORT])`, { errno: 'EINVAL', details: { uri } });
}

function parsePort(uri: string, text: string, what: string, min: number): number {
  if (!/^\d{1,5}$/.test(text) || Number(text) < min || Number(text) > 65535) throw bad(uri, `${what} port "${text}" is not a number from ${min} to 65535`);
  return Number(text);
}

/** "host:port", "[v6]:port" */
function parseEndpoint(uri: string, text: string, what: string, minPort: number): Endpoint {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d*)$/.exec(text);
  if (!m) throw bad(uri, `${what} "${text}" is not HOST:PORT`);
  const host = m[1] ?? m[2]!;
  if (m[1] !== undefined && net.isIPv6(host) === false) throw bad(uri, `${what} "${text}" is not an IPv6 address in brackets`);
  return { host, port: parsePort(uri, m[3]!, what, minPort) };
}

export function parseUdpUri(uri: string): UdpTarget {
  if (!uri.startsWith('udp://')) throw bad(uri, 'the scheme is not udp://');
  const rest = uri.slice('udp://'.length);
  const q = rest.indexOf('?');
  const authority = q < 0 ? rest : rest.slice(0, q);
  const query = new URLSearchParams(q < 0 ? '' : rest.slice(q + 1));
  if (authority.endsWith('/')) throw bad(uri, 'a udp heartbeat has no path');
  const peer = parseEndpoint(uri, authority, 'peer', 1);
  for (const key of query.keys()) if (key !== 'listen') throw bad(uri, `unknown parameter "${key}"`);
  const listenText = query.get('listen');
  const listen = listenText === null ? { host: net.isIPv6(peer.host) ? '::' : '0.0.0.0', port: peer.port } : parseEndpoint(uri, listenText, 'listen', 0);
  return { peer, listen };
}

class UdpPath implements HeartbeatPath {
  private socket: dgram.Socket | undefined;
  private stopped = false;
  private readonly beatListeners: Array<(r: HeartbeatReport) => void> = [];
  private readonly errorListeners: Array<(e: Error) => void> = [];

  constructor(
    readonly uri: string,
    private readonly target: UdpTarget,
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
    const socket = dgram.createSocket({ type: net.isIPv6(listen.host) ? 'udp6' : 'udp4' });
    await new Promise<void>((resolve, reject) => {
      socket.once('error', (err) => {
        socket.close();
        reject(new UdpHeartbeatError('ERR_HEARTBEAT_START', `cannot listen for heartbeats of ${this.uri} on udp ${listen.host}:${listen.port}: ${(err as { code?: string }).code ?? err.message}`, { cause: err, details: { uri: this.uri, listen } }));
      });
      socket.bind(listen.port, listen.host, () => resolve());
    });
    socket.removeAllListeners('error');
    socket.on('error', (err) => this.error(err));
    socket.on('message', (msg, rinfo) => {
      if (this.stopped || msg.length > MAX_FRAME) return;
      const report = { frame: msg, from: `${rinfo.address}:${rinfo.port}` };
      for (const l of this.beatListeners) l(report);
    });
    socket.unref();
    if (this.stopped) socket.close();
    else this.socket = socket;
  }

  send(frame: Buffer): void {
    const socket = this.socket;
    if (!socket || this.stopped) return;
    const { peer } = this.target;
    socket.send(frame, peer.port, peer.host, (err) => {
      if (err) this.error(new UdpHeartbeatError('ERR_HEARTBEAT_SEND', `heartbeat to udp ${peer.host}:${peer.port} not sent: ${(err as { code?: string }).code ?? err.message}`, { cause: err, details: { uri: this.uri } }));
    });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    const socket = this.socket;
    this.socket = undefined;
    if (socket) await new Promise<void>((resolve) => socket.close(() => resolve()));
  }
}

export function createUdpHeartbeat(): HeartbeatBackend {
  return {
    name: 'udp',
    summary: 'beats as UDP datagrams to udp://PEER:PORT, received on ?listen=ADDR:PORT (default: the same port)',
    caps: { frames: true, independentPath: true, authoritative: false },
    open: (uri, options) => new UdpPath(uri, parseUdpUri(uri), options),
  };
}
