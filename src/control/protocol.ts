/**
 * The control socket's wire format, shared by the server and the client: JSON lines (see
 * README.md). Pure: no sockets here.
 */

/** A request line the server accepts. 1 MiB per line at most. */
export const MAX_REQUEST_LINE_BYTES = 1 << 20;

/** The server's caps per control connection and on their number (ControlServerOptions). */
export const DEFAULT_CONTROL_LIMITS = {
  maxClients: 64,
  maxPendingRequests: 16,
  pauseAtUnreadBytes: 256 << 10,
  maxUnreadBytes: 4 << 20,
  stallTimeoutMs: 30_000,
} as const;

/** What a reply may echo: a string, a finite number, or null (absent, or not echoable). */
export type ControlRequestId = string | number | null;

export interface ControlRequest {
  /** a string or a number, echoed in the reply (null when absent) */
  id?: ControlRequestId;
  cmd: string;
  args?: Record<string, unknown>;
}

export interface ControlErrorBody {
  code: string;
  message: string;
}

export type ControlReply =
  | { id: unknown; ok: true; result: unknown }
  | { id: unknown; ok: false; error: ControlErrorBody };

/** A line the server sends to subscribers: the event's name, its fields, then the time. */
export interface ControlEvent {
  event: string;
  /** ISO 8601, when the server published it */
  time: string;
  [field: string]: unknown;
}

/** JSON.stringify that writes bigints as numbers when exact, as strings otherwise. */
export function toJsonLine(value: unknown): string {
  return (
    JSON.stringify(value, (_key, v: unknown) =>
      typeof v === 'bigint' ? (Number.isSafeInteger(Number(v)) ? Number(v) : v.toString()) : v,
    ) + '\n'
  );
}

export function isJsonObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Splits a byte stream into lines ("\n", with an optional "\r" before it) without letting one line
 * grow past `maxBytes`. Once a line is too long the splitter gives nothing more: the connection
 * is beyond repair.
 */
export class LineSplitter {
  private parts: Buffer[] = [];
  private pending = 0;
  private broken = false;

  constructor(readonly maxBytes: number) {}

  /** The complete lines in `chunk` (with what came before), and whether a line was too long. */
  push(chunk: Buffer): { lines: string[]; tooLong: boolean } {
    const lines: string[] = [];
    if (this.broken) return { lines, tooLong: true };
    let start = 0;
    for (let nl = chunk.indexOf(0x0a); nl !== -1; nl = chunk.indexOf(0x0a, start)) {
      const length = this.pending + (nl - start);
      if (length > this.maxBytes) return this.break(lines);
      this.parts.push(chunk.subarray(start, nl));
      let line = Buffer.concat(this.parts, length).toString('utf8');
      if (line.endsWith('\r')) line = line.slice(0, -1);
      lines.push(line);
      this.parts = [];
      this.pending = 0;
      start = nl + 1;
    }
    if (start < chunk.length) {
      this.pending += chunk.length - start;
      if (this.pending > this.maxBytes) return this.break(lines);
      this.parts.push(chunk.subarray(start));
    }
    return { lines, tooLong: false };
  }

  private break(lines: string[]): { lines: string[]; tooLong: true } {
    this.broken = true;
    this.parts = [];
    this.pending = 0;
    return { lines, tooLong: true };
  }
}
