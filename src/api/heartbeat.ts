/**
 * Heartbeat paths: how the two hosts of a replication pair hear each other (DESIGN §7). A backend
 * (plugins/heartbeat-*) opens one path per `--heartbeat URI`; a path sends this node's beat frames
 * and reports the peer's. It carries frames and decides nothing: the engine signs and checks each
 * frame (HMAC-SHA256 with the pair key, node id, replay order) and the failure detector decides
 * whether the peer is alive. A frame is opaque bytes to the backend, at most
 * HEARTBEAT_MAX_FRAME_BYTES long.
 *
 * Backends that have no frames to carry (exec: a command whose exit status is the beat) report
 * empty beats; the engine counts them as the peer's, unauthenticated.
 */

/** The largest frame a path must carry byte for byte. */
export const HEARTBEAT_MAX_FRAME_BYTES = 256;

export interface HeartbeatCaps {
  /** the path carries the engine's frames (false: a probe, every report is an empty beat) */
  readonly frames: boolean;
  /** the path does not share the replication data link (a second NIC, a disk, a command) */
  readonly independentPath: boolean;
  /** losing this path means losing ownership (a lease); no backend of this kind exists yet */
  readonly authoritative: boolean;
}

export interface HeartbeatOpenOptions {
  /** this node's id (--node-id) */
  readonly self: string;
  /** the peer's id (--peer-id) */
  readonly peer: string;
  /** how often the engine sends a beat, in milliseconds; a polling backend polls at this pace */
  readonly intervalMs: number;
  /** aborting it stops the path as stop() does */
  readonly signal?: AbortSignal;
}

/** One report: a frame as it arrived (empty for probe backends), and where it came from. */
export interface HeartbeatReport {
  readonly frame: Buffer;
  /** for status and logs: "127.0.0.1:7001", "slot 1", "exit 0" */
  readonly from: string;
}

export interface HeartbeatPath {
  /** the URI as the user gave it */
  readonly uri: string;
  /** start sending and receiving (bind, connect, open the file …); rejects with a coded error */
  start(): Promise<void>;
  /**
   * Send one frame towards the peer. Never throws and never waits for the peer: a frame that
   * cannot go now is dropped (the detector notices silence), the reason given to onError.
   */
  send(frame: Buffer): void;
  /** called for every frame from the peer, and for every successful probe */
  onBeat(listener: (report: HeartbeatReport) => void): void;
  /** trouble on the path that is not silence itself (a send failure, a bad slot); for logs */
  onError(listener: (err: Error) => void): void;
  /** stop sending and reporting, release sockets, files and children; idempotent */
  stop(): Promise<void>;
}
