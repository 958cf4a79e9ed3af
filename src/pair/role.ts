/**
 * The role an export plays in a replication pair, as the daemon sees it (PAIR-SPEC): one object
 * per paired export, kept by the daemon by export name. The primary's side (src/pair/primary*.ts)
 * and the secondary's side (src/pair/secondary*.ts) each implement it; the control verbs
 * (`status`, `failover`, `checkpoint`) only call through this interface.
 */
import type { GenerationTuple } from './generations.js';
import type { DiskState } from './messages.js';

export type PairLinkState = 'connecting' | 'connected' | 'degraded' | 'resyncing' | 'split-brain' | 'none';

/** what `status --json` shows under exports[i].pair */
export interface PairStatus {
  role: 'primary' | 'secondary';
  /** the peer's address (the primary's URI of the secondary; the secondary's view of the link's peer) */
  peer: string | null;
  protocol: 'sync' | 'async' | null;
  link: PairLinkState;
  /** last committed epoch */
  epoch: number;
  gi: GenerationTuple;
  diskState: DiskState;
  /** bytes waiting in the forwarding queue (primary; 0 on a secondary) */
  queueBytes: number;
  /** an async primary: what a write that does not fit in the queue does (serve-nbd --on-congestion) */
  onCongestion?: 'block' | 'pull-ahead';
  /** an async primary: how long writes waited for room in the queue (block) */
  congestion?: { waits: number; waitedMs: number; maxWaitMs: number; waiting: number; episodes: number; overLimit: number };
  /** bytes the peer misses (the peer bitmap's weight; 0 on a secondary) */
  bytesBehind: number;
  /** milliseconds since the last committed checkpoint, null before the first */
  lastCheckpointAgeMs: number | null;
  /** what the primary replicates to: a blkrep secondary with a pair link, or a plain NBD server */
  peerKind?: 'blkrep' | 'plain';
}

export interface FailoverOptions {
  to: 'checkpoint' | 'latest';
  dryRun: boolean;
  force: boolean;
  /** finish a failover that failed halfway (the target it recorded; the secondary only) */
  retry?: boolean;
}

export interface FailoverResult {
  /** the role after the failover (on a dry run: the role it would have) */
  role: 'primary' | 'secondary';
  dryRun: boolean;
  to: 'checkpoint' | 'latest';
  /** the epoch the disk holds (the checkpoint failed over to) */
  epoch: number;
  /** the generation tuple after the failover (on a dry run: unchanged) */
  gi: GenerationTuple;
  /** bytes moved (committed into the disk); on a dry run the bytes that would be */
  bytes: number;
  /** milliseconds from the request to the disk served read-write */
  ms: number;
  /** what was done (or would be), for people */
  explanation: string;
  /** extra fields a side adds (the dry run's explanation object, …) */
  [extra: string]: unknown;
}

/**
 * What a role leaves to the primary role that replaces it (`blkrep replicate` on an export whose
 * role is a primary no longer replicating: a promoted secondary, a stopped primary). The one way
 * a new PrimaryRole gets the regions its peer may miss beyond its own peer bitmap.
 */
export interface HandOff {
  /** regions the next peer may miss (a promoted secondary: its failback bitmap ∪ the old peer bitmap) */
  dirty: Array<{ offset: number; length: number }>;
  /**
   * the same record read again (a promoted secondary: its failback bitmap), once the next role
   * tracks writes itself: a write to the export after `dirty` was read and before the next role's
   * peer bitmap tracked it is in no other record
   */
  since?: () => Array<{ offset: number; length: number }>;
  /** what they are, for the log and the resync event */
  what: string;
  /** the next role holds them durably (its peer bitmap is flushed): the old record may go */
  taken(): Promise<void>;
}

export interface PairRole {
  readonly role: 'primary' | 'secondary';
  status(): PairStatus;
  failover(o: FailoverOptions): Promise<FailoverResult>;
  checkpoint?(): Promise<{ epoch: number }>;
  /** a primary role may replace this one now (it is a primary that does not replicate) */
  readonly replaceable?: boolean;
  /** close this role and hand over what the replacing primary role needs (only when replaceable) */
  handOff?(): Promise<HandOff>;
  /**
   * A beat of the heartbeat's peer (src/heartbeat): the generation it announces and whether it is
   * primary. A secondary whose link is down learns from it that the primary went on alone.
   */
  peerBeat?(b: { generation: string; primary: boolean }): void;
  /**
   * The heartbeat's pair-link path (src/heartbeat/service.ts pingLink): ping the peer on the pair
   * link when it is open and call `heard` when its pong comes back. False: no link to ping on.
   */
  pingLink?(heard: () => void): boolean;
  close(): Promise<void>;
}
