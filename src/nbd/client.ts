/**
 * The NBD client: one export, reached through one or more connections (ClientSession each), with
 * requests queued, sent, retried after a reconnect, and failed when the server stays away.
 *
 * Client states (data below):
 *
 *   READY ◀──▶ DISCONNECTED      READY: at least one connection takes requests. DISCONNECTED: none;
 *     │             │           requests are held for `holdMs` from the drop, then fail with
 *     ▼             ▼           ERR_NBD_DISCONNECTED (and later ones fail at once) until a
 *   CLOSING ──▶ CLOSED          connection is back. Reconnection runs in the background with
 *   FAILED (the export changed)  jittered exponential backoff for as long as the client is open.
 *
 * - Connections: `connections` (default 1) are opened only when the server advertises
 *   CAN_MULTI_CONN; requests go round-robin to connections with room. A flush on one covers
 *   writes completed on all of them (that is what the flag promises).
 * - At most `maxInFlight` (default 64) requests per connection are on the wire, and none is sent
 *   while the socket's buffer is full; the rest wait in the queue, in order.
 * - Requests unanswered when a connection drops were not performed (as far as anyone knows) and
 *   are sent again on the next connection, first in line, for at most `holdMs` after they were
 *   first handed back. A protocol violation fails them instead: the server's answers can no longer
 *   be trusted.
 * - Durability across reconnects: a write that completed but was not yet flushed may be lost if
 *   the server died. So when a connection drops while such writes exist, the next flush fails
 *   with ERR_NBD_WRITES_LOST (once): the caller learns that "flushed" cannot be promised, instead
 *   of a flush that silently succeeds on a restarted server that lost the data.
 * - Commands and flags are checked against what the server advertised before anything is sent.
 * - Every call takes an AbortSignal. A queued request is dropped; one on the wire is abandoned (its
 *   reply is read and discarded; a WRITE rejects only once the socket no longer holds its payload).
 *
 * Events (never 'error'):
 *   'disconnected' { connection, reason, error, orphans }   a connection was lost
 *   'retrying'     { connection, attempt, delayMs, error }  the next connection attempt is scheduled
 *   'reconnected'  { connection, attempts, downtimeMs }     a lost connection is back
 *   'hold-expired' { failed, error }                        held requests were failed
 *   'failed'       { error }                                the client gave up for good
 */
import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import { BlkrepError, isAbortError, toBlkrepError } from '../api/errors.js';
import type { TransportRegistry, UpgraderRegistry } from '../api/transport.js';
import { BASE_ALLOCATION, CMD, CMD_FLAG, TF } from './constants.js';
import { checkCommand, describeCommand } from './client-check.js';
import { registryConnector, upgraderOf, type NbdConnector } from './client-connect.js';
import { abortError } from './client-errors.js';
import { negotiate, type ExportInfo } from './client-handshake.js';
import { ClientSession, type ClientOp, type CommandReply, type CommandSpec, type SessionEnd, type SessionOwner } from './client-session.js';
import { greetAndStartTls, type Greeting } from './starttls.js';
import { parseNbdUri, type NbdUri } from './uri.js';
import { StateMachine } from '../util/state-machine.js';
import { loadNative } from '../block/native.js';

export type { ExportInfo, BlockSizeInfo } from './client-handshake.js';
export { registryConnector, type NbdConnector } from './client-connect.js';

export interface BackoffOptions {
  /** first retry delay before jitter (default 100 ms) */
  initialMs?: number;
  /** longest delay before jitter (default 10 000 ms) */
  maxMs?: number;
  /** growth per attempt (default 2) */
  factor?: number;
}

