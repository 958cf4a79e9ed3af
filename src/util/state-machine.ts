/**
 * One state machine helper for the engine's protocols and jobs (after libnbd's generated state
 * machine): the states, the transitions between them and the states each call may be made in
 * are data, given once in a MachineSpec; the machine refuses anything else.
 *
 * Two kinds of refusal, kept apart:
 * - a call made in a state that does not allow it is the caller's mistake (a user's verb on a
 *   job at the wrong time): a typed error with a stable code, built by the spec's `wrongState`
 *   so each user keeps the code its callers know (the job's ERR_JOB_STATE);
 * - a transition the table does not list is a bug in the code driving the machine: the spec's
 *   `badTransition` (default: a plain Error naming the machine and both states).
 */
import { BlkrepError } from '../api/errors.js';

export interface MachineSpec<S extends string, C extends string = never> {
  /** for messages: "job 3", "handshake", "NbdClient" */
  readonly name: string;
  /** every transition the machine allows: state → the states that may follow it */
  readonly transitions: Readonly<Record<S, readonly S[]>>;
  /** the states each call may be made in */
  readonly calls?: Readonly<Record<C, readonly S[]>>;
  /** the error for `call` made in `state` (default: BlkrepError ERR_WRONG_STATE) */
  readonly wrongState?: (call: C, state: S, allowed: readonly S[], why?: string) => Error;
  /** the error for a transition not in the table (default: a plain Error, as a bug) */
  readonly badTransition?: (from: S, to: S) => Error;
}

/** The default wrong-state error: what was called, in which state, and where it is allowed. */
export function wrongStateError(name: string, call: string, state: string, allowed: readonly string[], why?: string): BlkrepError {
  const message = why ?? `${name} is ${state}: ${call} needs it to be ${allowed.join(' or ')}`;
  return new BlkrepError('ERR_WRONG_STATE', message, { errno: 'EINVAL', details: { call, state, allowed: [...allowed] } });
}

export class StateMachine<S extends string, C extends string = never> {
  private current: S;

  constructor(
    readonly spec: MachineSpec<S, C>,
    initial: S,
    /** called after every change of state (not for a goto to the state it is in) */
    private readonly onChange?: (to: S, from: S) => void,
  ) {
    this.current = initial;
  }

  get state(): S {
    return this.current;
  }

  /** true when the machine is in one of `states` */
  is(...states: S[]): boolean {
    return states.includes(this.current);
  }

  /** true when the table allows the current state → `to` */
  can(to: S): boolean {
    return this.spec.transitions[this.current].includes(to);
  }

  /**
   * Move to `to`. Going to the state the machine is in does nothing; a transition the table does
   * not list throws `badTransition` and changes nothing.
   */
  goto(to: S): void {
    const from = this.current;
    if (from === to) return;
    if (!this.can(to)) throw this.spec.badTransition?.(from, to) ?? new Error(`${this.spec.name}: transition ${from} → ${to} is not allowed`);
    this.current = to;
    this.onChange?.(to, from);
  }

  /** the states `call` may be made in */
  allowedFor(call: C): readonly S[] {
    return this.spec.calls?.[call] ?? [];
  }

  /** true when `call` may be made now */
  allows(call: C): boolean {
    return this.allowedFor(call).includes(this.current);
  }

  /** Throws the spec's wrong-state error unless `call` may be made now. */
  check(call: C): void {
    if (!this.allows(call)) throw this.wrongState(call);
  }

  /** The wrong-state error for `call` now, with `why` in place of the standard message. */
  wrongState(call: C, why?: string): Error {
    const allowed = this.allowedFor(call);
    return this.spec.wrongState?.(call, this.current, allowed, why) ?? wrongStateError(this.spec.name, call, this.current, allowed, why);
  }
}
