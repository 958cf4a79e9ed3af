/**
 * The NBD server: a set of exports and the sessions connected to them. Transports hand it
 * connections (attach); it knows nothing of sockets beyond a Duplex stream.
 */
import { EventEmitter } from 'node:events';
import { BlkrepError } from '../api/errors.js';
import type { ConnectionUpgrader, TransportConnection } from '../api/transport.js';
import { MAX_PAYLOAD } from './constants.js';
import { Export, type ExportOptions } from './export.js';
import { BufferBudget, type BufferBudgetStatus } from './server-budget.js';
import type { TlsMode } from './server-handshake.js';
import { ServerSession, type OptionExtension, type RequestObserver, type SessionHost, type SessionTls } from './server-session.js';

/** default budget for the payloads and replies of all connections together */
export const DEFAULT_MAX_BUFFER = 256 * 1024 * 1024;
/** what each connection may hold beyond the budget (small requests never wait) */
export const BUFFER_ALLOWANCE = 256 * 1024;
/**
 * A connection in the handshake makes room for a new one only once it is this old (or half the
 * handshake timeout): a client reconnecting at once when closed then cannot evict, in a loop,
 * a client that is still handshaking (which takes milliseconds).
 */
export const HANDSHAKE_EVICT_AGE_MS = 1000;
/** default stall timeout */
export const DEFAULT_STALL_TIMEOUT_MS = 60_000;

export type LogLevel = 'debug' | 'info' | 'warn';
export type Logger = (level: LogLevel, message: string) => void;

export interface NbdServerOptions {
  exports: ExportOptions[];
  /** maximum simultaneous connections (default 100); more are refused */
  maxConnections?: number;
  /**
   * a connection must finish the handshake within this time (default 10 s); when the server is
   * full, a new connection takes the place of the oldest one still in the handshake
   */
  handshakeTimeoutMs?: number;
  /** a connection in the handshake is evicted for a new one only once this old (default 1 s) */
  handshakeEvictAgeMs?: number;
  /**
   * bytes of request payloads, read data and unsent replies all connections may hold together
   * (default 256 MiB, at least MAX_PAYLOAD); over it, connections stop being read until there is room
   */
  maxBufferBytes?: number;
  /**
   * a connection that holds over 1 MiB (replies it does not read, a write payload it stopped
   * sending) and makes no progress for this long is disconnected (default 60 s; 0: never)
   */
  stallTimeoutMs?: number;
  log?: Logger;
  /** blkrep extension options, by option number (the pair link: src/nbd/option-takeover.ts) */
  optionExtensions?: ReadonlyMap<number, OptionExtension>;
  /**
   * NBD_OPT_STARTTLS (src/nbd/server-handshake.ts). Without it, or with mode 'off', STARTTLS
   * gets ERR_POLICY. 'on': TLS is offered, options are also served in clear. 'require': before
   * STARTTLS every option but STARTTLS and ABORT gets ERR_TLS_REQD (EXPORT_NAME: hang-up).
   * After STARTTLS's ACK the connection goes to `upgrader.server()` with `settings`.
   */
  tls?: { mode: TlsMode; upgrader: ConnectionUpgrader; settings?: Record<string, string> };
}

export interface ConnectionStatus {
  id: number;
  peer: string;
  export: string | null;
  state: string;
  openedAt: string;
  inFlight: number;
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
}

export interface ExportStatus {
  name: string;
  description: string | null;
  image: string;
  driver: string;
  size: number;
  readOnly: boolean;
  connections: number;
  totalConnections: number;
  requests: Record<string, number>;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

export interface ServerStatus {
  pid: number;
  startedAt: string;
  uptimeSeconds: number;
  shuttingDown: boolean;
  /** memory held for connections (--max-buffer) */
  buffers: BufferBudgetStatus;
  connections: ConnectionStatus[];
  exports: ExportStatus[];
}

/**
 * Events: 'connection' ({id, peer}), 'disconnect' ({id, peer, export, reason}),
 * 'refused' ({peer, reason}).
 */
export class NbdServer extends EventEmitter implements SessionHost {
  readonly handshakeTimeoutMs: number;
  readonly maxConnections: number;
  readonly stallTimeoutMs: number;
  private readonly evictAgeMs: number;
  readonly budget: BufferBudget;
  readonly startedAt = new Date();
  private stallTimer: NodeJS.Timeout | undefined;
  private readonly exportsByName = new Map<string, Export>();
  private readonly sessions = new Set<ServerSession>();
  private readonly logger: Logger;
  private readonly extensions: ReadonlyMap<number, OptionExtension>;
  private tlsConfig: SessionTls | undefined;
  private stopping = false;
  /** times every request (serve-nbd --metrics); set before clients connect */
  requestObserver: RequestObserver | undefined;

