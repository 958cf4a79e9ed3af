/**
 * The daemon's heartbeat: opens one path per `--heartbeat URI` through the backend registered
 * for its scheme, sends this node's signed beat on every path once per interval, checks every
 * frame that comes back (signature, peer id, replay order), feeds the accepted ones to the peer
 * monitor, and publishes its transitions (peer-alive, peer-suspect, peer-dead).
 *
 * Time is the monotonic clock (performance.now, injectable); the wall clock appears only in
 * `lastBeatAt` for people reading status.
 */
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import type { HeartbeatPath, HeartbeatReport } from '../api/heartbeat.js';
import type { HeartbeatBackend, HeartbeatRegistry } from '../api/transport.js';
import { decodeBeat, encodeBeat, fitExports, ReplayGuard, type Beat, type BeatExport, type RejectReason } from './beat.js';
import type { PathState } from './detector.js';
import { PeerMonitor, type DetectorSpec, type PathView, type PeerEvent } from './monitor.js';

export type HeartbeatLog = (level: 'info' | 'warn' | 'error' | 'debug', message: string) => void;

export interface HeartbeatServiceOptions {
  /** the --heartbeat URIs, one path each */
  uris: readonly string[];
  registry: HeartbeatRegistry;
  /** this node's id (--node-id) and the peer's (--peer-id) */
  self: string;
  peer: string;
  /** the pair key (--heartbeat-key); without one beats are not authenticated */
  key?: Buffer;
  intervalMs: number;
  detector: DetectorSpec;
  /**
   * This start's incarnation (the beats' restart order, ReplayGuard): default the wall clock in ms.
   * A daemon with a term file passes one above every incarnation it used before (daemon.ts), so a
   * wall clock set back since (an NTP step, a VM restore, a wrong RTC at boot) cannot make its
   * beats look like replays to a peer that heard its last start.
   */
  incarnation?: bigint;
  /** the fencing epoch and generation this node announces (the pair's; 0 and EMPTY without one) */
  epoch?: () => bigint;
  generation?: () => string;
  /** is this node primary now (announced in every beat) */
  primary?: () => boolean;
  /**
   * This node's paired exports, each with its generation and flags (beat version 2, sent once the
   * peer says it decodes it). Absent: an empty list.
   */
  exports?: () => BeatExport[];
  /**
   * A paired export of the peer reports Outdated (flag bit 0 of its entry in a version 2 beat):
   * called once when it first says so, and again when it says so at another generation. On a
   * primary: its secondary for `export` confirmed it is Outdated at `generation` (--fencing
   * resource-and-stonith may resume writes on it).
   */
  onPeerOutdated?: (e: PeerOutdated) => void;
  /** every accepted signed beat of the peer, after it counted (the fencing token, the role) */
  onPeerBeat?: (beat: Beat) => void;
  /**
   * The pair link as one more path (DRBD's ping on the replication connection): called once per
   * interval, it pings the peer on the link when there is one (false: none) and calls `heard` when
   * the peer's pong comes back. A pong counts for liveness as a beat does, so the peer is not
   * declared dead while it answers on the link, whatever the heartbeat paths say.
   */
  pingLink?: (heard: () => void) => boolean;
  /** after each pong counted (a primary's quorum may be back) */
  onLinkHeard?: () => void;
  /** the monotonic clock in ms (default performance.now) */
  clock?: () => number;
  /** a control-socket event */
  publish?: (event: string, fields: Record<string, unknown>) => void;
  log?: HeartbeatLog;
  /** called on every peer transition, after it is published */
  onPeerEvent?: (event: PeerEvent) => void;
}

/** a paired export of the peer reports Outdated (onPeerOutdated, event peer-outdated) */
export interface PeerOutdated {
  peer: string;
  /** the pair's export name (the secondary's replica export) */
  export: string;
  /** the peer's generation for it */
  generation: string;
  /** the peer's incarnation that said it */
  incarnation: string;
}

/** a paired export of the peer, as its last version 2 beat announced it */
export interface PeerExportStatus {
  name: string;
  generation: string;
  outdated: boolean;
  primary: boolean;
}

