/**
 * The serve-nbd daemon as a library: open the images, serve them on the requested listeners,
 * answer the control socket, stop cleanly. The command is a thin shell around startDaemon().
 */
import { rm } from 'node:fs/promises';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import type { BlockNode } from '../api/block.js';
import type { ConnectionUpgrader, HeartbeatRegistry, TransportListener, TransportRegistry } from '../api/transport.js';
import { completeNode } from '../block/node.js';
import { openImage } from '../block/open.js';
import { RawNode } from '../block/raw.js';
import { registerBitmapVerbs } from '../bitmap/control-verbs.js';
import { ExportBitmaps, type BitmapLoad, type BitmapSpec } from '../bitmap/export-bitmaps.js';
import { DirtyTrackingNode } from '../block/filters/tracking.js';
import type { BitmapInfo } from '../bitmap/ops.js';
import { ControlServer } from '../control/server.js';
import { verb } from '../control/verb.js';
import { DAEMON_VERB_SPECS } from './daemon-verbs.js';
import { DaemonJobs, type JobExport } from '../jobs/daemon-jobs.js';
import '../jobs/daemon-job-types.js';
import { sidecarBase } from '../bitmap/names.js';
import { filePath, isFileSpec } from '../image/chain.js';
import { sideFileBase } from '../util/state-dir.js';
import { stackFilters, type FilterSpec } from '../block/filters/spec.js';
import { ExportStack, type Slot } from './export-stack.js';
import { NbdServer, type Logger, type ServerStatus } from '../nbd/server.js';
import { checkExportName } from '../util/names.js';
import { replaceFile } from '../util/safe-file.js';
import { HeartbeatService, type HeartbeatServiceOptions, type HeartbeatStatus, type PeerOutdated } from '../heartbeat/service.js';
import { AutoFailover } from '../heartbeat/auto-failover.js';
import { describeFence, runFenceHook } from '../heartbeat/fence.js';
import { IoFence, IoFenceFilter, type FencingPolicy, type IoFenceStatus, type OnNoQuorum } from '../heartbeat/io-fence.js';
import type { Beat, BeatExport } from '../heartbeat/beat.js';
import type { PeerEvent } from '../heartbeat/monitor.js';
import { PrimaryRole } from '../pair/primary.js';
import { EtcdLease, type EtcdTarget, type LeaseStatus } from '../heartbeat/etcd-lease.js';
import { loadTerms, saveTerms, termFilePath, type Terms } from '../heartbeat/term-file.js';
import { ReplicationFilter } from '../pair/replication-filter.js';
import { PrimaryHost, type PairExport, type PrimaryHostOptions, type ReplicationSpec } from '../pair/primary-host.js';
import type { PairRole } from '../pair/role.js';
import type { CompleteBlockNode } from '../api/block.js';
import type { OptionExtension } from '../nbd/server-session.js';
import { registerPairVerbs } from '../pair/control-verbs.js';
import { Metrics, type MetricsAddress } from './metrics.js';

export interface ExportSpec {
  name: string;
  image: string;
  description?: string;
  /** dirty bitmaps to open or create for this export (--bitmap NAME[=FILE]) */
  bitmaps?: BitmapSpec[];
}

export interface ListenSpec {
  transport: string;
  address: string;
}

export interface DaemonOptions {
  exports: ExportSpec[];
  listen: ListenSpec[];
  transports: TransportRegistry;
  readOnly?: boolean;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  /** bytes of payloads and replies all NBD connections may hold together (--max-buffer) */
  maxBufferBytes?: number;
  /** disconnect a client that holds over 1 MiB and makes no progress this long (--stall-timeout) */
  stallTimeoutMs?: number;
  minimumBlockSize?: number;
  pidFile?: string;
  /** mode of a Unix socket listener, whatever the umask (default 0600) */
  socketMode?: number;
  controlPath?: string;
  log?: Logger;
  /** load every bitmap file beside each image (IMAGE.NAME.bitmap); default true */
  autoBitmaps?: boolean;
  /** granularity of bitmaps created at start (default 64 KiB) */
  bitmapGranularity?: number;
  /** filters over every export, between the clients and the export (the first outermost): --filter */
  filters?: readonly FilterSpec[];
  /** watch the peer over these heartbeat paths (--heartbeat …); needs `heartbeats` */
  heartbeat?: DaemonHeartbeat;
  /** the heartbeat backends the installed plugins provide */
  heartbeats?: HeartbeatRegistry;
  /** TLS for every export and listener (--tls*): the mode, the upgrader, its settings, what check() found */
  tls?: DaemonTls;
  /** replicate an export to a secondary (serve-nbd --replicate-to; src/pair/primary.ts) */
  replication?: ReplicationSpec;
  /** exports in a replication pair: each makes its PairRole (src/pair) before anything listens */
  pair?: PairSetup[];
  /** serve Prometheus metrics on GET /metrics here (serve-nbd --metrics; src/serve/metrics.ts) */
  metrics?: MetricsAddress;
}

/** What a pair role gets from the daemon to build itself on (src/pair/secondary.ts, primary.ts). */
export interface PairContext {
  exportName: string;
  /** the export's image spec (a path) */
  image: string;
  /** the node the export serves (filters, tracking, the image) */
  exportNode: CompleteBlockNode;
  /** the image's driver node (under the tracking filter) */
  imageNode: BlockNode;
  server: NbdServer;
  bitmaps: ExportBitmaps;
  /** blkrep extension options of the server (the pair link), by option number */
  extensions: Map<number, OptionExtension>;
  minimumBlockSize: number | undefined;
  publish(event: string, fields: Record<string, unknown>): void;
  log: Logger;
}

export interface PairSetup {
  export: string;
  start(ctx: PairContext): Promise<PairRole>;
}

export interface DaemonTls {
  mode: 'off' | 'on' | 'require';
  upgrader: ConnectionUpgrader;
  settings: Record<string, string>;
  /** "x509", "x509+verify-peer", "psk" (the upgrader's check()) */
  kind: string;
  /** the earliest certificate expiry, ISO 8601 */
  notAfter?: string;
  warnings?: readonly string[];
}

/** What the listening line and status say about TLS (per export: every export has the daemon's mode). */
export interface TlsReport {
  mode: 'off' | 'on' | 'require';
  kind?: string;
  notAfter?: string;
  warnings?: readonly string[];
}