export interface NbdClientOptions {
  /** the export */
  uri: string | NbdUri;
  /**
   * the registry the connection goes through (the CLI's, filled by the plugins' hook). Without
   * it, the built-in tcp and unix plugins (src/engine/default-transports.ts).
   */
  transports?: TransportRegistry;
  /** the upgraders for nbds:// URIs (the CLI's); without it, the built-in tls plugin */
  upgraders?: UpgraderRegistry;
  /** connections to open when the server advertises CAN_MULTI_CONN (default 1) */
  connections?: number;
  /** requests on the wire per connection (default 64) */
  maxInFlight?: number;
  /** ask for structured replies (default true) */
  structuredReplies?: boolean;
  /** meta contexts for block status (default ["base:allocation"]) */
  metaContexts?: string[];
  /** reconnect after a connection is lost (default true) */
  reconnect?: boolean;
  /** how long requests wait for a lost connection to come back (default 5000 ms; 0 = fail at once) */
  holdMs?: number;
  backoff?: BackoffOptions;
  /** connect plus handshake must finish within this (default 10 000 ms) */
  connectTimeoutMs?: number;
  /** close() waits this long for requests and DISC before dropping connections (default 30 000 ms) */
  closeTimeoutMs?: number;
  /** after DISC the server must close the connection within this (default 5000 ms) */
  discTimeoutMs?: number;
  /**
   * gather the requests sent in one turn of the event loop into one socket write (default false;
   * the pair's forwarding connection: client-session.ts `batchSends`)
   */
  batchSends?: boolean;
  /**
   * ask for this send buffer on a Unix socket's connections (SO_SNDBUF through the native addon;
   * the kernel doubles it). Default 0: the system's (208 KiB here). TCP sizes its own buffers
   * (autotuning, which a fixed SO_SNDBUF turns off) and streams from other transports are left
   * as they are, as is a socket when the addon is not there or the kernel refuses; nbds+unix sets
   * it on the Unix socket before STARTTLS (the TLS records go through it). The pair's data connection
   * (src/pair/README.md: 1 MiB writes went in ~5 pieces, each a wake-up of both sides).
   */
  sendBufferBytes?: number;
  /** for jitter; tests inject it */
  random?: () => number;
}

export interface IoOptions {
  signal?: AbortSignal;
}

/** A connection was lost (`orphans`: its unanswered requests, queued again). */
export interface DisconnectedEvent {
  connection: number;
  reason: string;
  error: BlkrepError;
  orphans: number;
}

/** Attempt `attempt` to bring connection `connection` back starts in `delayMs`. */
export interface RetryingEvent {
  connection: number;
  attempt: number;
  delayMs: number;
  error: BlkrepError;
}

export interface ReconnectedEvent {
  connection: number;
  /** failed attempts before this one */
  attempts: number;
  downtimeMs: number;
}

export interface HoldExpiredEvent {
  /** requests failed with ERR_NBD_DISCONNECTED */
  failed: number;
  error: BlkrepError | undefined;
}

export interface NbdClientEvents {
  disconnected: [DisconnectedEvent];
  retrying: [RetryingEvent];
  reconnected: [ReconnectedEvent];
  'hold-expired': [HoldExpiredEvent];
  failed: [{ error: BlkrepError }];
}

export type ClientState = 'READY' | 'DISCONNECTED' | 'CLOSING' | 'CLOSED' | 'FAILED';

export const CLIENT_TRANSITIONS: Readonly<Record<ClientState, readonly ClientState[]>> = {
  READY: ['DISCONNECTED', 'CLOSING', 'FAILED'],
  DISCONNECTED: ['READY', 'CLOSING', 'FAILED'],
  CLOSING: ['CLOSED'],
  CLOSED: [],
  FAILED: ['CLOSING', 'CLOSED'],
};

export interface ClientStatus {
  state: ClientState;
  uri: string;
  connections: Array<{ index: number; state: 'connected' | 'connecting' | 'waiting'; inFlight: number; attempt: number }>;
  queued: number;
  lastError: { code: string; message: string } | null;
}

const DEFAULTS = {
  connections: 1,
  maxInFlight: 64,
  holdMs: 5000,
  connectTimeoutMs: 10_000,
  closeTimeoutMs: 30_000,
  discTimeoutMs: 5000,
  backoff: { initialMs: 100, maxMs: 10_000, factor: 2 },
};

interface Slot {
  index: number;
  session?: ClientSession;
  connecting?: AbortController;
  timer?: NodeJS.Timeout;
  /** failed attempts since the connection was lost */
  attempt: number;
  downSince?: number;
}

/** A request as the client tracks it; see ClientOp. */
class Request implements ClientOp {
  abandoned = false;
  payloadSent?: Promise<void>;
  settled = false;
  /** the session it is on the wire with, if any */
  session: ClientSession | undefined;
  /** when a lost connection first handed it back: retries end holdMs later */
  heldSince: number | undefined;
  private cleanup: (() => void) | undefined;

  constructor(
    readonly spec: CommandSpec,
    private readonly resolve: (reply: CommandReply) => void,
    private readonly reject: (err: BlkrepError) => void,
    /** a write without FUA: counted on success (the client's flush() durability rule) */
    private readonly counted?: () => void,
  ) {}

