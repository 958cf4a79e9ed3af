/**
 * The names of the events a daemon publishes, for `blkrep events --event/--until` to refuse a
 * name that can never come. Kept here, not taken from EVENT_SCHEMAS (output-schemas.ts), so the
 * events command does not load zod and every schema at start-up; test/cli/operator.test.ts
 * checks the two lists are the same.
 */
export const EVENT_NAMES: readonly string[] = [
  'auto-failover', 'bitmap-added', 'bitmap-checkpoint', 'bitmap-cleared', 'bitmap-disabled', 'bitmap-enabled', 'bitmap-filled',
  'bitmap-merged', 'bitmap-removed', 'cbw-failed', 'checkpoint', 'checkpoint-failed', 'connection', 'demoted', 'disconnect',
  'failover-deferred', 'failover-done', 'failover-failed', 'failover-started', 'fence', 'heartbeat-paths-down', 'heartbeat-paths-up', 'io-resumed', 'io-suspended',
  'job-cancelled', 'job-completed', 'job-copy-mode', 'job-error', 'job-ready', 'job-status-change', 'lease-acquired',
  'lease-lost', 'pair-refused', 'peer-alive', 'peer-dead', 'peer-outdated', 'peer-suspect', 'primary-io-error', 'refused', 'reload',
  'replication-congested', 'replication-connected', 'replication-degraded', 'replication-plain', 'replication-uncongested',
  'restore-point-lost', 'resync-done', 'resync-started', 'salvage', 'secondary-failed', 'shutdown', 'split-brain', 'tls-expiry',
];

/** A name --event or --until can never match: the usage error's message (undefined when known). */
export function unknownEventName(flag: string, name: string): string | undefined {
  if (EVENT_NAMES.includes(name)) return undefined;
  const near = EVENT_NAMES.filter((n) => n.includes(name) || name.includes(n));
  return `--${flag} ${JSON.stringify(name)}: no event has this name${near.length ? ` (did you mean ${near.join(', ')}?)` : ''}; the names: ${EVENT_NAMES.join(', ')}`;
}