/** --heartbeat and its companions, as serve-nbd parsed them (src/cli/heartbeat-flags.ts). */
export type DaemonHeartbeat = Omit<HeartbeatServiceOptions, 'registry' | 'publish' | 'log' | 'onPeerEvent'> & {
  /** --auto-failover with --fence-hook: fence the dead peer, then call the failover verb */
  autoFailover?: { fenceHook?: string; fenceTimeoutMs?: number };
  /** on a primary (--replicate-to): --fencing, with the hook it runs */
  fencing?: { policy: FencingPolicy; fenceHook?: string; fenceTimeoutMs?: number };
  /** on a primary: --on-no-quorum */
  onNoQuorum?: OnNoQuorum;
  /** --lease etcd://…: the primary holds the leader key, the secondary takes it before a failover */
  lease?: { target: EtcdTarget; ttlS: number };
};

export interface ListeningEvent {
  event: 'listening';
  uris: string[];
  pid: number;
  /** how each dirty bitmap was loaded (only when there are bitmaps) */
  bitmaps?: BitmapLoad[];
  /** jobs loaded (paused) from their state files beside the images (only when there are some) */
  jobs?: Array<{ id: string; type: string; export: string | null; status: string }>;
  /** TLS (only when it is on): with "require" the uris are nbds:// ones */
  tls?: TlsReport;
  /** where the Prometheus metrics are (only with --metrics) */
  metrics?: string;
}

export class Daemon {
  private stopping: Promise<void> | undefined;
  /** the heartbeat to the peer (--heartbeat), set once started */
  heartbeat: HeartbeatService | undefined;
  /** the primary's write gate (with --heartbeat) */
  ioFence: IoFence | undefined;
  /** --lease: leadership on etcd */
  lease: EtcdLease | undefined;
  /** this node's fencing token (the term its beats carry) and the highest its peer announced */
  private term = 0n;
  private peerTerm = 0n;
  private termPrimary = false;
  /** the highest term the peer announced as primary (above this.term: this node was replaced) */
  private primarySeen = 0n;
  /** where the terms are kept across restarts (undefined: an image with no directory, memory:) */
  private termFile: string | undefined;
  /** the heartbeat incarnation of this start, or of the last one the term file kept (initTerms) */
  private incarnation: bigint | undefined;
  /** silence after which a primary has no quorum (ms) */
  private quorumMs = Infinity;
  /** --fencing on a primary: the policy, its hook and what the hook is told (set with the heartbeat) */
  private fenceCtx:
    | {
        fencing: NonNullable<DaemonHeartbeat['fencing']>;
        node: string;
        peer: string;
        uris: readonly string[];
        epoch: () => bigint;
        publish: (event: string, fields: Record<string, unknown>) => void;
        log: (level: 'info' | 'warn' | 'error' | 'debug', message: string) => void;
      }
    | undefined;
  /** the fence hook running now (never two at once: a peer-dead during a link loss's hook waits for its verdict) */
  private fenceRun: Promise<void> | undefined;
  /** exports whose data link was lost while forwarding and is not back yet */
  private readonly linksLost = new Set<string>();
  /** of linksLost, the exports whose secondary has reported its disk Outdated since (beat version 2) */
  private readonly outdatedSinceLoss = new Set<string>();
  /**
   * Stall guard (fixed detector): a process stopped (SIGSTOP, a VM pause, a long GC) reads, when
   * it runs again, the beats that queued up while it was stopped — beats its peer sent before it
   * may have taken over. Counted as heard now they would give quorum back for the moment before
   * the new primary's beat is read, and a write could land on the replaced primary. So after a
   * stall longer than the quorum window (a tick came that late) there is no quorum for two beat
   * intervals: long enough for a beat sent after the stall to arrive, demoting this node if its
   * peer took over meanwhile.
   */
  private stallTick: NodeJS.Timeout | undefined;
  private lastTickAt = 0;
  private stallEndedAt = -Infinity;
  private stallGraceMs = 0;
  /** the Prometheus metrics (--metrics), set once listening */
  metrics: Metrics | undefined;
  private resolveStopped: () => void = () => {};
  /** Resolves once stop() has finished, whoever called it (a signal, the control socket). */
  readonly stopped = new Promise<void>((resolve) => (this.resolveStopped = resolve));

  private constructor(
    readonly server: NbdServer,
    readonly listeners: TransportListener[],
    readonly control: ControlServer | undefined,
    private readonly pidFile: string | undefined,
    /** the dirty bitmaps of each export, by export name */
    readonly bitmaps: Map<string, ExportBitmaps> = new Map(),
    private readonly log: Logger = () => {},
    /** the daemon's jobs (job-* control verbs) */
    readonly jobs: DaemonJobs | undefined = undefined,
    /** every image node the daemon opened for its exports (closed at stop) */
    private readonly images: BlockNode[] = [],
    /** the stack of each export, by export name */
    private readonly stacks: Map<string, ExportStack> = new Map(),
    /** the primary's side of replication pairs (replicate, checkpoint, failover verbs) */
    readonly pairHost: PrimaryHost | undefined = undefined,
    /** every export in a replication pair: its role, by export name */
    readonly pair: Map<string, PairRole> = new Map(),
  ) {}