  get abortable(): boolean {
    return this.cleanup !== undefined;
  }

  watch(signal: AbortSignal | undefined, onAbort: () => void): void {
    if (!signal) return;
    signal.addEventListener('abort', onAbort, { once: true });
    this.cleanup = () => signal.removeEventListener('abort', onAbort);
  }

  succeed(reply: CommandReply): void {
    if (this.settled) return;
    this.settled = true;
    this.cleanup?.();
    this.counted?.();
    this.resolve(reply);
  }

  fail(err: BlkrepError): void {
    if (this.settled) return;
    this.settled = true;
    this.cleanup?.();
    this.reject(err);
  }
}

export class NbdClient extends EventEmitter<NbdClientEvents> {
  readonly uri: NbdUri;
  /** the client's connection states (CLIENT_TRANSITIONS) */
  private readonly machine = new StateMachine<ClientState>({ name: 'NbdClient', transitions: CLIENT_TRANSITIONS }, 'DISCONNECTED');
  private exportInfo: ExportInfo | undefined;
  private readonly connector: NbdConnector;
  private readonly slots: Slot[] = [];
  private queue: Array<Request | undefined> = [];
  private head = 0;
  private rr = 0;
  private lastError: BlkrepError | undefined;
  private holdExpired = false;
  private holdTimer: NodeJS.Timeout | undefined;
  private closeWaiters: Array<() => void> = [];
  private closeTimer: NodeJS.Timeout | undefined;
  private fatal: BlkrepError | undefined;
  // durability across reconnects (see the header)
  private writesDone = 0;
  /** a Request's `counted`: one function for the client, not a closure per request */
  private readonly countWriteDone = (): void => {
    this.writesDone++;
  };
  private flushedUpTo = 0;
  private lossCount = 0;
  private pendingLoss = false;
  private readonly upgraders: UpgraderRegistry | undefined;
  private readonly opts: Required<Omit<NbdClientOptions, 'uri' | 'transports' | 'upgraders' | 'backoff'>> & { backoff: Required<BackoffOptions> };

  private constructor(options: NbdClientOptions) {
    super();
    this.uri = typeof options.uri === 'string' ? parseNbdUri(options.uri) : options.uri;
    this.connector = registryConnector(this.uri, options.transports);
    this.upgraders = options.upgraders;
    const connections = options.connections ?? DEFAULTS.connections;
    if (!Number.isInteger(connections) || connections < 1 || connections > 64) {
      throw new BlkrepError('ERR_BAD_OPTION', `connections must be an integer from 1 to 64, not ${connections}`, { errno: 'EINVAL' });
    }
    this.opts = {
      connections,
      maxInFlight: Math.max(1, options.maxInFlight ?? DEFAULTS.maxInFlight),
      structuredReplies: options.structuredReplies ?? true,
      metaContexts: options.metaContexts ?? [BASE_ALLOCATION],
      reconnect: options.reconnect ?? true,
      holdMs: Math.max(0, options.holdMs ?? DEFAULTS.holdMs),
      connectTimeoutMs: options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs,
      closeTimeoutMs: options.closeTimeoutMs ?? DEFAULTS.closeTimeoutMs,
      discTimeoutMs: options.discTimeoutMs ?? DEFAULTS.discTimeoutMs,
      batchSends: options.batchSends ?? false,
      sendBufferBytes: options.sendBufferBytes ?? 0,
      random: options.random ?? Math.random,
      backoff: { ...DEFAULTS.backoff, ...options.backoff },
    };
  }

  /** Connect (the first connection must succeed), then open the others if multi-conn is offered. */
  static async connect(options: NbdClientOptions & IoOptions): Promise<NbdClient> {
    const client = new NbdClient(options);
    const first: Slot = { index: 0, attempt: 0 };
    client.slots.push(first);
    const session = await client.establish(first, options.signal);
    client.exportInfo = session.info;
    client.attach(first, session);
    const want = session.info.flags & TF.CAN_MULTI_CONN ? client.opts.connections : 1;
    const more: Slot[] = [];
    for (let i = 1; i < want; i++) more.push({ index: i, attempt: 0 });
    client.slots.push(...more);
    await Promise.all(
      more.map(async (slot) => {
        try {
          client.attach(slot, await client.establish(slot, options.signal));
        } catch (err) {
          // One connection is enough to work; the others keep trying in the background.
          if (client.current === 'READY') client.scheduleReconnect(slot, toBlkrepError(err));
        }
      }),
    );
    return client;
  }

