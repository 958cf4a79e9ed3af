/**
 * The daemon's side of the pair, for the primary (PAIR-SPEC "Roles in the daemon"): every
 * writable export has a replication filter (detached: a pass-through) so `replicate` can start
 * replicating a running export; the export's pair role objects are kept by export name in
 * `roles` (shared with the secondary's side), and the pair verbs are registered here:
 *
 *   checkpoint {export?}                          → {export, epoch}    (the role's checkpoint())
 *   replicate  {export?, uri, protocol?, queue?, onCongestion?, congestionTimeout?}  → PairStatus  (starts a PrimaryRole)
 * (`failover` is control-verbs.ts's: it calls PrimaryRole.failover() on a primary.)
 */
import { z } from 'zod';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import type { ControlVerbRegistry } from '../api/control.js';
import type { TransportRegistry } from '../api/transport.js';
import { arg, verb, type VerbSpec } from '../control/verb.js';
import { PrimaryRole, type PrimaryOptions } from './primary.js';
import type { CongestionPolicy, ReplicationFilter, ReplicationProtocol } from './replication-filter.js';
import type { FailoverOptions, FailoverResult, HandOff, PairRole, PairStatus } from './role.js';

export interface ReplicationSpec {
  /** the export to replicate (default: the only one) */
  exportName?: string;
  uri: string;
  protocol?: ReplicationProtocol;
  queueBytes?: number;
  /** async only (ERR_BAD_REQUEST with sync) */
  onCongestion?: CongestionPolicy;
  /** async only: ms */
  congestionTimeoutMs?: number;
  checkpointIntervalMs?: number;
  /** this node's name (serve-nbd --node-name) */
  nodeName?: string;
}

export interface PairExport {
  /** the export's replication filter, put into its stack's replication slot on first use (an
   * export that never replicates pays no hop for it) */
  filter: () => Promise<ReplicationFilter>;
  /** the disk's path; undefined for an image that is no regular file (memory, NBD) */
  imagePath: string | undefined;
  /** why there is no path */
  why?: string;
}

const exportArg = arg.string().nullish().describe('the export; may be left out when the daemon serves one');

export const PRIMARY_VERB_SPECS = {
  checkpoint: {
    name: 'checkpoint',
    summary: "One checkpoint of a replication pair, driven from the primary: cut, drain, flush both, the secondary empties its overlays, both record the epoch. Replies with the epoch.",
    args: z.object({ export: exportArg }),
    result: '{export, epoch}',
    events: ['checkpoint', 'checkpoint-failed'],
    errors: ['ERR_NO_EXPORT', 'ERR_PAIR_ROLE', 'ERR_PAIR_NO_CHECKPOINT', 'ERR_PAIR_LINK_DOWN', 'ERR_PAIR_TIMEOUT', 'ERR_PAIR_STATE'],
  },
  replicate: {
    name: 'replicate',
    summary: 'Start replicating a running export to a secondary (an NBD URI): resync by the peer bitmap, then forward every write.',
    args: z.object({
      export: exportArg,
      uri: arg.name().describe("the secondary's replica export, an NBD URI"),
      protocol: arg.oneOf(['sync', 'async']).nullish().describe('sync (default): a write completes when both have it; async: after the local write'),
      queue: arg.uint().nullish().describe('async: bytes the forwarding queue holds, payloads and 512 bytes per write (default 8 MiB)'),
      onCongestion: arg.oneOf(['block', 'pull-ahead']).nullish().describe('async: a write that does not fit in the queue waits for room (block, the default) or replication degrades and resyncs later (pull-ahead)'),
      congestionTimeout: arg.uint().nullish().describe('async, block: ms a waiting write lets the secondary reply to nothing before replication degrades (default 10000)'),
    }),
    result: 'PairStatus: {role, peer, protocol, link, epoch, gi, diskState, queueBytes, onCongestion, congestion, bytesBehind, lastCheckpointAgeMs, peerKind}',
    events: ['replication-connected', 'replication-degraded', 'replication-congested', 'replication-uncongested', 'resync-started', 'resync-done', 'pair-refused', 'split-brain'],
    errors: ['ERR_NO_EXPORT', 'ERR_BAD_REQUEST', 'ERR_BAD_URI', 'ERR_PAIR_STATE', 'ERR_PAIR_SIZE', 'ERR_PAIR_ROLE', 'ERR_PAIR_SPLIT_BRAIN', 'ERR_PAIR_UNRELATED', 'ERR_READ_ONLY'],
  },
} as const satisfies Record<string, VerbSpec>;