  static async start(options: DaemonOptions): Promise<Daemon> {
    const names = new Set<string>();
    for (const e of options.exports) {
      checkExportName(e.name);
      if (names.has(e.name)) throw new BlkrepError('ERR_USAGE', `export "${e.name}" is given twice`, { errno: 'EINVAL' });
      names.add(e.name);
    }
    if (options.listen.length === 0) throw new BlkrepError('ERR_USAGE', 'nothing to listen on', { errno: 'EINVAL' });
    // Resolve transports first, so a missing plugin fails before any image is opened.
    const transports = options.listen.map((l) => options.transports.get(l.transport));

    const nodes: BlockNode[] = [];
    const stacks = new Map<string, ExportStack>();
    const listeners: TransportListener[] = [];
    const bitmaps = new Map<string, ExportBitmaps>();
    let control: ControlServer | undefined;
    let jobs: DaemonJobs | undefined;
    let heartbeat: HeartbeatService | undefined;
    let pairHost: PrimaryHost | undefined;
    let metrics: Metrics | undefined;
    const pair = new Map<string, PairRole>();
    try {
      for (const e of options.exports) nodes.push(await openImage(e.image, { readOnly: options.readOnly }));
      // Each export is a stack of slots (export-stack.ts). Its tracking slot holds a dirty-tracking
      // filter from the start (no cost without bitmaps), so bitmaps can be added at run time; its
      // bitmaps are opened before anything can write. A job puts its front end into the front
      // slot, a mirror's pivot its target into the pivot slot (the bitmaps keep recording). The
      // replication slot takes the pair's replication filter when the export starts to replicate
      // (serve-nbd --replicate-to, blkrep replicate): until then writes pay no hop for it.
      const tracking: DirtyTrackingNode[] = [];
      const replication: Array<() => Promise<ReplicationFilter>> = [];
      for (const [i, e] of options.exports.entries()) {
        // --filter …,at=disk goes on the disk itself, under the pair's filters; the rest over the stack
        const filters = options.filters ?? [];
        const onDisk = filters.filter((f) => f.at === 'disk');
        const disk = onDisk.length === 0 ? nodes[i]! : completeNode(stackFilters(nodes[i]!, onDisk));
        const stack = new ExportStack(disk, { name: e.name, filters: filters.filter((f) => f.at === undefined || f.at === 'export') });
        let filter: Promise<ReplicationFilter> | undefined;
        replication.push(() => {
          if (filter === undefined) {
            const f = claimPairDisk(nodes[i]!, e.name)
              .then(() => stack.insert('replication', (below) => new ReplicationFilter(below, { protocol: 'sync' })))
              .then(() => stack.opened('replication') as ReplicationFilter);
            filter = f;
            // a refused claim (another writer) may be retried by the next `blkrep replicate`
            f.catch(() => {
              if (filter === f) filter = undefined;
            });
          }
          return filter;
        });
        void stack.insert('tracking', (below) => {
          const t = new DirtyTrackingNode(below);
          tracking.push(t);
          return t;
        });
        stacks.set(e.name, stack);
      }
      const claimed = new Set<string>();
      for (const [i, e] of options.exports.entries()) {
        bitmaps.set(
          e.name,
          await ExportBitmaps.open({
            exportName: e.name,
            image: e.image,
            node: tracking[i]!,
            specs: e.bitmaps ?? [],
            discover: options.autoBitmaps ?? true,
            ...(options.bitmapGranularity === undefined ? {} : { granularity: options.bitmapGranularity }),
            claimed,
            publish: (event, fields) => control?.publish(event, fields),
            // a qcow2 image's own bitmaps are loaded, marked in use and tracked (bitmap/qcow2-live.ts)
            imageNode: nodes[i]!,
            log: (message) => options.log?.('warn', message),
          }),
        );
      }
      // with a heartbeat, writes pass the primary's fencing gate (io-fence.ts): demotion, quorum, --fencing
      const fenceRef: { daemon?: Daemon } = {};
      const ioFence = options.heartbeat
        ? new IoFence({
            active: () => fenceRef.daemon?.replicatingPrimary() ?? false,
            ...(options.heartbeat.onNoQuorum ? { onNoQuorum: options.heartbeat.onNoQuorum } : {}),
            quorum: () => fenceRef.daemon?.quorate() ?? false,
            ...(options.heartbeat.lease ? { lease: () => fenceRef.daemon?.lease?.valid() ?? false } : {}),
            // --fencing resource-and-stonith: a write that completes while frozen is not acknowledged until the freeze is lifted
            ...(options.heartbeat.fencing?.policy === 'resource-and-stonith' ? { holdsAcks: true } : {}),
            publish: (event, fields) => control?.publish(event, fields),
            log: (level, message) => options.log?.(level === 'error' ? 'warn' : level, message),
          })
        : undefined;
      const extensions = new Map<number, OptionExtension>();
      const server = new NbdServer({
        optionExtensions: extensions,
        exports: options.exports.map((e) => ({
          name: e.name,
          description: e.description,
          node: ioFence ? new IoFenceFilter(stacks.get(e.name)!.top, ioFence) : stacks.get(e.name)!.top,
          readOnly: options.readOnly,
          minimumBlockSize: options.minimumBlockSize,
        })),
        maxConnections: options.maxConnections,
        handshakeTimeoutMs: options.handshakeTimeoutMs,
        maxBufferBytes: options.maxBufferBytes,
        stallTimeoutMs: options.stallTimeoutMs,
        log: options.log,
        ...(options.tls && options.tls.mode !== 'off' ? { tls: { mode: options.tls.mode, upgrader: options.tls.upgrader, settings: options.tls.settings } } : {}),
      });
      for (const [name, eb] of bitmaps) eb.attach(server.findExport(name)!);
      // Jobs: those persisted by an earlier run are loaded (paused, their writes tracked) before
      // any client can connect.
      const jobExports = new Map<string, JobExport>();
      for (const [i, e] of options.exports.entries()) {
        const base = await sidecarBase(e.image);
        const stack = stacks.get(e.name)!;
        const tr = tracking[i]!;
        jobExports.set(e.name, {
          name: e.name,
          image: e.image,
          imagePath: base.path,
          readOnly: options.readOnly ?? false,
          size: tr.size,
          tracking: tr,
          bitmaps: bitmaps.get(e.name)!,
          get front() {
            return stack.opened('front') ?? tr;
          },
          get imageNode() {
            return stack.image;
          },
          switchFront: (node) => routeFront(stack, tr, node),
          switchImage: (node) => stack.replace('pivot', () => node).then(() => {}),
          keepOpen: (node) => nodes.push(node),
        });
      }
      jobs = new DaemonJobs({
        exports: jobExports,
        publish: (event, fields) => control?.publish(event, fields),
        log: options.log,
        // a job's export (a backup's fleecing view): read-only, on the daemon's own listeners
        serveExport: (name, node, description) => {
          const added = server.addExport({
            name,
            node: completeNode(node),
            readOnly: true,
            ...(description === undefined ? {} : { description }),
            ...(options.minimumBlockSize === undefined ? {} : { minimumBlockSize: options.minimumBlockSize }),
          });
          return {
            name,
            // listeners opened later (a job loaded at start) count too
            get uris() {
              return listeners.map((l) => l.uri(name));
            },
            remove: (reason) => {
              if (server.findExport(name) === added) server.removeExport(name, reason);
            },
          };
        },
      });
      await jobs.loadPersisted();
      for (const p of options.pair ?? []) {
        const i = options.exports.findIndex((e) => e.name === p.export);
        if (i < 0) throw new BlkrepError('ERR_NO_EXPORT', `the pair names export "${p.export}", which the daemon does not serve`, { errno: 'EINVAL' });
        await claimPairDisk(nodes[i]!, p.export);
        const role = await p.start({
          exportName: p.export,
          image: options.exports[i]!.image,
          exportNode: server.findExport(p.export)!.node,
          imageNode: nodes[i]!,
          server,
          bitmaps: bitmaps.get(p.export)!,
          extensions,
          minimumBlockSize: options.minimumBlockSize,
          publish: (event, fields) => control?.publish(event, fields),
          log: options.log ?? (() => {}),
        });
        pair.set(p.export, role);
      }
      pairHost = await startPairHost(options, replication, pair, (event, fields) => control?.publish(event, fields), {
        // --fencing: the data link lost while forwarding fences as a dead peer does (DRBD); its return lifts the freeze
        onLinkLost: (name, reason) => fenceRef.daemon?.linkLost(name, reason),
        onLinkBack: (name) => fenceRef.daemon?.linkBack(name),
      });
      // the fencing terms kept across restarts, read before any client can write: a primary that
      // was replaced (its peer announced itself primary with a higher term) starts demoted
      const terms = options.heartbeat ? await openTerms(options.exports) : undefined;
      const startsPrimary = [...pair.values()].some((r) => r.role === 'primary');
      if (terms && startsPrimary && terms.terms.primarySeen > terms.terms.term) {
        ioFence!.demote(`the term file ${terms.path} says the peer announced itself primary with term ${terms.terms.primarySeen}, above this node's ${terms.terms.term}`);
      }
      for (let i = 0; i < transports.length; i++) {
        const spec = options.listen[i]!;
        try {
          listeners.push(
            await transports[i]!.listen(spec.address, { onConnection: (c) => server.attach(c), ...(options.socketMode === undefined ? {} : { mode: options.socketMode }) }),
          );
        } catch (err) {
          // A plugin's own error (code ERR_…) already says "cannot listen on <transport> <address>".
          const code = (err as { code?: unknown } | null)?.code;
          const own = typeof code === 'string' && code.startsWith('ERR_');
          throw own ? toBlkrepError(err) : toBlkrepError(err, `cannot listen on ${spec.transport} address ${spec.address}`);
        }
      }
      const daemon = new Daemon(server, listeners, undefined, options.pidFile, bitmaps, options.log, jobs, nodes, stacks, pairHost, pair);
      fenceRef.daemon = daemon;
      if (terms) daemon.initTerms(terms.path, terms.terms, startsPrimary);
      daemon.ioFence = ioFence;
      if (options.tls && options.tls.mode !== 'off') {
        const { mode, kind, notAfter, warnings } = options.tls;
        daemon.tls = { mode, kind, ...(notAfter ? { notAfter } : {}), ...(warnings?.length ? { warnings } : {}) };
      }
      if (options.controlPath) {
        control = await ControlServer.listen(options.controlPath, { ...(options.log ? { log: options.log } : {}) });
        (daemon as { control: ControlServer | undefined }).control = control;
        daemon.wireControl(control);
      }
      if (options.tls && options.tls.mode !== 'off') daemon.watchTls(options.tls);
      if (options.heartbeat) heartbeat = await daemon.startHeartbeat(options.heartbeat, options.heartbeats, options.exports);
      if (options.metrics) {
        metrics = new Metrics({ status: () => daemon.status(), jobs: () => jobs?.list() ?? [] });
        await metrics.listen(options.metrics, options.socketMode === undefined ? {} : { socketMode: options.socketMode });
        server.requestObserver = metrics.observe;
        daemon.metrics = metrics;
      }
      // mode 0600 whatever the umask; a symlink planted at the path is replaced, never followed
      if (options.pidFile) await replaceFile(options.pidFile, `${process.pid}\n`, { mode: 0o600, what: 'pid file' });
      return daemon;
    } catch (err) {
      await metrics?.close().catch(() => {});
      await heartbeat?.stop().catch(() => {});
      await control?.close().catch(() => {});
      await Promise.all(listeners.map((l) => l.close().catch(() => {})));
      await jobs?.shutdown().catch(() => {});
      await pairHost?.close().catch(() => {});
      await Promise.all([...pair.values()].map((r) => r.close().catch(() => {})));
      await Promise.all(nodes.map((n) => n.close().catch(() => {})));
      await Promise.all([...bitmaps.values()].map((b) => b.close().catch(() => {})));
      throw err;
    }
  }

