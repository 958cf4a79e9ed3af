/**
 * The file heartbeat backend: a path through shared storage, SBD-style, independent of the
 * network. Both nodes name the same file; each writes its beats into its own 4 KiB slot and reads
 * the other's once per interval.
 *
 *   file:///PATH[?slot=0|1]
 *
 * The slot defaults to the order of the node ids (the smaller id writes slot 0), so both nodes
 * use the same URI. The file is created (mode 0600, 8 KiB) if missing. A slot holds "BKHS", a
 * 2-byte big-endian length and the frame; a slot whose bytes did not change since the last read
 * is no beat, so a peer that stopped writing is silent here as on any path.
 *
 * Each read and each write opens and closes the file, so NFS's close-to-open consistency shows
 * the other host's latest slot (mount with actimeo=0 or noac for reads fresher than the attribute
 * cache); a cluster file system (GFS2, OCFS2) needs nothing more. A raw shared block device would
 * need direct I/O, which this backend does not do: it refuses anything but a regular file.
 */
import { constants } from 'node:fs';
import { lstat, open } from 'node:fs/promises';
import type { HeartbeatBackend, HeartbeatOpenOptions, HeartbeatPath, HeartbeatReport } from 'blkrep/api';

const SLOT_BYTES = 4096;
const MAX_FRAME = 256;
const SLOT_MAGIC = Buffer.from('BKHS', 'latin1');

export class FileHeartbeatError extends Error {
  readonly code: string;
  readonly errno: 'EINVAL' | 'EIO';
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: { errno?: 'EINVAL' | 'EIO'; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'FileHeartbeatError';
    this.code = code;
    this.errno = options.errno ?? 'EIO';
    this.details = options.details ?? {};
  }
}

export interface FileTarget {
  path: string;
  /** the slot this node writes; the peer's is the other one */
  slot: 0 | 1;
}

function bad(uri: string, why: string): FileHeartbeatError {
  return new FileHeartbeatError('ERR_BAD_HEARTBEAT', `invalid heartbeat URI "${uri}": ${why} (expected file:///PATH[?slot=0|1])`, { errno: 'EINVAL', details: { uri } });
}

export function parseFileUri(uri: string, self: string, peer: string): FileTarget {
  if (!uri.startsWith('file://')) throw bad(uri, 'the scheme is not file://');
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw bad(uri, 'not a URL');
  }
  if (url.host !== '' && url.host !== 'localhost') throw bad(uri, `a file heartbeat names a local path, not host "${url.host}"`);
  const path = decodeURIComponent(url.pathname);
  if (path === '' || path.endsWith('/')) throw bad(uri, 'no file named');
  for (const key of url.searchParams.keys()) if (key !== 'slot') throw bad(uri, `unknown parameter "${key}"`);
  const slotText = url.searchParams.get('slot');
  if (slotText !== null) {
    if (slotText !== '0' && slotText !== '1') throw bad(uri, `slot "${slotText}" is not 0 or 1`);
    return { path, slot: slotText === '0' ? 0 : 1 };
  }
  if (self === peer) throw bad(uri, `this node and its peer have the same id "${self}": give ?slot=`);
  return { path, slot: self < peer ? 0 : 1 };
}

export function encodeSlot(frame: Buffer): Buffer {
  const slot = Buffer.alloc(SLOT_BYTES);
  SLOT_MAGIC.copy(slot, 0);
  slot.writeUInt16BE(frame.length, 4);
  frame.copy(slot, 6);
  return slot;
}

/** the frame in a slot, or undefined for an empty or damaged slot */
export function decodeSlot(slot: Buffer): Buffer | undefined {
  if (slot.length < 6 || !slot.subarray(0, 4).equals(SLOT_MAGIC)) return undefined;
  const length = slot.readUInt16BE(4);
  if (length > MAX_FRAME || 6 + length > slot.length) return undefined;
  return Buffer.from(slot.subarray(6, 6 + length));
}

class FilePath implements HeartbeatPath {
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private lastSeen: Buffer | undefined;
  private reading = false;
  private writing = false;
  /** the newest frame not yet written (only the latest matters) */
  private pending: Buffer | undefined;
  private readonly beatListeners: Array<(r: HeartbeatReport) => void> = [];
  private readonly errorListeners: Array<(e: Error) => void> = [];

