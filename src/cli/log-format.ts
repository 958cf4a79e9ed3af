/**
 * The daemon's log lines on stderr (serve-nbd --log-format):
 *   text  "TIME LEVEL blkrep serve-nbd: MESSAGE", TIME in ISO 8601 (UTC, milliseconds), LEVEL
 *         debug|info|warn; when stderr is the journal (systemd sets JOURNAL_STREAM to its
 *         device:inode), "<P>blkrep serve-nbd: MESSAGE" instead: journald stamps every line
 *         itself and reads the sd-daemon(3) priority prefix <P> (7 debug, 6 info, 4 warning),
 *         so journalctl -p warning works and no second timestamp clutters the journal
 *   json  one object per line with the stable keys time (ISO 8601, UTC), level, pid and message,
 *         for journald/Loki/jq (the same under the journal)
 * debug lines only with --verbose.
 */
import { fstatSync } from 'node:fs';
import type { LogLevel } from '../nbd/server.js';

export type LogFormat = 'text' | 'json';

const PRIORITY: Record<LogLevel, number> = { debug: 7, info: 6, warn: 4 };

export interface LogLineOptions {
  /** the time of the line (default now) */
  now?: Date;
  /** stderr is connected to the journal: text lines get <P> and no timestamp */
  journal?: boolean;
}

export function formatLogLine(format: LogFormat, level: LogLevel, message: string, options: LogLineOptions = {}): string {
  const now = options.now ?? new Date();
  if (format === 'json') return `${JSON.stringify({ time: now.toISOString(), level, pid: process.pid, message })}\n`;
  if (options.journal) return `<${PRIORITY[level]}>blkrep serve-nbd: ${message}\n`;
  return `${now.toISOString()} ${level} blkrep serve-nbd: ${message}\n`;
}

/**
 * Whether file descriptor `fd` is the journal's stream: JOURNAL_STREAM is "DEVICE:INODE" of it
 * (systemd.exec(5)); a child that inherited the variable but not the stream does not match.
 */
export function isJournalStream(fd = 2, env: NodeJS.ProcessEnv = process.env): boolean {
  const m = /^(\d+):(\d+)$/.exec(env.JOURNAL_STREAM ?? '');
  if (!m) return false;
  try {
    const st = fstatSync(fd, { bigint: true });
    return st.dev === BigInt(m[1]!) && st.ino === BigInt(m[2]!);
  } catch {
    return false;
  }
}

export function daemonLogger(format: LogFormat, verbose: boolean, write: (line: string) => void = (line) => void process.stderr.write(line), journal: boolean = isJournalStream()): (level: LogLevel, message: string) => void {
  return (level, message) => {
    if (level === 'debug' && !verbose) return;
    write(formatLogLine(format, level, message, { journal }));
  };
}