  get state(): ClientState {
    return this.current;
  }

  /** What the first handshake learned: size, transmission flags, block sizes, contexts. */
  get info(): ExportInfo {
    return this.exportInfo!;
  }

  /** connections currently taking requests */
  get connectedCount(): number {
    return this.slots.filter((s) => s.session?.state === 'READY').length;
  }

  status(): ClientStatus {
    return {
      state: this.current,
      uri: this.uri.uri,
      connections: this.slots.map((s) => ({
        index: s.index,
        state: s.session ? 'connected' : s.connecting ? 'connecting' : 'waiting',
        inFlight: s.session?.inFlight ?? 0,
        attempt: s.attempt,
      })),
      queued: this.queue.slice(this.head).filter((op) => op !== undefined && !op.settled).length,
      lastError: this.lastError ? { code: this.lastError.code, message: this.lastError.message } : null,
    };
  }

  // ---------------------------------------------------------------------------------------------
  // commands

  async read(offset: number, target: Buffer, options: IoOptions & { df?: boolean } = {}): Promise<void> {
    await this.command({ cmd: CMD.READ, flags: options.df ? CMD_FLAG.DF : 0, offset, length: target.length, target }, options.signal);
  }

  write(offset: number, data: Buffer, options: IoOptions & { fua?: boolean } = {}): Promise<void> {
    // not async: the reply's promise itself (every forwarded write of a pair passes here)
    return this.command({ cmd: CMD.WRITE, flags: options.fua ? CMD_FLAG.FUA : 0, offset, length: data.length, data }, options.signal) as Promise<unknown> as Promise<void>;
  }

  async writeZeroes(offset: number, length: number, options: IoOptions & { fua?: boolean; noHole?: boolean; fast?: boolean } = {}): Promise<void> {
    const flags = (options.fua ? CMD_FLAG.FUA : 0) | (options.noHole ? CMD_FLAG.NO_HOLE : 0) | (options.fast ? CMD_FLAG.FAST_ZERO : 0);
    await this.command({ cmd: CMD.WRITE_ZEROES, flags, offset, length }, options.signal);
  }

  async trim(offset: number, length: number, options: IoOptions & { fua?: boolean } = {}): Promise<void> {
    await this.command({ cmd: CMD.TRIM, flags: options.fua ? CMD_FLAG.FUA : 0, offset, length }, options.signal);
  }

  async cache(offset: number, length: number, options: IoOptions = {}): Promise<void> {
    await this.command({ cmd: CMD.CACHE, flags: 0, offset, length }, options.signal);
  }

  /**
   * Resolves once every write that completed before the call is durable. Fails with
   * ERR_NBD_WRITES_LOST if a connection dropped while completed writes were not yet flushed.
   */
  async flush(options: IoOptions = {}): Promise<void> {
    const upTo = this.writesDone;
    const losses = this.lossCount;
    const hadLoss = this.pendingLoss;
    await this.command({ cmd: CMD.FLUSH, flags: 0, offset: 0, length: 0 }, options.signal);
    if (hadLoss || this.lossCount !== losses) {
      this.pendingLoss = false;
      throw new BlkrepError(
        'ERR_NBD_WRITES_LOST',
        `flush of ${this.uri.uri} cannot promise durability: a connection to the server was lost while completed writes were not yet flushed, so the server may have lost them`,
        { errno: 'EIO', details: { uri: this.uri.uri } },
      );
    }
    this.flushedUpTo = Math.max(this.flushedUpTo, upTo);
  }

  /** Block status for every selected meta context: [length, flags] descriptors by context name. */
  async blockStatus(offset: number, length: number, options: IoOptions & { reqOne?: boolean } = {}): Promise<Map<string, Array<[number, number]>>> {
    const reply = await this.command({ cmd: CMD.BLOCK_STATUS, flags: options.reqOne ? CMD_FLAG.REQ_ONE : 0, offset, length }, options.signal);
    return reply.blockStatus ?? new Map();
  }