  constructor(options: NbdServerOptions) {
    super();
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.maxConnections = options.maxConnections ?? 100;
    this.stallTimeoutMs = options.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
    this.evictAgeMs = Math.min(options.handshakeEvictAgeMs ?? HANDSHAKE_EVICT_AGE_MS, this.handshakeTimeoutMs / 2);
    const maxBuffer = options.maxBufferBytes ?? DEFAULT_MAX_BUFFER;
    if (!Number.isSafeInteger(maxBuffer) || maxBuffer < MAX_PAYLOAD) {
      throw new BlkrepError('ERR_USAGE', `a buffer budget of ${maxBuffer} bytes is below the ${MAX_PAYLOAD} bytes one request may need`, {
        errno: 'EINVAL',
        details: { maxBuffer, minimum: MAX_PAYLOAD },
      });
    }
    this.budget = new BufferBudget(maxBuffer, BUFFER_ALLOWANCE);
    this.logger = options.log ?? (() => {});
    this.extensions = options.optionExtensions ?? new Map();
    this.tlsConfig = options.tls && options.tls.mode !== 'off' ? options.tls : undefined;
    for (const e of options.exports) this.exportsByName.set(e.name, new Export(e));
  }

  get shuttingDown(): boolean {
    return this.stopping;
  }

  findExport(name: string): Export | undefined {
    return this.exportsByName.get(name);
  }

  /** the exports a client may list (hidden ones only with `hidden: true`) */
  listExports(o: { hidden?: boolean } = {}): Export[] {
    const all = [...this.exportsByName.values()];
    return o.hidden ? all : all.filter((e) => !e.hidden);
  }

  /**
   * Serve one more export from now on (NBD_OPT_LIST, INFO and GO show it to new connections).
   * A name that exists is refused: BlkrepError ERR_EXPORT_EXISTS.
   */
  addExport(options: ExportOptions): Export {
    if (this.stopping) throw new BlkrepError('ERR_SHUTTING_DOWN', `cannot add export "${options.name}": the server is stopping`, { errno: 'ESHUTDOWN' });
    if (this.exportsByName.has(options.name)) {
      throw new BlkrepError('ERR_EXPORT_EXISTS', `the server has an export "${options.name}" already`, { errno: 'EINVAL', details: { export: options.name } });
    }
    const exp = new Export(options);
    this.exportsByName.set(exp.name, exp);
    this.log('info', `export "${exp.shownName}" added`);
    return exp;
  }

  /**
   * Stop serving an export: new connections can no longer choose it, and the sessions attached
   * to it are disconnected at once (as destroyAll does), with `reason`. Its node is not flushed
   * nor closed: it is the caller's. Returns false when there was no such export.
   */
  removeExport(name: string, reason?: string): boolean {
    const exp = this.exportsByName.get(name);
    if (!exp) return false;
    reason ??= `export "${exp.shownName}" removed`;
    this.exportsByName.delete(name);
    for (const s of [...this.sessions]) if (s.attachedExport === exp) s.close(reason);
    this.log('info', `export "${exp.shownName}" removed (${reason})`);
    return true;
  }

  /** TLS as configured (undefined: off); a session reads it when its client sends STARTTLS */
  get tls(): SessionTls | undefined {
    return this.tlsConfig;
  }

  /**
   * New upgrader settings for the connections that start TLS from now on (SIGHUP: renewed
   * certificates, a new PSK file); the mode stays, and connections already in TLS are untouched.
   */
  setTlsSettings(settings: Readonly<Record<string, string>>): void {
    if (!this.tlsConfig) throw new BlkrepError('ERR_USAGE', 'this server has no TLS to change', { errno: 'EINVAL' });
    this.tlsConfig = { ...this.tlsConfig, settings };
  }

  log(level: LogLevel, message: string): void {
    this.logger(level, message);
  }