export interface HeartbeatPathStatus {
  uri: string;
  backend: string;
  state: PathState;
  /** milliseconds since the last accepted beat on this path (null before the first) */
  lastBeatAgoMs: number | null;
  /** the wall-clock time of that beat, ISO 8601 */
  lastBeatAt: string | null;
  /** φ now (phi detector; null with fixed) */
  phi: number | null;
  /** beats accepted */
  beats: number;
  /** beats refused, by reason (bad-mac, unkeyed, keyed, replay, self, unknown-node, malformed) */
  rejected: Partial<Record<RejectReason, number>>;
  /** send/receive errors of the path (the last one's message in lastError) */
  errors: number;
  lastError: string | null;
  /** where the last accepted beat came from, as the backend says */
  lastFrom: string | null;
  /** false for probe paths (exec), whose beats cannot be signed */
  authenticated: boolean;
}

export interface HeartbeatStatus {
  node: string;
  peer: string;
  state: PathState;
  detector: DetectorSpec;
  keyed: boolean;
  /** this node's incarnation and beats sent */
  incarnation: string;
  sent: number;
  /**
   * what the peer last announced (null before its first signed beat): `generation` is its first
   * paired export's; `version` the beat's version; `exports` its paired exports (version 2; null
   * from a version 1 beat)
   */
  peerAnnounced: { incarnation: string; epoch: string; generation: string; primary: boolean; version: 1 | 2; exports: PeerExportStatus[] | null } | null;
  /** the beat version this node sends now: 1 until the peer says it decodes 2 */
  beatVersion: 1 | 2;
  /** this node's exports its beats leave out (a name too long, the 256-byte frame full), with why */
  exportsLeftOut: Array<{ name: string; why: string }>;
  paths: HeartbeatPathStatus[];
  /** the pair link's path (pings answered on it), null without a pair link to ping */
  link: { state: PathState; lastBeatAgoMs: number | null; pings: number; pongs: number } | null;
}

interface PathSlot {
  uri: string;
  backend: HeartbeatBackend;
  path: HeartbeatPath;
  guard: ReplayGuard;
  beats: number;
  lastBeatWall: number | null;
  lastFrom: string | null;
  rejected: Partial<Record<RejectReason, number>>;
  /** when each reject reason was last logged (monotonic), so a flood logs once a minute */
  rejectLogged: Map<RejectReason, number>;
  errors: number;
  lastError: string | null;
}

const REJECT_LOG_EVERY_MS = 60_000;
/** the pair link's name among the monitor's paths */
export const LINK_PATH = 'pair-link';

function roundView(p: PathView): PathView {
  return { ...p, lastBeatAgoMs: p.lastBeatAgoMs === null ? null : Math.round(p.lastBeatAgoMs) };
}

function roundLink(p: PathView): { state: PathState; lastBeatAgoMs: number | null } {
  return { state: p.state, lastBeatAgoMs: p.lastBeatAgoMs === null ? null : Math.round(p.lastBeatAgoMs) };
}

/** "udp" of "udp://…", "exec" of "exec:…" */
export function heartbeatScheme(uri: string): string {
  const m = /^([a-z][a-z0-9+.-]*):/i.exec(uri);
  if (!m) throw new BlkrepError('ERR_BAD_HEARTBEAT', `invalid heartbeat URI "${uri}": no scheme (udp://PEER:PORT, tcp://PEER:PORT, file:///PATH, exec:COMMAND, etcd://HOST:PORT/PREFIX)`, { errno: 'EINVAL', details: { uri } });
  return m[1]!.toLowerCase();
}

export class HeartbeatService {
  private readonly slots: PathSlot[] = [];
  private readonly monitor: PeerMonitor;
  private readonly clock: () => number;
  private readonly log: HeartbeatLog;
  private readonly incarnation: bigint;
  private seq = 0n;
  private sendTimer: NodeJS.Timeout | undefined;
  private checkTimer: NodeJS.Timeout | undefined;
  private peerAnnounced: HeartbeatStatus['peerAnnounced'] = null;
  private stopped = false;
  /** the link path's index in the monitor (after the heartbeat paths), undefined without pingLink */
  private readonly linkIndex: number | undefined;
  private pings = 0;
  private pongs = 0;
  /** the heartbeat paths were said down while the link answered (heartbeat-paths-down) */
  private pathsDown = false;
  /** does the peer decode version 2, by its latest incarnation heard (beat.ts: versions) */
  private peerV2: { incarnation: bigint; v2: boolean } = { incarnation: -1n, v2: false };
  /** the peer's exports that reported Outdated, by name: the generation they said it at */
  private readonly peerOutdated = new Map<string, string>();
  private leftOut: Array<{ name: string; why: string }> = [];
  private leftOutSaid = '';