export const PAIR_EVENTS: ReadonlyArray<{ name: string; fields: string }> = [
  { name: 'replication-connected', fields: 'forwarding started: export, peer, protocol, peerKind' },
  { name: 'replication-degraded', fields: 'forwarding stopped, writes are tracked: export, peer, reason (queue-full: pull-ahead; congestion-timeout: block, the secondary stopped replying), code' },
  { name: 'replication-congested', fields: 'async, on-congestion block: the queue is full and writes wait for room: export, peer, queueBytes, limit' },
  { name: 'replication-uncongested', fields: 'no write waits and the queue is at most half full again: export, peer, queueBytes, limit, waits (writes that waited), waitedMs (their waits added up), ms (since congested)' },
  { name: 'primary-io-error', fields: "a write failed on this disk (the client got the disk's errno; the region stays in the peer bitmap): export, op, offset, length, code, errno" },
  { name: 'replication-plain', fields: 'the secondary is a plain NBD server (no checkpoints): export, peer' },
  { name: 'resync-started', fields: 'export, peer, bytes (dirty), full' },
  { name: 'resync-done', fields: 'export, peer, bytes (copied), dirtyBytes, ms' },
  { name: 'split-brain', fields: 'the secondary refused the link for a split brain (on the primary: side "primary"): export, peer, side, rule, resolved (false), explanation' },
];

export interface PrimaryHostOptions {
  exports: Map<string, PairExport>;
  /** every paired export's role, by export name (the secondary's side adds its own) */
  roles: Map<string, PairRole>;
  transports?: TransportRegistry;
  publish?: PrimaryOptions['publish'];
  log?: PrimaryOptions['log'];
  /** every role's data link lost while forwarding / back (--fencing on the daemon: PrimaryOptions.onLinkLost) */
  onLinkLost?: (exportName: string, reason: string) => void;
  onLinkBack?: (exportName: string) => void;
}

export class PrimaryHost {
  /** exports whose replicate is under way (export name → the URI), one at a time */
  private readonly starting = new Map<string, string>();

  constructor(private readonly o: PrimaryHostOptions) {}

  /**
   * Start replicating an export (serve-nbd --replicate-to, the replicate verb). One at a time per
   * export: a second one while the first starts would hand off the old role twice and attach a
   * second replication filter (it failed with "the replication filter is degraded: detach it first").
   */
  async replicate(spec: ReplicationSpec): Promise<PrimaryRole> {
    const name = this.exportName(spec.exportName);
    const busy = this.starting.get(name);
    if (busy !== undefined) {
      throw new BlkrepError('ERR_PAIR_STATE', `export "${name}" is being put in a pair already (a replicate to ${busy} is under way): one at a time`, { errno: 'EINVAL', details: { export: name } });
    }
    this.starting.set(name, spec.uri);
    try {
      return await this.replicateNow(name, spec);
    } finally {
      this.starting.delete(name);
    }
  }

