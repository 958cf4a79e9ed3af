/**
 * serve-nbd --metrics: Prometheus text on GET /metrics (prom-client), over TCP HOST:PORT or a
 * Unix socket (unix:PATH). Everything but the request latency histogram is read from the daemon's
 * own status at scrape time, so a daemon without --metrics pays nothing and one with it pays one
 * clock read per request. The names are a contract (README "Metrics", serve-nbd(1)).
 */
import { createServer, type Server } from 'node:http';
import { chmod, rm } from 'node:fs/promises';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { BlkrepError } from '../api/errors.js';
import type { BitmapInfo } from '../bitmap/ops.js';
import type { ServerStatus } from '../nbd/server.js';
import type { RequestObserver } from '../nbd/server-session.js';
import type { PairStatus } from '../pair/role.js';
import type { HeartbeatStatus } from '../heartbeat/service.js';
import type { JobInfo } from '../jobs/job.js';

/** Where the metrics listen: TCP host and port, or a Unix socket path. */
export type MetricsAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/** What the metrics read at each scrape (the daemon's status; structural, so this file needs no daemon). */
export interface MetricsSource {
  status(): Pick<ServerStatus, 'buffers'> & {
    exports: Array<Partial<ServerStatus['exports'][number]> & { name: string; pair?: PairStatus }>;
    bitmaps: BitmapInfo[];
    heartbeat?: HeartbeatStatus;
  };
  jobs(): JobInfo[];
}

/** `HOST:PORT`, `[V6]:PORT`, `:PORT` (127.0.0.1) or `unix:PATH`; anything else is ERR_USAGE naming the value. */
export function parseMetricsAddress(text: string): MetricsAddress {
  if (text.startsWith('unix:')) {
    const path = text.slice(5);
    if (path === '') throw usage(text, 'unix: names no socket path');
    return { kind: 'unix', path };
  }
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]*)):(\d+)$/.exec(text);
  if (!m) throw usage(text, 'expected HOST:PORT, [IPV6]:PORT, :PORT or unix:PATH');
  const port = Number(m[3]);
  if (port > 65535) throw usage(text, `port ${port} is over 65535`);
  return { kind: 'tcp', host: m[1] ?? (m[2] || '127.0.0.1'), port };
}

function usage(text: string, why: string): BlkrepError {
  return new BlkrepError('ERR_USAGE', `--metrics "${text}": ${why}`, { errno: 'EINVAL' });
}

/** Request latency buckets, seconds: 25 µs to 10 s. */
const LATENCY_BUCKETS = [0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10];

const LINK_STATES = ['connecting', 'connected', 'degraded', 'resyncing', 'split-brain', 'none'] as const;
const PATH_STATES = ['unknown', 'alive', 'suspect', 'dead'] as const;

export class Metrics {
  readonly registry = new Registry();
  private readonly latency: Histogram<'export' | 'command'>;
  private server: Server | undefined;
  /** where it listens, as a URL (http://HOST:PORT/metrics or unix:PATH) */
  url = '';