  /** Serve one accepted connection. */
  attach(connection: TransportConnection): void {
    if (this.stopping) {
      connection.stream.destroy();
      return;
    }
    if (this.sessions.size >= this.maxConnections) this.evictHandshake();
    if (this.sessions.size >= this.maxConnections) {
      const reason = `already serving ${this.sessions.size} connections (--shared ${this.maxConnections})`;
      this.log('warn', `refusing connection from ${connection.peer}: ${reason}`);
      this.emit('refused', { peer: connection.peer, reason });
      connection.stream.destroy();
      return;
    }
    new ServerSession(this, connection.stream, connection.peer);
  }

  /**
   * The server is full: the oldest connection still in the handshake makes room. Idle sockets
   * then cannot lock clients out; a connection younger than HANDSHAKE_EVICT_AGE_MS is not
   * evicted, so one that handshakes at once (every real client) keeps its place.
   */
  private evictHandshake(): void {
    const now = Date.now();
    for (const s of this.sessions) {
      if (s.state !== 'flags' && s.state !== 'options' && s.state !== 'starttls') continue;
      // sessions are in the order they connected: the first in the handshake is the oldest
      const age = now - s.openedAt.getTime();
      if (age < this.evictAgeMs) return;
      const reason = `handshake not finished after ${age} ms; its place was taken by a new connection (--shared ${this.maxConnections} reached)`;
      this.log('warn', `connection ${s.id} from ${s.peer}: ${reason}; closing`);
      s.close(reason);
      return;
    }
  }

  optionExtension(option: number): OptionExtension | undefined {
    return this.extensions.get(option);
  }

  sessionOpened(session: ServerSession): void {
    this.sessions.add(session);
    if (!this.stallTimer && this.stallTimeoutMs > 0) {
      this.stallTimer = setInterval(() => this.checkStalls(), Math.min(1000, Math.max(50, this.stallTimeoutMs / 4)));
      this.stallTimer.unref?.();
    }
    this.emit('connection', { id: session.id, peer: session.peer });
  }

  sessionClosed(session: ServerSession, reason: string): void {
    this.sessions.delete(session);
    if (this.sessions.size === 0 && this.stallTimer) {
      clearInterval(this.stallTimer);
      this.stallTimer = undefined;
    }
    this.emit('disconnect', { id: session.id, peer: session.peer, export: session.attachedExport?.shownName ?? null, reason });
  }

  private checkStalls(): void {
    const now = Date.now();
    for (const s of [...this.sessions]) s.checkStall(now, this.stallTimeoutMs);
  }

  status(): ServerStatus {
    return {
      pid: process.pid,
      startedAt: this.startedAt.toISOString(),
      uptimeSeconds: Math.round((Date.now() - this.startedAt.getTime()) / 1000),
      shuttingDown: this.stopping,
      buffers: this.budget.status(),
      connections: [...this.sessions].map((s) => ({
        id: s.id,
        peer: s.peer,
        export: s.attachedExport?.shownName ?? null,
        state: s.state,
        openedAt: s.openedAt.toISOString(),
        inFlight: s.requestsInFlight,
        ...s.counters,
      })),
      exports: this.listExports().map((e) => ({
        name: e.name,
        description: e.description ?? null,
        image: e.node.description,
        driver: e.node.driver,
        size: e.size,
        readOnly: e.readOnly,
        ...e.counters,
        requests: { ...e.counters.requests },
      })),
    };
  }

  /**
   * Stop serving: requests in flight finish, later ones get ESHUTDOWN, each connection is closed
   * after a flush; connections still in the handshake get ERR_SHUTDOWN and are closed when their
   * handshake timer runs out. Then every export's node is flushed and closed.
   */
  async shutdown(): Promise<void> {
    if (!this.stopping) {
      this.stopping = true;
      this.emit('shutdown');
    }
    await Promise.all([...this.sessions].map((s) => s.shutdown()));
    for (const e of this.exportsByName.values()) {
      try {
        if (!e.readOnly) await e.node.flush();
      } finally {
        await e.node.close();
      }
    }
  }

  /** Drop every connection at once (tests, second signal). */
  destroyAll(reason = 'server stopped'): void {
    for (const s of [...this.sessions]) s.close(reason);
  }
}
