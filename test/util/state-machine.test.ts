/**
 * The state machine helper: transitions from the table only, calls in their states only, and the
 * two kinds of refusal (a wrong-state error with a stable code; a bad transition as a bug).
 */
import { describe, expect, it } from 'vitest';
import { BlkrepError } from '../../src/api/errors.js';
import { StateMachine, type MachineSpec } from '../../src/util/state-machine.js';
import { HANDSHAKE_TRANSITIONS } from '../../src/nbd/client-handshake.js';
import { CLIENT_TRANSITIONS } from '../../src/nbd/client.js';
import { SESSION_TRANSITIONS } from '../../src/nbd/client-session.js';
import { HANDSHAKE_STATES } from '../../src/nbd/server-handshake.js';
import { SESSION_PHASES } from '../../src/nbd/server-session.js';
import { TRANSITIONS, VERBS } from '../../src/jobs/job.js';

type Door = 'closed' | 'open' | 'locked';
type Call = 'push' | 'unlock';

const DOOR: MachineSpec<Door, Call> = {
  name: 'door',
  transitions: { closed: ['open', 'locked'], open: ['closed'], locked: ['closed'] },
  calls: { push: ['closed'], unlock: ['locked'] },
};

function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('did not throw');
}

describe('StateMachine', () => {
  it('follows the table, and a goto to the state it is in does nothing', () => {
    const changes: string[] = [];
    const m = new StateMachine(DOOR, 'closed', (to, from) => changes.push(`${from}→${to}`));
    m.goto('open');
    m.goto('open');
    m.goto('closed');
    m.goto('locked');
    expect(m.state).toBe('locked');
    expect(changes).toEqual(['closed→open', 'open→closed', 'closed→locked']);
    expect(m.is('locked', 'open')).toBe(true);
    expect(m.can('open')).toBe(false);
  });

  it('a transition not in the table throws and changes nothing', () => {
    const m = new StateMachine(DOOR, 'locked');
    const err = thrown(() => m.goto('open')) as Error;
    expect(err).not.toBeInstanceOf(BlkrepError);
    expect(err.message).toBe('door: transition locked → open is not allowed');
    expect(m.state).toBe('locked');
  });

  it('a call in a state that does not allow it: ERR_WRONG_STATE with the call, the state and where it is allowed', () => {
    const m = new StateMachine(DOOR, 'open');
    expect(m.allows('push')).toBe(false);
    const err = thrown(() => m.check('push')) as BlkrepError;
    expect(err).toBeInstanceOf(BlkrepError);
    expect(err.code).toBe('ERR_WRONG_STATE');
    expect(err.errno).toBe('EINVAL');
    expect(err.message).toBe('door is open: push needs it to be closed');
    expect(err.details).toEqual({ call: 'push', state: 'open', allowed: ['closed'] });
    m.goto('closed');
    expect(() => m.check('push')).not.toThrow();
  });

  it("the spec's own errors replace the defaults (a user keeps its codes)", () => {
    const m = new StateMachine<Door, Call>({
      ...DOOR,
      wrongState: (call, state, allowed, why) => new BlkrepError('ERR_DOOR_STATE', why ?? `${call} in ${state} (${allowed.join('|')})`),
      badTransition: (from, to) => new BlkrepError('ERR_DOOR_INTERNAL', `${from}→${to}`),
    }, 'closed');
    expect((thrown(() => m.check('unlock')) as BlkrepError).code).toBe('ERR_DOOR_STATE');
    expect((thrown(() => m.check('unlock')) as BlkrepError).message).toBe('unlock in closed (locked)');
    expect(m.wrongState('unlock', 'it is not locked').message).toBe('it is not locked');
    m.goto('open');
    expect((thrown(() => m.goto('locked')) as BlkrepError).code).toBe('ERR_DOOR_INTERNAL');
  });

  it("every table in the engine names only its own states, and the job's verbs only job states", () => {
    const tables: Array<Readonly<Record<string, readonly string[]>>> = [
      HANDSHAKE_TRANSITIONS, CLIENT_TRANSITIONS, SESSION_TRANSITIONS, HANDSHAKE_STATES.transitions, SESSION_PHASES.transitions, TRANSITIONS,
    ];
    for (const t of tables) {
      const states = Object.keys(t);
      for (const next of Object.values(t).flat()) expect(states).toContain(next);
    }
    for (const allowed of Object.values(VERBS)) for (const s of allowed) expect(Object.keys(TRANSITIONS)).toContain(s);
  });
});
