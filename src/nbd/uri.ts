/**
 * NBD URIs (NetworkBlockDevice/nbd doc/uri.md, RFC 3986):
 *
 *   nbd://host[:port]/export           TCP, port 10809 unless given; IPv6 hosts in brackets
 *   nbd+unix:///export?socket=PATH     Unix socket; `socket=%00name` is an abstract socket (Linux)
 *   nbds://…, nbds+unix://…            TLS required (STARTTLS first, nothing in clear), with the
 *                                      libnbd query keys tls-certificates=DIR, tls-psk-file=FILE,
 *                                      tls-username=NAME (else the URI's user, else the login name),
 *                                      tls-verify-peer=true|false (default true), tls-hostname=NAME
 *                                      (the name the server's certificate must hold; default the
 *                                      host, "localhost" over a Unix socket)
 *
 * The export name is the path without its leading "/", percent-decoded ("nbd://h//disk" names
 * "/disk"; no path names the default export ""). Query values are percent-decoded; "+" is a plus
 * sign, not a space (RFC 3986, unlike HTML forms). Unknown query keys are errors, as the URI
 * document asks, except experimental `x-…` keys, which are ignored.
 */
import { BlkrepError } from '../api/errors.js';
import { MAX_STRING } from './constants.js';

export const NBD_DEFAULT_PORT = 10809;

export type NbdTransportName = 'tcp' | 'unix';

export interface NbdUri {
  /** the URI as given */
  readonly uri: string;
  readonly scheme: 'nbd' | 'nbd+unix' | 'nbds' | 'nbds+unix';
  readonly transport: NbdTransportName;
  /** export name, decoded ("" = the server's default export) */
  readonly exportName: string;
  /** tcp: host name or address, IPv6 without brackets */
  readonly host?: string;
  /** tcp: port (10809 unless given) */
  readonly port?: number;
  /** unix: socket path; starts with NUL for an abstract socket */
  readonly socket?: string;
  /** the transport's address syntax: "host:port", "[v6]:port", or the socket path */
  readonly address: string;
  /** userinfo, decoded (the PSK user name unless tls-username is given) */
  readonly user?: string;
  /** nbds://, nbds+unix://: TLS is required; the upgrader's settings (the tls-* query keys) */
  readonly tls?: { readonly settings: Readonly<Record<string, string>> };
}

