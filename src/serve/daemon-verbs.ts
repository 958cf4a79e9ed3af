/**
 * The serve-nbd daemon's own control verbs (status, shutdown) as a table; the bitmap verbs are in
 * src/bitmap/control-verbs.ts, the job verbs in src/jobs/daemon-jobs.ts.
 */
import { NO_ARGS, type VerbSpec } from '../control/verb.js';

export const DAEMON_VERB_SPECS = {
  status: {
    name: 'status',
    summary: "The daemon's state: exports, NBD connections, listeners, the control socket, bitmaps.",
    args: NO_ARGS,
    result: '{exports (each with stack: its occupied slots top to bottom, [{slot, driver}]; tls: the mode), connections, listeners: [{address}], control, bitmaps: BitmapInfo[], tls: {mode, kind?, notAfter?, warnings?}, heartbeat? (with --heartbeat: node, peer, state, detector, paths [{uri, state, lastBeatAgoMs, phi, beats, rejected}]), …}',
  },
  shutdown: {
    name: 'shutdown',
    summary: 'Stop the daemon cleanly (as SIGTERM does); the reply comes first.',
    args: NO_ARGS,
    result: '{stopping: true}',
    events: ['shutdown'],
  },
  'resume-io': {
    name: 'resume-io',
    summary: "Let a primary's suspended writes go again (--fencing resource-and-stonith after a fence hook that did not confirm, on a dead peer or a lost data link; --on-no-quorum suspend-io): as drbdadm resume-io. Refused on a demoted node.",
    args: NO_ARGS,
    result: '{resumed (false: nothing was suspended), waiting (writes let go)}',
    events: ['io-resumed'],
    errors: ['ERR_DEMOTED', 'ERR_NO_HEARTBEAT'],
  },
} as const satisfies Record<string, VerbSpec>;

/** Events the daemon publishes that no verb causes. */
export const DAEMON_EVENTS: ReadonlyArray<{ name: string; fields: string }> = [
  { name: 'connection', fields: 'an NBD client connected: id, peer' },
  { name: 'disconnect', fields: 'an NBD client went away: id, peer, export, reason' },
  { name: 'refused', fields: 'an NBD connection was refused: peer, reason' },
  { name: 'shutdown', fields: 'the daemon is stopping: pid' },
  { name: 'reload', fields: 'SIGHUP re-read what can be re-read: what (done), failed (messages); serving goes on either way' },
  { name: 'tls-expiry', fields: 'a TLS certificate of the daemon expires within 30 days (or has): notAfter, warnings; when the control socket is up, at each SIGHUP, once a day' },
  { name: 'peer-alive', fields: 'the heartbeat peer is heard (first beat, or back): peer, from, silentMs, paths [{path, state, lastBeatAgoMs, phi}]' },
  { name: 'peer-suspect', fields: 'the heartbeat peer is late on every path (fixed: a beat over an interval late; phi: half the threshold): peer, from, silentMs, paths' },
  { name: 'peer-dead', fields: 'every heartbeat path and the pair link are silent past their bound: peer, from, silentMs, paths, link' },
  { name: 'heartbeat-paths-down', fields: 'every heartbeat path is dead but the peer answers pings on the pair link, so it is not declared dead: peer, paths, link {state, lastBeatAgoMs}' },
  { name: 'heartbeat-paths-up', fields: 'a heartbeat path is heard again after heartbeat-paths-down: peer, paths, link' },
  { name: 'peer-outdated', fields: 'a paired export of the heartbeat peer reports its disk Outdated (beat version 2; once, and again at another generation): peer, export, generation, incarnation' },
  { name: 'fence', fields: 'the fence hook ran (--auto-failover; a primary with --fencing: cause peer-dead or link-lost): peer, verdict, exitCode, signal, proceed, durationMs, policy, cause' },
  { name: 'auto-failover', fields: 'automatic failover after a peer death: peer, failedOver, fence, code, reason' },
  { name: 'failover-deferred', fields: 'automatic failover waits for the checkpoint in flight to commit: peer, checkpoint' },
  { name: 'io-suspended', fields: "the primary's writes wait (no quorum, or --fencing resource-and-stonith: the peer dead or the data link lost, while the hook runs; writes in flight are not acknowledged meanwhile): reason, cause (no-quorum, peer-dead, link-lost)" },
  { name: 'io-resumed', fields: "the primary's writes go again: by (quorum, fence, resume-io, link-back, peer-outdated), waiting" },
  { name: 'lease-acquired', fields: 'this node leads on etcd (--lease): key, revision, ttlS' },
  { name: 'lease-lost', fields: 'this node no longer leads on etcd: its deadline passed or etcd said the lease expired; writes fail with EIO: key, reason' },
  { name: 'demoted', fields: 'the peer announced itself primary with a higher term: every write fails with EIO: reason, refusedWaiting' },
];