  private async replicateNow(name: string, spec: ReplicationSpec): Promise<PrimaryRole> {
    const ex = this.o.exports.get(name)!;
    const existing = this.o.roles.get(name);
    // a role that is a primary no longer replicating (a stopped primary, a promoted secondary:
    // failback) is replaced; it hands over the regions the new peer may miss
    if (existing && !(existing.replaceable && existing.handOff)) {
      const st = existing.status();
      throw new BlkrepError('ERR_PAIR_STATE', `export "${name}" is already in a pair (${st.role}, peer ${st.peer ?? 'none'}, link ${st.link})`, { errno: 'EINVAL', details: { export: name } });
    }
    if ((spec.protocol ?? 'sync') === 'sync' && (spec.onCongestion !== undefined || spec.congestionTimeoutMs !== undefined)) {
      const what = spec.onCongestion !== undefined ? `onCongestion ${spec.onCongestion}` : `congestionTimeout ${spec.congestionTimeoutMs}`;
      throw new BlkrepError('ERR_BAD_REQUEST', `${what} is for protocol async: a sync primary has no queue (every write waits for the secondary)`, { errno: 'EINVAL', details: { export: name } });
    }
    if (ex.imagePath === undefined) {
      throw new BlkrepError('ERR_PAIR_STATE', `export "${name}" cannot be replicated: ${ex.why ?? 'its image is no regular file'} (the peer bitmap and the pair state live beside the disk)`, { errno: 'EINVAL' });
    }
    const handOff = existing ? await existing.handOff!() : undefined;
    if (existing) this.o.roles.delete(name);
    let last: PairStatus | undefined;
    const role = await PrimaryRole.start({
      onStartFailed: (st) => (last = st),
      exportName: name,
      imagePath: ex.imagePath,
      filter: await ex.filter(),
      uri: spec.uri,
      ...(spec.protocol ? { protocol: spec.protocol } : {}),
      ...(spec.queueBytes === undefined ? {} : { queueBytes: spec.queueBytes }),
      ...(spec.onCongestion === undefined ? {} : { onCongestion: spec.onCongestion }),
      ...(spec.congestionTimeoutMs === undefined ? {} : { congestionTimeoutMs: spec.congestionTimeoutMs }),
      ...(spec.checkpointIntervalMs === undefined ? {} : { checkpointIntervalMs: spec.checkpointIntervalMs }),
      ...(spec.nodeName === undefined ? {} : { nodeName: spec.nodeName }),
      ...(this.o.transports ? { transports: this.o.transports } : {}),
      ...(this.o.publish ? { publish: this.o.publish } : {}),
      ...(this.o.log ? { log: this.o.log } : {}),
      ...(handOff ? { handOff } : {}),
      ...(this.o.onLinkLost ? { onLinkLost: (reason: string) => this.o.onLinkLost!(name, reason) } : {}),
      ...(this.o.onLinkBack ? { onLinkBack: () => this.o.onLinkBack!(name) } : {}),
    }).catch((err: unknown) => {
      // refused (a split brain, …) after the old role was closed: the export stays in the pair's
      // status, with the refusal, and a later replicate takes over what the old role handed over
      const e = toBlkrepError(err);
      if (last && (handOff || e.code === 'ERR_PAIR_SPLIT_BRAIN')) this.o.roles.set(name, new RefusedRole(last, e, handOff));
      throw err;
    });
    this.o.roles.set(name, role);
    await handOff?.taken().catch((err: unknown) => this.o.log?.('warn', `replicate: ${(err as Error).message}`));
    return role;
  }

  /** The export a verb means: the one named, or the only one. */
  exportName(name: string | null | undefined): string {
    if (name === undefined || name === null) {
      if (this.o.exports.size === 1) return [...this.o.exports.keys()][0]!;
      throw new BlkrepError('ERR_BAD_REQUEST', `the daemon serves ${this.o.exports.size} exports: say which with "export" (${[...this.o.exports.keys()].map((n) => `"${n}"`).join(', ')})`, { errno: 'EINVAL' });
    }
    if (!this.o.exports.has(name)) {
      throw new BlkrepError('ERR_NO_EXPORT', `the daemon has no writable export "${name}" (it has ${[...this.o.exports.keys()].map((n) => `"${n}"`).join(', ') || 'none'})`, { errno: 'EINVAL', details: { export: name } });
    }
    return name;
  }