  private constructor(private readonly options: HeartbeatServiceOptions) {
    this.clock = options.clock ?? (() => performance.now());
    this.incarnation = options.incarnation ?? BigInt(Date.now());
    this.log = options.log ?? (() => {});
    this.linkIndex = options.pingLink ? options.uris.length : undefined;
    this.monitor = new PeerMonitor(options.peer, options.pingLink ? [...options.uris, LINK_PATH] : options.uris, options.detector, (e) => this.transition(e));
  }

  /** Open every path (a bad URI or a missing backend fails before anything starts), start them, start beating. */
  static async start(options: HeartbeatServiceOptions): Promise<HeartbeatService> {
    if (options.uris.length === 0) throw new BlkrepError('ERR_USAGE', 'no heartbeat path given', { errno: 'EINVAL' });
    if (options.self === options.peer) {
      throw new BlkrepError('ERR_USAGE', `this node and its peer have the same id "${options.self}": give each node its own --node-id`, { errno: 'EINVAL', details: { node: options.self } });
    }
    const service = new HeartbeatService(options);
    const seen = new Set<string>();
    for (const uri of options.uris) {
      if (seen.has(uri)) throw new BlkrepError('ERR_USAGE', `heartbeat path "${uri}" is given twice`, { errno: 'EINVAL', details: { uri } });
      seen.add(uri);
      const backend = options.registry.get(heartbeatScheme(uri));
      let path: HeartbeatPath;
      try {
        path = backend.open(uri, { self: options.self, peer: options.peer, intervalMs: options.intervalMs });
      } catch (err) {
        throw toBlkrepError(err);
      }
      service.slots.push({ uri, backend, path, guard: new ReplayGuard(options.self, options.peer), beats: 0, lastBeatWall: null, lastFrom: null, rejected: {}, rejectLogged: new Map(), errors: 0, lastError: null });
    }
    try {
      for (const [i, slot] of service.slots.entries()) {
        slot.path.onBeat((r) => service.receive(i, r));
        slot.path.onError((err) => {
          slot.errors++;
          slot.lastError = err.message;
          service.log('debug', `heartbeat ${slot.uri}: ${err.message}`);
        });
        await slot.path.start().catch((err: unknown) => Promise.reject(toBlkrepError(err, `cannot start heartbeat path ${slot.uri}`)));
      }
    } catch (err) {
      await service.stop();
      throw err;
    }
    service.beat();
    service.sendTimer = setInterval(() => service.beat(), options.intervalMs);
    // re-evaluated ten times per interval: a death is declared within a tenth of an interval of its bound
    const every = Math.max(10, Math.floor(options.intervalMs / 10));
    service.lastCheckAt = service.clock();
    service.checkTimer = setInterval(() => service.check(every), every);
    return service;
  }

  private lastCheckAt = 0;

  /**
   * The timer's re-evaluation. A check that comes late (by more than two periods) means this
   * process did not run meanwhile (descheduled on a loaded host, a long task, a pause): the
   * beats the peer sent during that stall wait in the paths' sockets, and the event loop runs
   * its timers before it reads them, so checking now would judge a silence that is this
   * node's own (a false peer-suspect, or after a long stall a false peer-dead that fences a
   * live primary). Then the check waits for the loop's I/O phase (setImmediate) and judges
   * after the queued beats are counted.
   */
  private check(every: number): void {
    const now = this.clock();
    const late = now - this.lastCheckAt > 2 * every;
    this.lastCheckAt = now;
    if (!late) {
      this.monitor.check(now);
      this.checkPaths(now);
      return;
    }
    setImmediate(() => {
      if (this.stopped) return;
      const at = this.clock();
      this.monitor.check(at);
      this.checkPaths(at);
    });
  }

