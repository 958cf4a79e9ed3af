import { Flags } from '@oclif/core';
import { summary } from '../cli/bitmap-command.js';
import type { BitmapInfo, LoadState } from '../bitmap/ops.js';
import { BlkrepCommand } from '../cli/base.js';
import { ControlClient } from '../control/client.js';
import { findControl } from '../cli/control-path.js';
import { controlFlag } from '../cli/job-command.js';
import type { ServerStatus } from '../nbd/server.js';
import type { HeartbeatStatus } from '../heartbeat/service.js';
import { formatSize } from '../util/size.js';
import type { PairStatus } from '../pair/role.js';

/** an async primary: its on-congestion policy, and for block how long writes waited */
function congestionText(p: PairStatus): string {
  if (!p.onCongestion) return '';
  const c = p.congestion;
  return p.onCongestion === 'block' && c ? ` (on congestion block: ${c.waits} writes waited ${c.waitedMs} ms, ${c.waiting} waiting)` : ` (on congestion ${p.onCongestion})`;
}

/** One line of an export's pair state. */
export function pairLine(p: PairStatus): string {
  const age = p.lastCheckpointAgeMs === null ? 'no checkpoint yet' : `last checkpoint ${(p.lastCheckpointAgeMs / 1000).toFixed(1)} s ago`;
  const kind = p.peerKind === 'plain' ? ' (plain NBD: no checkpoints)' : '';
  return `${p.role} → ${p.peer ?? 'no peer'}${kind}, ${p.protocol ?? '-'}, link ${p.link}, epoch ${p.epoch}, ${age}, disk ${p.diskState}, queue ${formatSize(p.queueBytes)}${congestionText(p)}, behind ${formatSize(p.bytesBehind)}, generation ${p.gi.current}`;
}

/** Lines under the pair line: a split brain that holds the link (either side), a refused replicate, a secondary without a restore point. */
export function pairNotes(p: PairStatus): string[] {
  const x = p as PairStatus & {
    splitBrain?: { explanation: string };
    secondary?: { splitBrain?: { keeps: string | null; explanation: string } | null; noRestorePoint?: string | null; hiddenRecreated?: string | null };
    refused?: { code: string; message: string };
  };
  const sb = x.splitBrain ?? (x.secondary?.splitBrain && x.secondary.splitBrain.keeps !== 'primary' ? x.secondary.splitBrain : undefined);
  const notes: string[] = [];
  if (p.link === 'split-brain' && sb) notes.push(`split brain: ${sb.explanation}`);
  if (x.refused && x.refused.code !== 'ERR_PAIR_SPLIT_BRAIN') notes.push(`replicate refused: ${x.refused.code}: ${x.refused.message}`);
  if (p.role === 'secondary' && x.secondary?.noRestorePoint) notes.push(`no checkpoint to roll back to (not promotable): ${x.secondary.noRestorePoint}`);
  if (p.role === 'secondary' && x.secondary?.hiddenRecreated) notes.push(x.secondary.hiddenRecreated);
  return notes;
}

type DaemonStatus = ServerStatus & { listeners?: Array<{ address: string }>; control?: string | null; bitmaps?: BitmapInfo[]; heartbeat?: HeartbeatStatus; tls?: { mode: string; kind?: string; notAfter?: string } };

/** How a bitmap was loaded, for a person: "loaded clean", "recovered after a crash (…)", "ALL-DIRTY (…)". */
function describeLoad(l: LoadState): string {
  if (l.state === 'clean') return 'loaded clean';
  if (l.state === 'recovered') {
    const distrusted = l.pagesDistrusted ? `, ${l.pagesDistrusted} damaged page${l.pagesDistrusted === 1 ? '' : 's'} loaded all-dirty` : '';
    return `recovered after an unclean stop (${l.extentsReplayed} activity-log extent${l.extentsReplayed === 1 ? '' : 's'} replayed${distrusted})`;
  }
  return `loaded ALL-DIRTY (${l.fault}): ${l.reason}`;
}

export default class Status extends BlkrepCommand {
  static override summary = 'Show what a running serve-nbd daemon is doing.';

  static override description = `Asks the daemon behind a control socket for its exports, connections, dirty bitmaps, and request and byte counters, and prints them (or, with --json, the daemon's status object as it is).`;

  static override examples = [
    { description: 'Show the status of the daemon started with --control /run/blkrep/ctl.sock', command: '<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock' },
    { description: 'Count the open connections from a script', command: "<%= config.bin %> <%= command.id %> --control /run/blkrep/ctl.sock --json | jq '.connections | length'" },
  ];

