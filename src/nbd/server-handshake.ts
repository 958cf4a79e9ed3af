/**
 * The server side of the fixed-newstyle handshake, pure: client flags and options in, replies
 * (Buffers) and one decision out. No sockets, no timers: ServerSession feeds it and carries
 * the decision out (send, close, upgrade to TLS, hand over, serve).
 *
 * Options are a table (OPTIONS): `{option, phases, handler}`. A row runs only in the TLS phases
 * it lists; in any other phase the option is refused by the phase's rule (refuse()), so "before
 * TLS, on a server that requires it, only ABORT and STARTTLS" is the one phase 'tls-required'
 * that only those two rows list. The TLS phases (doc/proto.md "TLS support"):
 *
 *   no-tls        TLS is not configured (NOTLS): STARTTLS gets ERR_POLICY, never ERR_TLS_REQD
 *   tls-offered   --tls on, before STARTTLS: every option is served in clear
 *   tls-required  --tls require, before STARTTLS (FORCEDTLS): ERR_TLS_REQD, EXPORT_NAME closes
 *   tls           after STARTTLS: every option but STARTTLS (ERR_INVALID, "already")
 *
 * The handshake's own states (STATES): FLAGS → OPTIONS → (STARTTLS → OPTIONS) → DONE; any → CLOSED.
 * STARTTLS waits for the upgrade; tlsUp() forgets every negotiated state (structured replies,
 * meta contexts) and enters phase 'tls'.
 */
import type { Duplex } from 'node:stream';
import { StateMachine, type MachineSpec } from '../util/state-machine.js';
import { FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, INFO, MAX_PAYLOAD, MAX_STRING, OPT, REP } from './constants.js';
import { encodeMessage, encodeOptionReply } from './codec.js';
import type { Export } from './export.js';

export type TlsPhase = 'no-tls' | 'tls-offered' | 'tls-required' | 'tls';

/** `--tls`: off (no TLS), on (offered: clients choose), require (nothing in clear but the two options) */
export type TlsMode = 'off' | 'on' | 'require';

export type HandshakeState = 'FLAGS' | 'OPTIONS' | 'STARTTLS' | 'DONE' | 'CLOSED';

export const HANDSHAKE_STATES: MachineSpec<HandshakeState> = {
  name: 'server handshake',
  transitions: {
    FLAGS: ['OPTIONS', 'CLOSED'],
    OPTIONS: ['STARTTLS', 'DONE', 'CLOSED'],
    STARTTLS: ['OPTIONS', 'CLOSED'],
    DONE: [],
    CLOSED: [],
  },
};

/**
 * An NBD option outside the spec that hands the connection over to another protocol once
 * acknowledged, as STARTTLS hands it to TLS. The pair link uses it (src/pair): one listener,
 * one transport and one TLS set-up serve both the replica export and the link. A server that
 * does not know the option answers NBD_REP_ERR_UNSUP, so a client learns it talks to a plain
 * NBD server. Extensions are rows of the option table, served where every option is (after
 * STARTTLS on a server that requires TLS).
 */
export interface OptionExtension {
  /** for logs: "pair link" */
  readonly name: string;
  /**
   * Decide on the option. A string refuses it (NBD_REP_ERR_POLICY with that message; the
   * handshake goes on). A function takes the connection: the server replies ACK, stops reading
   * the stream (it is left paused: the new owner calls `resume()`), forgets the connection, and
   * calls the function with the stream and any bytes the client sent after the option.
   */
  accept(data: Buffer, peer: string): string | ((stream: Duplex, rest: Buffer) => void);
}

/** What the handshake asks of the server it runs in. */
export interface HandshakeHost {
  readonly shuttingDown: boolean;
  findExport(name: string): Export | undefined;
  listExports(): Export[];
  /** a blkrep extension option this server takes, if any */
  optionExtension?(option: number): OptionExtension | undefined;
}

/** What the session does after sending the step's replies. */
export type HandshakeDecision =
  /** read the next option */
  | { kind: 'next' }
  /** hard disconnect, logged as a warning with `reason` */
  | { kind: 'close'; reason: string }
  /** OPT_ABORT: the ACK is in the replies; end the stream */
  | { kind: 'abort' }
  /** STARTTLS accepted: the ACK is in the replies; upgrade the stream, then call tlsUp() */
  | { kind: 'starttls' }
  /** an extension took the connection: the ACK is in the replies; hand the stream to `take` */
  | { kind: 'takeover'; name: string; take: (stream: Duplex, rest: Buffer) => void }
  /** the handshake is over: serve `export` (for EXPORT_NAME the export's reply is in the replies) */
  | { kind: 'serve'; export: Export; transmissionFlags: number; structured: boolean; contexts: Map<number, string> };