  /**
   * The heartbeat paths against the link: every heartbeat path dead while the peer answers on the
   * pair link is said once (heartbeat-paths-down: the peer is not dead, its heartbeat is cut), and
   * the first path heard again after that (heartbeat-paths-up).
   */
  private checkPaths(now: number): void {
    const link = this.linkIndex;
    if (link === undefined) return;
    const views = this.monitor.view(now);
    const paths = views.slice(0, link);
    const linkView = views[link]!;
    if (!this.pathsDown) {
      if (!paths.every((p) => p.state === 'dead') || linkView.state !== 'alive') return;
      this.pathsDown = true;
      this.log('warn', `every heartbeat path to peer "${this.options.peer}" is dead but it answers on the pair link: it is not declared dead (paths: ${paths.map((p) => `${p.path} ${p.state}`).join(', ')})`);
      this.options.publish?.('heartbeat-paths-down', { peer: this.options.peer, paths: paths.map(roundView), link: roundLink(linkView) });
      return;
    }
    if (!paths.some((p) => p.state === 'alive')) return;
    this.pathsDown = false;
    this.log('info', `a heartbeat path to peer "${this.options.peer}" is heard again (paths: ${paths.map((p) => `${p.path} ${p.state}`).join(', ')})`);
    this.options.publish?.('heartbeat-paths-up', { peer: this.options.peer, paths: paths.map(roundView), link: roundLink(linkView) });
  }

  /** the link's pong: one more beat on the link path */
  private readonly linkHeard = (): void => {
    if (this.stopped || this.linkIndex === undefined) return;
    this.pongs++;
    const now = this.clock();
    this.monitor.beat(this.linkIndex, now);
    this.checkPaths(now);
    this.options.onLinkHeard?.();
  };

  /** the version this node sends: 2 once the peer's latest incarnation said it decodes it */
  get beatVersion(): 1 | 2 {
    return this.peerV2.v2 ? 2 : 1;
  }

  /** this node's exports for a version 2 beat: those that fit (the others said once) */
  private beatExports(): BeatExport[] {
    const { fit, left } = fitExports(this.options.self, this.options.exports?.() ?? []);
    this.leftOut = left;
    const said = left.map((l) => l.name).join('\0');
    if (said !== this.leftOutSaid) {
      this.leftOutSaid = said;
      if (left.length > 0) this.log('warn', `heartbeat: the beats leave out ${left.map((l) => `export "${l.name.slice(0, 80)}" (${l.why})`).join(', ')}: the peer hears no generation for them`);
    }
    return fit;
  }

  private beat(): void {
    if (this.stopped) return;
    this.seq++;
    const v2 = this.peerV2.v2;
    const frame = encodeBeat(
      {
        node: this.options.self,
        incarnation: this.incarnation,
        seq: this.seq,
        epoch: this.options.epoch?.() ?? 0n,
        generation: this.options.generation?.() ?? '0000000000000000',
        ...(this.options.primary?.() ? { primary: true } : {}),
        // version 1 says this node decodes 2 (flag bit 2); version 2 carries the export list
        ...(v2 ? { exports: this.beatExports() } : { capable: true }),
      },
      this.options.key,
    );
    for (const slot of this.slots) slot.path.send(frame);
    if (this.options.pingLink?.(this.linkHeard)) this.pings++;
  }

  private receive(index: number, report: HeartbeatReport): void {
    if (this.stopped) return;
    const slot = this.slots[index]!;
    if (slot.backend.caps.frames) {
      const decoded = decodeBeat(report.frame, this.options.key);
      const checked = decoded.ok ? slot.guard.check(decoded.beat) : decoded;
      if (!checked.ok) {
        this.reject(slot, checked.reason, checked.detail, report.from);
        return;
      }
      this.announce(checked.beat);
    }
    slot.beats++;
    slot.lastBeatWall = Date.now();
    slot.lastFrom = report.from;
    const now = this.clock();
    this.monitor.beat(index, now);
    this.checkPaths(now);
    if (slot.backend.caps.frames && this.peerBeat) this.options.onPeerBeat?.(this.peerBeat);
  }

  private peerBeat: Beat | undefined;

  /**
   * Milliseconds since the peer was last heard on any path (null: never heard), read from the
   * clock now: the write path asks this synchronously, so a node that was frozen (SIGSTOP, a
   * long pause) sees its silence at once, before any timer has run.
   */
  silenceMs(): number | null {
    return this.monitor.silenceMs(this.clock());
  }

