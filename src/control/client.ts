/**
 * A client of the daemon's control socket: what `blkrep status`, `job …`, `events` and the other
 * live commands use when given `--control PATH`.
 */
import { statSync } from 'node:fs';
import net from 'node:net';
import { BlkrepError } from '../api/errors.js';
import { type ControlEvent, isJsonObject, LineSplitter, MAX_REQUEST_LINE_BYTES, toJsonLine } from './protocol.js';

export interface ControlConnectOptions {
  /** give up connecting after this many milliseconds (default 5000) */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface ControlRequestOptions {
  /** give up waiting for the reply after this many milliseconds (default: wait) */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export type ControlEventListener = (event: ControlEvent) => void;

/** Replies and events can be far longer than requests (a status with many connections). */
const MAX_INCOMING_LINE_BYTES = 64 << 20;

interface Pending {
  cmd: string;
  resolve(result: unknown): void;
  reject(err: BlkrepError): void;
}

function systemCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** Cancelled by its signal; `code` is Node's, so isAbortError() recognises it. */
function aborted(what: string, reason: unknown): BlkrepError {
  return new BlkrepError('ABORT_ERR', `${what} aborted`, { cause: reason });
}

/** what `path` is when it is there but not a socket ('a regular file' …); undefined for a socket or when stat fails */
function notASocket(path: string): string | undefined {
  try {
    const st = statSync(path);
    if (st.isSocket()) return undefined;
    return st.isFile() ? 'a regular file' : st.isFIFO() ? 'a FIFO' : st.isDirectory() ? 'a directory' : 'a device';
  } catch {
    return undefined;
  }
}

function connectError(path: string, err: unknown): BlkrepError {
  const sys = systemCode(err);
  const hint = `start a daemon with \`blkrep serve-nbd --control ${path}\``;
  const details = { path, syscallCode: sys };
  switch (sys) {
    case 'ENOENT':
      return new BlkrepError('ERR_CONTROL_UNREACHABLE', `cannot reach the blkrep daemon: there is no control socket at ${path}; ${hint}`, {
        cause: err,
        details,
      });
    case 'ECONNREFUSED': {
      // connect(2) says ECONNREFUSED for a regular file, a FIFO or a directory too: say what it is
      const kind = notASocket(path);
      if (kind !== undefined) {
        return new BlkrepError('ERR_CONTROL_UNREACHABLE', `cannot reach the blkrep daemon: ${path} is ${kind}, not a control socket; give the --control path a daemon listens on`, {
          cause: err,
          details: { ...details, kind },
        });
      }
      return new BlkrepError(
        'ERR_CONTROL_UNREACHABLE',
        `cannot reach the blkrep daemon: nothing answers on control socket ${path} (left behind by a daemon that stopped?); ${hint}`,
        { cause: err, details },
      );
    }
    case 'EACCES':
    case 'EPERM':
      return new BlkrepError(
        'ERR_CONTROL_PERMISSION',
        `permission denied on control socket ${path}: it is mode 0600, so run as the user the daemon runs as`,
        { errno: 'EPERM', cause: err, details },
      );
    default:
      return new BlkrepError('ERR_CONTROL_UNREACHABLE', `cannot reach the blkrep daemon at ${path}: ${(err as Error).message}`, {
        cause: err,
        details,
      });
  }
}

function openSocket(path: string, options: ControlConnectOptions): Promise<net.Socket> {
  const { signal, timeoutMs = 5000 } = options;
  const what = `connecting to control socket ${path}`;
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(aborted(what, signal.reason));
      return;
    }
    const socket = net.connect({ path });
    const settle = (): void => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('error', onError);
      signal?.removeEventListener('abort', onAbort);
    };
    const fail = (err: BlkrepError): void => {
      settle();
      socket.on('error', () => {});
      socket.destroy();
      reject(err);
    };
    const onConnect = (): void => {
      settle();
      resolve(socket);
    };
    const onError = (err: Error): void => fail(connectError(path, err));
    const onAbort = (): void => fail(aborted(what, signal?.reason));
    const timer = setTimeout(() => {
      fail(
        new BlkrepError('ERR_CONTROL_TIMEOUT', `no answer from control socket ${path} within ${timeoutMs} ms`, {
          details: { path, timeoutMs },
        }),
      );
    }, timeoutMs);
    socket.once('connect', onConnect);
    socket.once('error', onError);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export class ControlClient {
  /** Resolves when the connection has ended, whichever side ended it. Never rejects. */
  readonly closed: Promise<void>;
  private readonly pending = new Map<number, Pending>();
  private readonly lines = new LineSplitter(MAX_INCOMING_LINE_BYTES);
  private nextId = 1;
  private onEvent: ControlEventListener | undefined;
  /** why the connection is unusable, once it is */
  private failure: BlkrepError | undefined;

  private constructor(
    readonly path: string,
    private readonly socket: net.Socket,
  ) {
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.on('error', (err) => {
      this.fail(new BlkrepError('ERR_CONTROL_CLOSED', `control connection to ${path} failed: ${err.message}`, { cause: err }));
    });
    socket.on('close', () => {
      this.fail(new BlkrepError('ERR_CONTROL_CLOSED', `the daemon closed control connection ${path}`, { details: { path } }));
    });
  }

  /**
   * Connect to the daemon's control socket. A missing socket, or one nobody answers on, is
   * ERR_CONTROL_UNREACHABLE.
   */
  static async connect(path: string, options: ControlConnectOptions = {}): Promise<ControlClient> {
    return new ControlClient(path, await openSocket(path, options));
  }

  /** Send a command; resolves with its result, rejects with the daemon's error code and message. */
  request(cmd: string, args?: Record<string, unknown>, options: ControlRequestOptions = {}): Promise<unknown> {
    if (this.failure) return Promise.reject(this.failure);
    const { signal, timeoutMs } = options;
    if (signal?.aborted) return Promise.reject(aborted(`command "${cmd}"`, signal.reason));
    const id = this.nextId++;
    let line: string;
    try {
      line = toJsonLine(args === undefined ? { id, cmd } : { id, cmd, args });
    } catch (err) {
      return Promise.reject(
        new BlkrepError('ERR_BAD_REQUEST', `arguments of command "${cmd}" cannot be written as JSON: ${(err as Error).message}`, {
          errno: 'EINVAL',
          cause: err,
        }),
      );
    }
    const bytes = Buffer.byteLength(line) - 1;
    if (bytes > MAX_REQUEST_LINE_BYTES) {
      return Promise.reject(
        new BlkrepError('ERR_LINE_TOO_LONG', `command "${cmd}" is ${bytes} bytes as JSON; the control socket takes at most ${MAX_REQUEST_LINE_BYTES}`, {
          errno: 'EINVAL',
          details: { bytes, limit: MAX_REQUEST_LINE_BYTES },
        }),
      );
    }
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const done = (): void => {
        this.pending.delete(id);
        if (timer) clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
      };
      const onAbort = (): void => {
        done();
        reject(aborted(`command "${cmd}"`, signal?.reason));
      };
      this.pending.set(id, {
        cmd,
        resolve: (result) => {
          done();
          resolve(result);
        },
        reject: (err) => {
          done();
          reject(err);
        },
      });
      signal?.addEventListener('abort', onAbort, { once: true });
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          done();
          reject(
            new BlkrepError('ERR_CONTROL_TIMEOUT', `no reply to command "${cmd}" from ${this.path} within ${timeoutMs} ms`, {
              details: { path: this.path, cmd, timeoutMs },
            }),
          );
        }, timeoutMs);
      }
      this.socket.write(line);
    });
  }

  /**
   * Ask for events (all of them when `events` is undefined) and pass each to `onEvent`. Calling
   * it again replaces both the selection and the listener.
   */
  async subscribe(events: string[] | undefined, onEvent: ControlEventListener): Promise<void> {
    this.onEvent = onEvent;
    await this.request('subscribe', events === undefined ? {} : { events });
  }

  /** Hang up; requests still waiting reject with ERR_CONTROL_CLOSED. */
  async close(): Promise<void> {
    this.fail(new BlkrepError('ERR_CONTROL_CLOSED', `control connection to ${this.path} was closed by this client`));
    this.socket.end(() => this.socket.destroy());
    await this.closed;
  }

  private receive(chunk: Buffer): void {
    const { lines, tooLong } = this.lines.push(chunk);
    for (const line of lines) {
      if (line.trim() !== '') this.dispatch(line);
    }
    if (tooLong) {
      this.fail(new BlkrepError('ERR_CONTROL_PROTOCOL', `the daemon at ${this.path} sent a line longer than ${MAX_INCOMING_LINE_BYTES} bytes`));
      this.socket.destroy();
    }
  }

  private dispatch(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      message = undefined;
    }
    if (!isJsonObject(message)) {
      this.fail(new BlkrepError('ERR_CONTROL_PROTOCOL', `the daemon at ${this.path} sent a line that is not a JSON object: ${line.slice(0, 200)}`));
      this.socket.destroy();
      return;
    }
    if (typeof message.event === 'string' && !('ok' in message)) {
      this.onEvent?.(message as ControlEvent);
      return;
    }
    const error = isJsonObject(message.error) ? message.error : {};
    const code = typeof error.code === 'string' ? error.code : 'ERR_CONTROL_PROTOCOL';
    const text = typeof error.message === 'string' ? error.message : `the daemon at ${this.path} gave an error without a message`;
    const pending = typeof message.id === 'number' ? this.pending.get(message.id) : undefined;
    if (!pending) {
      // An error about no request in particular (a line it could not read) concerns them all.
      if (message.ok === false && message.id === null) this.fail(new BlkrepError(code, text));
      return;
    }
    if (message.ok === true) pending.resolve(message.result);
    else pending.reject(new BlkrepError(code, text, { details: { cmd: pending.cmd } }));
  }

  /** Reject everything waiting, and every later request, with `err`. */
  private fail(err: BlkrepError): void {
    this.failure ??= err;
    for (const p of [...this.pending.values()]) p.reject(this.failure);
  }
}