export interface HandshakeStep {
  replies: Buffer[];
  decision: HandshakeDecision;
}

export interface OptionRow {
  readonly option: number;
  /** for messages: "GO" */
  readonly name: string;
  /** the TLS phases the handler runs in; refuse() answers in the others */
  readonly phases: readonly TlsPhase[];
  /** `after`: bytes the client sent after the option that have already arrived */
  readonly handler: (hs: ServerHandshake, data: Buffer, after: number) => HandshakeStep;
}

const ALL: readonly TlsPhase[] = ['no-tls', 'tls-offered', 'tls-required', 'tls'];
/** where options are served: everywhere but before TLS on a server that requires it */
const SERVED: readonly TlsPhase[] = ['no-tls', 'tls-offered', 'tls'];

/** The option table. An option not in it gets unknownRow() (or extensionRow()). */
export const OPTIONS: readonly OptionRow[] = [
  { option: OPT.EXPORT_NAME, name: 'EXPORT_NAME', phases: SERVED, handler: (hs, data) => hs.exportName(data) },
  { option: OPT.ABORT, name: 'ABORT', phases: ALL, handler: (hs) => hs.abort() },
  { option: OPT.LIST, name: 'LIST', phases: SERVED, handler: (hs, data) => hs.list(data) },
  { option: OPT.STARTTLS, name: 'STARTTLS', phases: ALL, handler: (hs, data, after) => hs.startTls(data, after) },
  { option: OPT.INFO, name: 'INFO', phases: SERVED, handler: (hs, data) => hs.infoGo(OPT.INFO, data) },
  { option: OPT.GO, name: 'GO', phases: SERVED, handler: (hs, data) => hs.infoGo(OPT.GO, data) },
  { option: OPT.STRUCTURED_REPLY, name: 'STRUCTURED_REPLY', phases: SERVED, handler: (hs, data) => hs.structuredReply(data) },
  { option: OPT.LIST_META_CONTEXT, name: 'LIST_META_CONTEXT', phases: SERVED, handler: (hs, data) => hs.metaContext(OPT.LIST_META_CONTEXT, data) },
  { option: OPT.SET_META_CONTEXT, name: 'SET_META_CONTEXT', phases: SERVED, handler: (hs, data) => hs.metaContext(OPT.SET_META_CONTEXT, data) },
  {
    option: OPT.EXTENDED_HEADERS, name: 'EXTENDED_HEADERS', phases: SERVED,
    handler: (hs) => hs.error(OPT.EXTENDED_HEADERS, REP.ERR_UNSUP, 'extended headers are not supported'),
  },
];

const ROWS = new Map(OPTIONS.map((r) => [r.option, r]));

/** An option neither in the table nor an extension. */
function unknownRow(option: number): OptionRow {
  return { option, name: `option ${option}`, phases: SERVED, handler: (hs) => hs.error(option, REP.ERR_UNSUP, `option ${option} is not supported`) };
}