  private role(name: string | null | undefined, verbName: string): { name: string; role: PairRole } {
    const n = name === undefined || name === null ? (this.o.roles.size === 1 ? [...this.o.roles.keys()][0]! : this.exportName(name)) : name;
    const role = this.o.roles.get(n);
    if (!role) throw new BlkrepError('ERR_PAIR_ROLE', `${verbName}: export "${n}" is not in a replication pair (start one with serve-nbd --replicate-to or blkrep replicate)`, { errno: 'EINVAL', details: { export: n } });
    return { name: n, role };
  }

  register(control: ControlVerbRegistry): void {
    control.register(
      verb(PRIMARY_VERB_SPECS.checkpoint, async (a) => {
        const { name, role } = this.role(a.export, 'checkpoint');
        if (!role.checkpoint) throw new BlkrepError('ERR_PAIR_ROLE', `checkpoint: export "${name}" is a ${role.role}; checkpoints are driven from the primary`, { errno: 'EINVAL' });
        return { export: name, ...(await role.checkpoint()) };
      }),
    );
    control.register(
      verb(PRIMARY_VERB_SPECS.replicate, async (a) => {
        const role = await this.replicate({
          ...(a.export === undefined || a.export === null ? {} : { exportName: a.export }),
          uri: a.uri,
          ...(a.protocol ? { protocol: a.protocol } : {}),
          ...(a.queue === undefined || a.queue === null ? {} : { queueBytes: a.queue }),
          ...(a.onCongestion === undefined || a.onCongestion === null ? {} : { onCongestion: a.onCongestion }),
          ...(a.congestionTimeout === undefined || a.congestionTimeout === null ? {} : { congestionTimeoutMs: a.congestionTimeout }),
        });
        return role.status();
      }),
    );
  }

  /** the pair status of each export in a pair, for `status` */
  statuses(): Map<string, ReturnType<PairRole['status']>> {
    return new Map([...this.o.roles].map(([n, r]) => [n, r.status()]));
  }

  async close(): Promise<void> {
    for (const [name, role] of this.o.roles) {
      if (role instanceof PrimaryRole) {
        await role.close().catch(() => {});
        this.o.roles.delete(name);
      }
    }
  }
}

/**
 * An export whose `replicate` was refused (a split brain, unrelated data, …): a primary that does
 * not replicate. `status` keeps showing the pair (link `split-brain` with the explanation for a
 * split brain; `none` and the error otherwise) instead of dropping it; the next `replicate`
 * replaces it and takes over what the role before it handed over (the failback bitmap is kept
 * until a role holds it durably).
 */
export class RefusedRole implements PairRole {
  readonly role = 'primary' as const;
  readonly replaceable = true;
  private readonly at = new Date().toISOString();

  constructor(
    private readonly last: PairStatus,
    private readonly refusal: BlkrepError,
    private readonly handedOver: HandOff | undefined,
  ) {}

  status(): PairStatus {
    const splitBrain = this.refusal.code === 'ERR_PAIR_SPLIT_BRAIN';
    return {
      ...this.last,
      link: splitBrain ? 'split-brain' : 'none',
      queueBytes: 0,
      lastError: `${this.refusal.code}: ${this.refusal.message}`,
      refused: { at: this.at, code: this.refusal.code, message: this.refusal.message },
    } as PairStatus;
  }

  failover(o: FailoverOptions): Promise<FailoverResult> {
    const st = this.last;
    const explanation = `primary: export not replicating (replicate to ${st.peer ?? 'the peer'} was refused: ${this.refusal.code}: ${this.refusal.message}); it keeps serving read-write and tracks every write for a later replicate: nothing to do`;
    const sb = (st as { splitBrain?: unknown }).splitBrain;
    return Promise.resolve({ role: 'primary', dryRun: o.dryRun, to: o.to, epoch: st.epoch, gi: st.gi, bytes: 0, ms: 0, explanation, ...(sb ? { splitBrain: sb } : {}) });
  }

  handOff(): Promise<HandOff> {
    return Promise.resolve(this.handedOver ?? { dirty: [], what: 'the peer bitmap', taken: () => Promise.resolve() });
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}
