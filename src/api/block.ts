/**
 * The block node contract (DESIGN.md §4). Drivers (raw, qcow2, nbd, memory) and filters implement
 * it. Everything marked optional is optional: `completeNode()` in src/block/node.ts fills in the
 * missing parts (zeroing emulated by writes, FUA emulated by flush, extents as "all data").
 *
 * Durability rule: when flush() resolves, every write that resolved before flush() was called is on
 * stable storage, with all metadata it depends on. A write with `fua` is durable when it resolves.
 *
 * Offsets and lengths are JavaScript numbers (exact up to 2^53 bytes = 8 PiB).
 */

export interface BlockLimits {
  /** smallest unit of I/O; a power of two, 1 … 65536 */
  minimum: number;
  /** preferred unit; a power of two ≥ max(minimum, 512) */
  preferred: number;
  /** largest READ/WRITE payload accepted */
  maximum: number;
}

export interface Capabilities {
  canWrite: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  /** writeZeroes with `fast` can succeed (faster than writing zeros); else it fails ENOTSUP */
  canFastZero: boolean;
  /** flush on any connection makes writes from every connection durable */
  canMultiConn: boolean;
  canExtents: boolean;
  canCache: boolean;
  /**
   * extents() answers from metadata without reading data, so the server may ask it on every
   * read to send holes as hole chunks. Absent means false.
   */
  cheapExtents?: boolean;
  /**
   * extents() fills in `depth` on every run (stacks such as qcow2 over a backing file), so the
   * server can offer the `qemu:allocation-depth` meta context. Absent means false.
   */
  allocationDepth?: boolean;
}

export interface IoOptions {
  signal?: AbortSignal;
  /**
   * A read of a bulk copy (the copy engine's reads): a raw file tries it on the calling thread
   * first when the pages are cached (RWF_NOWAIT, up to 1 MiB), where a read that size otherwise
   * goes through the thread pool. A hint; other drivers ignore it.
   */
  bulk?: boolean;
}

export interface WriteOptions extends IoOptions {
  /** force unit access: durable before the call resolves */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** keep the range allocated (do not punch a hole) */
  noHole?: boolean;
  /** fail with ENOTSUP, changing nothing, unless zeroing is faster than writing zeros */
  fast?: boolean;
}

/** One run of the extents map. */
export interface Extent {
  length: number;
  /** not allocated (writes may need space) */
  hole: boolean;
  /** reads as zeros */
  zero: boolean;
  /** for stacks: 0 = unallocated in the whole chain, 1 = top layer, 2 = its backing, … */
  depth?: number;
}

export interface BlockNode {
  /** driver or filter name: "raw", "memory", … */
  readonly driver: string;
  /** human description of what is open (path, URI) */
  readonly description: string;
  readonly size: number;
  readonly limits: BlockLimits;
  readonly caps: Capabilities;

  read(offset: number, length: number, options?: IoOptions): Promise<Buffer>;
  /** Read target.length bytes at offset into target, so callers can reuse buffers. */
  readInto?(offset: number, target: Buffer, options?: IoOptions): Promise<void>;
  /**
   * The node must not keep `data` (or a view of it) once the promise settles: the caller may
   * reuse the buffer. A node that needs the bytes later copies them.
   */
  write(offset: number, data: Buffer, options?: WriteOptions): Promise<void>;
  writeZeroes?(offset: number, length: number, options?: ZeroOptions): Promise<void>;
  trim?(offset: number, length: number, options?: WriteOptions): Promise<void>;
  flush?(options?: IoOptions): Promise<void>;
  /**
   * Runs describing [offset, offset+length) in order, starting at `offset`. May describe less
   * than asked (at least one run) or run past the end of the request, never past `size`.
   */
  extents?(offset: number, length: number, options?: IoOptions): Promise<Extent[]>;
  /** prefetch hint; must not change what reads return */
  cache?(offset: number, length: number, options?: IoOptions): Promise<void>;
  /**
   * What the image is, for `blkrep info`: at least `format` and `virtualSize`; drivers add what
   * they know, named after `qemu-img info --output=json` where the meaning matches.
   */
  info?(): Promise<Record<string, unknown>>;
  /**
   * Drop every allocation of this layer, so reads fall through to its backing (qcow2
   * make-empty). Waits for requests in flight; durable when it resolves.
   */
  makeEmpty?(options?: IoOptions): Promise<void>;
  /**
   * [offset, offset+length) as a range of an open file whose bytes are exactly what read() would
   * return, for a server to send without copying them through a buffer (serve-nbd's splice path,
   * src/nbd/server-session.ts); undefined when the node cannot (not a raw file, a filter that
   * changes or checks reads, no addon). The node stays open until release().
   */
  fileRange?(offset: number, length: number): FileRange | undefined;
  close(): Promise<void>;
}

/** What BlockNode.fileRange() gives: a file's bytes that can go straight to a socket. */
export interface FileRange {
  /**
   * Send `header`, then the range's bytes, to the socket `sockFd` (a non-blocking stream socket
   * nothing else writes to meanwhile), on a pool thread. 'fallback': nothing was sent (the file
   * is shorter than the range now, or the range is too large), read the usual way. Rejects with
   * `.stage` 'read' when reading failed (nothing sent), 'send' when the socket failed midway (the
   * stream is torn). `lane`: the connection's Buffer of 3 aligned Int32, zeroed at first; the
   * sends of one lane reach the socket in the order sendTo() was called; a non-zero lane[0]
   * (set at close) stops them.
   */
  sendTo(sockFd: number, header: Buffer, lane: Buffer): Promise<'sent' | 'fallback'>;
  /** the caller is done with the range (once, after sendTo settled or instead of it) */
  release(): void;
}

/** A node whose optional operations have all been filled in. */
export type CompleteBlockNode = BlockNode & Required<Pick<BlockNode, 'readInto' | 'writeZeroes' | 'trim' | 'flush' | 'extents' | 'cache'>>;