  constructor(private readonly source: MetricsSource) {
    const r = this.registry;
    collectDefaultMetrics({ register: r });
    this.latency = new Histogram({ name: 'blkrep_nbd_request_duration_seconds', help: 'NBD requests by export and command: seconds from the parsed request to its reply', labelNames: ['export', 'command'], buckets: LATENCY_BUCKETS, registers: [r] });
    const requests = new Counter({ name: 'blkrep_nbd_requests_total', help: 'NBD requests by export and command', labelNames: ['export', 'command'], registers: [r] });
    const read = new Counter({ name: 'blkrep_nbd_read_bytes_total', help: 'bytes read by NBD clients', labelNames: ['export'], registers: [r] });
    const written = new Counter({ name: 'blkrep_nbd_written_bytes_total', help: 'bytes written by NBD clients', labelNames: ['export'], registers: [r] });
    const errors = new Counter({ name: 'blkrep_nbd_errors_total', help: 'NBD requests answered with an error', labelNames: ['export'], registers: [r] });
    const connectionsTotal = new Counter({ name: 'blkrep_nbd_connections_total', help: 'NBD connections that reached transmission', labelNames: ['export'], registers: [r] });
    const connections = new Gauge({ name: 'blkrep_nbd_connections', help: 'NBD connections in transmission now', labelNames: ['export'], registers: [r] });
    const exportSize = new Gauge({ name: 'blkrep_export_size_bytes', help: 'size of each export', labelNames: ['export'], registers: [r] });
    const buffer = new Gauge({ name: 'blkrep_nbd_buffer_bytes', help: 'bytes held for payloads and unsent replies of all connections (--max-buffer)', registers: [r] });
    const bufferLimit = new Gauge({ name: 'blkrep_nbd_buffer_limit_bytes', help: '--max-buffer', registers: [r] });
    const dirty = new Gauge({ name: 'blkrep_bitmap_dirty_bytes', help: 'bytes a dirty bitmap marks dirty', labelNames: ['export', 'bitmap'], registers: [r] });
    const jobOffset = new Gauge({ name: 'blkrep_job_offset_bytes', help: 'bytes a job has processed', labelNames: ['id', 'type', 'export'], registers: [r] });
    const jobLength = new Gauge({ name: 'blkrep_job_length_bytes', help: 'bytes a job expects to process in all', labelNames: ['id', 'type', 'export'], registers: [r] });
    const jobRate = new Gauge({ name: 'blkrep_job_rate_bytes_per_second', help: 'a job\'s recent rate', labelNames: ['id', 'type', 'export'], registers: [r] });
    const jobStatus = new Gauge({ name: 'blkrep_job_status', help: '1 for the status each job is in', labelNames: ['id', 'type', 'export', 'status'], registers: [r] });
    const pairLink = new Gauge({ name: 'blkrep_pair_link', help: '1 for the state the pair link of an export is in', labelNames: ['export', 'role', 'state'], registers: [r] });
    const pairQueue = new Gauge({ name: 'blkrep_pair_queue_bytes', help: 'bytes waiting in the forwarding queue (primary)', labelNames: ['export'], registers: [r] });
    const pairBehind = new Gauge({ name: 'blkrep_pair_behind_bytes', help: 'bytes the peer misses (the peer bitmap)', labelNames: ['export'], registers: [r] });
    const pairWaits = new Counter({ name: 'blkrep_pair_congestion_waits_total', help: 'writes that waited for room in the forwarding queue (async primary, on-congestion block)', labelNames: ['export'], registers: [r] });
    const pairWaited = new Counter({ name: 'blkrep_pair_congestion_wait_seconds_total', help: 'seconds writes waited for room in the forwarding queue, added up (async primary, on-congestion block)', labelNames: ['export'], registers: [r] });
    const pairEpoch = new Gauge({ name: 'blkrep_pair_epoch', help: 'last committed checkpoint epoch', labelNames: ['export'], registers: [r] });
    const pairAge = new Gauge({ name: 'blkrep_pair_checkpoint_age_seconds', help: 'seconds since the last committed checkpoint (absent before the first)', labelNames: ['export'], registers: [r] });
    const hbState = new Gauge({ name: 'blkrep_heartbeat_peer', help: '1 for the state the peer is in', labelNames: ['peer', 'state'], registers: [r] });
    const hbPhi = new Gauge({ name: 'blkrep_heartbeat_phi', help: 'phi of each heartbeat path (phi detector)', labelNames: ['path'], registers: [r] });
    const hbAge = new Gauge({ name: 'blkrep_heartbeat_last_beat_age_seconds', help: 'seconds since the last accepted beat of each path', labelNames: ['path'], registers: [r] });
    const hbRejected = new Gauge({ name: 'blkrep_heartbeat_rejected', help: 'beats refused on each path, by reason', labelNames: ['path', 'reason'], registers: [r] });

    // Everything but the histogram is the daemon's status at scrape time, set afresh each time.
    this.refresh = () => {
      const s = this.source.status();
      for (const m of [requests, read, written, errors, connectionsTotal, connections, exportSize, dirty, jobOffset, jobLength, jobRate, jobStatus, pairLink, pairQueue, pairWaits, pairWaited, pairBehind, pairEpoch, pairAge, hbState, hbPhi, hbAge, hbRejected]) m.reset();
      buffer.set(s.buffers.used);
      bufferLimit.set(s.buffers.limit);
      for (const e of s.exports) {
        const l = { export: e.name };
        for (const [command, n] of Object.entries(e.requests ?? {})) requests.inc({ ...l, command }, n);
        if (e.size !== undefined) {
          read.inc(l, e.bytesRead ?? 0);
          written.inc(l, e.bytesWritten ?? 0);
          errors.inc(l, e.errors ?? 0);
          connectionsTotal.inc(l, e.totalConnections ?? 0);
          connections.set(l, e.connections ?? 0);
          exportSize.set(l, e.size);
        }
        const p = e.pair;
        if (p) {
          for (const state of LINK_STATES) pairLink.set({ ...l, role: p.role, state }, p.link === state ? 1 : 0);
          pairQueue.set(l, p.queueBytes);
          pairBehind.set(l, p.bytesBehind);
          if (p.congestion) {
            pairWaits.inc(l, p.congestion.waits);
            pairWaited.inc(l, p.congestion.waitedMs / 1000);
          }
          pairEpoch.set(l, p.epoch);
          if (p.lastCheckpointAgeMs !== null) pairAge.set(l, p.lastCheckpointAgeMs / 1000);
        }
      }
      for (const b of s.bitmaps) dirty.set({ export: b.export ?? '', bitmap: b.name }, b.dirtyBytes);
      for (const q of this.source.jobs()) {
        const l = { id: q.id, type: q.type, export: typeof q.export === 'string' ? q.export : '' };
        jobOffset.set(l, q.offset);
        jobLength.set(l, q.length);
        jobRate.set(l, q.rate);
        jobStatus.set({ ...l, status: q.status }, 1);
      }
      const hb = s.heartbeat;
      if (hb) {
        for (const state of PATH_STATES) hbState.set({ peer: hb.peer, state }, hb.state === state ? 1 : 0);
        for (const p of hb.paths) {
          if (p.phi !== null) hbPhi.set({ path: p.uri }, p.phi);
          if (p.lastBeatAgoMs !== null) hbAge.set({ path: p.uri }, p.lastBeatAgoMs / 1000);
          for (const [reason, n] of Object.entries(p.rejected)) hbRejected.set({ path: p.uri, reason }, n ?? 0);
        }
      }
    };
  }