const URI_RE = /^([A-Za-z][A-Za-z0-9+.-]*):(?:\/\/([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$/;
const TLS_KEYS = new Set(['tls-hostname', 'tls-verify-peer', 'tls-certificates', 'tls-psk-file', 'tls-username']);

function badUri(uri: string, why: string): BlkrepError {
  return new BlkrepError('ERR_BAD_URI', `invalid NBD URI "${printable(uri)}": ${why}`, { errno: 'EINVAL', details: { uri } });
}

/** NULs and control characters shown as escapes, so messages stay one readable line. */
function printable(s: string): string {
  return s.replace(/[\u0000-\u001f\u007f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

function decode(uri: string, text: string, what: string): string {
  if (/%(?![0-9A-Fa-f]{2})/.test(text)) throw badUri(uri, `${what} has a "%" that does not start a %XX escape`);
  try {
    return decodeURIComponent(text);
  } catch {
    throw badUri(uri, `${what} is not valid percent-encoded UTF-8`);
  }
}

/** Whether `text` looks like an NBD URI at all (any nbd scheme, TLS ones included). */
export function isNbdUri(text: string): boolean {
  return /^nbds?(\+unix)?:/i.test(text);
}

export function parseNbdUri(uri: string): NbdUri {
  const m = URI_RE.exec(uri);
  if (!m) throw badUri(uri, 'expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH');
  const scheme = m[1]!.toLowerCase();
  const authority = m[2];
  const path = m[3]!;
  const query = m[4];
  const fragment = m[5];

  if (scheme !== 'nbd' && scheme !== 'nbd+unix' && scheme !== 'nbds' && scheme !== 'nbds+unix') {
    throw badUri(uri, `scheme "${scheme}" is not supported (use nbd://, nbd+unix://, or nbds://, nbds+unix:// for TLS)`);
  }
  const tls = scheme === 'nbds' || scheme === 'nbds+unix';
  const unix = scheme === 'nbd+unix' || scheme === 'nbds+unix';
  if (authority === undefined) throw badUri(uri, `expected "${scheme}://" followed by ${!unix ? 'a host' : '"/export?socket=PATH"'}`);
  if (fragment !== undefined) throw badUri(uri, 'a fragment ("#…") has no meaning in an NBD URI');
  if (path !== '' && !path.startsWith('/')) throw badUri(uri, 'the export name must follow a "/"');

  const exportName = decode(uri, path.slice(1), 'the export name');
  if (exportName.includes('\0')) throw badUri(uri, 'the export name contains a NUL character');
  if (Buffer.byteLength(exportName) > MAX_STRING) {
    throw badUri(uri, `the export name is ${Buffer.byteLength(exportName)} bytes long, more than the ${MAX_STRING} NBD allows`);
  }

  const params = new Map<string, string>();
  if (query !== undefined && query !== '') {
    for (const part of query.split('&')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      const key = decode(uri, eq < 0 ? part : part.slice(0, eq), 'a query key');
      const value = decode(uri, eq < 0 ? '' : part.slice(eq + 1), `the value of "${key}"`);
      if (params.has(key)) throw badUri(uri, `query parameter "${key}" is given twice`);
      params.set(key, value);
    }
  }
  for (const key of params.keys()) {
    if (key.startsWith('x-')) continue;
    if (TLS_KEYS.has(key) && tls) continue;
    if (TLS_KEYS.has(key)) throw badUri(uri, `"${key}" is a TLS setting: use ${unix ? 'nbds+unix' : 'nbds'}:// (TLS required) to give it`);
    if (key === 'tls-type') throw badUri(uri, '"tls-type" is not supported: give tls-certificates=DIR (x509) or tls-psk-file=FILE (PSK)');
    if (key === 'socket' && unix) continue;
    if (key === 'socket') throw badUri(uri, `"socket" belongs to ${scheme}+unix:// URIs; ${scheme}:// connects over TCP to the host`);
    throw badUri(uri, `unknown query parameter "${key}"`);
  }

  let user: string | undefined;
  let hostPort = authority;
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    user = decode(uri, authority.slice(0, at), 'the user name');
    hostPort = authority.slice(at + 1);
  }

  if (unix) {
    if (hostPort !== '') throw badUri(uri, `${scheme}:// URIs take no host (found "${hostPort}"); write ${scheme}:///export?socket=PATH`);
    const socket = params.get('socket');
    if (socket === undefined || socket === '') throw badUri(uri, `${scheme}:// needs the socket path: ?socket=PATH`);
    if (socket === '\0') throw badUri(uri, 'the abstract socket name after %00 is empty');
    return {
      uri, scheme, transport: 'unix', exportName, socket, address: socket,
      ...(user !== undefined ? { user } : {}),
      ...(tls ? { tls: { settings: tlsSettings(uri, params, user, 'localhost') } } : {}),
    };
  }

  // nbd://: host is a reg-name, an IPv4 address or [IPv6], then an optional :port
  const hm = /^(\[[^\]]*\]|[^:[\]]*)(?::(\d*))?$/.exec(hostPort);
  if (!hm) throw badUri(uri, `cannot read host and port from "${hostPort}" (write IPv6 addresses in brackets: nbd://[::1]:10809/)`);
  let host = hm[1]!;
  if (host.startsWith('[')) {
    // RFC 6874: a zone id is written %25 inside the brackets
    host = decode(uri, host.slice(1, -1), 'the IPv6 address');
    if (!/^[0-9A-Fa-f:.]+(%[^\]]+)?$/.test(host) || !host.includes(':')) throw badUri(uri, `"[${host}]" is not an IPv6 address`);
  } else {
    host = decode(uri, host, 'the host');
  }
  if (host === '') host = 'localhost';
  let port = NBD_DEFAULT_PORT;
  if (hm[2] !== undefined && hm[2] !== '') {
    port = Number(hm[2]);
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw badUri(uri, `port ${hm[2]} is not between 1 and 65535`);
  }
  const address = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  return {
    uri, scheme, transport: 'tcp', exportName, host, port, address,
    ...(user !== undefined ? { user } : {}),
    ...(tls ? { tls: { settings: tlsSettings(uri, params, user, host) } } : {}),
  };
}

/** The tls-* query keys as the upgrader's settings, with the user and the host as defaults. */
function tlsSettings(uri: string, params: ReadonlyMap<string, string>, user: string | undefined, host: string): Record<string, string> {
  const settings: Record<string, string> = {};
  for (const [key, value] of params) if (TLS_KEYS.has(key)) settings[key] = value;
  const verify = settings['tls-verify-peer'];
  if (verify !== undefined && !/^(true|false)$/i.test(verify)) throw badUri(uri, `tls-verify-peer is "${verify}"; expected true or false`);
  if (settings['tls-certificates'] !== undefined && settings['tls-psk-file'] !== undefined) {
    throw badUri(uri, 'give tls-certificates (x509) or tls-psk-file (PSK), not both');
  }
  for (const key of ['tls-certificates', 'tls-psk-file', 'tls-hostname', 'tls-username']) {
    if (settings[key] === '') throw badUri(uri, `${key} is empty`);
  }
  if (settings['tls-username'] === undefined && user !== undefined && user !== '') settings['tls-username'] = user;
  settings['tls-hostname'] ??= host;
  return settings;
}
