/**
 * Failure detectors (replication.md §6): one per heartbeat path, fed the monotonic arrival time of
 * each accepted beat, asked for the path's state at a given instant. Pure: time is a number the
 * caller passes (milliseconds on a monotonic clock), so tests drive them with a fake clock.
 *
 * - fixed: dead once no beat came for interval × misses (DRBD's ping-timeout and ko-count idea);
 *   suspect once a beat is over one interval late.
 * - phi: φ accrual (Hayashibara et al. 2004, as Akka's PhiAccrualFailureDetector computes it):
 *   φ = −log10(1 − F(Δt)), F the normal CDF of the last `window` inter-arrival times, σ at least
 *   minStdMs, the mean lengthened by acceptablePauseMs. Dead at φ ≥ threshold, suspect at half.
 */

export type PathState = 'unknown' | 'alive' | 'suspect' | 'dead';

export interface FailureDetector {
  /** a beat arrived at `now` */
  heartbeat(now: number): void;
  state(now: number): PathState;
  /** φ at `now` (the phi detector); null for the fixed one */
  phi(now: number): number | null;
  /** the last beat's arrival, undefined before the first */
  readonly lastBeat: number | undefined;
}

export interface FixedOptions {
  intervalMs: number;
  misses: number;
}

export class FixedDetector implements FailureDetector {
  lastBeat: number | undefined;

  constructor(private readonly options: FixedOptions) {}

  heartbeat(now: number): void {
    this.lastBeat = now;
  }

  state(now: number): PathState {
    if (this.lastBeat === undefined) return 'unknown';
    const silent = now - this.lastBeat;
    if (silent >= this.options.intervalMs * this.options.misses) return 'dead';
    if (silent >= this.options.intervalMs * 2) return 'suspect';
    return 'alive';
  }

  phi(): null {
    return null;
  }
}

export interface PhiOptions {
  /** the expected interval, seeding the history before real samples exist */
  intervalMs: number;
  /** φ at which the path is dead (Akka and Cassandra: 8) */
  threshold: number;
  /** the smallest σ used, so a very regular history does not make φ jump (Akka: 100 ms) */
  minStdMs: number;
  /** pauses this long are no sign of failure (GC, a busy host); added to the mean */
  acceptablePauseMs: number;
  /** inter-arrival samples kept (Akka: 1000) */
  window: number;
}

export const PHI_DEFAULTS: Omit<PhiOptions, 'intervalMs'> = { threshold: 8, minStdMs: 100, acceptablePauseMs: 0, window: 1000 };

export class PhiDetector implements FailureDetector {
  lastBeat: number | undefined;
  private readonly samples: number[] = [];
  private next = 0;
  private sum = 0;
  private squares = 0;
  private readonly options: PhiOptions;

  constructor(options: Pick<PhiOptions, 'intervalMs'> & Partial<PhiOptions>) {
    this.options = { ...PHI_DEFAULTS, ...options };
    // Akka's first-heartbeat estimate: the interval, σ a quarter of it, as two samples.
    const sigma = this.options.intervalMs / 4;
    this.add(this.options.intervalMs - sigma);
    this.add(this.options.intervalMs + sigma);
  }

  heartbeat(now: number): void {
    if (this.lastBeat !== undefined) this.add(now - this.lastBeat);
    this.lastBeat = now;
  }

  private add(sample: number): void {
    if (this.samples.length < this.options.window) {
      this.samples.push(sample);
    } else {
      const old = this.samples[this.next]!;
      this.sum -= old;
      this.squares -= old * old;
      this.samples[this.next] = sample;
      this.next = (this.next + 1) % this.options.window;
    }
    this.sum += sample;
    this.squares += sample * sample;
  }

  phi(now: number): number {
    if (this.lastBeat === undefined) return 0;
    const n = this.samples.length;
    const mean = this.sum / n;
    const variance = Math.max(0, this.squares / n - mean * mean);
    const sigma = Math.max(Math.sqrt(variance), this.options.minStdMs);
    return phiOf(now - this.lastBeat, mean + this.options.acceptablePauseMs, sigma);
  }

  state(now: number): PathState {
    if (this.lastBeat === undefined) return 'unknown';
    const phi = this.phi(now);
    if (phi >= this.options.threshold) return 'dead';
    if (phi >= this.options.threshold / 2) return 'suspect';
    return 'alive';
  }
}

/**
 * φ for a silence of `elapsed` given the mean and σ of inter-arrivals, with the logistic
 * approximation of the normal CDF Akka uses (error under 1e-4, and no overflow far in the tail).
 */
export function phiOf(elapsed: number, mean: number, sigma: number): number {
  const y = (elapsed - mean) / sigma;
  const e = Math.exp(-y * (1.5976 + 0.070566 * y * y));
  return Math.max(0, elapsed > mean ? -Math.log10(e / (1 + e)) : -Math.log10(1 - 1 / (1 + e)));
}
