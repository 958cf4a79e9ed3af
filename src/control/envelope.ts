/**
 * The request envelope, checked by the server (src/control/server.ts) before the verb's own
 * arguments: kept apart from protocol.ts so the CLI's client does not load zod.
 */
import { z } from 'zod';
import { type ControlErrorBody, type ControlRequestId, isJsonObject } from './protocol.js';
import { preview } from './verb.js';

/** The envelope of a request line; `args` are checked later, against the verb's schema. */
export const REQUEST_SCHEMA = z.object({
  id: z.union([z.string(), z.number(), z.null()]).optional(),
  cmd: z.string().min(1),
  args: z.record(z.string(), z.unknown()).nullish(),
});

export type ParsedEnvelope =
  | { ok: true; id: ControlRequestId; cmd: string; args: Record<string, unknown> }
  | { ok: false; id: ControlRequestId; error: ControlErrorBody };

function badRequest(id: ControlRequestId, message: string): ParsedEnvelope {
  return { ok: false, id, error: { code: 'ERR_BAD_REQUEST', message } };
}

/**
 * A request line → its id, command and arguments, or the error to answer with. An id that is
 * not a string or a finite number is never echoed (it could be anything, e.g. nested 3000
 * deep): the reply's id is then null.
 */
export function parseEnvelope(line: string): ParsedEnvelope {
  let request: unknown;
  try {
    request = JSON.parse(line);
  } catch (err) {
    return badRequest(null, `request is not valid JSON (${(err as Error).message.slice(0, 200)})`);
  }
  if (!isJsonObject(request)) return badRequest(null, 'request must be a JSON object: {"id": …, "cmd": "…", "args": {…}}');
  const r = REQUEST_SCHEMA.safeParse(request);
  const idOk = r.success || !r.error.issues.some((i) => i.path[0] === 'id');
  const id = idOk ? ((request.id as ControlRequestId | undefined) ?? null) : null;
  if (r.success) return { ok: true, id, cmd: r.data.cmd, args: r.data.args ?? {} };
  const field = r.error.issues[0]!.path[0];
  if (field === 'id') return badRequest(null, `"id" must be a string or a number, got ${preview(request.id)}; the reply's id is null`);
  if (field === 'cmd') return badRequest(id, `request has no "cmd" (a command name string), got ${preview(request.cmd)}`);
  return badRequest(id, `"args" of command "${String(request.cmd).slice(0, 64)}" must be an object, got ${preview(request.args)}`);
}
