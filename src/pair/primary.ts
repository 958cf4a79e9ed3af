/**
 * The primary of a replication pair, for one export (PAIR-SPEC, replication.md §2–4): it owns
 * the export's replication filter (replication-filter.ts), the pair link to the secondary, the
 * data connection, the peer bitmap, reconnection with backoff, resync and checkpoints.
 *
 * Link up (connect()): open blkrep's extension option on the URI's server and say hello; the
 * secondary answers welcome (with its decision on the generations) or refuse. A plain NBD server
 * (qemu-nbd, nbdkit) answers ERR_UNSUP: the primary replicates to it without a pair link and
 * without checkpoints, and says so (warning, status peerKind "plain"). Then the data connection
 * (a normal NBD client of the same URI; its size must equal the disk's: ERR_PAIR_SIZE), then a
 * resync by the peer bitmap (all of it for a full resync: a first replication, a decision that
 * says full) through a mirror job (src/jobs/mirror.ts, sync=bitmap) whose consistent instant
 * makes the filter forward (event replication-connected), then a checkpoint (with a blkrep
 * secondary: its restore point is the synced disk, and it adopts the primary's generations). An
 * initial full sync starts a generation.
 *
 * Link down (a forward failed, the queue overflowed, the link closed): the filter degraded
 * (writes set peer bits), event replication-degraded {reason}; reconnect with jittered
 * exponential backoff 100 ms × 2^k ≤ 10 s (±20 %), then resync as above. A loss while
 * forwarding calls onLinkLost synchronously (the daemon's --fencing freezes there, before a write
 * whose forward was cut completes to its client); the resync's start calls onLinkBack.
 *
 * Checkpoint N = epoch+1 (steps 1–3 and 8): the filter's cut (sync: hold writes; async: stop
 * sending after the cut) and both flushed; checkpoint{N} on the link; done → the epoch is
 * recorded durably, the cut released; failed → released, event checkpoint-failed; no answer in
 * 5 s → abort{N}, ERR_PAIR_TIMEOUT.
 *
 * Failover on the primary: the secondary is gone — stop forwarding, keep serving, track (peer
 * bitmap), a new generation; `replicate` starts again.
 */