  private readonly refresh: () => void;

  /** For NbdServer.requestObserver: one histogram observation per request. */
  readonly observe: RequestObserver = (exportName, command, seconds) => {
    this.latency.observe({ export: exportName, command }, seconds);
  };

  /** The Prometheus text exposition, as of now. */
  async text(): Promise<string> {
    this.refresh();
    return this.registry.metrics();
  }

  /** Serve GET /metrics at `address` (ERR_METRICS_LISTEN when it cannot). */
  async listen(address: MetricsAddress, options: { socketMode?: number } = {}): Promise<void> {
    const server = createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0];
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('only GET /metrics\n');
        return;
      }
      if (path !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: the metrics are at /metrics\n');
        return;
      }
      this.text().then(
        (body) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(req.method === 'HEAD' ? undefined : body),
        (err: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${err.message}\n`),
      );
    });
    // a scraper that keeps its connection open must not hold up the daemon's stop
    server.keepAliveTimeout = 5000;
    if (address.kind === 'unix') await rm(address.path, { force: true }).catch(() => {});
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => {
        const where = address.kind === 'unix' ? `unix:${address.path}` : `${address.host}:${address.port}`;
        reject(new BlkrepError('ERR_METRICS_LISTEN', `cannot serve metrics on ${where}: ${err.message}`, { errno: 'EINVAL', details: { address: where, cause: err.code ?? null } }));
      });
      if (address.kind === 'unix') server.listen(address.path, () => resolve());
      else server.listen(address.port, address.host, () => resolve());
    });
    if (address.kind === 'unix') {
      await chmod(address.path, options.socketMode ?? 0o600);
      this.url = `unix:${address.path}`;
    } else {
      const a = server.address() as { address: string; port: number };
      const host = a.address.includes(':') ? `[${a.address}]` : a.address;
      this.url = `http://${host}:${a.port}/metrics`;
    }
    this.server = server;
  }

  async close(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}
