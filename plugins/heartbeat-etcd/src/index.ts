/**
 * The etcd heartbeat backend: a path through an etcd cluster, for fleets that run one already.
 * Each node writes its beat frames into its own key and reads its peer's once per interval:
 *
 *   etcd://HOST:PORT/PREFIX        keys PREFIX/beat/NODE-ID (values: the frames, as etcd stores bytes)
 *
 * A change of the peer's key (its mod revision) is a beat; the key's value when the path starts
 * is old news and never counts, so a beat a dead peer left behind cannot make it look alive. The
 * path carries frames and decides nothing: the engine signs and checks them as on any path.
 *
 * Leadership is not this path's business: `--lease etcd://HOST:PORT/PREFIX` (the engine) holds
 * the leader key PREFIX/leader under a lease, and the key's create revision is the leader's
 * fencing term. Both may name the same prefix.
 *
 * Client: etcd's v3 JSON gateway over `fetch` (range and put; keys base64), as the engine's lease
 * client does, no dependency. A request that fails or takes longer than two intervals is reported
 * to onError; the path stays up and polls again (etcd down is silence, which the detector judges).
 *
 * Every beat is a put, so etcd's history grows by one revision per beat and node: run etcd with
 * `--auto-compaction-retention` (e.g. 1 = one hour), as any etcd holding leases should be.
 */
import type { HeartbeatBackend, HeartbeatOpenOptions, HeartbeatPath, HeartbeatReport } from 'blkrep/api';

const MAX_FRAME = 256;

export class EtcdHeartbeatError extends Error {
  readonly code: string;
  readonly errno: 'EINVAL' | 'EIO';
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: { errno?: 'EINVAL' | 'EIO'; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'EtcdHeartbeatError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }
}

export interface EtcdTarget {
  /** http://HOST:PORT */
  endpoint: string;
  /** the key prefix, without a trailing slash */
  prefix: string;
}

function bad(uri: string, why: string): EtcdHeartbeatError {
  return new EtcdHeartbeatError('ERR_BAD_HEARTBEAT', `invalid heartbeat URI "${uri}": ${why} (expected etcd://HOST:PORT/PREFIX)`, { errno: 'EINVAL', details: { uri } });
}

export function parseEtcdUri(uri: string): EtcdTarget {
  if (!uri.startsWith('etcd://')) throw bad(uri, 'the scheme is not etcd://');
  let url: URL;
  try {
    url = new URL(`http://${uri.slice('etcd://'.length)}`);
  } catch {
    throw bad(uri, 'not a URL');
  }
  if (url.hostname === '') throw bad(uri, 'no host');
  if (url.port === '') throw bad(uri, 'no port (etcd listens on 2379 by default: say so)');
  if (url.search !== '' || url.hash !== '' || url.username !== '') throw bad(uri, 'no query, fragment or user allowed');
  const prefix = decodeURIComponent(url.pathname).replace(/\/+$/, '');
  if (prefix === '') throw bad(uri, 'no key prefix (one per pair, e.g. /blkrep/pair1)');
  return { endpoint: `http://${url.host}`, prefix };
}

/** the key a node beats into */
export function beatKey(target: EtcdTarget, node: string): string {
  return `${target.prefix}/beat/${node}`;
}

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

interface RangeReply {
  kvs?: Array<{ value?: string; mod_revision?: string }>;
}

class EtcdPath implements HeartbeatPath {
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** the peer key's mod revision last seen ('' = no key; undefined = not read yet) */
  private lastRevision: string | undefined;
  private lastFrame: Buffer | undefined;
  private reading = false;
  private writing = false;
  private pending: Buffer | undefined;
  private readonly abort = new AbortController();
  private readonly beatListeners: Array<(r: HeartbeatReport) => void> = [];
  private readonly errorListeners: Array<(e: Error) => void> = [];
  private readonly ownKey: string;
  private readonly peerKey: string;

