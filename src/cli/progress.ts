/**
 * A progress bar with rate and ETA on stderr — only when stderr is a terminal, the command is
 * not printing JSON, and --no-progress was not given. Otherwise every call does nothing.
 * A terminal with TERM=dumb (Emacs shells, some serial consoles) cannot redraw a line: it gets
 * plain lines instead, one at each tenth of the way (`mirror: 30% 19.2 MiB of 64 MiB, 5.1 MiB/s`).
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

export function progressBar(label: string, total: number, options: { enabled: boolean; stream?: NodeJS.WriteStream }): Progress {
  const stream = options.stream ?? process.stderr;
  if (!options.enabled || !stream.isTTY || total <= 0) return silent;
  const started = Date.now();
  if (process.env['TERM'] === 'dumb') return plainLines(label, total, started, stream);
  const bar = new cliProgress.SingleBar(
    {
      stream,
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

/** TERM=dumb: a plain line at each tenth of the way, nothing redrawn, no cursor control. */
function plainLines(label: string, total: number, started: number, stream: NodeJS.WriteStream): Progress {
  let shown = 0; // tenths already printed
  let stopped = false;
  return {
    update(done: number) {
      if (stopped) return;
      const tenths = Math.min(10, Math.floor((done * 10) / total));
      if (tenths <= shown) return;
      shown = tenths;
      const seconds = Math.max((Date.now() - started) / 1000, 0.001);
      stream.write(`${label}: ${tenths * 10}% ${formatSize(Math.min(done, total))} of ${formatSize(total)}, ${formatSize(Math.round(done / seconds))}/s\n`);
    },
    stop() {
      stopped = true;
    },
  };
}
