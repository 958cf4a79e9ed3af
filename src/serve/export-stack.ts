/**
 * The export stack: what one export of the daemon is made of, as named slots in a fixed order,
 * top to bottom —
 *
 *   (--filter user filters)   fixed at start, above everything
 *   front        a job's front end (mirror, copy-before-write of a backup, active commit)
 *   tracking     the dirty-tracking filter (the export's bitmaps, a mirror's dirty set)
 *   replication  reserved: the replication pair primary's filter
 *   cbw          reserved: the pair secondary's copy-before-write filter
 *   pivot        the image after a mirror's pivot (its target): the image below is cut off
 *   image        the image the export was started with (fixed)
 *
 * Each occupied slot holds one node; an empty slot is not on the path at all (the slot above
 * is linked straight to the next occupied one, no hop). insert(), replace() and remove() change
 * a slot while clients are connected: the node above is relinked at once (Filter.relink), so
 * new requests take the new path, and the returned promise resolves once every request that
 * entered before the change has finished. Requests already on their way finish on the path they
 * were issued to: a filter hands a request to the `next` it had when the request reached it
 * (the tracking filter reads `next` once, before waiting for its bitmaps), so a filter inserted
 * sees only requests that entered after it, and one removed sees none once remove() resolved.
 * The count is kept by the stack's entry (`top`'s innermost node), one counter per shape of the
 * stack: the requests a job issues below the entry (its reads of the tracking filter) are not
 * counted — a filter that must wait for those counts them itself.
 *
 * A slot's factory gets `below` (the node of the next occupied slot under it) and returns the
 * slot's node: a filter over `below` (a Filter: the stack relinks it when the slots under it
 * change), or, in the pivot slot, the new image itself. The size never changes (an NBD export
 * announces it once); nor do the limits and capabilities the entry reports (the image's).
 *
 * The stack closes nothing: the image, a pivot's target and each slot's filter belong to whoever
 * opened them (the daemon closes its images and pivoted targets when it stops; whoever inserted
 * a filter releases it after remove() resolved — a Filter's own close() would close `next`, the
 * rest of the stack). The entry's close() does nothing, so the NBD server's close at shutdown
 * closes the user filters only.
 */
import type { BlockNode, CompleteBlockNode, Extent, FileRange, IoOptions, WriteOptions, ZeroOptions } from '../api/block.js';
import { BlkrepError } from '../api/errors.js';
import { Filter } from '../block/filter.js';
import { PinnedFilter } from '../block/filters/pinned.js';
import { stackFilters, type FilterSpec } from '../block/filters/spec.js';
import { completeNode } from '../block/node.js';

/** The slots, top to bottom. */
export const SLOTS = ['front', 'tracking', 'replication', 'cbw', 'pivot', 'image'] as const;
export type Slot = (typeof SLOTS)[number];
/** The slots insert(), replace() and remove() change (image is fixed: a pivot replaces it). */
export type MovableSlot = Exclude<Slot, 'image'>;

/** Builds a slot's node over `below`, the node of the next occupied slot under it. */
export type SlotFactory = (below: CompleteBlockNode) => BlockNode;

/** The slot holding the new image after a pivot: its node does not forward to the slot under it. */
const TERMINAL: ReadonlySet<Slot> = new Set<Slot>(['pivot', 'image']);
const IMAGE = SLOTS.indexOf('image');

export interface ExportStackOptions {
  /** the export's name, for messages */
  name?: string;
  /** --filter specs above the stack (the first outermost) */
  filters?: readonly FilterSpec[];
}

/** One occupied slot. */
interface Held {
  /** as the factory returned it (a driver's own node: Qcow2Node for the image) */
  readonly opened: BlockNode;
  /** as it is linked */
  readonly node: CompleteBlockNode;
}

/** The requests that entered while the stack had one shape. */
class Epoch {
  n = 0;
  private idle: Array<() => void> = [];
  /** bound once, handed to every request's finally(): no allocation per request */
  readonly release = (): void => {
    if (--this.n === 0 && this.idle.length > 0) for (const w of this.idle.splice(0)) w();
  };
  drained(): Promise<void> {
    return this.n === 0 ? Promise.resolve() : new Promise((resolve) => this.idle.push(resolve));
  }
}

/**
 * The stack's entry: forwards every request to the top occupied slot, counting it in the epoch
 * it entered (read before the request is issued, counted before anything else can run). Its
 * size, limits and caps are the image's (PinnedFilter).
 */
class StackEntry extends PinnedFilter {
  readonly driver = 'export-stack';
  epoch = new Epoch();
  /** epochs whose requests may still be in flight */
  private retired: Epoch[] = [];

