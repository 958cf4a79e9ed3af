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
    result: '{exports (each with stack: its occupied slots top to bottom, [{slot, driver}]), connections, listeners: [{address}], control, bitmaps: BitmapInfo[], …}',
  },
  shutdown: {
    name: 'shutdown',
    summary: 'Stop the daemon cleanly (as SIGTERM does); the reply comes first.',
    args: NO_ARGS,
    result: '{stopping: true}',
    events: ['shutdown'],
  },
} as const satisfies Record<string, VerbSpec>;

/** Events the daemon publishes that no verb causes. */
export const DAEMON_EVENTS: ReadonlyArray<{ name: string; fields: string }> = [
  { name: 'connection', fields: 'an NBD client connected: id, peer' },
  { name: 'disconnect', fields: 'an NBD client went away: id, peer, export, reason' },
  { name: 'refused', fields: 'an NBD connection was refused: peer, reason' },
  { name: 'shutdown', fields: 'the daemon is stopping: pid' },
];
