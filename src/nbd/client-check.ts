/**
 * What the client may send: a command, its flags, its range and its size checked against what the
 * server advertised (transmission flags, selected meta contexts, INFO_BLOCK_SIZE) before anything
 * goes on the wire (checklist item 40). Callers (NbdNode) split, align and emulate first; a
 * command that still does not fit fails here with a typed error instead of at the server.
 */
import { BlkrepError } from '../api/errors.js';
import { CMD, CMD_FLAG, CMD_NAMES, MAX_PAYLOAD, TF } from './constants.js';
import type { ExportInfo } from './client-handshake.js';
import type { CommandSpec } from './client-session.js';

export function describeCommand(spec: CommandSpec): string {
  const name = CMD_NAMES[spec.cmd] ?? `command ${spec.cmd}`;
  return spec.cmd === CMD.FLUSH ? name : `${name} of ${spec.length} bytes at offset ${spec.offset}`;
}

function unsupported(spec: CommandSpec, why: string): BlkrepError {
  return new BlkrepError('ERR_NBD_UNSUPPORTED', `cannot send NBD ${describeCommand(spec)}: ${why}`, { errno: 'EINVAL' });
}

/** Why the export (as `info` describes it) cannot take this command, or undefined when it can. */
export function checkCommand(info: ExportInfo, spec: CommandSpec): BlkrepError | undefined {
  const f = info.flags;
  // every request passes here (twice): nothing is built unless it is refused
  const flags = spec.flags;
  const has = (flag: number): boolean => (flags & flag) !== 0;
  if (has(CMD_FLAG.FUA) && !(f & TF.SEND_FUA)) return unsupported(spec, 'the server does not offer FUA');
  switch (spec.cmd) {
    case CMD.READ:
      if (has(CMD_FLAG.DF) && !(f & TF.SEND_DF && info.structured)) return unsupported(spec, 'the server does not offer DF (unfragmented reads)');
      break;
    case CMD.WRITE:
    case CMD.TRIM:
    case CMD.WRITE_ZEROES:
      if (f & TF.READ_ONLY) {
        return new BlkrepError('ERR_NBD_READ_ONLY', `cannot send NBD ${describeCommand(spec)}: export "${info.exportName}" is read-only`, { errno: 'EPERM' });
      }
      if (spec.cmd === CMD.TRIM && !(f & TF.SEND_TRIM)) return unsupported(spec, 'the server does not offer trim');
      if (spec.cmd === CMD.WRITE_ZEROES && !(f & TF.SEND_WRITE_ZEROES)) return unsupported(spec, 'the server does not offer write-zeroes');
      if (has(CMD_FLAG.FAST_ZERO) && !(f & TF.SEND_FAST_ZERO)) return unsupported(spec, 'the server does not offer fast zeroing');
      break;
    case CMD.FLUSH:
      if (!(f & TF.SEND_FLUSH)) return unsupported(spec, 'the server does not offer flush');
      return undefined;
    case CMD.CACHE:
      if (!(f & TF.SEND_CACHE)) return unsupported(spec, 'the server does not offer cache');
      break;
    case CMD.BLOCK_STATUS:
      if (info.contexts.size === 0) return unsupported(spec, 'no meta context was selected (the server offers no block status)');
      break;
    default:
      return unsupported(spec, 'unknown command');
  }
  if ((has(CMD_FLAG.NO_HOLE) || has(CMD_FLAG.FAST_ZERO)) && spec.cmd !== CMD.WRITE_ZEROES) return unsupported(spec, 'NO_HOLE and FAST_ZERO apply to write-zeroes only');
  if (has(CMD_FLAG.REQ_ONE) && spec.cmd !== CMD.BLOCK_STATUS) return unsupported(spec, 'REQ_ONE applies to block status only');
  if (!Number.isSafeInteger(spec.offset) || !Number.isSafeInteger(spec.length) || spec.offset < 0 || spec.length < 0 || spec.offset + spec.length > info.size) {
    return new BlkrepError('ERR_OUT_OF_RANGE', `NBD ${describeCommand(spec)} is beyond the end of export "${info.exportName}" (size ${info.size})`, {
      errno: spec.cmd === CMD.WRITE || spec.cmd === CMD.WRITE_ZEROES ? 'ENOSPC' : 'EINVAL',
      details: { offset: spec.offset, length: spec.length, size: info.size },
    });
  }
  if (spec.length > 0xffffffff) return unsupported(spec, 'a request carries at most 4 GiB - 1');
  const bs = info.blockSize;
  if (spec.cmd === CMD.READ || spec.cmd === CMD.WRITE) {
    const max = Math.min(bs && bs.maximum !== 0xffffffff ? bs.maximum : MAX_PAYLOAD, MAX_PAYLOAD);
    if (spec.length > max) return unsupported(spec, `the largest payload is ${max} bytes`);
  }
  if (bs && bs.minimum > 1) {
    const end = spec.offset + spec.length;
    if (spec.offset % bs.minimum !== 0 || (end % bs.minimum !== 0 && end !== info.size)) {
      return unsupported(spec, `the server's minimum block size is ${bs.minimum} and the request is not aligned to it`);
    }
  }
  return undefined;
}
