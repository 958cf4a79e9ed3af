import path from 'node:path';
import { isNbdUri, parseNbdUri } from '../nbd/uri.js';

/** The query keys of an NBD URI that name a file (libnbd's, as src/nbd/uri.ts takes them). */
const PATH_KEYS = new Set(['socket', 'tls-certificates', 'tls-psk-file']);

/**
 * An NBD URI whose file paths (socket=, tls-certificates=, tls-psk-file=) are relative, made
 * absolute against this process's directory: a URI sent over the control socket is opened by the
 * daemon, whose working directory is its own, and the control socket is local, so the path the
 * operator typed means here. Absolute paths and abstract sockets (%00name) are left as they are;
 * the URI is checked first (ERR_BAD_URI).
 */
export function absolutePathsUri(uri: string, cwd = process.cwd()): string {
  parseNbdUri(uri);
  const q = uri.indexOf('?');
  if (q < 0) return uri;
  const hash = uri.indexOf('#', q);
  const query = uri.slice(q + 1, hash < 0 ? undefined : hash);
  const parts = query.split('&').map((part) => {
    const eq = part.indexOf('=');
    if (eq < 0) return part;
    const key = decodeURIComponent(part.slice(0, eq));
    const value = decodeURIComponent(part.slice(eq + 1));
    if (!PATH_KEYS.has(key) || value === '' || value.startsWith('\0') || path.isAbsolute(value)) return part;
    return `${part.slice(0, eq)}=${encodeURIComponent(path.resolve(cwd, value)).replaceAll('%2F', '/')}`;
  });
  return `${uri.slice(0, q)}?${parts.join('&')}${hash < 0 ? '' : uri.slice(hash)}`;
}

/**
 * An image spec sent to the daemon (a live mirror's or backup's TARGET): a relative file path
 * (`new.img`, `raw:new.img`) made absolute against this process's directory, an NBD URI's file
 * paths as absolutePathsUri; memory:SIZE and absolute paths are left as they are.
 */
export function absoluteImageSpec(spec: string, cwd = process.cwd()): string {
  if (isNbdUri(spec)) return absolutePathsUri(spec, cwd);
  // not a file: memory:SIZE, another scheme (as image/chain.ts isFileSpec, not imported: start-up)
  if (spec.startsWith('memory:') || /^[a-z][a-z0-9+.-]*:\/\//i.test(spec)) return spec;
  const prefix = spec.startsWith('raw:') ? 'raw:' : '';
  const file = prefix ? spec.slice(prefix.length) : spec;
  return path.isAbsolute(file) ? spec : `${prefix}${path.resolve(cwd, file)}`;
}

/** A path sent to the daemon (a live backup's --fleecing-socket), absolute against this process's directory. */
export function absolutePath(p: string, cwd = process.cwd()): string {
  return path.isAbsolute(p) ? p : path.resolve(cwd, p);
}
