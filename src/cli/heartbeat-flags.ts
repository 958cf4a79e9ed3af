/**
 * serve-nbd's heartbeat flags (--heartbeat and its companions), kept here so the command only
 * spreads them in and passes on what parseHeartbeatFlags returns.
 *
 * Defaults declare a dead peer within 3 s on a quiet network: a beat every 0.5 s, dead after 5
 * missed (2.5 s, plus at most a tenth of an interval), as replication.md §6 recommends; the phi
 * detector with threshold 8 and σ ≥ 100 ms declares it about 1 s after the last beat at 0.5 s.
 */
import os from 'node:os';
import { Flags } from '@oclif/core';
import { BlkrepError } from '../api/errors.js';
import { MAX_NODE_ID_BYTES } from '../heartbeat/beat.js';
import { readHeartbeatKey } from '../heartbeat/key.js';
import type { DetectorSpec } from '../heartbeat/monitor.js';
import { DEFAULT_LEASE_TTL_S, parseLeaseUri } from '../heartbeat/etcd-lease.js';
import { FENCING_POLICIES, ON_NO_QUORUM, type FencingPolicy, type OnNoQuorum } from '../heartbeat/io-fence.js';
import type { DaemonHeartbeat } from '../serve/daemon.js';

export const DEFAULT_HEARTBEAT_INTERVAL_S = 0.5;
export const DEFAULT_HEARTBEAT_MISSES = 5;
export const DEFAULT_PHI_THRESHOLD = 8;
export const DEFAULT_FENCE_TIMEOUT_S = 60;

