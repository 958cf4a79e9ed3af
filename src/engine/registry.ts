import { BlkrepError } from '../api/errors.js';
import type { Transport, TransportFactory, TransportRegistry } from '../api/transport.js';

/** The engine's transport registry; plugins fill it through the `blkrep:register` hook. */
export class Transports implements TransportRegistry {
  private readonly factories = new Map<string, TransportFactory>();
  private readonly instances = new Map<string, Transport>();

  register(name: string, factory: TransportFactory): void {
    this.factories.set(name, factory);
    this.instances.delete(name);
  }

  has(name: string): boolean {
    return this.factories.has(name);
  }

  names(): string[] {
    return [...this.factories.keys()].sort();
  }

  get(name: string): Transport {
    let t = this.instances.get(name);
    if (t) return t;
    const factory = this.factories.get(name);
    if (!factory) {
      const known = this.names();
      throw new BlkrepError(
        'ERR_NO_TRANSPORT',
        `no transport named "${name}" is installed (installed: ${known.length ? known.join(', ') : 'none'})`,
        { errno: 'EINVAL' },
      );
    }
    t = factory();
    this.instances.set(name, t);
    return t;
  }
}