  /** TLS as configured (undefined: off) */
  tls: TlsReport | undefined;

  /** The stack of an export (its slots: export-stack.ts), or undefined for a name it does not serve. */
  exportStack(name: string): ExportStack | undefined {
    return this.stacks.get(name);
  }

  /** URIs a client uses, one per listener and export (nbds:// ones when TLS is required). */
  get uris(): string[] {
    const exports = this.server.listExports();
    const uris = this.listeners.flatMap((l) => exports.map((e) => l.uri(e.name)));
    return this.tls?.mode === 'require' ? uris.map((u) => u.replace(/^nbd(\+unix)?:/, 'nbds$1:')) : uris;
  }

  listening(): ListeningEvent {
    const loads = [...this.bitmaps.values()].flatMap((b) => b.loads());
    const jobs = (this.jobs?.list() ?? []).map((q) => ({ id: q.id, type: q.type, export: (q.export as string | null) ?? null, status: q.status }));
    return {
      event: 'listening', uris: this.uris, pid: process.pid,
      ...(loads.length ? { bitmaps: loads } : {}), ...(jobs.length ? { jobs } : {}), ...(this.tls ? { tls: this.tls } : {}),
      ...(this.metrics ? { metrics: this.metrics.url } : {}),
    };
  }

  /** The driver of an export's image (under its dirty-tracking filter). */
  imageDriver(exportName: string): string {
    const image = this.jobs?.exportNode(exportName);
    return image ? image.driver : (this.server.findExport(exportName)?.node.driver ?? 'unknown');
  }

  status(): Omit<ServerStatus, 'exports'> & {
    exports: Array<ServerStatus['exports'][number] & { stack?: Array<{ slot: Slot; driver: string }>; tls: TlsReport['mode'] }>;
    listeners: Array<{ address: string }>;
    control: string | null;
    bitmaps: BitmapInfo[];
    heartbeat?: HeartbeatStatus & { term: string; termFile: string | null; io: IoFenceStatus | null; lease: LeaseStatus | null };
    tls: TlsReport;
  } {
    const s = this.server.status();
    const tls: TlsReport = this.tls ?? { mode: 'off' };
    return {
      ...s,
      // the image under the tracking filter now (another one after a mirror's pivot), the
      // occupied slots of the export's stack, top to bottom (a job's export has none), tls: the
      // daemon's mode, which every export has, and the export's pair role
      exports: [
        ...s.exports.map((e) => {
          const stack = this.stacks.get(e.name);
          const pair = this.pair.get(e.name);
          return { ...e, image: this.jobs?.exportNode(e.name)?.description ?? e.image, driver: this.imageDriver(e.name), tls: tls.mode, ...(stack ? { stack: stack.layers() } : {}), ...(pair ? { pair: pair.status() } : {}) };
        }),
        // a secondary's replica export exists only while a primary holds the link: still listed
        ...[...this.pair].filter(([name]) => !s.exports.some((e) => e.name === name)).map(([name, role]) => ({ name, present: false, tls: tls.mode, pair: role.status() }) as unknown as (typeof s.exports)[number] & { tls: TlsReport['mode'] }),
      ],
      tls,
      listeners: this.listeners.map((l) => ({ address: l.address })),
      control: this.control?.path ?? null,
      bitmaps: [...this.bitmaps.values()].flatMap((b) => b.list()),
      ...(this.heartbeat ? { heartbeat: { ...this.heartbeat.status(), term: this.currentTerm().toString(), termFile: this.termFile ?? null, io: this.ioFence?.status() ?? null, lease: this.lease?.status() ?? null } } : {}),
    };
  }

