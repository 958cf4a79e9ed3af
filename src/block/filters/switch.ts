/**
 * A switch node: forwards every request to a backend that can be replaced while clients are
 * connected (the serve-nbd daemon puts one above and one below each export's dirty-tracking
 * filter, so a job can route the export through its front end and a mirror can pivot it).
 *
 * A request goes to the backend current when it is issued; switchTo() makes new requests go to
 * the new backend at once, and resolves once the requests already issued to the old one have
 * finished (the switch never waits for them before taking new ones).
 *
 * size, limits and caps are the first backend's (an NBD export announces them once, at the
 * handshake); a later backend must have the same size. close() closes nothing: whoever opened a
 * backend closes it (PinnedFilter). Every operation is overridden: each one counts itself in flight on its backend.
 */
import type { BlockNode, CompleteBlockNode, Extent, IoOptions, WriteOptions, ZeroOptions } from '../../api/block.js';
import { BlkrepError } from '../../api/errors.js';
import { PinnedFilter } from './pinned.js';

export class SwitchNode extends PinnedFilter {
  readonly driver = 'switch';
  private currentRaw: BlockNode;
  private readonly inFlight = new Map<CompleteBlockNode, { n: number; idle: Array<() => void> }>();

  constructor(initial: BlockNode) {
    super(initial);
    this.currentRaw = initial;
  }

  /** the backend new requests go to */
  get backend(): BlockNode {
    return this.currentRaw;
  }

  /**
   * New requests go to `node` from now on. Resolves when the requests in flight on the previous
   * backend have finished.
   */
  switchTo(node: BlockNode): Promise<void> {
    if (node.size !== this.size) {
      throw new BlkrepError('ERR_SIZE_MISMATCH', `cannot switch an export of ${this.size} bytes to ${node.description} of ${node.size} bytes`, { errno: 'EINVAL', details: { size: this.size, newSize: node.size } });
    }
    const old = this.next;
    this.currentRaw = node;
    this.setNext(node);
    const entry = this.inFlight.get(old);
    if (!entry || entry.n === 0) return Promise.resolve();
    return new Promise((resolve) => entry.idle.push(resolve));
  }

  private run<T>(fn: (node: CompleteBlockNode) => Promise<T>): Promise<T> {
    const node = this.next;
    let entry = this.inFlight.get(node);
    if (!entry) {
      entry = { n: 0, idle: [] };
      this.inFlight.set(node, entry);
    }
    entry.n++;
    const done = (): void => {
      entry.n--;
      if (entry.n === 0) {
        if (this.inFlight.get(node) === entry) this.inFlight.delete(node);
        for (const w of entry.idle.splice(0)) w();
      }
    };
    let p: Promise<T>;
    try {
      p = fn(node);
    } catch (err) {
      done();
      return Promise.reject(err);
    }
    return p.finally(done);
  }

  override read(offset: number, length: number, o?: IoOptions): Promise<Buffer> {
    return this.run((n) => n.read(offset, length, o));
  }
  override readInto(offset: number, target: Buffer, o?: IoOptions): Promise<void> {
    return this.run((n) => n.readInto(offset, target, o));
  }
  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return this.run((n) => n.write(offset, data, o));
  }
  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return this.run((n) => n.writeZeroes(offset, length, o));
  }
  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return this.run((n) => n.trim(offset, length, o));
  }
  override flush(o?: IoOptions): Promise<void> {
    return this.run((n) => n.flush(o));
  }
  override extents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    return this.run((n) => n.extents(offset, length, o));
  }
  override cache(offset: number, length: number, o?: IoOptions): Promise<void> {
    return this.run((n) => n.cache(offset, length, o));
  }
}
