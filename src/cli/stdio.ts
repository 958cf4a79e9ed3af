/**
 * Output of the short commands without node's process.stdout/process.stderr streams, through
 * bin/run.js's blkrep.stdio (fs.writeSync until the first error, then the stream: see bin/run.js).
 * Run any other way (tests importing a command, `node dist/src/...`), the streams as before.
 */
interface Stdio {
  write(fd: 1 | 2, text: string | Uint8Array): void;
  whenOpen(fd: 1 | 2): { on(event: 'error', fn: (err: NodeJS.ErrnoException) => void): unknown };
}

const stdio = (globalThis as { [key: symbol]: Stdio | undefined })[Symbol.for('blkrep.stdio')];

export function writeStdout(text: string | Uint8Array): void {
  if (stdio) stdio.write(1, text);
  else process.stdout.write(text);
}

export function writeStderr(text: string | Uint8Array): void {
  if (stdio) stdio.write(2, text);
  else process.stderr.write(text);
}

/** An 'error' handler for stdout's stream, applied when there is one (only a stream has write errors). */
export function onStdoutError(fn: (err: NodeJS.ErrnoException) => void): void {
  if (stdio) stdio.whenOpen(1).on('error', fn);
  else process.stdout.on('error', fn);
}