  static override flags = {
    control: controlFlag,
    timeout: Flags.integer({ description: 'give up after this many seconds', default: 10, min: 1, helpValue: 'SECONDS' }),
  };

  async run(): Promise<DaemonStatus> {
    const { flags } = await this.parse(Status);
    const client = await ControlClient.connect(await findControl(flags.control), { timeoutMs: flags.timeout * 1000 });
    let status: DaemonStatus;
    try {
      status = (await client.request('status')) as DaemonStatus;
    } finally {
      client.close();
    }
    if (!this.jsonEnabled()) this.print(status);
    return status;
  }

  private printHeartbeat(h: HeartbeatStatus): void {
    const d = h.detector;
    const detector = d.kind === 'fixed' ? `fixed, ${d.intervalMs} ms x ${d.misses}` : `phi, ${d.intervalMs} ms, threshold ${d.threshold ?? 8}`;
    this.log('');
    this.log(`Heartbeat: node "${h.node}", peer "${h.peer}" ${h.state.toUpperCase()} (${detector}${h.keyed ? ', signed' : ', NOT signed: no --heartbeat-key'})`);
    for (const p of h.paths) {
      const last = p.lastBeatAgoMs === null ? 'never heard' : `last beat ${p.lastBeatAgoMs} ms ago`;
      const refused = Object.entries(p.rejected).map(([why, n]) => `${why} ${n}`).join(', ');
      this.log(`  ${p.uri}  ${p.state}  ${last}${p.phi === null ? '' : `, phi ${p.phi}`}, ${p.beats} beats${refused ? `, refused: ${refused}` : ''}${p.errors ? `, ${p.errors} errors (${p.lastError ?? ''})` : ''}`);
    }
  }

  private print(s: DaemonStatus): void {
    this.log(`blkrep serve-nbd, pid ${s.pid}, up ${s.uptimeSeconds} s${s.shuttingDown ? ', shutting down' : ''}`);
    if (s.listeners?.length) this.log(`Listening on: ${s.listeners.map((l) => l.address).join(', ')}`);
    if (s.tls && s.tls.mode !== 'off') this.log(`TLS: ${s.tls.mode} for every export (${s.tls.kind ?? 'tls'}${s.tls.notAfter ? `, certificates valid until ${s.tls.notAfter}` : ''})`);
    this.log('');
    this.log('Exports:');
    for (const e of s.exports) {
      const pair = (e as { pair?: PairStatus }).pair;
      const pairText = pair ? [`      pair: ${pairLine(pair)}`, ...pairNotes(pair).map((n) => `      ${n}`)].join('\n') : undefined;
      if ((e as { present?: boolean }).present === false) {
        this.log(`  "${e.name}"  (not served: a secondary's replica export waits for a primary)`);
        if (pairText) this.log(pairText);
        continue;
      }
      const reqs = Object.entries(e.requests).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(', ') || 'none';
      this.log(`  "${e.name}"  ${e.image}  ${formatSize(e.size)}${e.readOnly ? '  read-only' : ''}`);
      this.log(`      connections ${e.connections} (${e.totalConnections} since start), read ${formatSize(e.bytesRead)}, written ${formatSize(e.bytesWritten)}, errors ${e.errors}`);
      this.log(`      requests: ${reqs}`);
      if (pairText) this.log(pairText);
    }
    const bitmaps = s.bitmaps ?? [];
    this.log('');
    this.log(`Bitmaps: ${bitmaps.length || 'none'}`);
    for (const b of bitmaps) {
      this.log(`  "${b.name}"  export "${b.export ?? ''}"  ${summary(b)}`);
      const where = b.persistent && b.file !== null ? `file ${b.file}` : 'in memory only (lost when the daemon stops)';
      this.log(`      ${where}${b.epoch !== null ? `, recording checkpoint ${b.epoch}` : ''}, ${describeLoad(b.loadState)}`);
    }
    if (s.heartbeat) this.printHeartbeat(s.heartbeat);
    this.log('');
    this.log(`Connections: ${s.connections.length}`);
    if (s.buffers) {
      const b = s.buffers;
      this.log(`  buffers: ${formatSize(b.used)} held of ${formatSize(b.limit)} (--max-buffer)${b.waiting ? `, ${b.waiting} connection(s) waiting for room` : ''}`);
    }
    for (const c of s.connections) {
      this.log(`  #${c.id}  ${c.peer}  export ${c.export === null ? '-' : `"${c.export}"`}  ${c.state}  in flight ${c.inFlight}  requests ${c.requests}`);
    }
  }
}
