/**
 * blkrep-control(7): the control protocol's page, generated from the verb tables (each verb's
 * argument schema, result, events and error codes; each job type's job-start arguments) and the
 * server's limits, with hand-written prose from man/prose/blkrep-control.roff.
 */
import { z } from 'zod';
import type { VerbSpec } from '../control/verb.js';
import { parseProse, roff as roffText } from './render.js';

/** roff() for this page: ASCII only (groff -ww warns of other input characters). */
function roff(text: string): string {
  return roffText(text.replace(/\u2026/g, '...'));
}

export interface JobTypeDoc {
  type: string;
  summary: string;
  args: z.ZodType;
}

export interface ControlPageInput {
  /** every verb, in the order the page lists them */
  verbs: readonly VerbSpec[];
  jobTypes: readonly JobTypeDoc[];
  limits: { maxLineBytes: number; maxClients: number; maxPendingRequests: number; pauseAtUnreadBytes: number; maxUnreadBytes: number; stallTimeoutMs: number };
}

type Json = Record<string, unknown>;

/** A JSON Schema (as zod writes it) in words: "a non-negative integer", "one of a, b". */
export function typePhrase(s: Json): string {
  if (Array.isArray(s.type)) {
    const types = (s.type as string[]).filter((t) => t !== 'null');
    return types.map((type) => typePhrase({ ...s, type })).join(', or ');
  }
  if (Array.isArray(s.enum)) return `one of ${(s.enum as unknown[]).map(String).join(', ')}`;
  if (Array.isArray(s.anyOf)) {
    const options = (s.anyOf as Json[]).filter((o) => o.type !== 'null');
    return options.map(typePhrase).join(', or ');
  }
  switch (s.type) {
    case 'string':
      return typeof s.minLength === 'number' && s.minLength > 0 ? 'a non-empty string' : 'a string';
    case 'integer':
      return s.minimum === 0 ? 'a non-negative integer' : 'an integer';
    case 'number':
      return 'a number';
    case 'boolean':
      return 'true or false';
    case 'array': {
      if (Array.isArray(s.prefixItems)) return `[${(s.prefixItems as Json[]).map(typePhrase).join(', ')}]`;
      const items = s.items as Json | undefined;
      const max = typeof s.maxItems === 'number' ? ` (at most ${s.maxItems})` : '';
      return items && Object.keys(items).length > 0 ? `an array of: ${typePhrase(items)}${max}` : `an array${max}`;
    }
    case 'object': {
      const props = Object.keys((s.properties as Json | undefined) ?? {});
      return props.length > 0 ? `{${props.join(', ')}}` : 'an object';
    }
    default:
      return 'any JSON value';
  }
}

/** The arguments of a schema: name, whether required, type phrase, description. */
export function argumentRows(schema: z.ZodType): Array<{ name: string; required: boolean; type: string; description: string }> {
  const js = z.toJSONSchema(schema, { io: 'input', unrepresentable: 'any' }) as Json;
  const props = (js.properties as Record<string, Json> | undefined) ?? {};
  const required = new Set((js.required as string[] | undefined) ?? []);
  return Object.entries(props).map(([name, p]) => ({
    name,
    required: required.has(name),
    type: typePhrase(p),
    description: typeof p.description === 'string' ? p.description : '',
  }));
}

function argumentList(schema: z.ZodType): string[] {
  const rows = argumentRows(schema);
  if (rows.length === 0) return ['.TP', '\\fIargs\\fR', 'none (an object given is ignored)'];
  const out: string[] = [];
  for (const r of rows) {
    out.push('.TP', `\\fB${roff(r.name)}\\fR${r.required ? '' : ' (optional)'}`, roff(`${r.type}${r.description ? `: ${r.description}` : ''}.`));
  }
  return out;
}

function codes(list: readonly string[]): string {
  return list.map((c) => `\\fB${roff(c)}\\fR`).join(', ');
}

function verbSection(v: VerbSpec): string[] {
  const out = ['.SS ' + roff(v.name), roff(v.summary), '.PP', '\\fIArguments\\fR:', '.RS', ...argumentList(v.args), '.RE'];
  out.push('.PP', `\\fIResult\\fR: ${roff(v.result)}.`);
  if (v.events?.length) out.push('.br', `\\fIEvents\\fR: ${codes(v.events)}.`);
  out.push('.br', `\\fIErrors\\fR: ${codes(['ERR_BAD_REQUEST', ...(v.errors ?? [])])}.`);
  if (v.notes) out.push('.PP', roff(v.notes));
  return out;
}

function size(bytes: number): string {
  return bytes % (1 << 20) === 0 ? `${bytes / (1 << 20)} MiB` : bytes % 1024 === 0 ? `${bytes / 1024} KiB` : `${bytes} bytes`;
}

