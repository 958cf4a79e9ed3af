/**
 * How the NBD client reaches a server: always through a transport registry (src/api/transport.ts),
 * the one it is given or the built-in plugins (tcp, unix) when none is. Connection upgraders
 * (TLS after NBD_OPT_STARTTLS) come from the same place when the handshake asks for them.
 */
import type { Duplex } from 'node:stream';
import type { ConnectionUpgrader, TransportRegistry, UpgraderRegistry } from '../api/transport.js';
import { defaultTransports, defaultUpgraders } from '../engine/default-transports.js';
import type { NbdUri } from './uri.js';

/** Opens a byte stream to the server. */
export type NbdConnector = (options: { signal: AbortSignal; timeoutMs: number }) => Promise<Duplex>;

/** Connects through `transports` (default: the built-in tcp and unix plugins) to the URI's transport. */
export function registryConnector(uri: NbdUri, transports?: TransportRegistry): NbdConnector {
  return async ({ signal, timeoutMs }) => {
    const registry = transports ?? (await defaultTransports());
    const connection = await registry.get(uri.transport).connect(uri.address, { signal, timeoutMs });
    return connection.stream;
  };
}

/** The named connection upgrader from `upgraders`, or from the built-in plugins when none is given. */
export async function upgraderOf(name: string, upgraders?: UpgraderRegistry): Promise<ConnectionUpgrader> {
  return (upgraders ?? (await defaultUpgraders())).get(name);
}