import { randomBytes } from 'node:crypto';
import { access, rm } from 'node:fs/promises';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import type { TransportRegistry } from '../api/transport.js';
import type { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import { PersistentBitmap } from '../bitmap/persistent.js';
import { NbdNode } from '../block/nbd.js';
import { defaultTransports } from '../engine/default-transports.js';
import { DEFAULT_WRITEBACK_BYTES, MirrorJob } from '../jobs/mirror.js';
import { upgraderOf } from '../nbd/client-connect.js';
import { openExtension, OPT_BLKREP_PAIR_LINK, startTlsPrepare } from '../nbd/option-takeover.js';
import { parseNbdUri, type NbdUri } from '../nbd/uri.js';
import { EMPTY, finishResyncAsSource, JUST_CREATED, mint, newGeneration, onLineageEvent, type GenerationTuple } from './generations.js';
import { fetchRuns, MAX_EPOCH, PAIR_LINK_VERSION, PairChannel, runsPage, type PairMessage } from './messages.js';
import type { FailoverOptions, FailoverResult, HandOff, PairLinkState, PairRole, PairStatus } from './role.js';
import { PairStateFile, initialState, pairStatePath } from './state.js';
import { ReplicationFilter, type CongestionPolicy, type ReplicationProtocol } from './replication-filter.js';
import { sideFileBase } from '../util/state-dir.js';
import { REPLICA_MAX_INFLIGHT, replicaWriterExport } from './data-token.js';

/**
 * The data connection's send buffer on a Unix socket (SO_SNDBUF, asked; the kernel doubles it):
 * a 1 MiB forward then goes in one write instead of ~5 pieces of the 208 KiB default, each an
 * EAGAIN, an epoll_ctl and a wake-up of both daemons (README "Where the time goes", session 15).
 * BLKREP_PAIR_SNDBUF=bytes overrides it (0: the system's default; bench comparisons).
 */
const DATA_SEND_BUFFER = 4 * 1024 * 1024;
let warnedSendBuffer = false;
function dataSendBuffer(): number {
  const v = process.env.BLKREP_PAIR_SNDBUF;
  if (v === undefined || v === '') return DATA_SEND_BUFFER;
  const n = Number(v);
  if (/^\d+$/.test(v.trim()) && n <= 2 ** 30) return n;
  if (!warnedSendBuffer) {
    warnedSendBuffer = true;
    process.stderr.write(`blkrep: BLKREP_PAIR_SNDBUF=${JSON.stringify(v)} is not a byte count from 0 to ${2 ** 30}; the data connection asks for ${DATA_SEND_BUFFER}\n`);
  }
  return DATA_SEND_BUFFER;
}

export const CHECKPOINT_TIMEOUT_MS = 5000;
export const LINK_TIMEOUT_MS = 10_000;
export const BACKOFF = { initialMs: 100, maxMs: 10_000, jitter: 0.2 };
/**
 * while a bitmap resync copies, the secondary is flushed (and the peer bitmap cleared of what it
 * holds) this often, the first time this long after the first copy: a shorter resync pays no
 * extra flush (each cost the resync of a 40 MiB outage about 0.5 s on the loaded machine)
 */
export const RESYNC_STABLE_INTERVAL_MS = 2000;
/**
 * A bitmap resync flushes the secondary along the way once this share of its dirty bytes was
 * written since the last flush (at least RESYNC_WRITEBACK_MIN_BYTES, at most the mirror's
 * DEFAULT_WRITEBACK_BYTES): its disk writes the copy back while the copy goes on, instead of all
 * of it in the drain's last flush (41 MiB of random 64 KiB blocks: ~100 ms of fdatasync there,
 * traced). So at most about 8 flushes more for any bitmap resync.
 */
export const RESYNC_WRITEBACK_SHARE = 8;
export const RESYNC_WRITEBACK_MIN_BYTES = 8 * 2 ** 20;

/** the peer bitmap beside the disk (a blkrep bitmap file; not IMAGE.*.bitmap, which the daemon loads as an export bitmap) */
export function peerBitmapPath(imagePath: string): string {
  return `${sideFileBase(imagePath)}.pair.dirty`;
}

/** jittered exponential backoff: 100 ms × 2^k, at most 10 s, ±20 % */
export function backoffDelay(attempt: number, random: () => number = Math.random): number {
  const base = Math.min(BACKOFF.maxMs, BACKOFF.initialMs * 2 ** Math.min(attempt, 20));
  return Math.round(base * (1 - BACKOFF.jitter + 2 * BACKOFF.jitter * random()));
}

export interface PrimaryOptions {
  exportName: string;
  /** the disk's path (the pair state and the peer bitmap live beside it) */
  imagePath: string;
  filter: ReplicationFilter;
  uri: string;
  protocol?: ReplicationProtocol;
  queueBytes?: number;
  /** async: a write that does not fit in the queue waits (block, the default) or degrades (pull-ahead) */
  onCongestion?: CongestionPolicy;
  /** block: a wait with no reply from the secondary for this long degrades (ms) */
  congestionTimeoutMs?: number;
  checkpointIntervalMs?: number;
  transports?: TransportRegistry;
  publish?: (event: string, fields: Record<string, unknown>) => void;
  log?: (level: 'info' | 'warn', message: string) => void;
  /** for tests: the backoff's random source */
  random?: () => number;
  /** this node's name for a secondary's discard-node=NAME (kept in the pair state) */
  nodeName?: string;
  /** what the role this one replaces hands over (replicate on a promoted secondary): OR'ed into the peer bitmap */
  handOff?: HandOff;
  /** the start failed on a refusal a retry cannot fix: the role's last status, taken before it closed */
  onStartFailed?: (status: PairStatus) => void;
  /**
   * The data link was lost while forwarding (a forward failed, the link closed, the secondary
   * stopped replying, the peer was promoted): called synchronously from the degrade, before any
   * write whose forward was cut completes to its client (--fencing resource-and-stonith freezes
   * here). Not for a degrade asked for (failover, stopping) nor async pull-ahead's queue-full
   * (the link is up and busy), nor a loss during a resync (the secondary already heard this
   * node's new generation in the hello).
   */
  onLinkLost?: (reason: string) => void;
  /** The link is back: hello and welcome done, the resync started (the secondary knows this node's generation). */
  onLinkBack?: () => void;
}

/** a split brain the secondary refused the link for (status `splitBrain`, link `split-brain`) */
export interface RefusedSplitBrain {
  at: string;
  rule: number | null;
  explanation: string;
}

export class PrimaryRole implements PairRole {
  readonly role = 'primary' as const;
  readonly uri: NbdUri;
  readonly protocol: ReplicationProtocol;
  private link: PairLinkState = 'connecting';
  private peerKind: 'blkrep' | 'plain' | undefined;
  private channel: PairChannel | undefined;
  private data: NbdNode | undefined;
  private resyncJob: MirrorJob | undefined;
  private stopped = false;
  private attempt = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private intervalTimer: NodeJS.Timeout | undefined;
  private connecting: Promise<void> | undefined;
  private checkpointing: Promise<{ epoch: number }> | undefined;
  /**
   * the epoch the secondary holds, as it last said (welcome, a checkpoint's answer, an abort's):
   * checkpoint N is numbered after it and this node's epoch, so a secondary never meets a number
   * it committed already (its epoch moved by other means, or a DONE was lost)
   */
  private peerEpoch = 0;
  /**
   * answers of the secondary refused since the last checkpoint that went through (an epoch it
   * cannot hold: peerEpochField): each raises the reconnect's backoff, which a resync that goes
   * through does not reset (a secondary answering every checkpoint badly is retried at most every
   * BACKOFF.maxMs, not after each resync)
   */
  private badAnswers = 0;
  /** the last checkpoint request sent (its number and id): a retry of the same number keeps the id */
  private lastCheckpointRequest: { n: number; id: string } | undefined;
  private lastCheckpointAt: number | null = null;
  private freshBitmap = false;
  /**
   * A resync ended and the checkpoint after it (where the secondary adopts this node's hello
   * generations) has not succeeded yet: that checkpoint moves the bitmap GI into history
   * (finishResyncAsSource), so the next peer loss mints with this current as the bitmap GI.
   */
  private resyncEnded = false;
  /** the last run of this primary did not stop cleanly (said in hello until a resync is done) */
  private crashed = false;
  private lastError: string | null = null;
  private lastTlsRefusal: string | undefined;
  /** the last resync that ended (status: a resync at start ends before anything can subscribe to events) */
  private lastResync: { bytes: number; dirtyBytes: number; full: boolean; resumed?: boolean; ms: number } | null = null;
  /** the secondary refused the link for a split brain (until a link is welcomed) */
  private splitBrain: RefusedSplitBrain | undefined;
  private readonly publish: NonNullable<PrimaryOptions['publish']>;
  private readonly log: NonNullable<PrimaryOptions['log']>;

  private constructor(
    private readonly options: PrimaryOptions,
    readonly state: PairStateFile,
    readonly peerBitmap: PersistentBitmap,
  ) {
    this.uri = parseNbdUri(options.uri);
    this.protocol = options.protocol ?? 'sync';
    this.publish = options.publish ?? (() => {});
    this.log = options.log ?? (() => {});
  }

  /**
   * Open the pair state and the peer bitmap, make the filter track, and try the first link.
   * Fails (closing what it opened) on a bad URI, a size mismatch or a refusal; an unreachable
   * secondary is not an error: the primary serves degraded and keeps trying.
   */
  static async start(options: PrimaryOptions): Promise<PrimaryRole> {
    const uri = parseNbdUri(options.uri);
    if (uri.tls) {
      // nbds://: the URI's credentials are checked before anything is opened (ERR_TLS_CREDENTIALS)
      const checked = await (await upgraderOf('tls')).check?.('client', uri.tls.settings);
      for (const w of checked?.warnings ?? []) options.log?.('warn', `replication to ${uri.uri}: TLS: ${w}`);
    }
    const state = await PairStateFile.open(pairStatePath(options.imagePath), () => initialState('primary'));
    if (state.state.role === 'secondary') {
      throw new BlkrepError('ERR_PAIR_ROLE', `${options.imagePath} is a secondary's disk (its pair state ${state.path} says so): fail it over before replicating from it`, { errno: 'EPERM' });
    }
    const crashed = state.state.role === 'primary' && !state.state.cleanShutdown;
    // a disk that never was in a pair starts a lineage (its first replication is a full sync,
    // replication.md §5); the secondary adopts it at the first checkpoint after that sync
    const fresh = state.state.gi.current === JUST_CREATED || state.state.gi.current === EMPTY;
    await state.update((s) => ({
      ...s,
      role: 'primary',
      cleanShutdown: false,
      diskState: 'UpToDate',
      // when it became primary (discard-younger-primary): kept across restarts as primary
      primarySince: s.role === 'primary' && s.primarySince ? s.primarySince : Date.now(),
      ...(options.nodeName === undefined ? {} : { name: options.nodeName }),
      ...(fresh ? { gi: { ...s.gi, current: newGeneration() } } : {}),
    }));
    const size = options.filter.size;
    const path = peerBitmapPath(options.imagePath);
    let bitmap: PersistentBitmap;
    let freshBitmap = false;
    if (await exists(path)) {
      bitmap = (await PersistentBitmap.open(path, { size })).bitmap;
    } else {
      bitmap = await PersistentBitmap.create(path, { size });
      freshBitmap = true;
    }
    if (options.handOff) {
      // the regions the peer may miss are known (a failback bitmap): durable before anything is written
      for (const r of options.handOff.dirty) bitmap.fill(r.offset, r.length);
      await bitmap.flush();
      freshBitmap = false;
      options.log?.('info', `replicating export "${options.exportName}": the peer bitmap starts from ${options.handOff.what} (${bitmap.bitmap.dirtyBytes} bytes)`);
    }
    const role = new PrimaryRole(options, state, bitmap);
    role.freshBitmap = freshBitmap || fresh;
    role.crashed = crashed;
    options.filter.configure({
      protocol: role.protocol,
      ...(options.queueBytes === undefined ? {} : { queueBytes: options.queueBytes }),
      ...(options.onCongestion === undefined ? {} : { onCongestion: options.onCongestion }),
      ...(options.congestionTimeoutMs === undefined ? {} : { congestionTimeoutMs: options.congestionTimeoutMs }),
      // block: the queue was full and a write waited (started); none waits and the queue is at most half full (ended)
      onCongestionChange: (state, info) => {
        const at = { export: options.exportName, peer: role.uri.uri, queueBytes: info.queueBytes, limit: info.limit };
        if (state === 'started') role.publish('replication-congested', at);
        else role.publish('replication-uncongested', { ...at, waits: info.waits, waitedMs: info.waitedMs, ms: info.ms });
      },
      peerBitmap: bitmap,
      onDegraded: (reason, error, from) => role.onDegraded(reason, error, from === 'forwarding'),
      // failure case 1 (replication.md §4): the client gets the disk's errno; the event says where
      onLocalError: (op, offset, length, error) =>
        role.publish('primary-io-error', { export: options.exportName, op, offset, length, code: error.code, ...(error.errno ? { errno: error.errno } : {}), message: error.message }),
    });
    // until the first link is up, writes are tracked only
    options.filter.resync(options.filter.next);
    options.filter.degrade('starting');
    if (options.handOff?.since) {
      // writes from the hand-off's read of the old record until now are marked in that record only:
      // once the ones in flight have finished (held meanwhile, so that a steady stream of writes
      // cannot keep the filter from going idle; their marks there are set when they complete, by the
      // tracking filter above this one), read it again; later writes set the peer bitmap's bits
      const release = await options.filter.quiesce();
      release();
      await new Promise<void>((r) => setImmediate(r));
      const since = options.handOff.since();
      if (since.length) {
        for (const r of since) bitmap.fill(r.offset, r.length);
        await bitmap.flush();
      }
    }
    try {
      await role.connect();
    } catch (err) {
      const e = toBlkrepError(err);
      if (isFatal(e)) {
        const last = role.status();
        await role.close();
        options.onStartFailed?.(last);
        throw e;
      }
      role.tlsRefused(e);
      // a disk that was in a pair and cannot reach its peer in this run serves writes alone from
      // now on (the daemon opens its listeners after this): a new generation first, durably, as
      // a primary losing its peer mints one (onDegraded; DRBD: a primary without its peer starts
      // a new current UUID). Its beats announce it, so a secondary whose link is down knows it is
      // Outdated before an automatic failover could roll back the writes acknowledged here
      // (test/heartbeat/attack-hb-restart-alone.test.ts). Before, a primary restarted after a
      // crash with its link cut kept the generation its secondary had.
      if (!fresh && !role.stopped) {
        try {
          // as onDegraded: a primary already alone (bitmap slot set) keeps its generation, which
          // differs from its secondary's already, and its history is not filled with restarts
          await state.update((s) => {
            const gi = onLineageEvent(s.gi, { kind: 'peer-lost', role: 'primary' });
            return gi === s.gi ? s : { ...s, gi };
          });
        } catch (err) {
          await role.close();
          throw err;
        }
      }
      role.scheduleRetry(e);
    }
    if (options.checkpointIntervalMs) role.startInterval(options.checkpointIntervalMs);
    void uri;
    return role;
  }

  status(): PairStatus {
    const s = this.state.state;
    return {
      role: 'primary',
      peer: this.uri.uri,
      protocol: this.protocol,
      // refused for a split brain and not linked since: that is the link's state, with the reason
      link: this.splitBrain && this.link !== 'connected' && this.link !== 'resyncing' ? 'split-brain' : this.link,
      epoch: s.epoch,
      gi: s.gi,
      diskState: s.diskState,
      queueBytes: this.options.filter.queueBytes,
      ...(this.protocol === 'async' ? { onCongestion: this.options.filter.onCongestion, congestion: this.options.filter.congestion } : {}),
      bytesBehind: this.peerBitmap.bitmap.dirtyBytes,
      lastCheckpointAgeMs: this.lastCheckpointAt === null ? null : Date.now() - this.lastCheckpointAt,
      ...(this.peerKind ? { peerKind: this.peerKind } : {}),
      ...(this.lastError ? { lastError: this.lastError } : {}),
      ...(this.lastResync ? { lastResync: this.lastResync } : {}),
      ...(this.splitBrain ? { splitBrain: this.splitBrain } : {}),
    } as PairStatus;
  }

  // ------------------------------------------------------------------------------------ link

  /** One attempt: link, data connection, resync, forwarding. */
  private connect(): Promise<void> {
    this.connecting ??= this.connectNow().finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private async connectNow(): Promise<void> {
    const filter = this.options.filter;
    this.link = 'connecting';
    const transports = this.options.transports ?? (await defaultTransports());
    let full = this.freshBitmap;
    /** the secondary applies the data connection's writes in arrival order (its welcome says so) */
    let ordered = false;
    let channel: PairChannel | undefined;
    /** the welcome's writer token: the data connection's export (data-token.ts) */
    let dataToken: string | undefined;
    /** the resync's time counts from the hello: a bitmap resync's secondary prepares it before its welcome (precopyBeforeResync) */
    let helloAt = Date.now();
    /** a full resync that goes on from where an interrupted one stopped (its peer bitmap) */
    let resume = false;
    /** the secondary's node id (a full resync records it: fullSyncTo) */
    let peerNodeId: string | undefined;
    try {
      const conn = await transports.get(this.uri.transport).connect(this.uri.address, { timeoutMs: LINK_TIMEOUT_MS });
      // nbds://: STARTTLS first, so the link's option and messages never travel in clear
      const prepare = this.uri.tls ? startTlsPrepare(await upgraderOf('tls'), this.uri.tls.settings, { timeoutMs: LINK_TIMEOUT_MS }) : undefined;
      const opened = await openExtension(conn, OPT_BLKREP_PAIR_LINK, Buffer.from(JSON.stringify({ exportName: this.uri.exportName }), 'utf8'), {
        timeoutMs: LINK_TIMEOUT_MS,
        ...(prepare ? { prepare } : {}),
      });
      channel = new PairChannel(opened.connection.stream, this.uri.uri, (m, ch) => this.onMessage(m, ch), opened.rest);
      const s = this.state.state;
      helloAt = Date.now();
      const answer = await channel.request<PairMessage>(
        asRequest({
          type: 'hello',
          version: PAIR_LINK_VERSION,
          exportName: this.uri.exportName,
          size: filter.size,
          protocol: this.protocol,
          nodeId: s.nodeId,
          role: 'primary',
          gi: s.gi,
          epoch: s.epoch,
          diskState: s.diskState,
          crashedPrimary: this.crashed,
          bitmapBytes: this.peerBitmap.bitmap.dirtyBytes,
          ...(s.name === undefined ? {} : { name: s.name }),
          primarySince: s.primarySince ?? null,
        }),
        LINK_TIMEOUT_MS,
      );
      if (answer.type === 'refuse') {
        this.publish('pair-refused', { export: this.options.exportName, peer: this.uri.uri, code: answer.code, message: answer.message, ...(answer.decision ? { decision: answer.decision } : {}) });
        if (answer.code === 'ERR_PAIR_SPLIT_BRAIN') this.refusedForSplitBrain(answer.message, answer.decision?.rule ?? null);
        throw new BlkrepError(answer.code, `the secondary ${this.uri.uri} refused the pair link: ${answer.message}`, { errno: 'EPERM', details: { decision: answer.decision } });
      }
      if (answer.type !== 'welcome') throw new BlkrepError('ERR_PAIR_PROTOCOL', `the secondary answered hello with "${answer.type}"`);
      if (answer.size !== filter.size) throw sizeError(this.uri.uri, filter.size, answer.size);
      if (answer.dataToken !== undefined && (typeof answer.dataToken !== 'string' || !/^[0-9a-f]{32}$/.test(answer.dataToken))) {
        throw new BlkrepError('ERR_PAIR_PROTOCOL', `the secondary's welcome carries a bad dataToken ${JSON.stringify(answer.dataToken).slice(0, 80)}`);
      }
      dataToken = answer.dataToken;
      if (answer.decision.action === 'refuse') throw new BlkrepError('ERR_PAIR_SPLIT_BRAIN', `the secondary refuses: ${answer.decision.explanation} (rule ${answer.decision.rule})`, { errno: 'EPERM' });
      this.splitBrain = undefined;
      if (answer.decision.action === 'resync-full') {
        full = true;
        // the secondary's disk is a partial full copy from this node at this generation, and the peer
        // bitmap tracks that copy (set whole before it began, cleared as the secondary held data): resume
        resume = answer.resumeFull === true && !this.freshBitmap && this.state.state.fullSyncTo === answer.nodeId;
        peerNodeId = answer.nodeId;
      }
      // the peer's own marks (an old primary's peer bitmap and activity log): the resync copies the union
      else if (!full && answer.bitmapBytes > 0) await this.takePeerRuns(channel);
      this.peerKind = 'blkrep';
      this.peerEpoch = peerEpochField('welcome', 'epoch', answer.epoch, 0, MAX_EPOCH, `a checkpoint number from 0 to ${MAX_EPOCH} (2^48)`);
      ordered = answer.ordered === true;
    } catch (err) {
      const e = toBlkrepError(err);
      channel?.close();
      if (e.code === 'ERR_PAIR_PROTOCOL' && e.details?.['field'] !== undefined) {
        // this node refuses the secondary's answer: an event, and the retries back off whatever a resync did
        this.badAnswers++;
        this.publish('pair-refused', { export: this.options.exportName, peer: this.uri.uri, code: e.code, message: e.message });
      }
      if (e.code !== 'ERR_NBD_UNSUPPORTED') throw e;
      // a blkrep secondary that stops offering the pair link was promoted (or replaced): never
      // fall back to writing into it as a plain server — that would be a stale primary writing
      if (this.peerKind === 'blkrep' || this.state.state.epoch > 0) {
        throw new BlkrepError('ERR_PAIR_ROLE', `${this.uri.uri} was a blkrep secondary (epoch ${this.state.state.epoch}) and no longer offers the pair link (promoted?): not replicating to it as a plain NBD server (to do so on purpose, stop this daemon and remove ${this.state.path})`, { errno: 'EPERM' });
      }
      if (this.peerKind !== 'plain') {
        this.log('warn', `${this.uri.uri} is a plain NBD server (no blkrep pair link): replicating without checkpoints`);
        this.publish('replication-plain', { export: this.options.exportName, peer: this.uri.uri });
      }
      this.peerKind = 'plain';
      channel = undefined;
    }
    let data: NbdNode | undefined;
    try {
      const target = dataToken === undefined ? this.uri : { ...this.uri, exportName: replicaWriterExport(this.uri.exportName, dataToken) };
      data = await NbdNode.open(target, { ...(this.options.transports ? { transports: this.options.transports } : {}), reconnect: false, holdMs: 0, connectTimeoutMs: LINK_TIMEOUT_MS, batchSends: true, sendBufferBytes: dataSendBuffer(), ...(dataToken === undefined ? {} : { maxInFlight: REPLICA_MAX_INFLIGHT }) });
      if (data.size !== filter.size) throw sizeError(this.uri.uri, filter.size, data.size);
      if (!data.caps.canWrite) throw new BlkrepError('ERR_READ_ONLY', `the secondary ${this.uri.uri} is read-only`, { errno: 'EPERM' });
    } catch (err) {
      channel?.close();
      await data?.close().catch(() => {});
      throw err;
    }
    if (this.stopped) {
      channel?.close();
      await data.close().catch(() => {});
      return;
    }
    this.channel = channel;
    this.data = data;
    channel?.onClose((why) => {
      if (this.channel === channel) {
        this.channel = undefined;
        filter.degrade('link-down', toBlkrepError(why));
      }
    });
    await this.resync(data, full, ordered, helloAt, resume, peerNodeId);
  }

  /**
   * The secondary refused the link for a split brain: status shows link `split-brain` with the
   * explanation, and this side's event stream says it too (event split-brain, once per reason:
   * a retry that meets the same refusal says nothing new).
   */
  private refusedForSplitBrain(explanation: string, rule: number | null): void {
    const same = this.splitBrain?.explanation === explanation;
    this.splitBrain = { at: same ? this.splitBrain!.at : new Date().toISOString(), rule, explanation };
    if (!same) this.publish('split-brain', { export: this.options.exportName, peer: this.uri.uri, side: 'primary', rule, resolved: false, explanation });
  }

  /** OR the regions the secondary marks for itself into the peer bitmap (durable before the resync starts). */
  private async takePeerRuns(channel: PairChannel): Promise<void> {
    for (const r of await fetchRuns(channel, this.options.filter.size, LINK_TIMEOUT_MS)) this.peerBitmap.fill(r.offset, r.length);
    await this.peerBitmap.flush();
  }

  /** Resync by the peer bitmap with a mirror job; at its consistent instant, forward. Its `ms` count from `since` (the hello). */
  private async resync(target: NbdNode, full: boolean, ordered: boolean, since: number, resume = false, peerNodeId?: string): Promise<void> {
    const filter = this.options.filter;
    // every write issued while degraded has set its bits before the mirror copies the bitmap
    const releaseWrites = await filter.quiesce();
    if (this.stopped) {
      // closing (close() cancels a resync job, and there is none yet)
      releaseWrites();
      throw new BlkrepError('ERR_PAIR_LINK_DOWN', `the resync to ${this.uri.uri} did not start: replication is stopping`, { errno: 'EIO' });
    }
    try {
      if (full && !resume) await this.startFullSync(peerNodeId);
    } catch (err) {
      releaseWrites();
      throw err;
    }
    const bytes = this.peerBitmap.bitmap.dirtyBytes;
    this.link = 'resyncing';
    this.publish('resync-started', { export: this.options.exportName, peer: this.uri.uri, bytes, full, ...(resume ? { resumed: true } : {}) });
    if (resume) this.log('info', `replicating export "${this.options.exportName}": the full resync to ${this.uri.uri} resumes: ${bytes} bytes left`);
    this.options.onLinkBack?.();
    const started = since;
    let job: MirrorJob;
    try {
      job = this.resyncJob = new MirrorJob({
        id: `resync-${this.options.exportName || 'default'}`,
        source: filter.next,
        target,
        sync: 'bitmap',
        bitmap: this.peerBitmap,
        bitmapMode: 'never',
        // an interrupted resync resumes by bitmap: what the secondary holds stably leaves the peer
        // bitmap as the copy goes, durably, not only at the consistent instant. A full one too: the
        // secondary says full again on the next hello (no generation yet), with resumeFull when its
        // disk is this copy (state.ts fullSyncFrom), and the copy goes on from the peer bitmap
        stableIntervalMs: RESYNC_STABLE_INTERVAL_MS,
        // the last interval's flush skipped: the consistency flush waited for it (24–41 ms at 4 GiB)
        ...(full ? {} : { writebackBytes: resyncWritebackBytes(bytes), writebackSkipTail: true }),
        onStable: (granules: DirtyBitmap) => this.resyncProgress(granules),
        onConsistent: async () => {
          // the secondary equals the disk and writes wait: forward from here on. No flush here: the
          // drain ends only after a flush issued with nothing dirty or in flight, and nothing written
          // since, completed (mirror.ts checkIdle/finish): the secondary holds this stably already
          // (the second flush cost 2–55 ms of every resync on the loaded machine, bench/pair outage)
          this.peerBitmap.clearAll();
          filter.attach(target, { ordered });
        },
      });
      filter.resync(job.node);
    } finally {
      releaseWrites();
    }
    try {
      await runResync(job);
    } catch (err) {
      this.resyncJob = undefined;
      if (filter.mode === 'resyncing') filter.degrade(`resync-failed: ${toBlkrepError(err).message}`, toBlkrepError(err));
      throw err;
    }
    this.resyncJob = undefined;
    await this.peerBitmap.flush().catch(() => {});
    this.freshBitmap = false;
    this.resyncEnded = true;
    this.crashed = false;
    this.attempt = 0;
    this.lastError = null;
    this.lastTlsRefusal = undefined;
    this.link = 'connected';
    const copied = job.query().offset;
    this.lastResync = { bytes: copied, dirtyBytes: bytes, full, ...(resume ? { resumed: true } : {}), ms: Date.now() - started };
    this.publish('resync-done', { export: this.options.exportName, peer: this.uri.uri, bytes: copied, dirtyBytes: bytes, full, ...(resume ? { resumed: true } : {}), ms: Date.now() - started });
    this.publish('replication-connected', { export: this.options.exportName, peer: this.uri.uri, protocol: this.protocol, peerKind: this.peerKind });
    // then a checkpoint (replication.md §3): the secondary's restore point is the synced disk, and it adopts the generations
    if (this.peerKind === 'blkrep') this.checkpoint().catch((err: unknown) => this.log('warn', `checkpoint after the resync: ${(err as Error).message}`));
  }

  /**
   * A full resync from the first byte: the peer bitmap is set whole and made durable, then the
   * pair state names the secondary it tracks (fullSyncTo). A crash before that record leaves no
   * claim (the next full resync starts again from zero); after it, the bitmap only ever holds
   * more than the secondary misses (resyncProgress), so a later full resync to that secondary may
   * resume from it when the secondary says its disk is this copy (welcome resumeFull).
   */
  private async startFullSync(peerNodeId: string | undefined): Promise<void> {
    if (this.state.state.fullSyncTo) await this.state.update((s) => ({ ...s, fullSyncTo: null }));
    this.peerBitmap.setAll();
    if (peerNodeId === undefined) return;
    await this.peerBitmap.flush();
    await this.state.update((s) => ({ ...s, fullSyncTo: peerNodeId }));
    // the bitmap marks the whole disk now: whatever the next link decides, it copies no less than needed
    this.freshBitmap = false;
  }

  /**
   * A target flush of the resync made `granules` stable on the secondary (and nothing wrote them
   * since): they leave the peer bitmap, and the clears are stored (the bitmap's syncs are
   * grouped). A write in flight keeps its granules (PersistentBitmap.clear), a later one sets
   * them again; the bitmap on disk only ever holds more than needed.
   */
  private resyncProgress(granules: DirtyBitmap): void {
    const g = granules.granularity;
    for (let b = granules.nextDirtyBit(0); b >= 0; ) {
      let e = granules.nextCleanBit(b);
      if (e < 0) e = granules.bits;
      const offset = b * g;
      this.peerBitmap.clear(offset, Math.min(e * g, granules.size) - offset);
      b = e < granules.bits ? granules.nextDirtyBit(e) : -1;
    }
    this.peerBitmap.flush().catch((err: unknown) => this.log('warn', `the peer bitmap during the resync: ${(err as Error).message}`));
  }

  private onMessage(m: PairMessage, ch: PairChannel): void {
    if (m.type === 'demote') {
      this.options.filter.degrade(`peer-promoted: ${m.reason}`);
    } else if (m.type === 'event') {
      this.publish(m.name, { ...m.fields, export: this.options.exportName, from: 'secondary' });
    } else if (m.type === 'bitmap') {
      // a secondary resolving a split brain salvages what this side's resync will overwrite
      if (ch.isOpen) ch.send({ type: 'runs', re: m.seq, ...runsPage(this.peerBitmap.bitmap, m.from) });
    } else if (m.type === 'ping') {
      try {
        this.channel?.send({ type: 'pong', t: m.t });
      } catch {
        /* the link is closing */
      }
    } else if (m.type === 'pong') {
      if (ch === this.channel) this.linkHeard?.();
    }
  }

  /** the heartbeat's callback for the pong of the link's last ping (pingLink) */
  private linkHeard: (() => void) | undefined;

  /** The heartbeat's pair-link path: a ping on the link, if it is up; its pong calls `heard`. */
  pingLink(heard: () => void): boolean {
    this.linkHeard = heard;
    return this.channel?.sendPing() ?? false;
  }

  private onDegraded(reason: string, error: BlkrepError | undefined, wasForwarding = false): void {
    if (reason === 'starting' || reason === 'stopping') return;
    const wasConnected = this.link === 'connected';
    this.link = this.stopped ? 'none' : 'degraded';
    this.lastError = error ? `${error.code}: ${error.message}` : reason;
    const channel = this.channel;
    this.channel = undefined;
    channel?.close();
    const data = this.data;
    this.data = undefined;
    void data?.close().catch(() => {});
    this.publish('replication-degraded', { export: this.options.exportName, peer: this.uri.uri, reason, ...(error ? { code: error.code } : {}) });
    // forwarding, not only `connected`: from the resync's consistent instant on, writes are acknowledged as the secondary's
    if (wasForwarding && reason !== 'failover' && reason !== 'queue-full') this.options.onLinkLost?.(reason);
    // a primary losing its peer starts a new generation (replication.md §5)
    if (wasConnected && reason !== 'failover' && reason !== 'stopping') void this.state.update((s) => ({ ...s, gi: mint(s.gi), diskState: 'UpToDate' })).catch(() => {});
    if (!this.stopped && reason !== 'failover') this.scheduleRetry(error);
  }

  /**
   * nbds://: a TLS refusal (certificate, name, PSK key or user, authz, a secondary without TLS) is
   * an event pair-refused at each attempt, and said on stderr each time it changes; the link keeps
   * retrying (the credentials may be fixed meanwhile), and nothing went out in clear.
   */
  private tlsRefused(e: BlkrepError): void {
    if (!/^ERR_(NBD_)?TLS_/.test(e.code)) return;
    this.publish('pair-refused', { export: this.options.exportName, peer: this.uri.uri, code: e.code, message: e.message });
    const said = `${e.code}: ${e.message}`;
    if (said === this.lastTlsRefusal) return;
    this.lastTlsRefusal = said;
    this.log('warn', `replication to ${this.uri.uri}: ${e.message}`);
  }

  private scheduleRetry(error: BlkrepError | undefined): void {
    if (this.stopped || this.retryTimer || this.connecting) return;
    this.link = 'degraded';
    if (error) this.lastError = `${error.code}: ${error.message}`;
    // a secondary whose answers were refused: at least 1.6 s, then the longest delay, however often a resync went through
    const delay = backoffDelay(Math.max(this.attempt++, this.badAnswers > 0 ? 4 * this.badAnswers : 0), this.options.random);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      if (this.stopped) return;
      this.connect().catch((err: unknown) => {
        const e = toBlkrepError(err);
        if (isFatal(e)) this.log('warn', `replication to ${this.uri.uri}: ${e.message}`);
        this.tlsRefused(e);
        this.scheduleRetry(e);
      });
    }, delay);
    this.retryTimer.unref?.();
  }

  // ------------------------------------------------------------------------------ checkpoint

  checkpoint(): Promise<{ epoch: number }> {
    if (this.peerKind === 'plain') {
      return Promise.reject(new BlkrepError('ERR_PAIR_NO_CHECKPOINT', `${this.uri.uri} is a plain NBD server: no checkpoints (they need a blkrep secondary with a pair link)`, { errno: 'ENOTSUP' }));
    }
    this.checkpointing ??= this.checkpointNow().finally(() => (this.checkpointing = undefined));
    return this.checkpointing;
  }

  private async checkpointNow(): Promise<{ epoch: number }> {
    const filter = this.options.filter;
    const channel = this.channel;
    if (this.link !== 'connected' || !channel) {
      throw new BlkrepError('ERR_PAIR_LINK_DOWN', `no checkpoint: the link to ${this.uri.uri} is ${this.link}`, { errno: 'EIO', details: { link: this.link } });
    }
    const n = Math.max(this.state.state.epoch, this.peerEpoch) + 1;
    /**
     * this request's id: the secondary answers "committed already" only to it (messages.ts). A
     * retry of checkpoint n keeps the id of the attempt that failed: a secondary that failed step
     * 6 redoes it and commits n on its own (failure case 6), and this retry is that checkpoint
     */
    const id = this.lastCheckpointRequest?.n === n ? this.lastCheckpointRequest.id : randomBytes(8).toString('hex');
    this.lastCheckpointRequest = { n, id };
    const heldBy = (e: number): void => {
      if (e > this.peerEpoch) this.peerEpoch = e;
    };
    /** an epoch the secondary holds when it fails or aborts N: at most N (N committed after all) */
    const heldMax = `at most ${n}: the secondary holds at most the checkpoint asked (its epoch moves only by this link's checkpoints)`;
    const started = Date.now();
    const t0 = performance.now();
    let steps: { preflushMs: number; drainMs: number; flushMs: number; secondaryMs: number; heldMs: number; stateMs: number } | undefined;
    try {
      // before the cut (writes are not held yet): durably "checkpoint n asked". Without its DONE
      // (a crash, a link loss) the secondary may hold n while this disk says n-1; back as that
      // node's secondary (failback), this record allows the lag of a checkpoint it asked, and
      // nothing else: a restored snapshot of this disk that asked nothing is another disk
      if ((this.state.state.checkpointSent ?? 0) < n) await this.state.update((s) => ({ ...s, checkpointSent: n }));
      const cut = await filter.cut();
      const t1 = performance.now();
      const answer = await channel.request<PairMessage>(asRequest({ type: 'checkpoint', n, id, nodeId: this.state.state.nodeId }), CHECKPOINT_TIMEOUT_MS).catch(async (err: unknown) => {
        const e = toBlkrepError(err);
        // the abort's answer says the epoch the secondary holds (n when checkpoint n went through there after all)
        if (e.code === 'ERR_PAIR_TIMEOUT' && channel.isOpen) {
          const held = await channel.request<PairMessage>(asRequest({ type: 'abort', n }), CHECKPOINT_TIMEOUT_MS).catch(() => undefined);
          if (held?.type === 'done') heldBy(peerEpochField(`answer to ABORT{${n}}`, 'epoch', held.epoch, 0, n, heldMax));
        }
        throw e;
      });
      if (answer.type === 'failed') {
        if (answer.epoch !== undefined) heldBy(peerEpochField(`FAILED{${n}}`, 'epoch', answer.epoch, 0, n, heldMax));
        throw new BlkrepError(answer.code, `the secondary failed checkpoint ${n}: ${answer.message}`, { details: { n } });
      }
      if (answer.type !== 'done') throw new BlkrepError('ERR_PAIR_PROTOCOL', `the secondary answered checkpoint ${n} with ${JSON.stringify(answer).slice(0, 120)}`);
      peerEpochField(`DONE for checkpoint ${n}`, 'n', answer.n, n, n, `the N of CHECKPOINT{${n}}`);
      // DONE{N} commits N: its epoch is N. While this link holds it the secondary takes no
      // checkpoint of its own, and its redo of a failed step 6 (failure case 6) commits a number
      // this primary asked, at most N; N is past what it said it held (welcome, FAILED, an
      // abort's answer): a DONE with another epoch cannot come from a secondary that applied
      // this primary's checkpoints (before: taken as "committed already" and
      // numbered after, so a DONE saying 2^53 − 1 stopped the checkpoints for good)
      peerEpochField(`DONE for checkpoint ${n}`, 'epoch', answer.epoch, n, n, `${n}: DONE{N} commits N (the secondary's epoch moves only by this link's checkpoints)`);
      this.peerEpoch = n;
      // the secondary holds CP_N: held writes go on now, not after our own state write (a crash
      // before that write leaves epoch N-1 here whether or not writes went on meanwhile)
      filter.release();
      const t2 = performance.now();
      // the peer bitmap's clears (the cut's FLUSH) become durable after the release: a failure
      // there costs resync time only, not the checkpoint (the secondary already committed it)
      // the checkpoint that ends a resync: the secondary took this node's generations; the bitmap
      // GI goes into history (kept, mint() would keep the old bitmap GI at the next peer loss and
      // the secondary's current would be in history only: rule 60, a full resync)
      const ended = this.resyncEnded;
      this.resyncEnded = false;
      await Promise.all([
        this.state.update((s) => ({ ...s, epoch: n, diskState: 'UpToDate', ...(ended && s.gi.bitmap !== EMPTY ? { gi: finishResyncAsSource(s.gi) } : {}) })),
        filter.flushPeer().catch((err: unknown) => this.log('warn', `checkpoint ${n}: the peer bitmap flush: ${(err as Error).message}`)),
      ]);
      const round = (x: number): number => Math.round(x * 10) / 10;
      steps = { preflushMs: round(cut.preflushMs), drainMs: round(cut.drainMs), flushMs: round(cut.flushMs), secondaryMs: round(t2 - t1), heldMs: round(t2 - t0 - cut.preflushMs), stateMs: round(performance.now() - t2) };
    } catch (err) {
      const e = toBlkrepError(err);
      this.publish('checkpoint-failed', { export: this.options.exportName, n, code: e.code, message: e.message });
      if (e.code === 'ERR_PAIR_PROTOCOL' && e.details?.['field'] !== undefined && this.channel === channel) {
        // an answer no secondary that applied this link's checkpoints gives: what it holds is
        // unknown, so the link goes (the peer bitmap keeps what it misses), and the reconnect backs off
        this.badAnswers++;
        filter.release();
        filter.degrade(`bad-answer: ${e.message}`, e);
      }
      throw e;
    } finally {
      filter.release();
    }
    const ms = Date.now() - started;
    this.badAnswers = 0;
    this.lastCheckpointAt = Date.now();
    this.publish('checkpoint', { export: this.options.exportName, epoch: n, ms, ...(steps ? { steps } : {}) });
    return { epoch: n };
  }

  private startInterval(ms: number): void {
    this.intervalTimer = setInterval(() => {
      if (this.link !== 'connected' || this.peerKind !== 'blkrep' || this.checkpointing) return;
      this.checkpoint().catch((err: unknown) => this.log('warn', `periodic checkpoint: ${(err as Error).message}`));
    }, ms);
    this.intervalTimer.unref?.();
  }

  // -------------------------------------------------------------------------------- failover

  /** The secondary is gone: stop forwarding, keep serving, track; a new generation. */
  async failover(o: FailoverOptions): Promise<FailoverResult> {
    const started = Date.now();
    const s = this.state.state;
    const explanation = `primary: stop forwarding to ${this.uri.uri}, keep serving export "${this.options.exportName}" read-write, track every write in the peer bitmap for a later resync (blkrep replicate); a new generation is minted`;
    if (o.dryRun) return { role: 'primary', dryRun: true, to: o.to, epoch: s.epoch, gi: s.gi, bytes: 0, ms: 0, explanation };
    this.publish('failover-started', { export: this.options.exportName, role: 'primary' });
    this.stopped = true;
    this.stopTimers();
    this.options.filter.degrade('failover');
    this.link = 'none';
    await this.resyncJob?.cancel({ force: true }).catch(() => {});
    await this.state.update((st) => ({ ...st, gi: mint(st.gi) }));
    const gi: GenerationTuple = this.state.state.gi;
    const ms = Date.now() - started;
    this.publish('failover-done', { export: this.options.exportName, role: 'primary', epoch: s.epoch, ms });
    return { role: 'primary', dryRun: false, to: o.to, epoch: s.epoch, gi, bytes: 0, ms, explanation };
  }

  /** true once failover stopped it (replicate may start another) */
  get isStopped(): boolean {
    return this.stopped;
  }

  /** replicate replaces a primary that failover stopped */
  get replaceable(): boolean {
    return this.stopped;
  }

  /** Close; what the next peer misses is in the peer bitmap beside the disk, which the next role opens. */
  async handOff(): Promise<HandOff> {
    await this.close();
    return { dirty: [], what: peerBitmapPath(this.options.imagePath), taken: () => Promise.resolve() };
  }

  private stopTimers(): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    clearInterval(this.intervalTimer);
    this.intervalTimer = undefined;
  }

  /** Stop replicating; the disk and the peer bitmap are closed cleanly (a clean shutdown). */
  async close(): Promise<void> {
    this.stopped = true;
    this.stopTimers();
    // a resync under way stops now (its progress is in the peer bitmap), not after copying the rest
    const resync = this.resyncJob?.cancel({ force: true }).catch(() => {});
    await this.connecting?.catch(() => {});
    await resync;
    const filter = this.options.filter;
    await filter.idle();
    // what was not replied yet stays in the peer bitmap
    filter.degrade('stopping');
    filter.detach();
    this.channel?.close();
    await this.data?.close().catch(() => {});
    await this.peerBitmap.close().catch(() => {});
    await this.state.update((s) => ({ ...s, cleanShutdown: true })).catch(() => {});
  }

  /** Forget the peer bitmap (a new replication to another secondary starts with a full copy). */
  static async forgetPeer(imagePath: string): Promise<void> {
    await rm(peerBitmapPath(imagePath), { force: true });
  }
}

