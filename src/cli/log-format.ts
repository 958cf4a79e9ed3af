/**
 * The daemon's log lines on stderr (serve-nbd --log-format): text, "blkrep serve-nbd: MESSAGE",
 * or json, one object per line with the stable keys time (ISO 8601, UTC), level
 * (debug|info|warn), pid and message, for journald/Loki/jq. debug lines only with --verbose.
 */
import type { LogLevel } from '../nbd/server.js';

export type LogFormat = 'text' | 'json';

export function formatLogLine(format: LogFormat, level: LogLevel, message: string, now: Date = new Date()): string {
  if (format === 'json') return `${JSON.stringify({ time: now.toISOString(), level, pid: process.pid, message })}\n`;
  return `blkrep serve-nbd: ${message}\n`;
}

export function daemonLogger(format: LogFormat, verbose: boolean, write: (line: string) => void = (line) => void process.stderr.write(line)): (level: LogLevel, message: string) => void {
  return (level, message) => {
    if (level === 'debug' && !verbose) return;
    write(formatLogLine(format, level, message));
  };
}