  /** Send one command (already split and aligned by the caller) and wait for its reply. */
  command(spec: CommandSpec, signal?: AbortSignal): Promise<CommandReply> {
    return new Promise<CommandReply>((resolve, reject) => {
      // described only for an error: nothing is built for a request that goes out (every
      // forwarded write of a pair passes here: no closure but the promise's own executor)
      if (signal?.aborted) return reject(abortError(`NBD ${describeCommand(spec)}`, signal.reason));
      if (this.machine.is('CLOSING', 'CLOSED')) return reject(this.closedError(`NBD ${describeCommand(spec)}`));
      if (this.fatal) return reject(this.fatal);
      const invalid = checkCommand(this.info, spec);
      if (invalid) return reject(invalid);
      if (this.current === 'DISCONNECTED' && this.holdExpired) return reject(this.disconnectedError(`NBD ${describeCommand(spec)}`));
      const writes = (spec.cmd === CMD.WRITE || spec.cmd === CMD.WRITE_ZEROES || spec.cmd === CMD.TRIM) && !(spec.flags & CMD_FLAG.FUA);
      const op: Request = new Request(spec, resolve, reject, writes ? this.countWriteDone : undefined);
      if (signal) op.watch(signal, () => this.abandon(op, abortError(`NBD ${describeCommand(spec)}`, signal.reason)));
      this.queue.push(op);
      this.pump();
    });
  }

  private abandon(op: Request, err: BlkrepError): void {
    if (op.settled) return;
    op.abandoned = true;
    if (!op.session) {
      op.fail(err); // still queued: pump() skips settled requests
      return;
    }
    // On the wire: the reply will be read and dropped. A WRITE's caller may reuse its buffer only
    // once the socket is done with it.
    const sent = op.payloadSent;
    if (!sent) return op.fail(err);
    op.settled = true;
    void sent.then(() => {
      op.settled = false;
      op.fail(err);
    });
  }

  private closedError(what: string): BlkrepError {
    return new BlkrepError('ERR_NBD_CLOSED', `${what}: the NBD client for ${this.uri.uri} is closed`, { errno: 'EIO' });
  }

  private disconnectedError(what: string): BlkrepError {
    const shutdown = this.lastError?.errno === 'ESHUTDOWN';
    const held = this.opts.reconnect && this.opts.holdMs > 0 ? ` came back within ${this.opts.holdMs} ms` : '';
    return new BlkrepError(
      'ERR_NBD_DISCONNECTED',
      `${what}: no connection to ${this.uri.uri}${held}${this.lastError ? ` (${this.lastError.message})` : ''}`,
      { errno: shutdown ? 'ESHUTDOWN' : 'EIO', ...(this.lastError ? { cause: this.lastError } : {}), details: { uri: this.uri.uri } },
    );
  }

