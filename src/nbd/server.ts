/**
 * The NBD server: a set of exports and the sessions connected to them. Transports hand it
 * connections (attach); it knows nothing of sockets beyond a Duplex stream.
 */
import { EventEmitter } from 'node:events';
import { BlkrepError } from '../api/errors.js';
import type { TransportConnection } from '../api/transport.js';
import { Export, type ExportOptions } from './export.js';
import { ServerSession, type SessionHost } from './server-session.js';

export type LogLevel = 'debug' | 'info' | 'warn';
export type Logger = (level: LogLevel, message: string) => void;

export interface NbdServerOptions {
  exports: ExportOptions[];
  /** maximum simultaneous connections (default 100); more are refused */
  maxConnections?: number;
  /** a connection must finish the handshake within this time (default 10 s) */
  handshakeTimeoutMs?: number;
  log?: Logger;
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
  readonly startedAt = new Date();
  private readonly exportsByName = new Map<string, Export>();
  private readonly sessions = new Set<ServerSession>();
  private readonly logger: Logger;
  private stopping = false;

  constructor(options: NbdServerOptions) {
    super();
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.maxConnections = options.maxConnections ?? 100;
    this.logger = options.log ?? (() => {});
    for (const e of options.exports) this.exportsByName.set(e.name, new Export(e));
  }

  get shuttingDown(): boolean {
    return this.stopping;
  }

  findExport(name: string): Export | undefined {
    return this.exportsByName.get(name);
  }

  listExports(): Export[] {
    return [...this.exportsByName.values()];
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
    this.log('info', `export "${exp.name}" added`);
    return exp;
  }

  /**
   * Stop serving an export: new connections can no longer choose it, and the sessions attached
   * to it are disconnected at once (as destroyAll does), with `reason`. Its node is not flushed
   * nor closed: it is the caller's. Returns false when there was no such export.
   */
  removeExport(name: string, reason = `export "${name}" removed`): boolean {
    const exp = this.exportsByName.get(name);
    if (!exp) return false;
    this.exportsByName.delete(name);
    for (const s of [...this.sessions]) if (s.attachedExport === exp) s.close(reason);
    this.log('info', `export "${name}" removed (${reason})`);
    return true;
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
    if (this.sessions.size >= this.maxConnections) {
      const reason = `already serving ${this.sessions.size} connections (--shared ${this.maxConnections})`;
      this.log('warn', `refusing connection from ${connection.peer}: ${reason}`);
      this.emit('refused', { peer: connection.peer, reason });
      connection.stream.destroy();
      return;
    }
    new ServerSession(this, connection.stream, connection.peer);
  }

  sessionOpened(session: ServerSession): void {
    this.sessions.add(session);
    this.emit('connection', { id: session.id, peer: session.peer });
  }

  sessionClosed(session: ServerSession, reason: string): void {
    this.sessions.delete(session);
    this.emit('disconnect', { id: session.id, peer: session.peer, export: session.exportName ?? null, reason });
  }

  status(): ServerStatus {
    return {
      pid: process.pid,
      startedAt: this.startedAt.toISOString(),
      uptimeSeconds: Math.round((Date.now() - this.startedAt.getTime()) / 1000),
      shuttingDown: this.stopping,
      connections: [...this.sessions].map((s) => ({
        id: s.id,
        peer: s.peer,
        export: s.exportName ?? null,
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
