/**
 * The engine's registries: transports (how bytes get there), connection upgraders (TLS) and
 * heartbeat backends. Plugins fill them through the `blkrep:register` hook; each is a table of
 * factories by name, each factory called once, on first use.
 */
import { BlkrepError } from '../api/errors.js';
import type {
  ConnectionUpgrader, HeartbeatBackend, HeartbeatFactory, HeartbeatRegistry, Transport, TransportFactory, TransportRegistry,
  UpgraderFactory, UpgraderRegistry,
} from '../api/transport.js';

/** Factories by name; `get` makes (once) and returns the named one, or a clear error. */
class Registry<T> {
  private readonly factories = new Map<string, () => T>();
  private readonly instances = new Map<string, T>();

  constructor(
    /** what a missing entry is called in errors: "transport", "connection upgrader" … */
    private readonly what: string,
    private readonly code: string,
  ) {}

  register(name: string, factory: () => T): void {
    this.factories.set(name, factory);
    this.instances.delete(name);
  }

  has(name: string): boolean {
    return this.factories.has(name);
  }

  names(): string[] {
    return [...this.factories.keys()].sort();
  }

  get(name: string): T {
    let t = this.instances.get(name);
    if (t) return t;
    const factory = this.factories.get(name);
    if (!factory) {
      const known = this.names();
      throw new BlkrepError(this.code, `no ${this.what} named "${name}" is installed (installed: ${known.length ? known.join(', ') : 'none'})`, {
        errno: 'EINVAL',
        details: { name, installed: known },
      });
    }
    t = factory();
    this.instances.set(name, t);
    return t;
  }
}

/** The engine's transport registry. */
export class Transports extends Registry<Transport> implements TransportRegistry {
  constructor() {
    super('transport', 'ERR_NO_TRANSPORT');
  }
  override register(name: string, factory: TransportFactory): void {
    super.register(name, factory);
  }
}

/** Connection upgraders (TLS): the server runs one after NBD_OPT_STARTTLS, and so does the client. */
export class Upgraders extends Registry<ConnectionUpgrader> implements UpgraderRegistry {
  constructor() {
    super('connection upgrader', 'ERR_NO_UPGRADER');
  }
  override register(name: string, factory: UpgraderFactory): void {
    super.register(name, factory);
  }
}

/** Heartbeat backends (the slot; no backend exists yet). */
export class Heartbeats extends Registry<HeartbeatBackend> implements HeartbeatRegistry {
  constructor() {
    super('heartbeat backend', 'ERR_NO_HEARTBEAT');
  }
  override register(name: string, factory: HeartbeatFactory): void {
    super.register(name, factory);
  }
}