  private announce(beat: Beat): void {
    this.peerBeat = beat;
    this.peerAnnounced = {
      incarnation: beat.incarnation.toString(),
      epoch: beat.epoch.toString(),
      generation: beat.generation,
      primary: beat.primary === true,
      version: beat.exports === undefined ? 1 : 2,
      exports: beat.exports?.map((e) => ({ name: e.name, generation: e.generation, outdated: e.outdated === true, primary: e.primary === true })) ?? null,
    };
    // the version to send follows the peer's latest incarnation (an older beat on a slower path says nothing)
    if (beat.incarnation >= this.peerV2.incarnation) {
      const v2 = beat.exports !== undefined || beat.capable === true;
      if (v2 !== this.peerV2.v2) this.log('info', `heartbeat: peer "${this.options.peer}" ${v2 ? 'decodes beat version 2: this node sends version 2 (an export list)' : 'decodes beat version 1 only: this node sends version 1'}`);
      this.peerV2 = { incarnation: beat.incarnation, v2 };
    }
    if (beat.exports === undefined) return;
    for (const e of beat.exports) {
      if (!e.outdated) {
        this.peerOutdated.delete(e.name);
        continue;
      }
      if (this.peerOutdated.get(e.name) === e.generation) continue;
      this.peerOutdated.set(e.name, e.generation);
      const fields: PeerOutdated = { peer: this.options.peer, export: e.name, generation: e.generation, incarnation: beat.incarnation.toString() };
      this.log('info', `heartbeat: peer "${this.options.peer}" reports its disk of export "${e.name}" Outdated at generation ${e.generation}`);
      this.options.publish?.('peer-outdated', { ...fields });
      this.options.onPeerOutdated?.(fields);
    }
  }

  private reject(slot: PathSlot, reason: RejectReason, detail: string, from: string): void {
    slot.rejected[reason] = (slot.rejected[reason] ?? 0) + 1;
    const now = this.clock();
    const last = slot.rejectLogged.get(reason);
    if (last !== undefined && now - last < REJECT_LOG_EVERY_MS) return;
    slot.rejectLogged.set(reason, now);
    // a wrong key or a stranger is a configuration error worth a warning; a reordered datagram is not
    const level = reason === 'replay' ? 'debug' : 'warn';
    this.log(level, `heartbeat ${slot.uri}: beat from ${from} refused (${reason}): ${detail}${last === undefined ? '' : ' (said once a minute)'}`);
  }

  private transition(e: PeerEvent): void {
    const level = e.event === 'peer-alive' ? 'info' : 'warn';
    const silent = e.silentMs === null ? '' : ` after ${Math.round(e.silentMs)} ms of silence`;
    this.log(level, `peer "${e.peer}" is ${e.event.slice('peer-'.length)}${e.event === 'peer-alive' ? '' : silent} (paths: ${e.paths.map((p) => `${p.path} ${p.state}`).join(', ')})`);
    const link = this.linkIndex === undefined ? undefined : e.paths[this.linkIndex];
    const paths = this.linkIndex === undefined ? e.paths : e.paths.slice(0, this.linkIndex);
    this.options.publish?.(e.event, { peer: e.peer, from: e.from, silentMs: e.silentMs === null ? null : Math.round(e.silentMs), paths: paths.map(roundView), ...(link ? { link: roundLink(link) } : {}) });
    this.options.onPeerEvent?.(e);
  }

  /** The peer's state now. */
  get peerState(): PathState {
    return this.monitor.state(this.clock());
  }

  status(): HeartbeatStatus {
    const now = this.clock();
    const views = this.monitor.view(now);
    return {
      node: this.options.self,
      peer: this.options.peer,
      state: this.monitor.state(now),
      detector: this.options.detector,
      keyed: this.options.key !== undefined,
      incarnation: this.incarnation.toString(),
      sent: Number(this.seq),
      peerAnnounced: this.peerAnnounced,
      beatVersion: this.beatVersion,
      exportsLeftOut: this.leftOut.map((l) => ({ ...l })),
      link: this.linkIndex === undefined ? null : { ...roundLink(views[this.linkIndex]!), pings: this.pings, pongs: this.pongs },
      paths: this.slots.map((s, i) => {
        const v = views[i]!;
        return {
          uri: s.uri,
          backend: s.backend.name,
          state: v.state,
          lastBeatAgoMs: v.lastBeatAgoMs === null ? null : Math.round(v.lastBeatAgoMs),
          lastBeatAt: s.lastBeatWall === null ? null : new Date(s.lastBeatWall).toISOString(),
          phi: v.phi,
          beats: s.beats,
          rejected: { ...s.rejected },
          errors: s.errors,
          lastError: s.lastError,
          lastFrom: s.lastFrom,
          authenticated: s.backend.caps.frames,
        };
      }),
    };
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.sendTimer) clearInterval(this.sendTimer);
    if (this.checkTimer) clearInterval(this.checkTimer);
    await Promise.all(this.slots.map((s) => s.path.stop().catch(() => {})));
  }
}