  /** A new shape: new requests count in a new epoch; resolves when every older one is idle. */
  turn(): Promise<void> {
    this.retired = [...this.retired.filter((e) => e.n > 0), this.epoch];
    this.epoch = new Epoch();
    const busy = this.retired.filter((e) => e.n > 0);
    if (busy.length === 0) return Promise.resolve();
    return Promise.all(busy.map((e) => e.drained())).then(() => {});
  }

  private count<T>(e: Epoch, p: Promise<T>): Promise<T> {
    e.n++;
    return p.finally(e.release);
  }

  override read(offset: number, length: number, o?: IoOptions): Promise<Buffer> {
    return this.count(this.epoch, this.next.read(offset, length, o));
  }
  override readInto(offset: number, target: Buffer, o?: IoOptions): Promise<void> {
    return this.count(this.epoch, this.next.readInto(offset, target, o));
  }
  override write(offset: number, data: Buffer, o?: WriteOptions): Promise<void> {
    return this.count(this.epoch, this.next.write(offset, data, o));
  }
  override writeZeroes(offset: number, length: number, o?: ZeroOptions): Promise<void> {
    return this.count(this.epoch, this.next.writeZeroes(offset, length, o));
  }
  override trim(offset: number, length: number, o?: WriteOptions): Promise<void> {
    return this.count(this.epoch, this.next.trim(offset, length, o));
  }
  override flush(o?: IoOptions): Promise<void> {
    return this.count(this.epoch, this.next.flush(o));
  }
  override extents(offset: number, length: number, o?: IoOptions): Promise<Extent[]> {
    return this.count(this.epoch, this.next.extents(offset, length, o));
  }
  override cache(offset: number, length: number, o?: IoOptions): Promise<void> {
    return this.count(this.epoch, this.next.cache(offset, length, o));
  }
  /** counted in its epoch, as a read, until released */
  override fileRange(offset: number, length: number): FileRange | undefined {
    const range = this.passFileRange(offset, length);
    if (!range) return undefined;
    const e = this.epoch;
    e.n++;
    let released = false;
    return {
      sendTo: (sockFd, header, lane) => range.sendTo(sockFd, header, lane),
      release: () => {
        if (released) return;
        released = true;
        range.release();
        e.release();
      },
    };
  }
}

export class ExportStack {
  /** what the export serves: the user filters over the entry (the entry when there are none) */
  readonly top: CompleteBlockNode;
  private readonly entry: StackEntry;
  private readonly held: Array<Held | undefined> = SLOTS.map(() => undefined);
  private readonly name: string;

  constructor(image: BlockNode, options: ExportStackOptions = {}) {
    this.name = options.name ?? image.description;
    const node = completeNode(image);
    this.held[IMAGE] = { opened: image, node };
    // the image's own caps are announced (what it does itself), as before the stack
    this.entry = new StackEntry(node, image);
    this.top = completeNode(stackFilters(this.entry, options.filters ?? []));
  }

  has(slot: Slot): boolean {
    return this.held[slotIndex(slot, this.name)] !== undefined;
  }

  /** A slot's node as it is linked (completed), or undefined when the slot is empty. */
  node(slot: Slot): CompleteBlockNode | undefined {
    return this.held[slotIndex(slot, this.name)]?.node;
  }

  /** A slot's node as its factory returned it (a driver's own node for image and pivot). */
  opened(slot: Slot): BlockNode | undefined {
    return this.held[slotIndex(slot, this.name)]?.opened;
  }

  /** The image the export serves now: the pivot's target after a pivot, else the image. */
  get image(): BlockNode {
    return (this.held[SLOTS.indexOf('pivot')] ?? this.held[IMAGE]!).opened;
  }

  /** The occupied slots, top to bottom, with their node's driver (for status and tests). */
  layers(): Array<{ slot: Slot; driver: string }> {
    const out: Array<{ slot: Slot; driver: string }> = [];
    for (const [i, h] of this.held.entries()) {
      if (h) out.push({ slot: SLOTS[i]!, driver: h.node.driver });
      if (h && TERMINAL.has(SLOTS[i]!)) break;
    }
    return out;
  }

  /**
   * Put `factory(below)` into an empty slot. Throws at once, changing nothing, for a slot that
   * is not movable (ERR_STACK_SLOT), is occupied (ERR_STACK_SLOT_BUSY), or a node that cannot sit
   * there (ERR_STACK_BAD_NODE, ERR_SIZE_MISMATCH). Resolves, with the slot's node, when the
   * requests that entered before have finished; never rejects.
   */
  insert(slot: MovableSlot, factory: SlotFactory): Promise<CompleteBlockNode> {
    const i = movableIndex(slot, this.name);
    const h = this.held[i];
    if (h) {
      throw new BlkrepError('ERR_STACK_SLOT_BUSY', `slot "${slot}" of export "${this.name}" holds ${h.node.driver} already: remove it first, or replace it`, {
        errno: 'EINVAL',
        details: { export: this.name, slot, driver: h.node.driver },
      });
    }
    return this.put(i, factory);
  }

