/**
 * The pair's verbs on the daemon's control socket. `failover` dispatches on the export's pair
 * role (PAIR-SPEC): a secondary promotes itself (src/pair/secondary.ts), a primary stops
 * forwarding and keeps serving (src/pair/primary*.ts).
 */
import { z } from 'zod';
import { BlkrepError } from '../api/errors.js';
import type { ControlVerbRegistry } from '../api/control.js';
import { arg, verb, type VerbSpec } from '../control/verb.js';
import type { PairRole } from './role.js';

export const PAIR_VERB_SPECS = {
  failover: {
    name: 'failover',
    summary: "Fail over a paired export: on a secondary, promote it (commit the view into the disk, serve it read-write with a new generation); on a primary, stop forwarding and keep serving.",
    args: z.object({
      export: arg.string().nullish().describe('the paired export; may be left out when the daemon has one'),
      to: arg.oneOf(['checkpoint', 'latest']).nullish().describe('checkpoint (default): the last committed checkpoint plus the secondary\'s own writes; latest: what the primary last wrote (sync mode only)'),
      dryRun: arg.bool().nullish().describe('change nothing, explain what would happen'),
      force: arg.bool().nullish().describe('fail over an Outdated secondary'),
      retry: arg.bool().nullish().describe('finish a failover that failed halfway (failover-failed), with the target it recorded'),
    }),
    result: 'FailoverResult {role, dryRun, to, epoch, gi, bytes, ms, explanation, …}',
    events: ['failover-started', 'failover-done', 'failover-failed'],
    errors: ['ERR_PAIR_ROLE', 'ERR_PAIR_OUTDATED', 'ERR_PAIR_INCONSISTENT', 'ERR_PAIR_STATE', 'ERR_PAIR_FAILOVER_FAILED', 'ERR_NO_EXPORT'],
  },
} as const satisfies Record<string, VerbSpec>;

/** The paired export a request names (or the only one). */
export function findRole(roles: ReadonlyMap<string, PairRole>, name: string | null | undefined): PairRole {
  if (name === undefined || name === null) {
    if (roles.size === 1) return [...roles.values()][0]!;
    if (roles.size === 0) throw new BlkrepError('ERR_PAIR_ROLE', 'no export of this daemon is in a replication pair (serve-nbd --secondary or --replicate-to)', { errno: 'EINVAL' });
    throw new BlkrepError('ERR_BAD_REQUEST', `the daemon has ${roles.size} paired exports: say which with "export" (${[...roles.keys()].map((n) => `"${n}"`).join(', ')})`, { errno: 'EINVAL' });
  }
  const role = roles.get(name);
  if (!role) throw new BlkrepError('ERR_NO_EXPORT', `the daemon has no paired export "${name}" (paired: ${[...roles.keys()].map((n) => `"${n}"`).join(', ') || 'none'})`, { errno: 'EINVAL', details: { export: name } });
  return role;
}

export function registerPairVerbs(control: ControlVerbRegistry, roles: ReadonlyMap<string, PairRole>): void {
  control.register(
    verb(PAIR_VERB_SPECS.failover, (a) => {
      const role = findRole(roles, a.export);
      if (a.retry && role.role === 'primary') {
        throw new BlkrepError('ERR_PAIR_STATE', `no failover is half done on export "${a.export ?? [...roles.keys()][0]}": it is a primary (failover --retry finishes a secondary's failed failover)`, { errno: 'EINVAL' });
      }
      return role.failover({ to: a.to ?? 'checkpoint', dryRun: a.dryRun ?? false, force: a.force ?? false, retry: a.retry ?? false });
    }),
  );
}
