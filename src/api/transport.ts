/**
 * Transports listen and connect; they carry bytes and nothing else. TLS is not a transport (it is
 * NBD_OPT_STARTTLS inside the handshake). Transport plugins export a factory and register it with
 * the engine's registry through the `blkrep:register` oclif hook.
 *
 * Addresses are strings in the transport's own syntax: tcp "host:port" ("[::1]:10809"),
 * unix a filesystem path.
 */
import type { Duplex } from 'node:stream';
import type { HeartbeatCaps, HeartbeatOpenOptions, HeartbeatPath } from './heartbeat.js';

export interface TransportConnection {
  /** the byte stream (a net.Socket for tcp and unix) */
  readonly stream: Duplex;
  /** who is on the other end, for logs and status ("127.0.0.1:51234", "unix") */
  readonly peer: string;
}

export interface ListenOptions {
  /** called once per accepted connection */
  onConnection(connection: TransportConnection): void;
  /** socket backlog */
  backlog?: number;
  /**
   * For an address that is a file (unix): the socket file's permission bits, set whatever the
   * umask (default 0600: only the daemon's user can connect). Other transports ignore it.
   */
  mode?: number;
}

export interface TransportListener {
  /** the address actually bound (port 0 resolved) */
  readonly address: string;
  /** the NBD URI a client uses to reach `exportName` through this listener */
  uri(exportName: string): string;
  /** stop accepting; existing connections are left alone */
  close(): Promise<void>;
}

export interface ConnectOptions {
  signal?: AbortSignal;
  /** give up after this many milliseconds */
  timeoutMs?: number;
}

export interface Transport {
  /** "tcp", "unix" */
  readonly name: string;
  readonly summary: string;
  listen(address: string, options: ListenOptions): Promise<TransportListener>;
  connect(address: string, options?: ConnectOptions): Promise<TransportConnection>;
}

export type TransportFactory = () => Transport;

export interface TransportRegistry {
  register(name: string, factory: TransportFactory): void;
  get(name: string): Transport;
  has(name: string): boolean;
  names(): string[];
}

/**
 * A connection upgrade: takes a connected byte stream and returns the upgraded one (TLS after
 * NBD_OPT_STARTTLS, on the server and on the client). Encryption is an upgrade, not a transport.
 */
export interface ConnectionUpgrader {
  /** "tls" */
  readonly name: string;
  readonly summary: string;
  /** the server side of a connection: after the server accepted NBD_OPT_STARTTLS */
  server(connection: TransportConnection, options?: UpgradeOptions): Promise<TransportConnection>;
  /** the client side: after the server answered NBD_OPT_STARTTLS with ACK */
  client(connection: TransportConnection, options?: UpgradeOptions): Promise<TransportConnection>;
  /**
   * Check the settings before any connection (files there and readable, keys that match their
   * certificates): a daemon calls it at start so that bad credentials fail then, not at the first
   * client. Optional (added after the slot).
   */
  check?(role: 'server' | 'client', settings: Readonly<Record<string, string>>): Promise<UpgraderCheck>;
}

/** What an upgrader's check() found. */
export interface UpgraderCheck {
  /** the kind of credentials, for status and logs ("x509", "x509+verify-peer", "psk") */
  readonly kind: string;
  /** things an operator should know (a certificate expiring within 30 days …) */
  readonly warnings: readonly string[];
  /** the earliest expiry among the certificates, ISO 8601, if any */
  readonly notAfter?: string;
}

export interface UpgradeOptions {
  signal?: AbortSignal;
  /** give up after this many milliseconds */
  timeoutMs?: number;
  /** the upgrader's own settings (certificates, PSK file …), as the user gave them */
  settings?: Readonly<Record<string, string>>;
}

export type UpgraderFactory = () => ConnectionUpgrader;

export interface UpgraderRegistry {
  register(name: string, factory: UpgraderFactory): void;
  get(name: string): ConnectionUpgrader;
  has(name: string): boolean;
  names(): string[];
}

/**
 * A heartbeat backend: how the two hosts of a replication pair watch each other (DESIGN §7).
 * It opens paths (src/api/heartbeat.ts) that carry beat frames and decide nothing. Registered
 * under its URI scheme: `--heartbeat udp://…` uses the backend named "udp".
 */
export interface HeartbeatBackend {
  /** the URI scheme it serves: "udp", "tcp", "file", "exec" */
  readonly name: string;
  readonly summary: string;
  readonly caps: HeartbeatCaps;
  /**
   * One path for a `--heartbeat` URI. Checks the URI at once (a coded error, ERR_BAD_HEARTBEAT,
   * naming the URI and what is wrong) and opens nothing until start().
   */
  open(uri: string, options: HeartbeatOpenOptions): HeartbeatPath;
}

export type HeartbeatFactory = () => HeartbeatBackend;

export interface HeartbeatRegistry {
  register(name: string, factory: HeartbeatFactory): void;
  get(name: string): HeartbeatBackend;
  has(name: string): boolean;
  names(): string[];
}

/** Options passed to the `blkrep:register` oclif hook: the registries a plugin may add to. */
export interface RegisterHookOptions {
  transports: TransportRegistry;
  /** connection upgraders (TLS); absent in engines older than this slot */
  upgraders?: UpgraderRegistry;
  /** heartbeat backends; absent in engines older than this slot */
  heartbeats?: HeartbeatRegistry;
}
