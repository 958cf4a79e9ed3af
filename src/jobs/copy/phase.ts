/**
 * A job's phase: one declared union and one transition function (the table of the phases each
 * phase may go to), instead of a set of booleans. A transition the table does not allow is a
 * bug of the job: ERR_JOB_INTERNAL, naming the job, both phases and the allowed ones.
 */
import { BlkrepError } from '../../api/errors.js';

export class Phase<P extends string> {
  private current: P;

  constructor(
    private readonly owner: string,
    private readonly table: Readonly<Record<P, readonly P[]>>,
    initial: P,
  ) {
    this.current = initial;
  }

  get now(): P {
    return this.current;
  }

  is(...phases: P[]): boolean {
    return phases.includes(this.current);
  }

  /** Go to `to` (staying put is allowed); throws ERR_JOB_INTERNAL when the table does not allow it. */
  to(to: P): void {
    const from = this.current;
    if (from === to) return;
    if (!this.table[from].includes(to)) {
      throw new BlkrepError('ERR_JOB_INTERNAL', `${this.owner}: no phase transition from ${from} to ${to} (allowed: ${this.table[from].join(', ') || 'none'})`, {
        errno: 'EINVAL',
        details: { from, to, allowed: [...this.table[from]] },
      });
    }
    this.current = to;
  }
}