  private readonly reloaders: Array<() => Promise<string | undefined>> = [];

  /**
   * TLS credentials: SIGHUP re-reads them (renewed certificates, a new PSK file or allow-list;
   * checked first: bad ones leave the old in place, ERR_TLS_CREDENTIALS in the reload's failed),
   * and certificates that expire within 30 days are event tls-expiry (with the warnings) once
   * the control socket is up, at each reload, and once a day.
   */
  private watchTls(tls: DaemonTls): void {
    let settings: Readonly<Record<string, string>> = tls.settings;
    const check = async (fresh: Readonly<Record<string, string>>): Promise<void> => {
      const checked = tls.upgrader.check ? await tls.upgrader.check('server', fresh) : undefined;
      if (!checked) return;
      this.tls = { mode: tls.mode, kind: checked.kind, ...(checked.notAfter ? { notAfter: checked.notAfter } : {}), ...(checked.warnings.length ? { warnings: checked.warnings } : {}) };
      if (checked.warnings.length) this.control?.publish('tls-expiry', { ...(checked.notAfter ? { notAfter: checked.notAfter } : {}), warnings: checked.warnings });
    };
    this.onReload(async () => {
      // a new settings object: the upgrader loads the files again for the connections from now on
      const fresh = { ...settings };
      await check(fresh);
      for (const w of this.tls?.warnings ?? []) this.log('warn', `TLS: ${w}`);
      settings = fresh;
      this.server.setTlsSettings(fresh);
      return 'TLS credentials';
    });
    queueMicrotask(() => void check(settings).catch(() => {}));
    this.tlsTimer = setInterval(() => void check(settings).catch((err: unknown) => this.log('warn', `TLS: ${(err as Error).message}`)), 86_400_000);
    this.tlsTimer.unref();
  }

  private tlsTimer: NodeJS.Timeout | undefined;

  /** Something SIGHUP re-reads (TLS allow-lists …); resolves with what it did, for the log. */
  onReload(fn: () => Promise<string | undefined>): void {
    this.reloaders.push(fn);
  }

  /**
   * SIGHUP: every reloader runs; one that fails leaves its old settings and the others still
   * run. Nothing stops serving. Publishes `reload` (what, failed) and resolves with what was done.
   */
  async reload(): Promise<string[]> {
    const done: string[] = [];
    const failed: string[] = [];
    for (const fn of this.reloaders) {
      try {
        const what = await fn();
        if (what) done.push(what);
      } catch (err) {
        failed.push((err as Error).message);
      }
    }
    this.control?.publish('reload', { what: done, failed });
    if (failed.length) throw new BlkrepError('ERR_RELOAD', failed.join('; '));
    return done;
  }

