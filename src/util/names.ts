/**
 * Names users give that blkrep turns into file names or shows in listings: job ids (a job's
 * files are IMAGE.job-ID.json and IMAGE.job-ID.dirty beside the image) and export names (which a
 * job's fleecing export, logs and status carry). Checked where the user gives them (CLI flags,
 * control verbs), each with its own stable code, so a name can never reach a path outside the
 * image's directory or hide in a log line.
 */
import { BlkrepError } from '../api/errors.js';

/** longest job id, in bytes: it becomes part of a file name (NAME_MAX is 255) */
export const MAX_JOB_ID_BYTES = 64;
/** the NBD protocol's limit on an export name, in bytes */
export const MAX_EXPORT_NAME_BYTES = 4096;

/** Why `id` cannot be a job id, or undefined when it can: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with "." or "-". */
export function jobIdProblem(id: string): string | undefined {
  if (id.length === 0) return 'a job id cannot be empty';
  const bytes = Buffer.byteLength(id);
  if (bytes > MAX_JOB_ID_BYTES) return `job id of ${bytes} bytes is longer than ${MAX_JOB_ID_BYTES}`;
  if (/[/\\\0]/.test(id)) return `job id "${printable(id)}" contains "/", "\\" or a NUL byte`;
  if (id.includes('..')) return `job id "${printable(id)}" contains ".."`;
  if (!/^[A-Za-z0-9_][A-Za-z0-9._-]*$/.test(id)) return `job id "${printable(id)}" is not 1 to ${MAX_JOB_ID_BYTES} of the characters A-Z a-z 0-9 . _ - (not starting with "." or "-")`;
  return undefined;
}

/** Throw ERR_JOB_ID (EINVAL) naming the id and what is wrong with it. */
export function checkJobId(id: string): string {
  const problem = jobIdProblem(id);
  if (problem) throw new BlkrepError('ERR_JOB_ID', problem, { errno: 'EINVAL', details: { id } });
  return id;
}

/**
 * Why `name` cannot be an export name, or undefined when it can. The empty name is the NBD
 * default export. Refused: more than 4096 bytes (the protocol's limit), a NUL or another control
 * character, "/" at the start, and ".." as a path component.
 */
export function exportNameProblem(name: string): string | undefined {
  const bytes = Buffer.byteLength(name);
  if (bytes > MAX_EXPORT_NAME_BYTES) return `export name of ${bytes} bytes is longer than the protocol's ${MAX_EXPORT_NAME_BYTES}`;
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(name)) return `export name "${printable(name)}" contains a NUL byte or another control character`;
  if (name.startsWith('/')) return `export name "${printable(name)}" starts with "/"`;
  if (name.split('/').includes('..')) return `export name "${printable(name)}" contains ".." as a path component`;
  return undefined;
}

/** Throw ERR_EXPORT_NAME (EINVAL) naming the export name and what is wrong with it. */
export function checkExportName(name: string): string {
  const problem = exportNameProblem(name);
  if (problem) throw new BlkrepError('ERR_EXPORT_NAME', problem, { errno: 'EINVAL', details: { export: name } });
  return name;
}

/** A name as it can be shown on one line: control characters escaped, at most 80 characters. */
function printable(name: string): string {
  // eslint-disable-next-line no-control-regex
  const shown = JSON.stringify(name).slice(1, -1).replace(/[\u0000-\u001f\u007f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
  return shown.length > 80 ? `${shown.slice(0, 77)}...` : shown;
}