export const heartbeatFlags = {
  heartbeat: Flags.string({
    description: 'watch the peer over this path (repeatable, one per path; the peer is dead only when every path is silent): udp://PEER:PORT[?listen=ADDR:PORT], tcp://PEER:PORT[?listen=ADDR:PORT], file:///PATH, exec:COMMAND, etcd://HOST:PORT/PREFIX',
    helpValue: 'URI',
    multiple: true,
    multipleNonGreedy: true,
    dependsOn: ['peer-id'],
  }),
  'peer-id': Flags.string({ description: 'the peer\'s node id, as it gives it with --node-id; beats from any other node are refused', helpValue: 'ID', dependsOn: ['heartbeat'] }),
  'node-id': Flags.string({ description: 'this node\'s id in its beats [default: the host name]', helpValue: 'ID', dependsOn: ['heartbeat'] }),
  'heartbeat-interval': Flags.string({ description: `seconds between beats (0.01 to 60) [default: ${DEFAULT_HEARTBEAT_INTERVAL_S}]`, helpValue: 'SECONDS', dependsOn: ['heartbeat'] }),
  'heartbeat-misses': Flags.integer({ description: `--detector fixed: the peer is dead after this many intervals without a beat [default: ${DEFAULT_HEARTBEAT_MISSES}]`, min: 1, max: 1000, helpValue: 'N', dependsOn: ['heartbeat'] }),
  detector: Flags.string({ description: 'how silence is judged: fixed (interval x misses) or phi (phi-accrual, adapts to the observed jitter) [default: fixed]', options: ['fixed', 'phi'], helpValue: 'fixed|phi', dependsOn: ['heartbeat'] }),
  'phi-threshold': Flags.string({ description: `--detector phi: the peer is dead at this phi (suspect at half); 8 as Akka and Cassandra, 10-12 on noisy networks [default: ${DEFAULT_PHI_THRESHOLD}]`, helpValue: 'PHI', dependsOn: ['heartbeat'] }),
  'heartbeat-key': Flags.string({ description: 'sign and check beats with HMAC-SHA256 and the key in FILE (16 to 4096 bytes, the same on both nodes); FILE must be a regular file owned by the daemon\'s user or root, with no access for group or others (mode 0600 or 0400): anything else is refused at start (ERR_HEARTBEAT_KEY)', helpValue: 'FILE', dependsOn: ['heartbeat'] }),
  'auto-failover': Flags.boolean({ description: 'when the peer is dead, run --fence-hook and, only if it says the peer is outdated (4) or fenced (7), call failover (never forced); with --lease, take the etcd leader key first (the lease fences: --fence-hook may be left out)', dependsOn: ['heartbeat'] }),
  lease: Flags.string({ description: 'leadership on etcd (its v3 JSON gateway): the primary holds a lease and the key PREFIX/leader and stops writing at its own deadline (last keep-alive + TTL - TTL/4) when it loses them; the secondary fails over only after taking the key', helpValue: 'etcd://HOST:PORT/PREFIX', dependsOn: ['heartbeat'] }),
  'lease-ttl': Flags.string({ description: `--lease: the lease's TTL in seconds (1 to 60) [default: ${DEFAULT_LEASE_TTL_S}]`, helpValue: 'SECONDS', dependsOn: ['lease'] }),
  'fence-hook': Flags.string({ description: 'command that fences the peer (before an automatic failover; on a primary with --fencing, when the peer is dead or the data link is lost), with the peer in BLKREP_PEER (and DRBD_PEER); DRBD fence-peer exit codes: 3 inconsistent, 4 outdated, 5 unreachable, 6 refused, 7 fenced', helpValue: 'CMD', dependsOn: ['heartbeat'] }),
  fencing: Flags.string({ description: 'on a primary (--replicate-to), when the peer is dead or the data link to it is lost: dont-care (keep writing; a failover may lose the writes acknowledged since the cut), resource-only (run --fence-hook), resource-and-stonith (freeze writes, run --fence-hook, resume when it says 4 or 7, the link is back, or on blkrep resume-io) [default: dont-care]', options: [...FENCING_POLICIES], helpValue: 'POLICY', dependsOn: ['heartbeat'] }),
  'on-no-quorum': Flags.string({ description: 'on a primary (--replicate-to): when neither the peer nor a witness (any --heartbeat path) was heard within the bound, suspend-io (writes wait for a beat or blkrep resume-io) or io-error (writes fail with EIO) [default: keep writing]', options: [...ON_NO_QUORUM], helpValue: 'ACTION', dependsOn: ['heartbeat'] }),
  'fence-timeout': Flags.string({ description: `kill the fence hook after this many seconds (then it counts as not fenced) [default: ${DEFAULT_FENCE_TIMEOUT_S}]`, helpValue: 'SECONDS', dependsOn: ['fence-hook'] }),
};

export interface HeartbeatFlagValues {
  heartbeat?: string[];
  'peer-id'?: string;
  'node-id'?: string;
  'heartbeat-interval'?: string;
  'heartbeat-misses'?: number;
  detector?: string;
  'phi-threshold'?: string;
  'heartbeat-key'?: string;
  'auto-failover'?: boolean;
  'fence-hook'?: string;
  'fence-timeout'?: string;
  fencing?: string;
  'on-no-quorum'?: string;
  lease?: string;
  'lease-ttl'?: string;
}

function usage(message: string, details: Record<string, unknown> = {}): never {
  throw new BlkrepError('ERR_USAGE', message, { errno: 'EINVAL', details });
}

function seconds(flag: string, text: string, min: number, max: number): number {
  const v = Number(text);
  if (text.trim() === '' || !Number.isFinite(v) || v < min || v > max) usage(`--${flag} "${text}" is not a number of seconds from ${min} to ${max}`, { flag, value: text });
  return v;
}

function nodeId(flag: string, id: string): string {
  const bytes = Buffer.byteLength(id);
  if (bytes < 1 || bytes > MAX_NODE_ID_BYTES || /[\u0000-\u001f\u007f]/.test(id)) usage(`--${flag} "${id}" is not a node id (1 to ${MAX_NODE_ID_BYTES} bytes, no control characters)`, { flag, value: id });
  return id;
}