  /** Stop accepting, finish the requests in flight, flush, close everything. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      clearInterval(this.tlsTimer);
      this.control?.publish('shutdown', { pid: process.pid });
      // the peer hears this node stop beating first: a stopping daemon no longer answers for its data
      if (this.stallTick) clearInterval(this.stallTick);
      await this.heartbeat?.stop().catch(() => {});
      await this.metrics?.close().catch(() => {});
      await Promise.all(this.listeners.map((l) => l.close().catch(() => {})));
      try {
        await this.server.shutdown();
      } finally {
        // Jobs after the export nodes were flushed: a persistent one pauses and saves its state.
        await this.jobs?.shutdown().catch((err: unknown) => this.log('warn', `jobs: ${(err as Error).message}`));
        await this.pairHost?.close().catch((err: unknown) => this.log('warn', `replication: ${(err as Error).message}`));
        for (const r of this.pair.values()) await r.close().catch((err: unknown) => this.log('warn', `pair: ${(err as Error).message}`));
        await Promise.all(this.images.map((n) => n.close().catch(() => {})));
        // After the nodes are flushed and closed: store every bitmap and mark its file clean.
        for (const b of this.bitmaps.values()) {
          await b.close().catch((err: unknown) => this.log('warn', `${(err as Error).message}; the bitmap will load as recovered next time`));
        }
        await this.control?.close().catch(() => {});
        if (this.pidFile) await rm(this.pidFile, { force: true }).catch(() => {});
        this.resolveStopped();
      }
    })();
    return this.stopping;
  }

  /** Start beating to the peer; with auto-failover, a death fences it and calls `failover`. */
  private async startHeartbeat(options: DaemonHeartbeat, registry: HeartbeatRegistry | undefined, exports: ExportSpec[]): Promise<HeartbeatService> {
    if (!registry) throw new BlkrepError('ERR_NO_HEARTBEAT', 'no heartbeat backends are installed', { errno: 'EINVAL' });
    const { autoFailover, fencing, onNoQuorum: _onNoQuorum, lease: leaseSpec, ...service } = options;
    const control = this.control;
    const publish = (event: string, fields: Record<string, unknown>): void => control?.publish(event, fields);
    const log = (level: 'info' | 'warn' | 'error' | 'debug', message: string): void => this.log(level === 'error' ? 'warn' : level, message);
    const d = service.detector;
    // a primary stops writing one interval before its peer may declare it dead (fixed); phi: at its dead threshold
    this.quorumMs = d.kind === 'fixed' ? d.intervalMs * Math.max(1, d.misses - 1) : Infinity;
    if (Number.isFinite(this.quorumMs) && !this.stallTick) {
      this.stallGraceMs = 2 * d.intervalMs;
      this.lastTickAt = performance.now();
      this.stallTick = setInterval(() => {
        const now = performance.now();
        if (now - this.lastTickAt > this.quorumMs) {
          this.stallEndedAt = now;
          log('warn', `this process did not run for ${Math.round(now - this.lastTickAt)} ms, beyond the quorum window of ${this.quorumMs} ms: no quorum until beats sent after the stall arrive (${this.stallGraceMs} ms)`);
        }
        this.lastTickAt = now;
      }, Math.max(10, Math.min(d.intervalMs / 2, 250)));
      this.stallTick.unref();
    }
    const epoch = service.epoch ?? (() => this.currentTerm());
    const generation = service.generation ?? (() => this.firstRole()?.status().gi.current ?? '0000000000000000');
    if (leaseSpec) {
      this.lease = new EtcdLease({ target: leaseSpec.target, node: service.self, ttlS: leaseSpec.ttlS, publish, log: (level, m) => log(level, m) });
      // a primary from the start campaigns at once and keeps trying; a secondary takes the key only to fail over
      if (this.replicatingPrimary()) this.lease.hold();
    }
    const lease = this.lease;
    const auto = autoFailover
      ? new AutoFailover({
          node: service.self,
          peer: service.peer,
          ...(autoFailover.fenceHook === undefined ? {} : { fenceHook: autoFailover.fenceHook }),
          ...(lease ? { acquireLease: () => lease.acquire(leaseSpec!.ttlS * 2000 + 2000) } : {}),
          ...(autoFailover.fenceTimeoutMs === undefined ? {} : { fenceTimeoutMs: autoFailover.fenceTimeoutMs }),
          peerAddresses: service.uris,
          resource: exports.map((e) => e.name).join(' '),
          epoch,
          generation,
          // a secondary of a pair to promote: the failover verb exists in every daemon (a
          // primary's failover means "stop forwarding"), which is no takeover
          hasFailover: () => (control?.has('failover') ?? false) && [...this.pair.values()].some((r) => r.role === 'secondary'),
          checkpointInFlight: () => this.checkpointInFlight(),
          refusal: async () => {
            // the secondary's own rules (secondary-explain.ts failoverRefusal), asked without changing anything
            // (a failover half done is finished whatever its dry run says: the real call does not refuse it)
            const r = (await control!.call('failover', { dryRun: true }).catch(() => null)) as { refusal?: { code: string; message: string } | null; retry?: boolean } | null;
            return r?.refusal && !r.retry ? { code: r.refusal.code, message: r.refusal.message } : null;
          },
          // never forced: only the operator forces a takeover
          failover: () => control!.call('failover', {}),
          publish,
          log,
        })
      : undefined;
    if (fencing && fencing.policy !== 'dont-care') this.fenceCtx = { fencing, node: service.self, peer: service.peer, uris: service.uris, epoch, publish, log };
    const onPeerEvent = (e: PeerEvent): void => {
      void auto?.onPeerEvent(e);
      // a peer dead after its data link was lost (the same outage: the link's loss fenced already) is not fenced again
      if (e.event === 'peer-dead' && this.linksLost.size === 0) this.fencePeer('peer-dead', `peer "${service.peer}" is dead`);
    };
    // this start's incarnation: above the last one kept, whatever the wall clock says now (set
    // back since: a peer would refuse every beat as a replay of the last start's and call this node
    // dead), kept durably before the first beat goes out
    const now = BigInt(Date.now());
    const incarnation = this.incarnation !== undefined && this.incarnation >= now ? this.incarnation + 1n : now;
    if (this.incarnation !== undefined && incarnation !== now) this.log('warn', `the wall clock (${now} ms) is not past this node's last heartbeat incarnation (${this.incarnation}): it was set back; this start's incarnation is ${incarnation}`);
    this.incarnation = incarnation;
    if (this.termFile) this.saveTerms({ incarnation });
    this.heartbeat = await HeartbeatService.start({
      ...service,
      incarnation,
      epoch,
      generation,
      primary: () => this.isPrimary(),
      exports: () => this.beatExports(),
      onPeerOutdated: (e) => {
        const local = this.localExportOf(e.export);
        this.peerOutdated(local, e.generation, log);
        for (const l of this.peerOutdatedListeners) l({ ...e, local });
      },
      registry,
      publish,
      log,
      onPeerEvent,
      onPeerBeat: (b) => this.onPeerBeat(b, service.peer),
      // the pair link is a path too (DRBD pings on its replication connection): a peer answering
      // there is alive and, on a primary, gives quorum, whatever the heartbeat paths say
      pingLink: (heard) => {
        let pinged = false;
        for (const r of this.pair.values()) if (r.pingLink?.(heard)) pinged = true;
        return pinged;
      },
      onLinkHeard: () => {
        const fence = this.ioFence;
        if (fence && (!Number.isFinite(this.quorumMs) || this.quorate())) fence.quorumBack();
      },
    });
    return this.heartbeat;
  }

  private firstRole(): PairRole | undefined {
    return this.pair.values().next().value;
  }

  /**
   * A pair's name in the beats (beat.ts, version 2): the name the pair link uses, the secondary's
   * replica export: a primary's `replicate` URI's export name, a secondary's own export name.
   */
  private pairName(local: string, role: PairRole): string {
    return role instanceof PrimaryRole ? role.uri.exportName : local;
  }

  /** this node's local export whose pair is named `name` in the beats (undefined: none) */
  private localExportOf(name: string): string | undefined {
    for (const [local, role] of this.pair) if (this.pairName(local, role) === name) return local;
    return undefined;
  }

  /** this node's paired exports as a version 2 beat lists them: the pair's name, the generation, Outdated, primary */
  private beatExports(): BeatExport[] {
    return [...this.pair].map(([local, role]) => {
      const st = role.status();
      return { name: this.pairName(local, role), generation: st.gi.current, ...(st.diskState === 'Outdated' ? { outdated: true } : {}), ...(role.role === 'primary' ? { primary: true } : {}) };
    });
  }

  private readonly peerOutdatedListeners: Array<(e: PeerOutdated & { local: string | undefined }) => void> = [];

  /**
   * Be told when a paired export of the heartbeat peer reports its disk Outdated (beat version 2,
   * the event peer-outdated): on a primary, the secondary of the pair `e.export` (this node's
   * export `e.local`) confirmed at generation `e.generation` that it is Outdated, so a primary
   * frozen by --fencing resource-and-stonith may resume that export's writes.
   */
  whenPeerOutdated(listener: (e: PeerOutdated & { local: string | undefined }) => void): void {
    this.peerOutdatedListeners.push(listener);
  }

  private isPrimary(): boolean {
    return [...this.pair.values()].some((r) => r.role === 'primary');
  }

  /** A primary from the start (--replicate-to, replicate): the one quorum and --fencing apply to. */
  replicatingPrimary(): boolean {
    return [...this.pair.values()].some((r) => r instanceof PrimaryRole);
  }

  private checkpointInFlight(): number | null {
    for (const r of this.pair.values()) {
      const sec = (r.status() as { secondary?: { checkpointing?: number | null; committing?: number | null } }).secondary;
      const n = sec?.checkpointing ?? sec?.committing ?? null;
      if (n !== null) return n;
    }
    return null;
  }

  /** The terms kept across restarts (term-file.ts); a primary from the start keeps its own term (at least 1). */
  initTerms(path: string | undefined, terms: Terms, startsPrimary: boolean): void {
    this.termFile = path;
    this.term = terms.term;
    this.peerTerm = terms.seen;
    this.primarySeen = terms.primarySeen;
    this.incarnation = terms.incarnation;
    this.termPrimary = startsPrimary;
    if (startsPrimary && this.term === 0n) this.saveTerms({ term: 1n });
  }