/** An extension option as a row of the table. */
function extensionRow(option: number, extension: OptionExtension, peer: string): OptionRow {
  return { option, name: extension.name, phases: SERVED, handler: (hs, data) => hs.extension(option, extension, data, peer) };
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

const NEXT: HandshakeDecision = { kind: 'next' };

export interface ServerHandshakeOptions {
  /** the TLS mode; 'off' or undefined: no TLS (STARTTLS gets ERR_POLICY) */
  tls?: TlsMode;
  /** the client's address, for extensions and messages */
  peer?: string;
}

export class ServerHandshake {
  private readonly machine = new StateMachine(HANDSHAKE_STATES, 'FLAGS');
  private tls: TlsPhase;
  private noZeroes = false;
  private structured = false;
  /** export named by the last SET_META_CONTEXT, and the contexts it selected (id → name) */
  private metaExport: string | undefined;
  private selected = new Map<number, string>();
  private nextContextId = 1;
  private readonly peer: string;

  constructor(
    private readonly host: HandshakeHost,
    options: ServerHandshakeOptions = {},
  ) {
    this.tls = options.tls === 'on' ? 'tls-offered' : options.tls === 'require' ? 'tls-required' : 'no-tls';
    this.peer = options.peer ?? 'unknown';
  }

  get state(): HandshakeState {
    return this.machine.state;
  }

  get tlsPhase(): TlsPhase {
    return this.tls;
  }

  /** the client asked for no zero padding after EXPORT_NAME's reply */
  get clientNoZeroes(): boolean {
    return this.noZeroes;
  }

  /** The 4 bytes of client flags. */
  clientFlags(flags: number): HandshakeStep {
    this.machine.goto('OPTIONS');
    const known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if ((flags & ~known) !== 0) return this.close(`client flags 0x${flags.toString(16)} include bits the server did not offer`);
    this.noZeroes = (flags & FLAG_C_NO_ZEROES) !== 0;
    if ((flags & FLAG_C_FIXED_NEWSTYLE) === 0 && this.tls !== 'no-tls') {
      // TLS needs fixed newstyle on both sides (doc/proto.md): such a client is served in clear
      // where TLS is only offered, and not at all where it is required.
      if (this.tls === 'tls-required') return this.close('the client did not set FIXED_NEWSTYLE, which TLS needs, on a server that requires TLS');
      this.tls = 'no-tls';
    }
    return { replies: [], decision: NEXT };
  }

  /**
   * One option (its header already checked by the session). `after`: bytes the client sent
   * after this option that have already arrived (STARTTLS must be the last thing said in clear).
   */
  option(option: number, data: Buffer, after = 0): HandshakeStep {
    if (this.host.shuttingDown && option !== OPT.ABORT) {
      if (option === OPT.EXPORT_NAME) return this.close('server shutting down');
      return this.error(option, REP.ERR_SHUTDOWN, 'server is shutting down');
    }
    const row = this.row(option);
    if (!row.phases.includes(this.tls)) return this.refuse(row);
    return row.handler(this, data, after);
  }

  /** The upgrade after STARTTLS succeeded: nothing negotiated in clear survives it. */
  tlsUp(): void {
    this.machine.goto('OPTIONS');
    this.tls = 'tls';
    this.structured = false;
    this.metaExport = undefined;
    this.selected = new Map();
    this.nextContextId = 1;
  }

  /** The session closed the connection. */
  closed(): void {
    if (!this.machine.is('DONE', 'CLOSED')) this.machine.goto('CLOSED');
  }

  row(option: number): OptionRow {
    const row = ROWS.get(option);
    if (row) return row;
    const extension = this.host.optionExtension?.(option);
    return extension ? extensionRow(option, extension, this.peer) : unknownRow(option);
  }

  /** The answer to an option its phase does not allow. */
  private refuse(row: OptionRow): HandshakeStep {
    if (this.tls === 'tls-required') {
      // EXPORT_NAME has no error reply; a forced-TLS server hangs up (doc/proto.md).
      if (row.option === OPT.EXPORT_NAME) return this.close('EXPORT_NAME before STARTTLS on a server that requires TLS');
      // Names nothing about the exports: a client learns only that TLS comes first.
      return this.error(row.option, REP.ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
    }
    return this.error(row.option, REP.ERR_POLICY, `${row.name} is not allowed now`);
  }

  // ---------------------------------------------------------------------------------- replies

  reply(option: number, type: number, data?: Buffer): Buffer {
    return encodeOptionReply(option, type, data);
  }

  /** An error reply; the message may echo a client's name, so it is kept a valid NBD string. */
  error(option: number, type: number, message: string): HandshakeStep {
    return { replies: [this.reply(option, type, encodeMessage(message))], decision: NEXT };
  }

  private close(reason: string): HandshakeStep {
    return { replies: [], decision: { kind: 'close', reason } };
  }

  // --------------------------------------------------------------------------------- handlers

  abort(): HandshakeStep {
    return { replies: [this.reply(OPT.ABORT, REP.ACK)], decision: { kind: 'abort' } };
  }

  startTls(data: Buffer, after: number): HandshakeStep {
    if (data.length) return this.error(OPT.STARTTLS, REP.ERR_INVALID, 'STARTTLS must carry no data');
    if (this.tls === 'no-tls') return this.error(OPT.STARTTLS, REP.ERR_POLICY, 'TLS is not configured on this server');
    if (this.tls === 'tls') return this.error(OPT.STARTTLS, REP.ERR_INVALID, 'TLS is already on: STARTTLS was sent twice');
    // A client waits for the ACK before it says anything more; bytes already here were put in
    // the stream by someone else, to be read as if they came over TLS (CVE-2021-3716).
    if (after > 0) return this.close(`${after} bytes arrived in clear after STARTTLS, before its reply: an injection attempt`);
    this.machine.goto('STARTTLS');
    return { replies: [this.reply(OPT.STARTTLS, REP.ACK)], decision: { kind: 'starttls' } };
  }

  structuredReply(data: Buffer): HandshakeStep {
    if (data.length) return this.error(OPT.STRUCTURED_REPLY, REP.ERR_INVALID, 'STRUCTURED_REPLY must carry no data');
    this.structured = true;
    return { replies: [this.reply(OPT.STRUCTURED_REPLY, REP.ACK)], decision: NEXT };
  }

  extension(option: number, extension: OptionExtension, data: Buffer, peer: string): HandshakeStep {
    const decision = extension.accept(data, peer);
    if (typeof decision === 'string') return this.error(option, REP.ERR_POLICY, decision);
    this.machine.goto('CLOSED');
    return { replies: [this.reply(option, REP.ACK)], decision: { kind: 'takeover', name: extension.name, take: decision } };
  }

  exportName(data: Buffer): HandshakeStep {
    const name = data.toString('utf8');
    const exp = data.length <= MAX_STRING ? this.host.findExport(name) : undefined;
    // EXPORT_NAME has no error reply: the only answer is to close.
    if (!exp) return this.close(`EXPORT_NAME asked for unknown export "${name.slice(0, 256)}"`);
    const refused = exp.admit?.();
    if (refused !== undefined) return this.close(`EXPORT_NAME "${name.slice(0, 256)}": ${refused}`);
    const serve = this.serve(exp);
    const b = Buffer.alloc(this.noZeroes ? 10 : 134);
    b.writeBigUInt64BE(BigInt(exp.size), 0);
    b.writeUInt16BE(serve.transmissionFlags, 8);
    return { replies: [b], decision: serve };
  }

  list(data: Buffer): HandshakeStep {
    if (data.length) return this.error(OPT.LIST, REP.ERR_INVALID, 'LIST must carry no data');
    const replies: Buffer[] = [];
    for (const exp of this.host.listExports()) {
      const name = Buffer.from(exp.name, 'utf8');
      const desc = Buffer.from(exp.description ?? '', 'utf8');
      const b = Buffer.alloc(4 + name.length + desc.length);
      b.writeUInt32BE(name.length, 0);
      name.copy(b, 4);
      desc.copy(b, 4 + name.length);
      replies.push(this.reply(OPT.LIST, REP.SERVER, b));
    }
    replies.push(this.reply(OPT.LIST, REP.ACK));
    return { replies, decision: NEXT };
  }

  infoGo(option: number, data: Buffer): HandshakeStep {
    const what = option === OPT.GO ? 'GO' : 'INFO';
    if (data.length < 6) return this.error(option, REP.ERR_INVALID, `${what} data is ${data.length} bytes, at least 6 are needed`);
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6) {
      return this.error(option, REP.ERR_INVALID, `${what} name length ${nameLength} exceeds the option length ${data.length} less 6`);
    }
    if (nameLength > MAX_STRING) return this.error(option, REP.ERR_INVALID, `export name of ${nameLength} bytes is longer than ${MAX_STRING}`);
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 6 + nameLength + 2 * count) {
      return this.error(option, REP.ERR_INVALID, `${what} asks for ${count} information types but carries ${data.length - 6 - nameLength} bytes for them`);
    }
    const requested = new Set<number>();
    for (let i = 0; i < count; i++) requested.add(data.readUInt16BE(6 + nameLength + 2 * i));
    const exp = this.host.findExport(name);
    if (!exp) return this.error(option, REP.ERR_UNKNOWN, `no export named "${name}"`);
    const refused = exp.admit?.();
    if (refused !== undefined) return this.error(option, REP.ERR_POLICY, refused);

    const replies: Buffer[] = [];
    const info = Buffer.alloc(12);
    info.writeUInt16BE(INFO.EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.size), 2);
    info.writeUInt16BE(exp.transmissionFlags(this.structured), 10);
    replies.push(this.reply(option, REP.INFO, info));
    if (requested.has(INFO.NAME)) {
      replies.push(this.reply(option, REP.INFO, Buffer.concat([u16(INFO.NAME), Buffer.from(exp.name, 'utf8')])));
    }
    if (requested.has(INFO.DESCRIPTION) && exp.description !== undefined) {
      replies.push(this.reply(option, REP.INFO, Buffer.concat([u16(INFO.DESCRIPTION), Buffer.from(exp.description, 'utf8')])));
    }
    // Block size is sent whether asked or not: it costs nothing and lets clients do better.
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(INFO.BLOCK_SIZE, 0);
    bs.writeUInt32BE(exp.minimum, 2);
    bs.writeUInt32BE(exp.preferred, 6);
    bs.writeUInt32BE(Math.min(exp.maximum, MAX_PAYLOAD), 10);
    replies.push(this.reply(option, REP.INFO, bs));
    replies.push(this.reply(option, REP.ACK));
    return { replies, decision: option === OPT.GO ? this.serve(exp) : NEXT };
  }

  metaContext(option: number, data: Buffer): HandshakeStep {
    const set = option === OPT.SET_META_CONTEXT;
    const what = set ? 'SET_META_CONTEXT' : 'LIST_META_CONTEXT';
    if (set) {
      // SET replaces earlier selections even when it fails.
      this.selected = new Map();
      this.metaExport = undefined;
    }
    if (!this.structured) return this.error(option, REP.ERR_INVALID, `${what} needs STRUCTURED_REPLY first`);
    const parsed = parseMetaContextRequest(data);
    if (typeof parsed === 'string') return this.error(option, REP.ERR_INVALID, `${what}: ${parsed}`);
    const exp = this.host.findExport(parsed.exportName);
    if (!exp) return this.error(option, REP.ERR_UNKNOWN, `no export named "${parsed.exportName}"`);
    const available = exp.metaContextNames();
    const matches: string[] = [];
    if (!set && parsed.queries.length === 0) matches.push(...available);
    for (const q of parsed.queries) {
      for (const name of available) {
        // In LIST a query ending in ':' is a wildcard for everything under it ("base:" → "base:allocation").
        const hit = name === q || (!set && q.endsWith(':') && name.startsWith(q));
        if (hit && !matches.includes(name)) matches.push(name);
      }
    }
    const replies: Buffer[] = [];
    for (const name of matches) {
      const id = set ? this.nextContextId++ : 0;
      if (set) this.selected.set(id, name);
      const b = Buffer.alloc(4 + Buffer.byteLength(name));
      b.writeUInt32BE(id, 0);
      b.write(name, 4, 'utf8');
      replies.push(this.reply(option, REP.META_CONTEXT, b));
    }
    if (set) this.metaExport = exp.name;
    replies.push(this.reply(option, REP.ACK));
    return { replies, decision: NEXT };
  }

  private serve(exp: Export): HandshakeDecision & { kind: 'serve' } {
    this.machine.goto('DONE');
    const contexts = this.metaExport === exp.name ? this.selected : new Map<number, string>();
    return { kind: 'serve', export: exp, transmissionFlags: exp.transmissionFlags(this.structured), structured: this.structured, contexts };
  }
}

/** Parse the payload of LIST/SET_META_CONTEXT; a string is the reason it is malformed. */
export function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | string {
  if (data.length < 8) return `payload of ${data.length} bytes is shorter than the 8 bytes of its fixed fields`;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return `export name length ${nameLength} runs past the payload of ${data.length} bytes`;
  if (nameLength > MAX_STRING) return `export name of ${nameLength} bytes is longer than ${MAX_STRING}`;
  const exportName = data.toString('utf8', 4, 4 + nameLength);
  let p = 4 + nameLength;
  const count = data.readUInt32BE(p);
  p += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (p + 4 > data.length) return `query ${i + 1} of ${count} runs past the payload of ${data.length} bytes`;
    const len = data.readUInt32BE(p);
    p += 4;
    if (len > data.length - p) return `query ${i + 1} of ${count} (length ${len}) runs past the payload of ${data.length} bytes`;
    if (len > MAX_STRING) return `query ${i + 1} is ${len} bytes, longer than ${MAX_STRING}`;
    queries.push(data.toString('utf8', p, p + len));
    p += len;
  }
  if (p !== data.length) return `${data.length - p} bytes left over after ${count} queries`;
  return { exportName, queries };
}