  private pump(): void {
    while (this.head < this.queue.length) {
      const op = this.queue[this.head];
      if (!op || op.settled) {
        this.queue[this.head++] = undefined;
        continue;
      }
      const session = this.pickSession();
      if (!session) break;
      this.queue[this.head++] = undefined;
      const invalid = checkCommand(session.info, op.spec);
      if (invalid) {
        op.fail(invalid); // this connection's server offers less than the first one did
        continue;
      }
      op.session = session;
      session.submit(op);
    }
    if (this.head === this.queue.length) {
      // emptied: reuse the array (a new one at every request was a new backing store each)
      if (this.head > 1024) this.queue = [];
      else this.queue.length = 0;
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    if (this.current === 'CLOSING') this.continueClose();
  }

  private pickSession(): ClientSession | undefined {
    const n = this.slots.length;
    for (let i = 0; i < n; i++) {
      const idx = (this.rr + i) % n;
      const s = this.slots[idx]!.session;
      if (s?.acceptsRequests) {
        this.rr = idx + 1;
        return s;
      }
    }
    return undefined;
  }

  // ---------------------------------------------------------------------------------------------
  // connections

  private get current(): ClientState {
    return this.machine.state;
  }

  private goto(next: ClientState): void {
    this.machine.goto(next);
  }

  private label(slot: Slot): string {
    return this.opts.connections > 1 ? `NBD server ${this.uri.uri} (connection ${slot.index})` : `NBD server ${this.uri.uri}`;
  }

  /** Connect and handshake, bounded by connectTimeoutMs. */
  private async establish(slot: Slot, outer?: AbortSignal): Promise<ClientSession> {
    const ac = new AbortController();
    slot.connecting = ac;
    const timeout = AbortSignal.timeout(this.opts.connectTimeoutMs);
    const signal = AbortSignal.any(outer ? [ac.signal, timeout, outer] : [ac.signal, timeout]);
    try {
      let stream = await this.connector({ signal, timeoutMs: this.opts.connectTimeoutMs });
      if (this.opts.sendBufferBytes > 0) setUnixSendBuffer(stream, this.opts.sendBufferBytes);
      let greeted: Greeting | undefined;
      if (this.uri.tls) {
        // nbds://: STARTTLS before anything else; no option ever travels in clear
        const upgrader = await upgraderOf('tls', this.upgraders);
        const upgraded = await greetAndStartTls({ stream, peer: this.uri.address }, upgrader, this.uri.tls.settings, { signal, timeoutMs: this.opts.connectTimeoutMs });
        stream = upgraded.connection.stream;
        greeted = upgraded.greeting;
      }
      const { info, leftover } = await negotiate(stream, {
        exportName: this.uri.exportName,
        structuredReplies: this.opts.structuredReplies,
        metaContexts: this.opts.metaContexts,
        signal,
        ...(greeted ? { greeted } : {}),
      }).catch((err: unknown) => {
        throw greeted ? tlsRejection(this.uri.uri, err) : err;
      });
      return new ClientSession(stream, leftover, info, this.sessionOwner, { maxInFlight: this.opts.maxInFlight, label: this.label(slot), discTimeoutMs: this.opts.discTimeoutMs, batchSends: this.opts.batchSends });
    } catch (err) {
      if (timeout.aborted && !ac.signal.aborted && !outer?.aborted) {
        throw new BlkrepError('ERR_NBD_CONNECT', `cannot connect to ${this.uri.uri}: no answer within ${this.opts.connectTimeoutMs} ms`, {
          errno: 'EIO',
          cause: err,
          details: { uri: this.uri.uri, timeoutMs: this.opts.connectTimeoutMs },
        });
      }
      if (isAbortError(err)) throw toBlkrepError(err);
      const e = toBlkrepError(err);
      if (e.code === 'ERR_CONNECT_FAILED' || e.code === 'ERR_CONNECT_TIMEOUT' || e.code.startsWith('ERR_SYSTEM_')) {
        throw new BlkrepError('ERR_NBD_CONNECT', `cannot connect to ${this.uri.uri}: ${e.message}`, { errno: 'EIO', cause: err, details: { uri: this.uri.uri } });
      }
      throw e;
    } finally {
      if (slot.connecting === ac) slot.connecting = undefined;
      if (this.current === 'CLOSING') queueMicrotask(() => this.continueClose());
    }
  }

  private attach(slot: Slot, session: ClientSession): void {
    slot.session = session;
    session.start();
    const wasDown = slot.downSince;
    const attempts = slot.attempt;
    slot.attempt = 0;
    slot.downSince = undefined;
    if (this.current === 'DISCONNECTED') {
      this.goto('READY');
      this.holdExpired = false;
      if (this.holdTimer) clearTimeout(this.holdTimer);
      this.holdTimer = undefined;
    }
    if (wasDown !== undefined) this.emit('reconnected', { connection: slot.index, attempts, downtimeMs: Date.now() - wasDown });
    this.pump();
  }

  private readonly sessionOwner: SessionOwner = {
    sessionAvailable: () => this.pump(),
    sessionClosed: (session, end) => this.onSessionClosed(session, end),
  };

  private onSessionClosed(session: ClientSession, end: SessionEnd): void {
    const slot = this.slots.find((s) => s.session === session);
    if (!slot) return;
    slot.session = undefined;
    for (const op of end.orphans) (op as Request).session = undefined;
    if (!end.clean && this.writesDone > this.flushedUpTo) {
      this.lossCount++;
      this.pendingLoss = true;
    }
    if (this.machine.is('CLOSING', 'CLOSED', 'FAILED')) {
      const err = this.fatal ?? this.closedError(`NBD request`);
      for (const op of end.orphans) op.fail(err);
      this.pump();
      return;
    }
    this.lastError = end.cause;
    slot.downSince = Date.now();
    // Unanswered requests go first, in their order, ahead of those still waiting. Each is retried
    // for at most holdMs after it was first handed back, so a server that drops the connection on
    // one request every time (or always answers ESHUTDOWN) cannot keep it going round forever.
    const now = Date.now();
    const live: Request[] = [];
    for (const op of end.orphans as Request[]) {
      if (op.settled) continue;
      op.heldSince ??= now;
      if (this.opts.reconnect && now - op.heldSince < this.opts.holdMs) live.push(op);
      else op.fail(this.disconnectedError(`NBD ${describeCommand(op.spec)}`));
    }
    if (live.length) {
      this.queue = [...live, ...this.queue.slice(this.head)];
      this.head = 0;
    }
    this.emit('disconnected', { connection: slot.index, reason: end.cause.message, error: end.cause, orphans: end.orphans.length });
    if (this.connectedCount === 0) this.startOutage();
    if (this.opts.reconnect) this.scheduleReconnect(slot, end.cause);
    this.pump();
  }

  private startOutage(): void {
    if (this.current !== 'READY') return;
    this.goto('DISCONNECTED');
    const expire = (): void => {
      this.holdTimer = undefined;
      this.holdExpired = true;
      const held = this.queue.slice(this.head).filter((op): op is Request => op !== undefined && !op.settled);
      this.queue = [];
      this.head = 0;
      for (const op of held) op.fail(this.disconnectedError(`NBD ${describeCommand(op.spec)}`));
      this.emit('hold-expired', { failed: held.length, error: this.lastError });
    };
    if (!this.opts.reconnect || this.opts.holdMs === 0) expire();
    else this.holdTimer = setTimeout(expire, this.opts.holdMs);
  }

  /** Delay before attempt n (0-based): full exponential, then jittered to 50–100 %. */
  backoffDelay(attempt: number): number {
    const { initialMs, maxMs, factor } = this.opts.backoff;
    const base = Math.min(maxMs, initialMs * factor ** Math.min(attempt, 64));
    return Math.round(base * (0.5 + 0.5 * this.opts.random()));
  }

  private scheduleReconnect(slot: Slot, error: BlkrepError): void {
    if (slot.timer || slot.connecting || slot.session) return;
    if (this.machine.is('CLOSING', 'CLOSED', 'FAILED')) return;
    slot.downSince ??= Date.now();
    const attempt = slot.attempt + 1;
    const delayMs = this.backoffDelay(slot.attempt);
    this.emit('retrying', { connection: slot.index, attempt, delayMs, error });
    slot.timer = setTimeout(() => {
      slot.timer = undefined;
      void this.reconnect(slot);
    }, delayMs);
    // Held requests keep the process alive through their own timer; an idle client must not.
    slot.timer.unref?.();
  }

  /**
   * Try every lost connection now, without waiting out the backoff (a job resumed by its user
   * after the server came back must not fail again at once because the next attempt is seconds
   * away). Resolves true when a connection is up (or none was lost), false when this attempt
   * failed too (the backoff then goes on) or the client is closing or failed.
   */
  async retryNow(): Promise<boolean> {
    if (this.current === 'READY') return true;
    if (this.current !== 'DISCONNECTED') return false;
    const attempts: Array<Promise<void>> = [];
    for (const slot of this.slots) {
      if (slot.session) continue;
      if (slot.connecting) {
        attempts.push(this.nextOutcome(slot));
      } else {
        if (slot.timer) clearTimeout(slot.timer);
        slot.timer = undefined;
        attempts.push(this.reconnect(slot));
      }
    }
    await Promise.all(attempts);
    return (this.current as ClientState) === 'READY';
  }

  /** Resolves when the attempt under way on `slot` has succeeded or failed. */
  private nextOutcome(slot: Slot): Promise<void> {
    return new Promise((resolve) => {
      const done = (e?: { connection: number }): void => {
        if (e !== undefined && e.connection !== slot.index) return;
        this.off('reconnected', done);
        this.off('retrying', done);
        this.off('failed', settle);
        resolve();
      };
      const settle = (): void => done();
      this.on('reconnected', done);
      this.on('retrying', done);
      this.on('failed', settle);
    });
  }

  private async reconnect(slot: Slot): Promise<void> {
    let session: ClientSession;
    try {
      session = await this.establish(slot);
    } catch (err) {
      slot.attempt++;
      const e = toBlkrepError(err);
      this.lastError = e;
      this.scheduleReconnect(slot, e);
      return;
    }
    if (this.machine.is('CLOSING', 'CLOSED', 'FAILED')) {
      session.start();
      session.disconnect();
      return;
    }
    if (session.info.size !== this.info.size) {
      const error = new BlkrepError(
        'ERR_NBD_EXPORT_CHANGED',
        `after reconnecting, export "${this.uri.exportName}" of ${this.uri.uri} has ${session.info.size} bytes instead of ${this.info.size}: giving up on it`,
        { errno: 'EIO', details: { uri: this.uri.uri, size: this.info.size, newSize: session.info.size } },
      );
      session.start();
      session.disconnect();
      this.fail(error);
      return;
    }
    this.attach(slot, session);
  }

  /** Give up for good: every request fails with `error` from now on. */
  private fail(error: BlkrepError): void {
    this.fatal = error;
    this.lastError = error;
    this.goto('FAILED');
    if (this.holdTimer) clearTimeout(this.holdTimer);
    this.holdTimer = undefined;
    for (const slot of this.slots) {
      if (slot.timer) clearTimeout(slot.timer);
      slot.timer = undefined;
      slot.connecting?.abort();
      slot.session?.disconnect();
    }
    const queued = this.queue.slice(this.head).filter((op): op is Request => op !== undefined);
    this.queue = [];
    this.head = 0;
    for (const op of queued) op.fail(error);
    this.emit('failed', { error });
  }

  // ---------------------------------------------------------------------------------------------
  // close

  /**
   * Finish: queued and in-flight requests complete (while a connection is up; held ones fail),
   * then each connection sends DISC and waits for the server to close. Bounded by closeTimeoutMs,
   * after which connections are dropped.
   */
  close(): Promise<void> {
    if (this.current === 'CLOSED') return Promise.resolve();
    const done = new Promise<void>((resolve) => this.closeWaiters.push(resolve));
    if (this.current === 'CLOSING') return done;
    const hadConnection = this.current === 'READY';
    this.goto('CLOSING');
    if (this.holdTimer) clearTimeout(this.holdTimer);
    this.holdTimer = undefined;
    for (const slot of this.slots) {
      if (slot.timer) clearTimeout(slot.timer);
      slot.timer = undefined;
      slot.connecting?.abort();
    }
    if (!hadConnection) {
      const queued = this.queue.slice(this.head).filter((op): op is Request => op !== undefined);
      this.queue = [];
      this.head = 0;
      for (const op of queued) op.fail(this.closedError(`NBD ${describeCommand(op.spec)}`));
    }
    this.closeTimer = setTimeout(() => {
      for (const slot of this.slots) slot.session?.destroy(this.closedError('NBD close'));
      const queued = this.queue.slice(this.head).filter((op): op is Request => op !== undefined);
      this.queue = [];
      this.head = 0;
      for (const op of queued) op.fail(this.closedError(`NBD ${describeCommand(op.spec)}`));
      this.continueClose();
    }, this.opts.closeTimeoutMs);
    this.pump();
    return done;
  }

  private continueClose(): void {
    if (this.current !== 'CLOSING') return;
    const queued = this.queue.slice(this.head).filter((op): op is Request => op !== undefined && !op.settled);
    if (queued.length && this.connectedCount > 0) return;
    this.queue = [];
    this.head = 0;
    for (const op of queued) op.fail(this.closedError(`NBD ${describeCommand(op.spec)}`));
    for (const slot of this.slots) slot.session?.disconnect();
    if (this.slots.some((s) => s.session || s.connecting)) return;
    if (this.closeTimer) clearTimeout(this.closeTimer);
    this.closeTimer = undefined;
    this.goto('CLOSED');
    for (const w of this.closeWaiters.splice(0)) w();
  }
}

/**
 * In TLS 1.3 a server that refuses our client certificate (or its authz list refuses our DN) says
 * so after the handshake completed on our side: our first read finds the connection closed.
 */
function tlsRejection(uri: string, err: unknown): unknown {
  const e = toBlkrepError(err);
  if (e.code !== 'ERR_NBD_HANDSHAKE' || e.details.state === undefined) return err;
  return new BlkrepError(
    'ERR_TLS_REJECTED',
    `${uri}: the server closed the connection right after the TLS handshake: it refused our credentials (a client certificate it does not trust, a DN or PSK user not in its allow-list, or none where it needs one)`,
    { errno: 'EPERM', cause: err, details: { uri } },
  );
}

/**
 * SO_SNDBUF on a plain Unix socket (its libuv handle is a Pipe); anything else is left alone, and
 * so is a socket the kernel refuses (the connection works with its default). Returns the size
 * the kernel reports, or undefined when nothing was set.
 */
export function setUnixSendBuffer(stream: Duplex, bytes: number): number | undefined {
  const handle = (stream as { _handle?: { fd?: unknown; constructor?: { name?: string } } | null })._handle;
  const fd = handle?.fd;
  if (handle?.constructor?.name !== 'Pipe' || typeof fd !== 'number' || fd < 0) return undefined;
  const native = loadNative();
  if (!native?.setSendBuffer) return undefined;
  try {
    return native.setSendBuffer(fd, bytes);
  } catch {
    return undefined;
  }
}
