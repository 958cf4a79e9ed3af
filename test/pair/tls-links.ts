/**
 * The pair link as a parameter of the two-daemon pair tests, the way test/nbd/conformance-suite.ts
 * makes the transport one of the server's suite: in clear (nbd+unix://), or nbds+unix:// with x509
 * (client certificates the secondary checks against an allow-list) or with PSK.
 *
 * A daemon given `serverArgs` requires TLS on every export, so the tests' own connections to it
 * (the secondary's view, a promoted secondary) go through `uri` too. The same certificate
 * directory holds a server and a client certificate, so either daemon can be primary or secondary
 * (failback swaps them).
 *
 * Which tests run over TLS as well (the suite must not double): the ones where the link does
 * something different at each step — checkpoint and failover (two-daemons), degrade, reconnect
 * and resync after a secondary crash inside a checkpoint (two-daemons-faults), and failback
 * (roles swap: each daemon is TLS server, then client). The rest exercise the secondary's own
 * steps or timing (random failover instants, split brain, failover --retry, checkpoint atomicity
 * under fio) and run in clear; two-daemons-tls covers the refusals.
 */
import { existsSync } from 'node:fs';
import { makeTempDir, unixUri } from '../support/spawn.js';
import { CLIENT_DN, makePki, type Pki } from '../support/tls-pki.js';

export type LinkKind = 'clear' | 'x509' | 'psk';

export interface PairLink {
  kind: LinkKind;
  /** serve-nbd flags for a daemon that is, or will become, a secondary */
  serverArgs: string[];
  /** an export on a daemon's Unix socket: for --replicate-to, `replicate`, and the tests' clients */
  uri(socket: string, exportName?: string): string;
}

let pki: Pki | undefined;

/** The link of `kind`; the PKI is made once per test file (in a temp dir removed after it). */
export async function pairLink(kind: LinkKind): Promise<PairLink> {
  if (kind === 'clear') return { kind, serverArgs: [], uri: unixUri };
  if (!pki || !existsSync(pki.good)) pki = makePki(await makeTempDir('file'));
  const query = kind === 'x509' ? `tls-certificates=${pki.good}` : `tls-psk-file=${pki.psk}&tls-username=alice`;
  const serverArgs = kind === 'x509' ? ['--tls-certificates', pki.good, '--tls-authz', CLIENT_DN] : ['--tls-psk', pki.psk];
  return {
    kind,
    serverArgs,
    uri: (socket, exportName = '') => `nbds+unix:///${encodeURIComponent(exportName)}?socket=${socket}&${query}`,
  };
}

/**
 * A daemon started with `link.serverArgs` says in its listening line that it requires TLS: the
 * pair then cannot have connected in clear (the secondary refuses every option before STARTTLS).
 */
export function requiresTls(listeningLine: string, link: PairLink): boolean {
  const tls = (JSON.parse(listeningLine) as { tls?: { mode?: string } }).tls;
  return link.kind === 'clear' ? tls === undefined : tls?.mode === 'require';
}