function sizeError(uri: string, size: number, peerSize: number): BlkrepError {
  return new BlkrepError('ERR_PAIR_SIZE', `the secondary ${uri} is ${peerSize} bytes and the disk is ${size}: a pair needs the same size`, {
    errno: 'EINVAL',
    details: { size, peerSize },
  });
}

/**
 * A number the secondary says (an epoch, a checkpoint number), checked against what it can be:
 * ERR_PAIR_PROTOCOL naming the message, the field, the number and the range (as the secondary's
 * checkHello does for the primary's hello); details.field for the caller.
 */
function peerEpochField(message: string, field: string, v: unknown, min: number, max: number, expected: string): number {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max) return v;
  throw new BlkrepError('ERR_PAIR_PROTOCOL', `the secondary's ${message}: "${field}" must be ${expected}, not ${JSON.stringify(v)?.slice(0, 40) ?? 'absent'}`, { details: { field, value: typeof v === 'number' ? v : String(v), min, max } });
}

/** errors a retry cannot fix: the start fails on them */
function isFatal(e: BlkrepError): boolean {
  return ['ERR_PAIR_SIZE', 'ERR_PAIR_ROLE', 'ERR_PAIR_PROTOCOL', 'ERR_PAIR_SPLIT_BRAIN', 'ERR_PAIR_UNRELATED', 'ERR_READ_ONLY', 'ERR_PAIR_BUSY', 'ERR_NBD_URI', 'ERR_BAD_URI', 'ERR_TLS_SETTINGS', 'ERR_TLS_CREDENTIALS'].includes(e.code);
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/** Start the mirror, wait until it is in step, complete it without a pivot (its consistent instant attaches the filter). */
async function runResync(job: MirrorJob): Promise<void> {
  const ready = new Promise<void>((resolve, reject) => {
    const onEvent = (e: { event: string; synced?: boolean }) => {
      if (e.event === 'ready' && e.synced) {
        job.off('event', onEvent);
        resolve();
      }
    };
    job.on('event', onEvent);
    job.whenConcluded().then(() => {
      job.off('event', onEvent);
      reject(job.error ?? new BlkrepError('ERR_PAIR_LINK_DOWN', 'the resync ended before it was in step'));
    }, reject);
  });
  job.start();
  await ready;
  await job.complete({ pivot: false });
}

type RequestMessage = Extract<PairMessage, { seq: number }>;
type WithoutSeq<T> = T extends unknown ? Omit<T, 'seq'> : never;

/** a request without its seq (PairChannel.request fills it in) */
function asRequest(m: WithoutSeq<RequestMessage>): Parameters<PairChannel['request']>[0] {
  return m as Parameters<PairChannel['request']>[0];
}

/** The write-back flush interval of a bitmap resync of `dirtyBytes` (RESYNC_WRITEBACK_SHARE). */
export function resyncWritebackBytes(dirtyBytes: number): number {
  return Math.min(DEFAULT_WRITEBACK_BYTES, Math.max(RESYNC_WRITEBACK_MIN_BYTES, Math.ceil(dirtyBytes / RESYNC_WRITEBACK_SHARE)));
}
