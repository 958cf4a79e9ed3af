/**
 * The peer monitor: one failure detector per heartbeat path, and the peer's state from all of
 * them. The peer is alive while any path is alive, and dead only when every path is dead, so one
 * lost NIC or a slow disk path never declares it dead. Pure: the caller passes the monotonic time.
 *
 * Like corosync's wait_for_all, a peer never heard is "unknown", never dead: a node that starts
 * alone does not act on a peer it has not seen.
 *
 * Transitions are returned (and given to the listener) as events:
 *   unknown|suspect|dead → alive   peer-alive
 *   alive → suspect                peer-suspect
 *   alive|suspect → dead           peer-dead
 */
import { FixedDetector, PhiDetector, type FailureDetector, type PathState, type PhiOptions } from './detector.js';

export type PeerEventName = 'peer-alive' | 'peer-suspect' | 'peer-dead';

export interface PathView {
  /** the path's URI */
  path: string;
  state: PathState;
  /** milliseconds since its last beat (null before the first) */
  lastBeatAgoMs: number | null;
  phi: number | null;
}

export interface PeerEvent {
  event: PeerEventName;
  peer: string;
  /** the state before */
  from: PathState;
  /** milliseconds since the last beat on any path (null if never heard) */
  silentMs: number | null;
  paths: PathView[];
}

export type DetectorSpec = { kind: 'fixed'; intervalMs: number; misses: number } | ({ kind: 'phi'; intervalMs: number } & Partial<Omit<PhiOptions, 'intervalMs'>>);

export function makeDetector(spec: DetectorSpec): FailureDetector {
  return spec.kind === 'fixed' ? new FixedDetector(spec) : new PhiDetector(spec);
}

const RANK: Record<PathState, number> = { dead: 0, unknown: 1, suspect: 2, alive: 3 };

export class PeerMonitor {
  private readonly detectors: FailureDetector[];
  private current: PathState = 'unknown';

  constructor(
    readonly peer: string,
    readonly paths: readonly string[],
    spec: DetectorSpec,
    private readonly listener: (event: PeerEvent) => void = () => {},
  ) {
    this.detectors = paths.map(() => makeDetector(spec));
  }

  /** A beat was accepted on path `index` at `now`; returns the transition it caused, if any. */
  beat(index: number, now: number): PeerEvent | undefined {
    const d = this.detectors[index];
    if (!d) throw new RangeError(`no heartbeat path ${index} (there are ${this.detectors.length})`);
    d.heartbeat(now);
    return this.check(now);
  }

  /** The peer's state at `now`: the best of its paths' (any alive path keeps it alive). */
  state(now: number): PathState {
    let best: PathState = 'dead';
    let heard = false;
    for (const d of this.detectors) {
      const s = d.state(now);
      if (s === 'unknown') continue;
      heard = true;
      if (RANK[s] > RANK[best]) best = s;
    }
    return heard ? best : 'unknown';
  }

  view(now: number): PathView[] {
    return this.paths.map((path, i) => {
      const d = this.detectors[i]!;
      const phi = d.phi(now);
      return { path, state: d.state(now), lastBeatAgoMs: d.lastBeat === undefined ? null : now - d.lastBeat, phi: phi === null ? null : round(phi) };
    });
  }

  /** Re-evaluate at `now` (on a timer); returns the transition, if any. */
  check(now: number): PeerEvent | undefined {
    const next = this.state(now);
    const from = this.current;
    if (next === from || next === 'unknown') return undefined;
    this.current = next;
    const event = next === 'alive' ? 'peer-alive' : next === 'suspect' ? (from === 'alive' ? 'peer-suspect' : undefined) : 'peer-dead';
    if (event === undefined) return undefined;
    const last = Math.max(...this.detectors.map((d) => d.lastBeat ?? -Infinity));
    const e: PeerEvent = { event, peer: this.peer, from, silentMs: Number.isFinite(last) ? now - last : null, paths: this.view(now) };
    this.listener(e);
    return e;
  }

  /** milliseconds since the last beat on any path at `now`, null before the first */
  silenceMs(now: number): number | null {
    const last = Math.max(...this.detectors.map((d) => d.lastBeat ?? -Infinity));
    return Number.isFinite(last) ? now - last : null;
  }

  get peerState(): PathState {
    return this.current;
  }
}

/** φ for people and JSON: three decimals, and 999 for "beyond any threshold" (JSON has no Infinity) */
function round(phi: number): number {
  return Math.min(999, Math.round(phi * 1000) / 1000);
}
