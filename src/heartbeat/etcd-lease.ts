/**
 * Leadership on etcd for fleets (`--lease etcd://HOST:PORT/PREFIX`, tls-heartbeat-ops.md §3): the
 * primary holds an etcd lease and, under it, the leader key PREFIX/leader (value: its node id);
 * the secondary takes over only after it has created that key itself, which etcd allows only once
 * the old lease has expired or was revoked.
 *
 * The leader fences itself on a local deadline, not on the lease-lost news (which comes after the
 * server has already expired the lease): the deadline is the monotonic time at which the last
 * acknowledged keep-alive was *sent* + TTL − margin. Writes are allowed only before it
 * (`valid()`, read on every write by the daemon's write gate).
 *
 * Client: etcd's v3 JSON gateway over `fetch` (grant, txn, keepalive, revoke; keys base64), no
 * dependency: the `etcd3` package pulls gRPC, proto-loader, cockatiel and bignumber.js for the four
 * calls used here, and its campaign emits an unhandled 'error' when a lease is lost.
 */
import { BlkrepError } from '../api/errors.js';

export interface EtcdTarget {
  /** http://HOST:PORT */
  endpoint: string;
  /** the key prefix, without a trailing slash ("/blkrep/pair1") */
  prefix: string;
}

export const DEFAULT_LEASE_TTL_S = 5;

function bad(uri: string, why: string): BlkrepError {
  return new BlkrepError('ERR_BAD_LEASE', `invalid lease URI "${uri}": ${why} (expected etcd://HOST:PORT/PREFIX)`, { errno: 'EINVAL', details: { uri } });
}

