/**
 * The registries a program gets when it passes none (openImage of an nbd:// URI from the library,
 * NbdClient.connect without `transports`): the transport plugins that ship with blkrep (tcp and
 * unix), and the connection upgrader (tls, for nbds://), loaded on first use. The CLI does not use this: it fills its registries through the
 * plugins' `blkrep:register` hook, so that installed plugins are found too.
 */
import { BlkrepError } from '../api/errors.js';
import type { TransportFactory, TransportRegistry, UpgraderFactory, UpgraderRegistry } from '../api/transport.js';
import { Transports, Upgraders } from './registry.js';

/** name, package, factory export: the plugins listed in package.json `oclif.plugins` */
const BUILT_IN: ReadonlyArray<readonly [string, string, string]> = [
  ['tcp', '@blkrep/transport-tcp', 'createTcpTransport'],
  ['unix', '@blkrep/transport-unix', 'createUnixTransport'],
];

let loading: Promise<TransportRegistry> | undefined;

/** The built-in transports, one registry for the process. */
export function defaultTransports(): Promise<TransportRegistry> {
  loading ??= load().catch((err: unknown) => {
    loading = undefined;
    throw err;
  });
  return loading;
}

async function load(): Promise<TransportRegistry> {
  const transports = new Transports();
  await Promise.all(
    BUILT_IN.map(async ([name, pkg, exported]) => {
      // By name: the plugins are built after the engine (they compile against its API), so the
      // engine cannot compile against theirs; what they export is the TransportFactory contract.
      const specifier: string = pkg;
      const mod = (await import(specifier)) as Record<string, unknown>;
      const factory = mod[exported];
      if (typeof factory !== 'function') {
        throw new BlkrepError('ERR_NO_TRANSPORT', `the ${name} transport plugin (${pkg}) does not export ${exported}()`, { errno: 'EINVAL', details: { name, pkg } });
      }
      transports.register(name, factory as TransportFactory);
    }),
  );
  return transports;
}

let loadingUpgraders: Promise<UpgraderRegistry> | undefined;

/** The built-in connection upgraders (tls), one registry for the process. */
export function defaultUpgraders(): Promise<UpgraderRegistry> {
  loadingUpgraders ??= loadUpgraders().catch((err: unknown) => {
    loadingUpgraders = undefined;
    throw err;
  });
  return loadingUpgraders;
}

async function loadUpgraders(): Promise<UpgraderRegistry> {
  const upgraders = new Upgraders();
  const pkg = '@blkrep/transport-tls';
  const specifier: string = pkg;
  const mod = (await import(specifier)) as Record<string, unknown>;
  const factory = mod.createTlsUpgrader;
  if (typeof factory !== 'function') {
    throw new BlkrepError('ERR_NO_UPGRADER', `the tls plugin (${pkg}) does not export createTlsUpgrader()`, { errno: 'EINVAL', details: { name: 'tls', pkg } });
  }
  upgraders.register('tls', factory as UpgraderFactory);
  return upgraders;
}
