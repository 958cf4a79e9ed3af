/**
 * The daemon's control socket: a Unix socket, mode 0600, speaking JSON lines (README.md).
 * Commands are registered by whoever owns the live state (`register`); events are pushed to the
 * connections that asked for them (`publish`).
 */
import { chmod, lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import { resolve as resolvePath } from 'node:path';
import { z } from 'zod';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import type { Logger } from '../nbd/server.js';
import {
  type ControlErrorBody,
  type ControlReply,
  type ControlRequestId,
  DEFAULT_CONTROL_LIMITS,
  LineSplitter,
  MAX_REQUEST_LINE_BYTES,
  toJsonLine,
} from './protocol.js';
import { parseEnvelope } from './envelope.js';
import { arg, type ControlVerb, parseVerbArgs, verb, type VerbSpec } from './verb.js';

export type ControlHandler = (args: unknown) => Promise<unknown> | unknown;

/** The built-in verb: choose the events this connection receives. */
export const SUBSCRIBE_VERB = {
  name: 'subscribe',
  summary: 'Receive events on this connection: the ones named, or all of them. Subscribing again replaces the selection.',
  args: z.object({
    events: z.array(arg.string(), { error: 'must be an array of event names' }).nullish().describe('event names; absent or null: every event'),
  }),
  result: '{events}: the names subscribed to, or "all"',
} satisfies VerbSpec;

export interface ControlServerOptions {
  /** longest request line accepted (default 1 MiB); a longer one closes its connection */
  maxLineBytes?: number;
  /**
   * Output a connection may leave unread (default 16 MiB) before it is dropped, so a subscriber
   * that stops reading cannot make the daemon buffer events without bound.
   */
  maxUnreadBytes?: number;
  /** on close(), how long a connection gets to take its last lines before it is cut (default 1 s) */
  closeGraceMs?: number;
  /** control connections at once (default 64); one more is told ERR_CONTROL_BUSY and closed */
  maxClients?: number;
  /** requests of one connection handled at once (default 16); the rest wait unread in the socket */
  maxPendingRequests?: number;
  /**
   * Unread output at which a connection's requests stop being read (default 256 KiB): a client
   * that does not read its replies stops being served instead of growing the daemon.
   */
  pauseAtUnreadBytes?: number;
  /**
   * How long a connection may leave pauseAtUnreadBytes of output unread before it is
   * disconnected (default 30 s), so clients that never read cannot hold every place.
   */
  stallTimeoutMs?: number;
  /** where a failure inside one connection is reported (it closes only that connection) */
  log?: Logger;
}

/** sun_path holds 108 bytes on Linux and 104 on the BSDs and macOS, the final NUL included. */
const MAX_SOCKET_PATH_BYTES = process.platform === 'linux' ? 107 : 103;

const BUILTIN_COMMANDS = ['subscribe'];

interface Connection {
  readonly socket: net.Socket;
  readonly lines: LineSplitter;
  /** undefined: not subscribed; null: every event; a set: those events */
  subscription: Set<string> | null | undefined;
  /** request lines read and not handled yet (at most one chunk's worth: reading pauses) */
  readonly queue: string[];
  /** requests being handled */
  inFlight: number;
  /** running while the client leaves too much output unread */
  stall: NodeJS.Timeout | undefined;
}

function systemCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

export class ControlServer {
  private readonly verbs = new Map<string, ControlVerb>();
  private readonly connections = new Set<Connection>();
  private readonly maxLineBytes: number;
  private readonly maxUnreadBytes: number;
  private readonly closeGraceMs: number;
  private readonly maxClients: number;
  private readonly maxPendingRequests: number;
  private readonly pauseAtUnreadBytes: number;
  private readonly stallTimeoutMs: number;
  private readonly log: Logger;
  private server: net.Server | undefined;
  /** the socket file's inode, so close() never removes a socket someone else bound since */
  private inode: bigint | undefined;
  private closing: Promise<void> | undefined;

  private constructor(
    /** absolute path of the socket */
    readonly path: string,
    options: ControlServerOptions,
  ) {
    const d = DEFAULT_CONTROL_LIMITS;
    this.maxLineBytes = options.maxLineBytes ?? MAX_REQUEST_LINE_BYTES;
    this.maxUnreadBytes = options.maxUnreadBytes ?? d.maxUnreadBytes;
    this.closeGraceMs = options.closeGraceMs ?? 1000;
    this.maxClients = options.maxClients ?? d.maxClients;
    this.maxPendingRequests = options.maxPendingRequests ?? d.maxPendingRequests;
    this.pauseAtUnreadBytes = options.pauseAtUnreadBytes ?? d.pauseAtUnreadBytes;
    this.stallTimeoutMs = options.stallTimeoutMs ?? d.stallTimeoutMs;
    this.log = options.log ?? (() => {});
  }

  /**
   * Listen on `path`. A stale socket file there (nobody answers on it) is replaced; a live one,
   * or a file that is not a socket, is an error.
   */
  static async listen(path: string, options: ControlServerOptions = {}): Promise<ControlServer> {
    const bytes = Buffer.byteLength(path);
    if (bytes === 0 || bytes > MAX_SOCKET_PATH_BYTES) {
      throw new BlkrepError(
        'ERR_CONTROL_BAD_PATH',
        bytes === 0
          ? 'control socket path is empty'
          : `control socket path "${path}" is ${bytes} bytes long, the limit is ${MAX_SOCKET_PATH_BYTES}; use a shorter path`,
        { errno: 'EINVAL', details: { path, bytes, limit: MAX_SOCKET_PATH_BYTES } },
      );
    }
    const server = new ControlServer(resolvePath(path), options);
    await server.start(path);
    return server;
  }

  /**
   * Make a verb answerable: its arguments are checked against its schema before the handler
   * runs. `register(name, handler)` registers a verb without a schema (any object of
   * arguments, passed as it came). Names are unique; `subscribe` is built in.
   */
  register(verbOrName: ControlVerb | string, handler?: ControlHandler): void {
    const v = typeof verbOrName === 'string' ? untypedVerb(verbOrName, handler ?? (() => null)) : verbOrName;
    if (BUILTIN_COMMANDS.includes(v.name) || this.verbs.has(v.name)) {
      throw new BlkrepError('ERR_INTERNAL', `control command "${v.name}" is registered twice`);
    }
    this.verbs.set(v.name, v);
  }

  /** Is a verb of this name registered? */
  has(name: string): boolean {
    return this.verbs.has(name);
  }

  /**
   * Run a registered verb in-process, its arguments checked as a client's would be (the daemon
   * itself acting, e.g. automatic failover calling `failover`). ERR_UNKNOWN_COMMAND when absent.
   */
  async call(name: string, args: unknown = {}): Promise<unknown> {
    const v = this.verbs.get(name);
    if (!v) throw new BlkrepError('ERR_UNKNOWN_COMMAND', `unknown command "${name}"; known commands: ${this.commands().join(', ')}`, { errno: 'EINVAL', details: { command: name } });
    return v.handler(parseVerbArgs(name, v.args, args));
  }

  /** Every command a client may send, sorted. */
  commands(): string[] {
    return [...this.verbs.keys(), ...BUILTIN_COMMANDS].sort();
  }

  /** How many control connections are open. */
  get clientCount(): number {
    return this.connections.size;
  }

  /** Each connection's load: requests waiting and in flight, unread output, whether reading is paused. */
  clients(): Array<{ queued: number; inFlight: number; unreadBytes: number; paused: boolean }> {
    return [...this.connections].map((c) => ({ queued: c.queue.length, inFlight: c.inFlight, unreadBytes: c.socket.writableLength, paused: c.socket.isPaused() }));
  }

  /** Send `{"event": name, ...data, "time"}` to every connection subscribed to `name`. */
  publish(name: string, data: object = {}): void {
    const subscribers = [...this.connections].filter((c) => c.subscription === null || c.subscription?.has(name));
    if (subscribers.length === 0) return;
    const time = new Date().toISOString();
    let line: string;
    try {
      line = toJsonLine(Object.assign({ event: name }, data, { event: name, time }));
    } catch (err) {
      // Subscribers still learn that the event happened.
      const reason = err instanceof Error ? err.message : String(err);
      line = toJsonLine({ event: name, error: `event fields cannot be written as JSON: ${reason}`, time });
    }
    for (const c of subscribers) this.send(c, line);
  }

  /** publish() for an event that already carries its name: `emit({ event: 'ready', job })`. */
  emit<E extends { event: string }>(event: E): void {
    const { event: name, ...data } = event;
    this.publish(name, data);
  }

  /** Stop listening, close every client connection, remove the socket file. Idempotent. */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async start(bindPath: string): Promise<void> {
    try {
      this.server = await this.bind(bindPath);
    } catch (err) {
      if (systemCode(err) !== 'EADDRINUSE') throw this.listenError(err);
      await this.removeStale(err);
      try {
        this.server = await this.bind(bindPath);
      } catch (again) {
        if (systemCode(again) === 'EADDRINUSE') {
          throw new BlkrepError('ERR_CONTROL_IN_USE', `control socket ${this.path} was taken by another process while starting`, {
            cause: again,
            details: { path: this.path },
          });
        }
        throw this.listenError(again);
      }
    }
    try {
      // The umask already made it 0600 where the process may change its umask; this covers the
      // rest (worker threads) and states the intent.
      await chmod(this.path, 0o600);
      this.inode = (await lstat(this.path, { bigint: true })).ino;
    } catch (err) {
      await this.close();
      throw this.listenError(err);
    }
  }

  private bind(path: string): Promise<net.Server> {
    return new Promise((resolve, reject) => {
      const server = net.createServer((socket) => this.accept(socket));
      server.once('error', reject);
      server.once('listening', () => {
        server.off('error', reject);
        // Failed accepts (EMFILE …) are transient and the server keeps listening.
        server.on('error', () => {});
        resolve(server);
      });
      // Bind under a umask that leaves the socket 0600 from its first moment: there is no window
      // in which another user could connect. listen() binds synchronously, so the umask is
      // restored before any other code runs.
      let previous: number | undefined;
      try {
        previous = process.umask(0o177);
      } catch {
        // Worker threads may not change the umask; the chmod after listening still applies.
      }
      try {
        server.listen(path);
      } finally {
        if (previous !== undefined) process.umask(previous);
      }
    });
  }

  private listenError(err: unknown): BlkrepError {
    const sys = systemCode(err);
    const reason = err instanceof Error ? err.message : String(err);
    return new BlkrepError('ERR_CONTROL_LISTEN_FAILED', `cannot listen on control socket ${this.path}: ${reason}`, {
      errno: sys === 'EACCES' || sys === 'EPERM' ? 'EPERM' : 'EIO',
      cause: err,
      details: { path: this.path },
    });
  }

  /** The path is taken: remove it if it is a socket nobody answers on, else say why not. */
  private async removeStale(bindError: unknown): Promise<void> {
    let stat;
    try {
      stat = await lstat(this.path);
    } catch (err) {
      if (systemCode(err) === 'ENOENT') return; // gone meanwhile: just bind again
      throw this.listenError(err);
    }
    if (!stat.isSocket()) {
      throw new BlkrepError('ERR_CONTROL_PATH_EXISTS', `cannot listen on control socket ${this.path}: it exists and is not a socket; refusing to replace it`, {
        cause: bindError,
        details: { path: this.path },
      });
    }
    if (await answers(this.path)) {
      throw new BlkrepError(
        'ERR_CONTROL_IN_USE',
        `cannot listen on control socket ${this.path}: another process answers on it (is a blkrep daemon already running? try \`blkrep status --control ${this.path}\`)`,
        { cause: bindError, details: { path: this.path } },
      );
    }
    try {
      await unlink(this.path);
    } catch (err) {
      if (systemCode(err) !== 'ENOENT') throw this.listenError(err);
    }
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    socket.on('error', () => {}); // a client that vanishes (EPIPE, ECONNRESET) just goes away
    if (this.connections.size >= this.maxClients) {
      const error = { code: 'ERR_CONTROL_BUSY', message: `the daemon has ${this.connections.size} control connections, the limit is ${this.maxClients}; try again later` };
      this.log('warn', `control: refused a connection: ${this.connections.size} of ${this.maxClients} open`);
      this.hangUp(socket, toJsonLine({ id: null, ok: false, error } satisfies ControlReply));
      return;
    }
    const connection: Connection = { socket, lines: new LineSplitter(this.maxLineBytes), subscription: undefined, queue: [], inFlight: 0, stall: undefined };
    this.connections.add(connection);
    socket.on('close', () => {
      this.connections.delete(connection);
      clearTimeout(connection.stall);
    });
    socket.on('drain', () => this.pump(connection));
    socket.on('data', (chunk: Buffer) => {
      const { lines, tooLong } = connection.lines.push(chunk);
      for (const line of lines) if (line.trim() !== '') connection.queue.push(line);
      this.pump(connection);
      if (tooLong) this.reject(connection);
    });
  }

  /**
   * Handle queued requests while the connection has room: fewer than maxPendingRequests in
   * flight and less than pauseAtUnreadBytes of output it has not read. Otherwise stop reading
   * its socket until a request finishes or its output drains.
   */
  private pump(connection: Connection): void {
    const { socket, queue } = connection;
    while (queue.length > 0 && connection.inFlight < this.maxPendingRequests && socket.writableLength < this.pauseAtUnreadBytes && !socket.destroyed) {
      const line = queue.shift()!;
      connection.inFlight++;
      this.handle(connection, line)
        .catch((err: unknown) => this.fail(connection, err))
        .finally(() => {
          connection.inFlight--;
          this.pump(connection);
        });
    }
    if (socket.destroyed) return;
    if (queue.length > 0) socket.pause();
    else if (socket.isPaused()) socket.resume();
    this.watchStall(connection);
  }

  /** Disconnect a client that leaves its output unread for stallTimeoutMs. */
  private watchStall(connection: Connection): void {
    const { socket } = connection;
    const stalled = socket.writableLength >= this.pauseAtUnreadBytes;
    if (!stalled) {
      clearTimeout(connection.stall);
      connection.stall = undefined;
    } else if (connection.stall === undefined) {
      connection.stall = setTimeout(() => {
        this.log('warn', `control: disconnecting a client that left ${socket.writableLength} bytes unread for ${this.stallTimeoutMs} ms`);
        socket.destroy();
      }, this.stallTimeoutMs);
      connection.stall.unref();
    }
  }

  /** Anything a request's handling threw past its own error replies: log it, say so if possible, close this connection only. */
  private fail(connection: Connection, err: unknown): void {
    const reason = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
    this.log('warn', `control: closing a connection after an internal error: ${reason}`);
    const { socket } = connection;
    connection.queue.length = 0;
    if (!socket.writable) {
      socket.destroy();
      return;
    }
    const error = { code: 'ERR_INTERNAL', message: `the daemon failed to answer a request (${reason.slice(0, 200)}); closing the connection` };
    this.hangUp(socket, toJsonLine({ id: null, ok: false, error } satisfies ControlReply));
  }

  /**
   * Send a last line and close. What the client still sends is read and dropped until it closes
   * too (or the grace period ends): closing with unread input would reset the connection, and
   * the client could lose the line that says why.
   */
  private hangUp(socket: net.Socket, line: string): void {
    socket.removeAllListeners('data');
    socket.on('data', () => {});
    socket.once('end', () => socket.destroy());
    socket.end(line);
    socket.resume();
    setTimeout(() => socket.destroy(), this.closeGraceMs).unref();
  }

  /** A line too long: say so and hang up, since where the next request starts is unknown. */
  private reject(connection: Connection): void {
    const { socket } = connection;
    connection.queue.length = 0;
    if (!socket.writable) return;
    const error = {
      code: 'ERR_LINE_TOO_LONG',
      message: `request line is longer than ${this.maxLineBytes} bytes; closing the connection`,
    };
    this.hangUp(socket, toJsonLine({ id: null, ok: false, error } satisfies ControlReply));
  }

  private async handle(connection: Connection, line: string): Promise<void> {
    const envelope = parseEnvelope(line);
    if (!envelope.ok) {
      this.reply(connection, envelope.id, envelope.error);
      return;
    }
    const { id, cmd, args: rawArgs } = envelope;
    if (cmd === 'subscribe') {
      let args;
      try {
        args = parseVerbArgs('subscribe', SUBSCRIBE_VERB.args, rawArgs);
      } catch (err) {
        const e = toBlkrepError(err, 'subscribe failed');
        this.reply(connection, id, { code: e.code, message: e.message });
        return;
      }
      this.subscribe(connection, id, args.events ?? null);
      return;
    }
    const v = this.verbs.get(cmd);
    if (!v) {
      this.reply(connection, id, {
        code: 'ERR_UNKNOWN_COMMAND',
        message: `unknown command "${cmd.length > 64 ? `${cmd.slice(0, 64)}…` : cmd}"; known commands: ${this.commands().join(', ')}`,
      });
      return;
    }
    let result: unknown;
    try {
      result = await v.handler(parseVerbArgs(cmd, v.args, rawArgs));
    } catch (err) {
      const e = toBlkrepError(err, `command "${cmd}" failed`);
      this.reply(connection, id, { code: e.code, message: e.message });
      return;
    }
    let reply: string;
    try {
      reply = toJsonLine({ id, ok: true, result: result ?? null } satisfies ControlReply);
    } catch (err) {
      this.reply(connection, id, {
        code: 'ERR_INTERNAL',
        message: `result of command "${cmd}" cannot be written as JSON: ${(err as Error).message}`,
      });
      return;
    }
    this.send(connection, reply);
  }

  private subscribe(connection: Connection, id: ControlRequestId, events: string[] | null): void {
    connection.subscription = events === null ? null : new Set(events);
    const result = { events: events === null ? 'all' : [...connection.subscription!] };
    this.send(connection, toJsonLine({ id, ok: true, result } satisfies ControlReply));
  }

  private reply(connection: Connection, id: ControlRequestId, error: ControlErrorBody): void {
    // The id is a string, a finite number or null (parseEnvelope), so it can be written back.
    this.send(connection, toJsonLine({ id, ok: false, error } satisfies ControlReply));
  }

  private send(connection: Connection, line: string): void {
    const { socket } = connection;
    if (!socket.writable) return;
    if (socket.writableLength > this.maxUnreadBytes) {
      // It has stopped reading; holding more for it would only grow the daemon.
      socket.destroy();
      return;
    }
    socket.write(line);
    this.watchStall(connection);
  }

  private async shutdown(): Promise<void> {
    const server = this.server;
    if (server) {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const { socket } of this.connections) {
        // end() lets the last lines (a "shutdown" event, a reply) reach the client; a client that
        // does not take them within the grace period is cut.
        const cut = setTimeout(() => socket.destroy(), this.closeGraceMs);
        cut.unref();
        socket.once('close', () => clearTimeout(cut));
        socket.end(() => socket.destroy());
      }
      await closed;
    }
    if (this.inode === undefined) return;
    try {
      const stat = await lstat(this.path, { bigint: true });
      if (stat.isSocket() && stat.ino === this.inode) await unlink(this.path);
    } catch (err) {
      if (systemCode(err) !== 'ENOENT') throw toBlkrepError(err, `cannot remove control socket ${this.path}`);
    }
  }
}

/** A verb registered by name only: any object of arguments, passed on as it came. */
function untypedVerb(name: string, handler: ControlHandler): ControlVerb {
  return verb({ name, summary: '', args: z.looseObject({}), result: '' }, handler);
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
