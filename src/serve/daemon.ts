/**
 * The serve-nbd daemon as a library: open the images, serve them on the requested listeners,
 * answer the control socket, stop cleanly. The command is a thin shell around startDaemon().
 */
import { writeFile, rm } from 'node:fs/promises';
import { BlkrepError, toBlkrepError } from '../api/errors.js';
import type { BlockNode } from '../api/block.js';
import type { TransportListener, TransportRegistry } from '../api/transport.js';
import { completeNode } from '../block/node.js';
import { openImage } from '../block/open.js';
import { ControlServer } from '../control/server.js';
import { NbdServer, type Logger, type ServerStatus } from '../nbd/server.js';

export interface ExportSpec {
  name: string;
  image: string;
  description?: string;
}

export interface ListenSpec {
  transport: string;
  address: string;
}

export interface DaemonOptions {
  exports: ExportSpec[];
  listen: ListenSpec[];
  transports: TransportRegistry;
  readOnly?: boolean;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  minimumBlockSize?: number;
  pidFile?: string;
  controlPath?: string;
  log?: Logger;
}

export interface ListeningEvent {
  event: 'listening';
  uris: string[];
  pid: number;
}

export class Daemon {
  private stopping: Promise<void> | undefined;
  private resolveStopped: () => void = () => {};
  /** Resolves once stop() has finished, whoever called it (a signal, the control socket). */
  readonly stopped = new Promise<void>((resolve) => (this.resolveStopped = resolve));

  private constructor(
    readonly server: NbdServer,
    readonly listeners: TransportListener[],
    readonly control: ControlServer | undefined,
    private readonly pidFile: string | undefined,
  ) {}

  static async start(options: DaemonOptions): Promise<Daemon> {
    const names = new Set<string>();
    for (const e of options.exports) {
      if (names.has(e.name)) throw new BlkrepError('ERR_USAGE', `export "${e.name}" is given twice`, { errno: 'EINVAL' });
      names.add(e.name);
    }
    if (options.listen.length === 0) throw new BlkrepError('ERR_USAGE', 'nothing to listen on', { errno: 'EINVAL' });
    // Resolve transports first, so a missing plugin fails before any image is opened.
    const transports = options.listen.map((l) => options.transports.get(l.transport));

    const nodes: BlockNode[] = [];
    const listeners: TransportListener[] = [];
    let control: ControlServer | undefined;
    try {
      for (const e of options.exports) nodes.push(await openImage(e.image, { readOnly: options.readOnly }));
      const server = new NbdServer({
        exports: options.exports.map((e, i) => ({
          name: e.name,
          description: e.description,
          node: completeNode(nodes[i]!),
          readOnly: options.readOnly,
          minimumBlockSize: options.minimumBlockSize,
        })),
        maxConnections: options.maxConnections,
        handshakeTimeoutMs: options.handshakeTimeoutMs,
        log: options.log,
      });
      for (let i = 0; i < transports.length; i++) {
        const spec = options.listen[i]!;
        try {
          listeners.push(await transports[i]!.listen(spec.address, { onConnection: (c) => server.attach(c) }));
        } catch (err) {
          // A plugin's own error (code ERR_…) already says "cannot listen on <transport> <address>".
          const code = (err as { code?: unknown } | null)?.code;
          const own = typeof code === 'string' && code.startsWith('ERR_');
          throw own ? toBlkrepError(err) : toBlkrepError(err, `cannot listen on ${spec.transport} address ${spec.address}`);
        }
      }
      const daemon = new Daemon(server, listeners, undefined, options.pidFile);
      if (options.controlPath) {
        control = await ControlServer.listen(options.controlPath);
        (daemon as { control: ControlServer | undefined }).control = control;
        daemon.wireControl(control);
      }
      if (options.pidFile) await writeFile(options.pidFile, `${process.pid}\n`);
      return daemon;
    } catch (err) {
      await control?.close().catch(() => {});
      await Promise.all(listeners.map((l) => l.close().catch(() => {})));
      await Promise.all(nodes.map((n) => n.close().catch(() => {})));
      throw err;
    }
  }

  /** URIs a client uses, one per listener and export. */
  get uris(): string[] {
    const exports = this.server.listExports();
    return this.listeners.flatMap((l) => exports.map((e) => l.uri(e.name)));
  }

  listening(): ListeningEvent {
    return { event: 'listening', uris: this.uris, pid: process.pid };
  }

  status(): ServerStatus & { listeners: Array<{ address: string }>; control: string | null } {
    return {
      ...this.server.status(),
      listeners: this.listeners.map((l) => ({ address: l.address })),
      control: this.control?.path ?? null,
    };
  }

  /** Stop accepting, finish the requests in flight, flush, close everything. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.control?.publish('shutdown', { pid: process.pid });
      await Promise.all(this.listeners.map((l) => l.close().catch(() => {})));
      try {
        await this.server.shutdown();
      } finally {
        await this.control?.close().catch(() => {});
        if (this.pidFile) await rm(this.pidFile, { force: true }).catch(() => {});
        this.resolveStopped();
      }
    })();
    return this.stopping;
  }

  private wireControl(control: ControlServer): void {
    control.register('status', () => this.status());
    control.register('shutdown', () => {
      // Reply first, then stop.
      setImmediate(() => void this.stop());
      return { stopping: true };
    });
    this.server.on('connection', (e) => control.publish('connection', e));
    this.server.on('disconnect', (e) => control.publish('disconnect', e));
    this.server.on('refused', (e) => control.publish('refused', e));
  }
}