  constructor(
    readonly uri: string,
    private readonly target: FileTarget,
    private readonly options: HeartbeatOpenOptions,
  ) {
    options.signal?.addEventListener('abort', () => void this.stop(), { once: true });
  }

  onBeat(listener: (r: HeartbeatReport) => void): void {
    this.beatListeners.push(listener);
  }

  onError(listener: (e: Error) => void): void {
    this.errorListeners.push(listener);
  }

  private error(err: Error): void {
    for (const l of this.errorListeners) l(err);
  }

  async start(): Promise<void> {
    if (this.stopped || this.options.signal?.aborted) return;
    const { path } = this.target;
    try {
      const st = await lstat(path).catch((err: { code?: string }) => (err.code === 'ENOENT' ? undefined : Promise.reject(err)));
      if (st && !st.isFile()) throw new FileHeartbeatError('ERR_HEARTBEAT_START', `heartbeat file ${path} is not a regular file (a block device needs direct I/O, which the file backend does not do)`, { details: { uri: this.uri, path } });
      const handle = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600);
      try {
        const size = (await handle.stat()).size;
        if (size < 2 * SLOT_BYTES) await handle.truncate(2 * SLOT_BYTES);
      } finally {
        await handle.close();
      }
      // what the peer's slot holds now is old news: only a change is a beat
      this.lastSeen = await this.readPeerSlot();
    } catch (err) {
      if (err instanceof FileHeartbeatError) throw err;
      throw new FileHeartbeatError('ERR_HEARTBEAT_START', `cannot open heartbeat file ${path}: ${(err as { code?: string }).code ?? (err as Error).message}`, { cause: err, details: { uri: this.uri, path } });
    }
    if (this.stopped) return;
    this.timer = setInterval(() => void this.poll(), this.options.intervalMs);
    this.timer.unref();
  }

  private async readPeerSlot(): Promise<Buffer> {
    const handle = await open(this.target.path, 'r');
    try {
      const slot = Buffer.alloc(SLOT_BYTES);
      await handle.read(slot, 0, SLOT_BYTES, (1 - this.target.slot) * SLOT_BYTES);
      return slot;
    } finally {
      await handle.close();
    }
  }

  private async poll(): Promise<void> {
    if (this.reading || this.stopped) return;
    this.reading = true;
    try {
      const slot = await this.readPeerSlot();
      if (this.stopped || (this.lastSeen && slot.equals(this.lastSeen))) return;
      this.lastSeen = slot;
      const frame = decodeSlot(slot);
      if (frame === undefined) return;
      const report = { frame, from: `slot ${1 - this.target.slot}` };
      for (const l of this.beatListeners) l(report);
    } catch (err) {
      this.error(new FileHeartbeatError('ERR_HEARTBEAT_RECEIVE', `cannot read the peer's slot in ${this.target.path}: ${(err as { code?: string }).code ?? (err as Error).message}`, { cause: err, details: { uri: this.uri } }));
    } finally {
      this.reading = false;
    }
  }

  send(frame: Buffer): void {
    if (this.stopped || frame.length > MAX_FRAME) return;
    this.pending = frame;
    if (!this.writing) void this.write();
  }

  private async write(): Promise<void> {
    this.writing = true;
    try {
      while (this.pending && !this.stopped) {
        const slot = encodeSlot(this.pending);
        this.pending = undefined;
        const handle = await open(this.target.path, constants.O_WRONLY | constants.O_NOFOLLOW);
        try {
          await handle.write(slot, 0, SLOT_BYTES, this.target.slot * SLOT_BYTES);
        } finally {
          await handle.close();
        }
      }
    } catch (err) {
      this.error(new FileHeartbeatError('ERR_HEARTBEAT_SEND', `cannot write this node's slot in ${this.target.path}: ${(err as { code?: string }).code ?? (err as Error).message}`, { cause: err, details: { uri: this.uri } }));
    } finally {
      this.writing = false;
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.pending = undefined;
  }
}

export function createFileHeartbeat(): HeartbeatBackend {
  return {
    name: 'file',
    summary: 'beats through a shared file (file:///PATH): each node writes its 4 KiB slot and reads the other\'s',
    caps: { frames: true, independentPath: true, authoritative: false },
    open: (uri, options) => new FilePath(uri, parseFileUri(uri, options.self, options.peer), options),
  };
}
