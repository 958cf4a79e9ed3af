/**
 * How the NBD client reaches a server: through the engine's transport registry (the tcp and unix
 * plugins) when it is given one, else straight through node:net, so that openImage() works
 * without the plugin machinery (tcp and unix are all an NBD URI can name).
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { BlkrepError } from '../api/errors.js';
import type { TransportRegistry } from '../api/transport.js';
import { abortError } from './client-errors.js';
import type { NbdUri } from './uri.js';

/** Opens a byte stream to the server. */
export type NbdConnector = (options: { signal: AbortSignal; timeoutMs: number }) => Promise<Duplex>;

/** The default connector: node:net straight to the host or socket. */
export function netConnector(uri: NbdUri): NbdConnector {
  return ({ signal, timeoutMs }) =>
    new Promise<Duplex>((resolve, reject) => {
      const where = uri.transport === 'tcp' ? `tcp ${uri.address}` : `unix socket ${uri.address.replace(/\0/g, '@')}`;
      if (signal.aborted) return reject(abortError(`connect to ${where}`, signal.reason));
      const socket = uri.transport === 'tcp' ? net.connect({ host: uri.host!, port: uri.port! }) : net.connect({ path: uri.socket! });
      const settle = (): void => {
        socket.off('connect', onConnect);
        socket.off('error', onError);
        signal.removeEventListener('abort', onAbort);
      };
      const onConnect = (): void => {
        settle();
        socket.on('error', () => {}); // reported through 'close' by whoever takes the stream
        if (uri.transport === 'tcp') socket.setNoDelay(true);
        resolve(socket);
      };
      const onError = (err: NodeJS.ErrnoException): void => {
        settle();
        socket.destroy();
        reject(new BlkrepError('ERR_NBD_CONNECT', `cannot connect to ${where}: ${err.message}`, { errno: 'EIO', cause: err, details: { uri: uri.uri } }));
      };
      const onAbort = (): void => {
        settle();
        socket.on('error', () => {});
        socket.destroy();
        reject(abortError(`connect to ${where} (limit ${timeoutMs} ms)`, signal.reason));
      };
      socket.once('connect', onConnect);
      socket.once('error', onError);
      signal.addEventListener('abort', onAbort, { once: true });
    });
}

export function registryConnector(uri: NbdUri, transports: TransportRegistry): NbdConnector {
  return async ({ signal, timeoutMs }) => {
    const connection = await transports.get(uri.transport).connect(uri.address, { signal, timeoutMs });
    return connection.stream;
  };
}