  /** Change terms, durably first (a sync save: terms change only at a takeover or a higher peer term). */
  private saveTerms(change: Partial<Terms>): void {
    const incarnation = change.incarnation ?? this.incarnation;
    const next: Terms = { term: change.term ?? this.term, seen: change.seen ?? this.peerTerm, primarySeen: change.primarySeen ?? this.primarySeen, ...(incarnation === undefined ? {} : { incarnation }) };
    if (this.termFile) {
      try {
        saveTerms(this.termFile, next);
      } catch (err) {
        this.log('warn', `${(err as Error).message}: term ${next.term} is not kept across a restart`);
      }
    }
    this.term = next.term;
    this.peerTerm = next.seen;
    this.primarySeen = next.primarySeen;
  }

  /**
   * The term this node's beats carry, the fencing token. A node promoted while running takes the
   * highest term it ever heard + 1, so the node that took over announces more than the one it
   * replaced. With --lease, a leader's term is at least the create revision of the leader key it
   * holds: etcd's revisions only grow and each creation has its own, so two leaders never share
   * a term. A primary from the start keeps the term it had (initTerms): coming back, it never
   * outbids the node that replaced it. Terms only grow.
   */
  private currentTerm(): bigint {
    const primary = this.isPrimary();
    let next = this.term;
    if (primary && !this.termPrimary) next = (this.term > this.peerTerm ? this.term : this.peerTerm) + 1n;
    this.termPrimary = primary;
    const revision = primary ? (this.lease?.leaderRevision() ?? null) : null;
    if (revision !== null && revision > next) next = revision;
    if (next !== this.term) this.saveTerms({ term: next });
    return this.term;
  }

  /** Has this primary heard its peer (or a witness) recently enough to write? Read on each write. */
  quorate(): boolean {
    const hb = this.heartbeat;
    if (!hb) return false;
    const silence = hb.silenceMs();
    if (silence === null) return false;
    if (!Number.isFinite(this.quorumMs)) return hb.peerState !== 'dead';
    // the stall guard: just after a stall (or during one whose tick has not run yet), beats read now may be stale
    const now = performance.now();
    if (now - this.stallEndedAt < this.stallGraceMs || now - this.lastTickAt > this.quorumMs) return false;
    return silence < this.quorumMs;
  }

  private onPeerBeat(beat: Beat, peer: string): void {
    const primarySeen = beat.primary && beat.epoch > this.primarySeen ? beat.epoch : this.primarySeen;
    if (beat.epoch > this.peerTerm || primarySeen !== this.primarySeen) this.saveTerms({ seen: beat.epoch > this.peerTerm ? beat.epoch : this.peerTerm, primarySeen });
    this.peerBeatToRoles(beat);
    const fence = this.ioFence;
    if (!fence) return;
    if (beat.primary && this.isPrimary() && beat.epoch > this.currentTerm()) {
      fence.demote(`peer "${peer}" announces itself primary with term ${beat.epoch}, this node's is ${this.term}`);
      return;
    }
    // a beat read just after a stall may have been sent before it: it gives no quorum back (stall guard)
    if (!Number.isFinite(this.quorumMs) || this.quorate()) fence.quorumBack();
  }

  /**
   * A peer's beat to the pair roles it speaks for. Version 2: each role hears its own pair's entry
   * (by the pair's name; several entries of that name: the one at this disk's generation, else
   * none, as nothing tells them apart). Version 1 (a peer not upgraded yet): the header's
   * generation is the peer's first export's, given to this node's first role, as before.
   */
  private peerBeatToRoles(beat: Beat): void {
    const entries = beat.exports;
    if (entries === undefined) {
      this.firstRole()?.peerBeat?.({ generation: beat.generation, primary: beat.primary === true });
      return;
    }
    for (const [local, role] of this.pair) {
      if (!role.peerBeat) continue;
      const name = this.pairName(local, role);
      const named = entries.filter((e) => e.name === name);
      const entry = named.length === 1 ? named[0] : named.find((e) => e.generation === role.status().gi.current);
      if (entry) role.peerBeat({ generation: entry.generation, primary: entry.primary === true });
    }
  }


  /**
   * The data link of an export to its secondary was lost while forwarding (PrimaryOptions.onLinkLost,
   * called synchronously from the degrade): with --fencing, fence as for a dead peer. DRBD: a primary
   * that loses its connection freezes I/O and calls fence-peer. Without it, a secondary that did not
   * hear this node's new generation (the next beat) could take over from its last checkpoint and
   * lose every write acknowledged since the cut.
   */
  linkLost(exportName: string, reason: string): void {
    if (!this.fenceCtx) return;
    this.linksLost.add(exportName);
    this.outdatedSinceLoss.delete(exportName);
    this.fencePeer('link-lost', `the data link${exportName ? ` of export "${exportName}"` : ''} to peer "${this.fenceCtx.peer}" was lost (${reason})`);
  }

  /**
   * The secondary of this node's export `local` reports its disk Outdated (beat version 2, at its
   * generation `generation`) after that export's link was lost: it heard this node's new
   * generation and will not take over without --force, which is what the fence hook's "4"
   * confirms. Once every lost link's secondary has, a fencing freeze is lifted (peer-outdated).
   * A report at this node's own generation confirms nothing (not a secondary left behind).
   */
  private peerOutdated(local: string | undefined, generation: string, log: (level: 'info' | 'warn' | 'error' | 'debug', message: string) => void): void {
    if (local === undefined || !this.linksLost.has(local)) return;
    if (this.pair.get(local)?.status().gi.current === generation) return;
    this.outdatedSinceLoss.add(local);
    if (![...this.linksLost].every((x) => this.outdatedSinceLoss.has(x))) return;
    if (this.ioFence?.peerConfirmedOutdated()) log('info', `the secondary reports its disk Outdated (generation ${generation}) since the data link was lost: writes resume`);
  }

  /** The link is back (hello, welcome, resync started): once every lost one is, a fencing freeze is lifted (link-back). */
  linkBack(exportName: string): void {
    if (!this.linksLost.delete(exportName) || this.linksLost.size > 0) return;
    this.ioFence?.linkBack();
  }

  /**
   * --fencing on a primary whose peer is dead or whose data link was lost: resource-and-stonith
   * freezes writes (and holds the acknowledgement of those in flight) until the hook confirms (4, 7),
   * the link is back, the peer confirms it is Outdated, or resume-io; resource-only runs the hook
   * alone. Once per loss: a peer dead after its link was lost is the same outage (not fenced again
   * until the link came back); and one hook at a time: a cause that comes while it runs freezes
   * (if not frozen) and waits for its verdict.
   */
  private fencePeer(cause: 'peer-dead' | 'link-lost', why: string): void {
    const c = this.fenceCtx;
    if (!c || !this.replicatingPrimary()) return;
    const freeze = c.fencing.policy === 'resource-and-stonith';
    if (freeze) this.ioFence?.suspend(`--fencing resource-and-stonith: ${why}; the fence hook runs`, false, cause);
    if (this.fenceRun) {
      c.log('info', `${why}: the fence hook already runs, its verdict counts for this too`);
      return;
    }
    this.fenceRun = this.runFencing(c, cause).finally(() => (this.fenceRun = undefined));
  }

