/**
 * An export: an image served under a name, with the meta contexts it offers and its counters.
 * Shared by every connection to it (one node, so a flush on any connection covers writes
 * completed on all of them: CAN_MULTI_CONN).
 */
import type { CompleteBlockNode, Extent } from '../api/block.js';
import { CMD_NAMES, BASE_ALLOCATION, STATE_HOLE, STATE_ZERO, TF } from './constants.js';

/** One descriptor of a BLOCK_STATUS reply: [length, flags]. */
export type Descriptor = [number, number];

/**
 * A source of block status for one meta context (base:allocation here; qemu:dirty-bitmap:NAME and
 * qemu:allocation-depth come from later layers). Returns consecutive descriptors from `offset`,
 * at least one, none of length 0.
 */
export interface MetaContextSource {
  readonly name: string;
  blockStatus(offset: number, length: number): Promise<Descriptor[]>;
}

export interface ExportOptions {
  name: string;
  description?: string;
  node: CompleteBlockNode;
  readOnly?: boolean;
  /** smallest I/O unit clients must respect; defaults to the node's */
  minimumBlockSize?: number;
  /** not in NBD_OPT_LIST: only a client that knows the name reaches it (the pair's writer export) */
  hidden?: boolean;
  /**
   * Checked when a client picks the export (NBD_OPT_GO/INFO, EXPORT_NAME): a string refuses it,
   * NBD_REP_ERR_POLICY with that message (EXPORT_NAME: the connection is closed)
   */
  admit?: () => string | undefined;
  /**
   * The name logs, status, metrics and error messages show, when the name itself is a secret
   * (the pair's writer export carries its fencing token: data-token.ts); default the name
   */
  shownName?: string;
  /**
   * Requests one connection runs at once before the server stops reading it (default
   * server-session.ts MAX_INFLIGHT, 64). The pair's writer export sets its own
   * (data-token.ts REPLICA_MAX_INFLIGHT): its one client is the primary, whose window matches.
   */
  maxInflight?: number;
}

export interface ExportCounters {
  connections: number;
  totalConnections: number;
  requests: Record<string, number>;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

export class Export {
  readonly name: string;
  readonly description: string | undefined;
  readonly node: CompleteBlockNode;
  readonly readOnly: boolean;
  readonly hidden: boolean;
  /** what logs, status, metrics and error messages call it (ExportOptions.shownName) */
  readonly shownName: string;
  readonly admit: (() => string | undefined) | undefined;
  /** ExportOptions.maxInflight (undefined: the server's default) */
  readonly maxInflight: number | undefined;
  readonly minimum: number;
  readonly preferred: number;
  readonly maximum: number;
  readonly counters: ExportCounters;
  private readonly contexts = new Map<string, MetaContextSource>();

  constructor(options: ExportOptions) {
    this.name = options.name;
    this.description = options.description;
    this.node = options.node;
    this.readOnly = Boolean(options.readOnly) || !options.node.caps.canWrite;
    this.hidden = options.hidden ?? false;
    this.shownName = options.shownName ?? options.name;
    this.admit = options.admit;
    this.maxInflight = options.maxInflight;
    const limits = options.node.limits;
    this.minimum = Math.max(limits.minimum, options.minimumBlockSize ?? 1);
    this.preferred = Math.max(limits.preferred, this.minimum, 512);
    this.maximum = Math.max(limits.maximum, this.preferred);
    this.counters = {
      connections: 0,
      totalConnections: 0,
      requests: Object.fromEntries(Object.values(CMD_NAMES).map((n) => [n, 0])),
      errors: 0,
      bytesRead: 0,
      bytesWritten: 0,
    };
    this.addMetaContext(allocationContext(this.node));
    if (this.node.caps.allocationDepth) this.addMetaContext(allocationDepthContext(this.node));
  }

  get size(): number {
    return this.node.size;
  }

  addMetaContext(source: MetaContextSource): void {
    this.contexts.set(source.name, source);
  }

  removeMetaContext(name: string): void {
    this.contexts.delete(name);
  }

  metaContext(name: string): MetaContextSource | undefined {
    return this.contexts.get(name);
  }

  metaContextNames(): string[] {
    return [...this.contexts.keys()];
  }

  /** Transmission flags; SEND_DF only when the connection negotiated structured replies. */
  transmissionFlags(structured: boolean): number {
    const c = this.node.caps;
    let f = TF.HAS_FLAGS;
    if (this.readOnly) f |= TF.READ_ONLY;
    if (c.canFlush) f |= TF.SEND_FLUSH;
    if (c.canFua && !this.readOnly) f |= TF.SEND_FUA;
    if (c.canTrim && !this.readOnly) f |= TF.SEND_TRIM;
    if (!this.readOnly) f |= TF.SEND_WRITE_ZEROES;
    if (c.canFastZero && !this.readOnly) f |= TF.SEND_FAST_ZERO;
    if (structured) f |= TF.SEND_DF;
    if (c.canMultiConn) f |= TF.CAN_MULTI_CONN;
    f |= TF.SEND_CACHE;
    return f;
  }
}

function allocationContext(node: CompleteBlockNode): MetaContextSource {
  return {
    name: BASE_ALLOCATION,
    async blockStatus(offset: number, length: number): Promise<Descriptor[]> {
      if (!node.caps.canExtents) return [[length, 0]];
      const extents: Extent[] = await node.extents(offset, length);
      return extents.map((e) => [e.length, (e.hole ? STATE_HOLE : 0) | (e.zero ? STATE_ZERO : 0)]);
    },
  };
}

/** QEMU's context for allocation depth (reference part D) */
export const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';

/**
 * qemu:allocation-depth: each descriptor's whole 32-bit value is the depth — 0 unallocated in
 * the whole chain, 1 the top layer, 2 its backing, …
 */
function allocationDepthContext(node: CompleteBlockNode): MetaContextSource {
  return {
    name: QEMU_ALLOCATION_DEPTH,
    async blockStatus(offset: number, length: number): Promise<Descriptor[]> {
      const out: Descriptor[] = [];
      for (const e of await node.extents(offset, length)) {
        const depth = e.depth ?? 1;
        const last = out[out.length - 1];
        if (last && last[1] === depth) last[0] += e.length;
        else out.push([e.length, depth]);
      }
      return out;
    },
  };
}
