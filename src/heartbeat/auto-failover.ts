/**
 * Automatic failover (--auto-failover, on the secondary): when the peer is declared dead, fence it
 * with the fence hook, and only if the hook confirms (4 outdated, 7 fenced) call the `failover`
 * verb, never forced. One attempt per death: the peer must be heard again before another.
 *
 * Each step is an event on the control socket: `fence` (the hook's verdict) and `auto-failover`
 * (done, or why not). The failover verb belongs to the replication pair's secondary; a daemon
 * without one says so (ERR_NO_FAILOVER) instead of pretending.
 */
import { toBlkrepError } from '../api/errors.js';
import { describeFence, runFenceHook, type FenceResult } from './fence.js';
import type { PeerEvent } from './monitor.js';
import type { HeartbeatLog } from './service.js';

export interface AutoFailoverOptions {
  node: string;
  peer: string;
  /** the fence hook (required unless the etcd lease fences: an automatic takeover never skips fencing) */
  fenceHook?: string;
  /** --lease: take the leader key before failing over (resolves false when it stays held) */
  acquireLease?: () => Promise<boolean>;
  fenceTimeoutMs?: number;
  /** the heartbeat URIs, for the hook's BLKREP_PEER_ADDRESSES */
  peerAddresses?: readonly string[];
  resource?: string;
  epoch?: () => bigint;
  generation?: () => string;
  /** the checkpoint being committed now, if any: the failover waits for it (it cannot be undone half-way) */
  checkpointInFlight?: () => number | null;
  /** is there a `failover` verb to call? */
  hasFailover: () => boolean;
  /** why the failover would be refused now (its dry run), or null: asked before fencing */
  refusal?: () => Promise<{ code: string; message: string } | null>;
  /** call it (never with force) */
  failover: () => Promise<unknown>;
  publish?: (event: string, fields: Record<string, unknown>) => void;
  log?: HeartbeatLog;
}

export interface AutoFailoverOutcome {
  fence: FenceResult | null;
  failedOver: boolean;
  /** why not, when not */
  reason: string | null;
  code: string | null;
}

export class AutoFailover {
  /** the attempt under way, or done for this death */
  private attempt: Promise<AutoFailoverOutcome> | undefined;

  constructor(private readonly options: AutoFailoverOptions) {}

  /** Feed every peer transition; a death starts one attempt, a return makes the next possible. */
  onPeerEvent(e: PeerEvent): Promise<AutoFailoverOutcome> | undefined {
    if (e.event === 'peer-alive') {
      this.attempt = undefined;
      return undefined;
    }
    if (e.event !== 'peer-dead' || this.attempt) return undefined;
    this.attempt = this.run();
    return this.attempt;
  }

  private async run(): Promise<AutoFailoverOutcome> {
    const o = this.options;
    const log = o.log ?? (() => {});
    if (!o.hasFailover()) {
      // said before fencing: fencing a peer nobody takes over from would only make an outage
      return this.refuse(null, 'ERR_NO_FAILOVER', `peer "${o.peer}" is dead but this daemon has no failover verb (it is not the secondary of a replication pair): nothing fenced, nothing taken over`);
    }
    // a failover the secondary refuses (an Outdated disk: its primary went on alone) is said before
    // fencing, as above: fencing a live primary nobody takes over from would only make an outage.
    // Behind a checkpoint in flight the dry run would wait for it: the failover itself decides then.
    if (o.refusal && (o.checkpointInFlight?.() ?? null) === null) {
      const r = await o.refusal();
      if (r) return this.refuse(null, r.code, `peer "${o.peer}" is dead but this node's failover is refused, so nothing is fenced: ${r.message}`);
    }
    let fence: FenceResult | null = null;
    if (o.fenceHook !== undefined) {
      fence = await this.fence(o.fenceHook);
      if (!fence.proceed) return this.refuse(fence, 'ERR_NOT_FENCED', describeFence(fence, o.peer));
    }
    if (o.acquireLease) {
      log('info', `peer "${o.peer}" is dead: waiting for its etcd lease to expire to take the leader key`);
      if (!(await o.acquireLease())) return this.refuse(fence, 'ERR_LEASE_HELD', `peer "${o.peer}" is dead here but the etcd leader key is still held (or etcd is unreachable): not taking over`);
    }
    const inFlight = o.checkpointInFlight?.() ?? null;
    if (inFlight !== null) {
      // the failover verb runs after it (one checkpoint or failover at a time): say so, it is why the takeover is later
      log('warn', `peer "${o.peer}" was fenced; checkpoint ${inFlight} is being committed: the failover waits for it`);
      o.publish?.('failover-deferred', { peer: o.peer, checkpoint: inFlight });
    }
    try {
      await o.failover();
    } catch (err) {
      const e = toBlkrepError(err);
      return this.refuse(fence, e.code, `failover after fencing peer "${o.peer}" failed: ${e.message}`);
    }
    log('warn', `peer "${o.peer}" was fenced (${fence?.verdict ?? 'its etcd lease expired'}); this node took over`);
    o.publish?.('auto-failover', { peer: o.peer, failedOver: true, fence: fence?.verdict ?? null, code: null, reason: null });
    return { fence, failedOver: true, reason: null, code: null };
  }

  private async fence(command: string): Promise<FenceResult> {
    const o = this.options;
    const log = o.log ?? (() => {});
    const fence = await runFenceHook({
      command,
      node: o.node,
      peer: o.peer,
      ...(o.peerAddresses ? { peerAddresses: o.peerAddresses } : {}),
      ...(o.resource === undefined ? {} : { resource: o.resource }),
      ...(o.epoch ? { epoch: o.epoch() } : {}),
      ...(o.generation ? { generation: o.generation() } : {}),
      ...(o.fenceTimeoutMs === undefined ? {} : { timeoutMs: o.fenceTimeoutMs }),
      force: false,
    });
    const line = describeFence(fence, o.peer);
    log(fence.proceed ? 'info' : 'warn', line + (fence.stderr.trim() ? `; hook said: ${fence.stderr.trim().split('\n').slice(-1)[0]}` : ''));
    o.publish?.('fence', { peer: o.peer, verdict: fence.verdict, exitCode: fence.exitCode, signal: fence.signal, proceed: fence.proceed, durationMs: fence.durationMs });
    return fence;
  }

  private refuse(fence: FenceResult | null, code: string, reason: string): AutoFailoverOutcome {
    this.options.log?.('error', `automatic failover not done: ${reason}`);
    this.options.publish?.('auto-failover', { peer: this.options.peer, failedOver: false, fence: fence?.verdict ?? null, code, reason });
    return { fence, failedOver: false, reason, code };
  }
}