export function renderControlPage(input: ControlPageInput, prose: string, date: string): string {
  const extra = parseProse(prose);
  const { limits: l } = input;
  const out: string[] = [`.TH BLKREP-CONTROL 7 "${date}" "blkrep" "blkrep manual"`];
  out.push('.SH NAME', 'blkrep\\-control \\- the control protocol of blkrep serve\\-nbd');
  out.push(
    '.SH SYNOPSIS',
    '.nf',
    '\\fBblkrep serve\\-nbd\\fR \\fIIMAGE\\fR \\fB\\-\\-control\\fR \\fIPATH\\fR ...',
    '\\(-> {"id": 1, "cmd": "\\fIVERB\\fR", "args": {...}}',
    '\\(<- {"id": 1, "ok": true, "result": ...}',
    '\\(<- {"id": 1, "ok": false, "error": {"code": "ERR_...", "message": "..."}}',
    '.fi',
  );
  out.push('.SH DESCRIPTION', extra.get('DESCRIPTION') ?? '');
  out.push(
    '.SH FRAMING',
    roff(
      `One JSON object per line, UTF-8, ended by "\\n" (a "\\r" before it is dropped); blank lines are ignored. ` +
        `A request is {"id", "cmd", "args"}: "cmd" is the verb (a non-empty string); "args" an object (absent or null: {}); ` +
        `"id" a string or a number, echoed in the reply (absent: null). An id of any other type is never echoed: ` +
        `the reply has id null and ERR_BAD_REQUEST, and the verb does not run.`,
    ),
    '.PP',
    roff(
      `Requests are handled concurrently, so replies may come in any order: the id says which is which. ` +
        `A reply is {"id", "ok": true, "result"} or {"id", "ok": false, "error": {"code", "message"}}; ` +
        `"code" is stable, for scripts; "message" is for people and names the verb, the field, what was expected and what came ` +
        `(e.g. job-start: "speed" must be a number, got "x"). Bigints in results are numbers when exact, strings otherwise.`,
    ),
    '.PP',
    roff(
      `An event line has no id and no ok: {"event": NAME, ...fields, "time"}; a connection receives events only after subscribe.`,
    ),
  );
  out.push(
    '.SH LIMITS',
    roff('Each limit protects the daemon and the NBD clients it serves from one control client:'),
    '.TP',
    roff(`request line: ${size(l.maxLineBytes)}`),
    roff('A longer line is answered ERR_LINE_TOO_LONG (id null) and the connection is closed: where the next request starts is unknown.'),
    '.TP',
    roff(`connections: ${l.maxClients}`),
    roff('One more is answered ERR_CONTROL_BUSY (id null) and closed.'),
    '.TP',
    roff(`requests in flight per connection: ${l.maxPendingRequests}`),
    roff('Further requests wait, unread, in the socket.'),
    '.TP',
    roff(`unread replies per connection: ${size(l.pauseAtUnreadBytes)}`),
    roff(
      `Once this much output waits for a client that does not read it, the daemon stops reading that client's requests until it reads (back-pressure); ` +
        `a client that leaves it unread for ${l.stallTimeoutMs / 1000} s is disconnected, so clients that never read cannot hold every place.`,
    ),
    '.TP',
    roff(`unread output per connection: ${size(l.maxUnreadBytes)}`),
    roff('A connection that leaves more unread (a subscriber that stopped reading its events) is disconnected.'),
  );
  out.push(
    '.SH "PROTOCOL ERRORS"',
    '.TP', '\\fBERR_BAD_REQUEST\\fR', roff('Not JSON, not an object, no "cmd", "args" not an object, an id that is not a string or a number, or arguments that do not fit the verb. The connection is kept.'),
    '.TP', '\\fBERR_UNKNOWN_COMMAND\\fR', roff('No such verb; the message lists the verbs. The connection is kept.'),
    '.TP', '\\fBERR_LINE_TOO_LONG\\fR', roff('See LIMITS. The connection is closed.'),
    '.TP', '\\fBERR_CONTROL_BUSY\\fR', roff('See LIMITS. The connection is closed.'),
    '.TP', '\\fBERR_INTERNAL\\fR', roff('A verb failed unexpectedly; the daemon logs why. When the failure is outside the verb, the reply has id null and only this connection is closed; the daemon and its NBD clients are not affected.'),
  );
  out.push('.SH VERBS');
  for (const v of input.verbs) out.push(...verbSection(v));
  out.push('.SH "JOB TYPES"', roff('The arguments job-start takes besides type, export and id, for each type.'));
  for (const t of input.jobTypes) {
    out.push('.SS ' + roff(t.type), roff(t.summary), '.RS', ...argumentList(t.args), '.RE');
  }
  for (const [title, body] of extra) {
    if (title === 'DESCRIPTION' || title === 'EXAMPLES' || title === 'SEE ALSO') continue;
    out.push(`.SH ${title.includes(' ') ? `"${title}"` : title}`, body);
  }
  if (extra.has('EXAMPLES')) out.push('.SH EXAMPLES', extra.get('EXAMPLES')!);
  out.push('.SH "SEE ALSO"', extra.get('SEE ALSO') ?? '\\fBblkrep\\-serve\\-nbd\\fR(1)');
  return `${out.join('\n')}\n`;
}