  private async runFencing(c: NonNullable<Daemon['fenceCtx']>, cause: 'peer-dead' | 'link-lost'): Promise<void> {
    const { fencing, peer, publish, log } = c;
    const r = await runFenceHook({
      command: fencing.fenceHook!,
      node: c.node,
      peer,
      peerAddresses: c.uris,
      resource: [...this.pair.keys()].join(' '),
      epoch: c.epoch(),
      ...(fencing.fenceTimeoutMs === undefined ? {} : { timeoutMs: fencing.fenceTimeoutMs }),
    });
    const line = describeFence(r, peer);
    log(r.proceed ? 'info' : 'warn', line);
    publish('fence', { peer, verdict: r.verdict, exitCode: r.exitCode, signal: r.signal, proceed: r.proceed, durationMs: r.durationMs, policy: fencing.policy, cause });
    if (fencing.policy !== 'resource-and-stonith') return;
    if (r.proceed && this.ioFence?.frozen) this.ioFence.resume('fence');
    else if (!r.proceed && this.ioFence?.frozen) log('warn', `writes stay suspended until the peer is fenced: run "blkrep resume-io" once it cannot write`);
  }

  private wireControl(control: ControlServer): void {
    control.register(verb(DAEMON_VERB_SPECS.status, () => this.status()));
    control.register(
      verb(DAEMON_VERB_SPECS['resume-io'], () => {
        if (!this.ioFence) throw new BlkrepError('ERR_NO_HEARTBEAT', 'this daemon has no heartbeat (--heartbeat): its writes are never suspended', { errno: 'EINVAL' });
        return this.ioFence.resume('resume-io');
      }),
    );
    control.register(
      verb(DAEMON_VERB_SPECS.shutdown, () => {
        // Reply first, then stop.
        setImmediate(() => void this.stop());
        return { stopping: true };
      }),
    );
    registerBitmapVerbs(
      control,
      (name) => {
        if (name === undefined) {
          if (this.bitmaps.size === 1) return [...this.bitmaps.values()][0]!;
          throw new BlkrepError('ERR_BAD_REQUEST', `the daemon serves ${this.bitmaps.size} exports: say which with "export" (${[...this.bitmaps.keys()].map((n) => `"${n}"`).join(', ')})`, { errno: 'EINVAL' });
        }
        const eb = this.bitmaps.get(name);
        if (!eb) throw new BlkrepError('ERR_NO_EXPORT', `the daemon has no export "${name}" (it has ${[...this.bitmaps.keys()].map((n) => `"${n}"`).join(', ')})`, { errno: 'EINVAL', details: { export: name } });
        return eb;
      },
      () => [...this.bitmaps.values()],
    );
    this.jobs?.register(control);
    registerPairVerbs(control, this.pair);
    this.pairHost?.register(control);
    this.server.on('connection', (e) => control.publish('connection', e));
    this.server.on('disconnect', (e) => control.publish('disconnect', e));
    this.server.on('refused', (e) => control.publish('refused', e));
  }
}

/**
 * JobExport.switchFront on the stack: a job's front end into the front slot, or (`node` is the
 * tracking filter) the front slot emptied. Resolves when the requests on the old path finished.
 */
function routeFront(stack: ExportStack, tracking: DirtyTrackingNode, node: BlockNode): Promise<void> {
  if (node === tracking) return stack.has('front') ? stack.remove('front').then(() => {}) : Promise.resolve();
  return stack.replace('front', () => node).then(() => {});
}

/** The primary's side of replication: each writable export's filter; --replicate-to started. */
async function startPairHost(
  options: DaemonOptions,
  filters: Array<() => Promise<ReplicationFilter>>,
  roles: Map<string, PairRole>,
  publish: (event: string, fields: Record<string, unknown>) => void,
  link: Pick<PrimaryHostOptions, 'onLinkLost' | 'onLinkBack'>,
): Promise<PrimaryHost | undefined> {
  if (options.readOnly) {
    if (options.replication) throw new BlkrepError('ERR_USAGE', 'a read-only daemon cannot replicate: its exports take no writes', { errno: 'EINVAL' });
    return undefined;
  }
  const exports = new Map<string, PairExport>();
  for (const [i, e] of options.exports.entries()) {
    // a block device can be replicated too: its pair files go to the state directory (util/state-dir.ts)
    const base = isFileSpec(e.image) ? { path: filePath(e.image) } : await sidecarBase(e.image);
    exports.set(e.name, { filter: filters[i]!, imagePath: base.path, ...(base.path === undefined ? { why: base.why } : {}) });
  }
  const host = new PrimaryHost({ exports, roles, transports: options.transports, publish, log: (level, message) => options.log?.(level, message), ...link });
  if (options.replication) await host.replicate(options.replication);
  return host;
}

/**
 * The term file of the first export kept in a file or a block device (term-file.ts; a block
 * device's goes to the state directory, state-dir.ts); none for memory: or NBD images.
 */
async function openTerms(exports: readonly ExportSpec[]): Promise<{ path: string | undefined; terms: Terms }> {
  for (const e of exports) {
    if (!isFileSpec(e.image)) continue;
    const path = termFilePath(sideFileBase(filePath(e.image)));
    return { path, terms: loadTerms(path) };
  }
  return { path: undefined, terms: { term: 0n, seen: 0n, primarySeen: 0n } };
}

/**
 * An export joins a replication pair (a secondary, --replicate-to, blkrep replicate): its disk
 * stops sharing writes with other processes (RawNode.unshareWrites; a qcow2 image never shares
 * them). A process writing it around the pair would change one side only, silently. While one
 * has it open for writing: ERR_IMAGE_LOCKED, naming it.
 */
async function claimPairDisk(node: BlockNode, exportName: string): Promise<void> {
  if (!(node instanceof RawNode)) return;
  try {
    await node.unshareWrites();
  } catch (err) {
    if (!(err instanceof BlkrepError) || err.code !== 'ERR_IMAGE_LOCKED') throw err;
    throw new BlkrepError('ERR_IMAGE_LOCKED', `export "${exportName}" cannot join a replication pair: ${err.message}; a pair member's disk is written only through the pair`, {
      errno: err.errno ?? 'EBUSY',
      cause: err,
      details: err.details ?? {},
    });
  }
}
