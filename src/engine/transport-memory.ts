/**
 * The in-memory transport: listeners and connections inside one process, no port, no socket
 * file. For tests of the engine (a server and its clients in one process) and for examples; it
 * passes the same compliance suite as tcp and unix (src/testing/transport-compliance.ts).
 *
 * Addresses are names in a network (by default one per process): listening on "" or "*" picks a
 * fresh name ("memory-1" …); listening on a name in use fails with ERR_ADDRESS_IN_USE.
 * A connection is a pair of Duplex streams with backpressure (a write completes when the other
 * side has read, or has room), half-close (end() is EOF on the other side), and destroy() of
 * one end closing the other, as a reset TCP connection does.
 */
import { Duplex } from 'node:stream';
import { BlkrepError } from '../api/errors.js';
import type { ConnectOptions, ListenOptions, Transport, TransportConnection, TransportListener } from '../api/transport.js';

/** Where listeners are found by name. */
export type MemoryNetwork = Map<string, MemoryListener>;

const processNetwork: MemoryNetwork = new Map();
let nextName = 1;

/** One end of an in-memory connection. */
class MemoryStream extends Duplex {
  other!: MemoryStream;
  /** our write waiting for the other side to read */
  private blocked: ((err?: Error | null) => void) | undefined;

  override _read(): void {
    const release = this.other.blocked;
    this.other.blocked = undefined;
    release?.();
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (err?: Error | null) => void): void {
    if (this.other.destroyed) return callback(new BlkrepError('ERR_CONNECTION_RESET', 'the other end of the in-memory connection is closed', { errno: 'EIO' }));
    if (this.other.push(chunk)) callback();
    else this.blocked = callback;
  }

  override _final(callback: (err?: Error | null) => void): void {
    if (!this.other.destroyed) this.other.push(null);
    callback();
  }

  override _destroy(err: Error | null, callback: (err?: Error | null) => void): void {
    const blocked = this.blocked;
    this.blocked = undefined;
    blocked?.(err ?? null);
    if (!this.other.destroyed) this.other.destroy();
    callback(err);
  }
}

/** Two connected streams. */
export function memoryStreamPair(): [Duplex, Duplex] {
  const a = new MemoryStream();
  const b = new MemoryStream();
  a.other = b;
  b.other = a;
  return [a, b];
}

function abortError(what: string, reason: unknown): Error {
  const err = new Error(`${what} aborted`, { cause: reason });
  err.name = 'AbortError';
  (err as Error & { code: string }).code = 'ABORT_ERR';
  return err;
}

class MemoryListener implements TransportListener {
  private clients = 0;
  closed = false;

  constructor(
    readonly address: string,
    private readonly network: MemoryNetwork,
    private readonly options: ListenOptions,
  ) {}

  uri(exportName: string): string {
    return `nbd+memory:///${encodeURIComponent(exportName)}?name=${encodeURIComponent(this.address)}`;
  }

  accept(): TransportConnection {
    const [client, server] = memoryStreamPair();
    this.clients += 1;
    this.options.onConnection({ stream: server, peer: `memory client ${this.clients}` });
    return { stream: client, peer: `memory ${this.address}` };
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.network.get(this.address) === this) this.network.delete(this.address);
  }
}

export class MemoryTransport implements Transport {
  readonly name = 'memory';
  readonly summary = 'in-process connections by name, for tests (no port, no socket file)';

  constructor(private readonly network: MemoryNetwork = processNetwork) {}

  async listen(address: string, options: ListenOptions): Promise<TransportListener> {
    const name = address === '' || address === '*' ? `memory-${nextName++}` : address;
    if (this.network.has(name)) {
      throw new BlkrepError('ERR_ADDRESS_IN_USE', `cannot listen on memory "${name}": address in use`, { errno: 'EINVAL', details: { address: name } });
    }
    const listener = new MemoryListener(name, this.network, options);
    this.network.set(name, listener);
    return listener;
  }

  async connect(address: string, options: ConnectOptions = {}): Promise<TransportConnection> {
    const { signal } = options;
    if (signal?.aborted) throw abortError(`connect to memory "${address}"`, signal.reason);
    // a connect completes in a later turn, as a socket's does, so that an abort can land mid-connect
    await new Promise((resolve) => setImmediate(resolve));
    if (signal?.aborted) throw abortError(`connect to memory "${address}"`, signal.reason);
    const listener = this.network.get(address);
    if (listener === undefined || listener.closed) {
      throw new BlkrepError('ERR_CONNECT_FAILED', `cannot connect to memory "${address}": nothing listens there`, { errno: 'EIO', details: { address } });
    }
    return listener.accept();
  }
}

/** The factory, for registries: `transports.register('memory', createMemoryTransport)`. */
export function createMemoryTransport(): Transport {
  return new MemoryTransport();
}