export function parseLeaseUri(uri: string): EtcdTarget {
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

export type LeaseState = 'none' | 'leader' | 'follower' | 'lost';

export interface EtcdLeaseOptions {
  target: EtcdTarget;
  /** this node's id: the leader key's value */
  node: string;
  ttlS: number;
  /** the safety margin before the TTL (default: a quarter of it) */
  marginMs?: number;
  /** monotonic ms (default performance.now) */
  clock?: () => number;
  publish?: (event: string, fields: Record<string, unknown>) => void;
  log?: (level: 'info' | 'warn' | 'error', message: string) => void;
  /** one request's timeout (default: a third of the TTL) */
  requestTimeoutMs?: number;
}

export interface LeaseStatus {
  uri: string;
  key: string;
  state: LeaseState;
  /** the leader key's create revision while this node leads: the fencing token */
  revision: string | null;
  /** who holds the key, as last seen */
  holder: string | null;
  ttlS: number;
  /** ms left before this leader stops writing (null when not leader) */
  deadlineInMs: number | null;
  lastError: string | null;
}

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

export class EtcdLease {
  private stateNow: LeaseState = 'none';
  private leaseId: string | undefined;
  private revision: string | null = null;
  private holder: string | null = null;
  /** monotonic send time of the last acknowledged grant or keep-alive */
  private lastAck = -Infinity;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private lastError: string | null = null;
  private readonly clock: () => number;
  readonly key: string;

  constructor(private readonly o: EtcdLeaseOptions) {
    this.clock = o.clock ?? (() => performance.now());
    this.key = `${o.target.prefix}/leader`;
  }

  get state(): LeaseState {
    return this.stateNow;
  }

  private get marginMs(): number {
    return this.o.marginMs ?? (this.o.ttlS * 1000) / 4;
  }

  /** The leader key's create revision while this node leads (the fencing term), else null. */
  leaderRevision(): bigint | null {
    return this.stateNow === 'leader' && this.revision !== null ? BigInt(this.revision) : null;
  }

  /** May this node write as leader now? (its own deadline, read from the clock) */
  valid(): boolean {
    return this.stateNow === 'leader' && this.clock() < this.lastAck + this.o.ttlS * 1000 - this.marginMs;
  }

  status(): LeaseStatus {
    return {
      uri: `etcd://${this.o.target.endpoint.slice('http://'.length)}${this.o.target.prefix}`,
      key: this.key,
      state: this.stateNow,
      revision: this.revision,
      holder: this.holder,
      ttlS: this.o.ttlS,
      deadlineInMs: this.stateNow === 'leader' ? Math.round(this.lastAck + this.o.ttlS * 1000 - this.marginMs - this.clock()) : null,
      lastError: this.lastError,
    };
  }

  private async call<T>(path: string, body: unknown): Promise<T> {
    const res = await fetch(`${this.o.target.endpoint}${path}`, {
      method: 'POST',
      body: JSON.stringify(body),
      headers: { 'content-type': 'application/json' },
      signal: AbortSignal.timeout(Math.round(this.o.requestTimeoutMs ?? Math.max(200, (this.o.ttlS * 1000) / 3))),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`etcd ${path}: HTTP ${res.status} ${text.slice(0, 200)}`);
    return JSON.parse(text) as T;
  }

  /**
   * One attempt to become leader: a new lease, then create the key under it if nobody holds it.
   * Resolves true when this node leads (keep-alives start), false when another node holds the key.
   */
  async campaign(): Promise<boolean> {
    if (this.stopped) return false;
    if (this.stateNow === 'leader') return true;
    const sent = this.clock();
    try {
      const grant = await this.call<{ ID: string; TTL: string }>('/v3/lease/grant', { TTL: this.o.ttlS });
      const key = b64(this.key);
      const txn = await this.call<{ succeeded?: boolean; header: { revision: string }; responses?: Array<{ response_range?: { kvs?: Array<{ value?: string; create_revision: string }> } }> }>('/v3/kv/txn', {
        compare: [{ target: 'CREATE', key, createRevision: '0' }],
        success: [{ requestPut: { key, value: b64(this.o.node), lease: grant.ID } }],
        failure: [{ requestRange: { key } }],
      });
      this.lastError = null;
      if (!txn.succeeded) {
        // someone else leads: give our lease back at once
        await this.call('/v3/lease/revoke', { ID: grant.ID }).catch(() => {});
        const kv = txn.responses?.[0]?.response_range?.kvs?.[0];
        this.holder = kv?.value ? Buffer.from(kv.value, 'base64').toString('utf8') : null;
        if (this.holder === this.o.node) {
          // our own key from an earlier lease of this run or a previous one: wait for it to expire
          this.holder = `${this.o.node} (an older lease)`;
        }
        if (this.stateNow !== 'lost') this.stateNow = 'follower';
        return false;
      }
      this.leaseId = grant.ID;
      this.revision = txn.header.revision;
      this.holder = this.o.node;
      this.lastAck = sent;
      this.stateNow = 'leader';
      this.o.log?.('info', `etcd: this node leads ${this.key} (revision ${this.revision}, lease ${this.o.ttlS} s)`);
      this.o.publish?.('lease-acquired', { key: this.key, revision: this.revision, ttlS: this.o.ttlS });
      this.scheduleKeepalive();
      return true;
    } catch (err) {
      this.lastError = (err as Error).message;
      return false;
    }
  }

  private scheduleKeepalive(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => void this.keepalive(), (this.o.ttlS * 1000) / 3);
    this.timer.unref();
  }

  private async keepalive(): Promise<void> {
    if (this.stopped || this.stateNow !== 'leader') return;
    const sent = this.clock();
    try {
      const r = await this.call<{ result?: { TTL?: string } }>('/v3/lease/keepalive', { ID: this.leaseId });
      if (r.result?.TTL === undefined || Number(r.result.TTL) <= 0) {
        this.lose('etcd says the lease has expired');
        return;
      }
      this.lastAck = sent;
      this.lastError = null;
    } catch (err) {
      this.lastError = (err as Error).message;
      if (!this.valid()) {
        this.lose(`no keep-alive acknowledged before the deadline: ${this.lastError}`);
        return;
      }
    }
    this.scheduleKeepalive();
  }

  private lose(why: string): void {
    if (this.stateNow !== 'leader') return;
    this.stateNow = 'lost';
    this.revision = null;
    this.o.log?.('error', `etcd: this node no longer leads ${this.key}: ${why}`);
    this.o.publish?.('lease-lost', { key: this.key, reason: why });
    // leadership may come back if nobody took it (etcd was only unreachable)
    this.hold();
  }

  /** Campaign now and, while this node does not lead, again every third of the TTL (a primary's way). */
  hold(): void {
    const again = (): void => {
      if (this.stopped) return;
      void this.campaign().then((leader) => {
        if (leader || this.stopped) return;
        this.timer = setTimeout(again, (this.o.ttlS * 1000) / 3);
        this.timer.unref();
      });
    };
    again();
  }

  /** Campaign until this node leads or `timeoutMs` passes (the old leader's lease must expire). */
  async acquire(timeoutMs: number, everyMs = 250): Promise<boolean> {
    const end = this.clock() + timeoutMs;
    for (;;) {
      if (await this.campaign()) return true;
      if (this.stopped || this.clock() + everyMs > end) return false;
      await new Promise((r) => setTimeout(r, everyMs));
    }
  }

  /** Stop keep-alives; revoke the lease when asked (a clean stop hands leadership over at once). */
  async stop(revoke = true): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    if (revoke && this.leaseId && this.stateNow === 'leader') await this.call('/v3/lease/revoke', { ID: this.leaseId }).catch(() => {});
    this.stateNow = 'none';
  }
}