/** The daemon's heartbeat settings, or undefined without --heartbeat. Reads the key file. */
export async function parseHeartbeatFlags(flags: HeartbeatFlagValues): Promise<DaemonHeartbeat | undefined> {
  const uris = flags.heartbeat ?? [];
  if (uris.length === 0) return undefined;
  const peer = nodeId('peer-id', flags['peer-id'] ?? '');
  const self = nodeId('node-id', flags['node-id'] ?? os.hostname());
  if (self === peer) usage(`--node-id "${self}" and --peer-id are the same: each node needs its own id${flags['node-id'] === undefined ? ' (the default is the host name: give --node-id)' : ''}`);
  const intervalMs = Math.round(seconds('heartbeat-interval', flags['heartbeat-interval'] ?? String(DEFAULT_HEARTBEAT_INTERVAL_S), 0.01, 60) * 1000);
  const kind = flags.detector ?? 'fixed';
  if (kind === 'fixed' && flags['phi-threshold'] !== undefined) usage('--phi-threshold is for --detector phi');
  if (kind === 'phi' && flags['heartbeat-misses'] !== undefined) usage('--heartbeat-misses is for --detector fixed');
  let detector: DetectorSpec;
  if (kind === 'phi') {
    const text = flags['phi-threshold'] ?? String(DEFAULT_PHI_THRESHOLD);
    const threshold = Number(text);
    if (text.trim() === '' || !Number.isFinite(threshold) || threshold < 1 || threshold > 100) usage(`--phi-threshold "${text}" is not a number from 1 to 100`, { value: text });
    detector = { kind: 'phi', intervalMs, threshold };
  } else {
    detector = { kind: 'fixed', intervalMs, misses: flags['heartbeat-misses'] ?? DEFAULT_HEARTBEAT_MISSES };
  }
  const key = flags['heartbeat-key'] === undefined ? undefined : await readHeartbeatKey(flags['heartbeat-key']);
  const fenceHook = flags['fence-hook'];
  if (flags['auto-failover'] && flags.lease === undefined && (fenceHook === undefined || fenceHook.trim() === '')) usage('--auto-failover needs --fence-hook (or --lease, whose expiry fences): a takeover never skips fencing');
  const lease = flags.lease === undefined ? undefined : { target: parseLeaseUri(flags.lease), ttlS: seconds('lease-ttl', flags['lease-ttl'] ?? String(DEFAULT_LEASE_TTL_S), 1, 60) };
  const policy = (flags.fencing ?? 'dont-care') as FencingPolicy;
  if (policy !== 'dont-care' && (fenceHook === undefined || fenceHook.trim() === '')) usage(`--fencing ${policy} needs --fence-hook: the command that fences the peer`);
  if (fenceHook !== undefined && !flags['auto-failover'] && policy === 'dont-care') usage('--fence-hook is run by --auto-failover (on a secondary) or --fencing resource-only|resource-and-stonith (on a primary): give one of them');
  const fenceTimeoutMs = flags['fence-timeout'] === undefined ? undefined : Math.round(seconds('fence-timeout', flags['fence-timeout'], 0.1, 3600) * 1000);
  return {
    uris,
    self,
    peer,
    intervalMs,
    detector,
    ...(key ? { key } : {}),
    ...(flags['auto-failover'] ? { autoFailover: { ...(fenceHook === undefined ? {} : { fenceHook }), ...(fenceTimeoutMs === undefined ? {} : { fenceTimeoutMs }) } } : {}),
    ...(lease ? { lease } : {}),
    ...(policy === 'dont-care' ? {} : { fencing: { policy, fenceHook: fenceHook!, ...(fenceTimeoutMs === undefined ? {} : { fenceTimeoutMs }) } }),
    ...(flags['on-no-quorum'] === undefined ? {} : { onNoQuorum: flags['on-no-quorum'] as OnNoQuorum }),
  };
}