  constructor(
    readonly uri: string,
    private readonly target: EtcdTarget,
    private readonly options: HeartbeatOpenOptions,
  ) {
    this.ownKey = b64(beatKey(target, options.self));
    this.peerKey = b64(beatKey(target, options.peer));
    options.signal?.addEventListener('abort', () => void this.stop(), { once: true });
  }

  onBeat(listener: (r: HeartbeatReport) => void): void {
    this.beatListeners.push(listener);
  }

  onError(listener: (e: Error) => void): void {
    this.errorListeners.push(listener);
  }

  private error(code: string, what: string, err: unknown): void {
    if (this.stopped) return;
    const e = new EtcdHeartbeatError(code, `${what} on ${this.target.endpoint}: ${(err as Error).message}`, { cause: err, details: { uri: this.uri } });
    for (const l of this.errorListeners) l(e);
  }

  private async call<T>(path: string, body: unknown): Promise<T> {
    const timeout = AbortSignal.timeout(Math.max(200, this.options.intervalMs * 2));
    const res = await fetch(`${this.target.endpoint}${path}`, {
      method: 'POST',
      body: JSON.stringify(body),
      headers: { 'content-type': 'application/json' },
      signal: AbortSignal.any([timeout, this.abort.signal]),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`etcd ${path}: HTTP ${res.status} ${text.slice(0, 200)}`);
    return JSON.parse(text) as T;
  }

  async start(): Promise<void> {
    if (this.stopped || this.options.signal?.aborted) return;
    // the first read only sets the baseline: what the peer's key holds now is old news
    await this.poll();
    if (this.stopped) return;
    this.timer = setInterval(() => void this.poll(), this.options.intervalMs);
    this.timer.unref();
  }

  private async poll(): Promise<void> {
    if (this.reading || this.stopped) return;
    this.reading = true;
    try {
      const r = await this.call<RangeReply>('/v3/kv/range', { key: this.peerKey });
      if (this.stopped) return;
      const kv = r.kvs?.[0];
      const revision = kv?.mod_revision ?? '';
      const baseline = this.lastRevision === undefined;
      if (revision === this.lastRevision) return;
      this.lastRevision = revision;
      if (baseline || kv === undefined) return;
      const frame = Buffer.from(kv.value ?? '', 'base64');
      // the same frame put again (a resend) is no news
      if (this.lastFrame?.equals(frame)) return;
      this.lastFrame = frame;
      const report = { frame, from: `${this.target.endpoint.slice('http://'.length)} revision ${revision}` };
      for (const l of this.beatListeners) l(report);
    } catch (err) {
      this.error('ERR_HEARTBEAT_RECEIVE', `cannot read the peer's key ${beatKey(this.target, this.options.peer)}`, err);
    } finally {
      this.reading = false;
    }
  }

  send(frame: Buffer): void {
    if (this.stopped || frame.length > MAX_FRAME) return;
    this.pending = frame;
    if (!this.writing) void this.write();
  }

  private async write(): Promise<void> {
    this.writing = true;
    try {
      while (this.pending && !this.stopped) {
        const value = this.pending.toString('base64');
        this.pending = undefined;
        await this.call('/v3/kv/put', { key: this.ownKey, value });
      }
    } catch (err) {
      // this frame is lost (the next beat is newer anyway)
      this.pending = undefined;
      this.error('ERR_HEARTBEAT_SEND', `cannot write this node's key ${beatKey(this.target, this.options.self)}`, err);
    } finally {
      this.writing = false;
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.pending = undefined;
    this.abort.abort();
  }
}

export function createEtcdHeartbeat(): HeartbeatBackend {
  return {
    name: 'etcd',
    summary: "beats through etcd (etcd://HOST:PORT/PREFIX): each node puts its frames in PREFIX/beat/NODE and reads its peer's",
    caps: { frames: true, independentPath: true, authoritative: false },
    open: (uri, options) => new EtcdPath(uri, parseEtcdUri(uri), options),
  };
}
