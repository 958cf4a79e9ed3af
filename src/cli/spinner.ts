/**
 * A spinner (ora) on stderr while a command waits for one step (a job to complete or cancel, a
 * checkpoint): only when stderr is a terminal, TERM is not "dumb" and the command is not printing
 * JSON. Otherwise nothing is written at all, so scripts, pipes and logs see no control codes.
 * The spinner is cleared when the wait ends, either way; ora shows the cursor again at exit,
 * Ctrl-C included. stdin is left alone (no raw mode), so Ctrl-C stays a signal.
 */
import ora from 'ora';

export interface SpinnerOptions {
  /** false: print nothing (e.g. --json) */
  enabled: boolean;
  /** where to draw (default process.stderr); tests pass a fake terminal */
  stream?: NodeJS.WriteStream;
}

/** Whether a spinner would be drawn on `stream`. */
export function spinnerShown(options: SpinnerOptions): boolean {
  const stream = options.stream ?? process.stderr;
  return options.enabled && stream.isTTY === true && process.env.TERM !== 'dumb';
}

/** Run `work` with a spinner saying `text`; resolves or rejects as `work` does. */
export async function withSpinner<T>(text: string, options: SpinnerOptions, work: () => Promise<T>): Promise<T> {
  if (!spinnerShown(options)) return work();
  const stream = options.stream ?? process.stderr;
  const spinner = ora({ text, stream, discardStdin: false, isEnabled: true, hideCursor: true }).start();
  try {
    return await work();
  } finally {
    spinner.stop();
  }
}

export interface Spinner {
  /** clear it (and show the cursor again); idempotent */
  stop(): void;
}

/**
 * A spinner that runs until stop(): for a wait whose end comes from elsewhere (a job that has
 * not reported its length yet, before the progress bar takes over). Nothing is drawn where
 * spinnerShown() says no.
 */
export function startSpinner(text: string, options: SpinnerOptions): Spinner {
  if (!spinnerShown(options)) return { stop() {} };
  const spinner = ora({ text, stream: options.stream ?? process.stderr, discardStdin: false, isEnabled: true, hideCursor: true }).start();
  let stopped = false;
  return {
    stop() {
      if (stopped) return;
      stopped = true;
      spinner.stop();
    },
  };
}