  /** Put `factory(below)` into a slot, empty or not (a second pivot). As insert() otherwise. */
  replace(slot: MovableSlot, factory: SlotFactory): Promise<CompleteBlockNode> {
    return this.put(movableIndex(slot, this.name), factory);
  }

  /**
   * Empty a slot: the slot above is linked to the one below. Throws at once for a slot that is
   * not movable (ERR_STACK_SLOT) or empty (ERR_STACK_SLOT_EMPTY). Resolves, with the node as
   * its factory returned it, when the requests that entered before have finished (none reaches
   * the node any more: its owner may release it then); never rejects.
   */
  remove(slot: MovableSlot): Promise<BlockNode> {
    const i = movableIndex(slot, this.name);
    const h = this.held[i];
    if (!h) {
      throw new BlkrepError('ERR_STACK_SLOT_EMPTY', `slot "${slot}" of export "${this.name}" is empty: nothing to remove`, { errno: 'EINVAL', details: { export: this.name, slot } });
    }
    this.held[i] = undefined;
    this.link(i, this.below(i));
    return this.entry.turn().then(() => h.opened);
  }

  private put(i: number, factory: SlotFactory): Promise<CompleteBlockNode> {
    const slot = SLOTS[i]!;
    const opened = factory(this.below(i));
    const node = completeNode(opened);
    if (node.size !== this.entry.size) {
      throw new BlkrepError('ERR_SIZE_MISMATCH', `cannot put ${node.description} of ${node.size} bytes into slot "${slot}" of export "${this.name}" of ${this.entry.size} bytes`, {
        errno: 'EINVAL',
        details: { export: this.name, slot, size: this.entry.size, newSize: node.size },
      });
    }
    if (!TERMINAL.has(slot) && !(node instanceof Filter)) {
      throw new BlkrepError('ERR_STACK_BAD_NODE', `slot "${slot}" of export "${this.name}" takes a filter (src/block/filter.ts), not a ${node.driver} node: the stack relinks it when the slots under it change`, {
        errno: 'EINVAL',
        details: { export: this.name, slot, driver: node.driver },
      });
    }
    const at = this.held.findIndex((h, j) => j !== i && h !== undefined && (h.node === node || h.opened === opened));
    if (at >= 0 || node === this.entry) {
      throw new BlkrepError('ERR_STACK_BAD_NODE', `the ${node.driver} node for slot "${slot}" of export "${this.name}" is in its slot "${at >= 0 ? SLOTS[at] : 'entry'}" already: a node sits in one slot`, {
        errno: 'EINVAL',
        details: { export: this.name, slot, in: at >= 0 ? SLOTS[at] : 'entry' },
      });
    }
    this.held[i] = { opened, node };
    this.link(i, node);
    return this.entry.turn().then(() => node);
  }

  /** The node of the next occupied slot under slot i (there is always one: the image). */
  private below(i: number): CompleteBlockNode {
    for (let j = i + 1; j < SLOTS.length; j++) {
      const h = this.held[j];
      if (h) return h.node;
    }
    throw new BlkrepError('ERR_INTERNAL', `export "${this.name}" has no image`);
  }

  /** Link the occupied slot above slot i (or the entry) to `node`. */
  private link(i: number, node: CompleteBlockNode): void {
    for (let j = i - 1; j >= 0; j--) {
      const h = this.held[j];
      if (h) {
        Filter.relink(h.node as Filter, node);
        return;
      }
    }
    Filter.relink(this.entry, node);
  }
}

function slotIndex(slot: string, name: string): number {
  const i = SLOTS.indexOf(slot as Slot);
  if (i < 0) throw new BlkrepError('ERR_STACK_SLOT', `export "${name}" has no slot "${slot}" (slots, top to bottom: ${SLOTS.join(', ')})`, { errno: 'EINVAL', details: { export: name, slot } });
  return i;
}

function movableIndex(slot: string, name: string): number {
  const i = slotIndex(slot, name);
  if (i === IMAGE) {
    throw new BlkrepError('ERR_STACK_SLOT', `slot "image" of export "${name}" is fixed: a new image goes into slot "pivot", above it`, { errno: 'EINVAL', details: { export: name, slot } });
  }
  return i;
}
