/**
 * A progress bar with rate and ETA on stderr — only when stderr is a terminal, the command is
 * not printing JSON, and --no-progress was not given. Otherwise every call does nothing.
 */
import cliProgress from 'cli-progress';
import { formatSize } from '../util/size.js';

export interface Progress {
  update(done: number): void;
  stop(): void;
}

const silent: Progress = { update() {}, stop() {} };

/** Bars on screen; at exit, whatever the reason, the cursor they hid is shown again. */
let active = 0;
const showCursor = (): void => {
  if (active > 0) process.stderr.write('\x1b[?25h');
};

export function progressBar(label: string, total: number, options: { enabled: boolean }): Progress {
  if (!options.enabled || !process.stderr.isTTY || total <= 0) return silent;
  const started = Date.now();
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: `${label} [{bar}] {percentage}% | {done} of {size} | {rate}/s | ETA {eta_formatted}`,
      hideCursor: true,
      clearOnComplete: true,
      etaBuffer: 50,
      fps: 10,
    },
    cliProgress.Presets.shades_classic,
  );
  bar.start(total, 0, { done: formatSize(0), size: formatSize(total), rate: formatSize(0) });
  if (active++ === 0) process.on('exit', showCursor);
  let stopped = false;
  return {
    update(done: number) {
      const seconds = Math.max((Date.now() - started) / 1000, 0.001);
      bar.update(done, { done: formatSize(done), size: formatSize(total), rate: formatSize(Math.round(done / seconds)) });
    },
    stop() {
      if (stopped) return;
      stopped = true;
      bar.stop();
      if (--active === 0) process.off('exit', showCursor);
    },
  };
}
