/**
 * A node's pair state, kept durably beside its disk (IMAGE.pair.json, written by atomic replace +
 * fsync): node id, role, generations, the committed epoch and the checkpoint step in progress —
 * what the crash rules of replication.md §2 read after a restart.
 */
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { BlkrepError } from '../api/errors.js';
import { replaceFile } from '../util/safe-file.js';
import { freshTuple, type GenerationTuple } from './generations.js';
import type { DiskState } from './messages.js';

export interface PairState {
  version: 1;
  nodeId: string;
  role: 'primary' | 'secondary' | 'none';
  gi: GenerationTuple;
  /** last committed epoch */
  epoch: number;
  /** a checkpoint between step 5 and step 7 (replication.md §2): its number */
  committing: number | null;
  diskState: DiskState;
  /** false while a primary serves; true after a clean stop (a crashed primary resyncs its activity log) */
  cleanShutdown: boolean;
}

export function pairStatePath(imagePath: string): string {
  return `${imagePath}.pair.json`;
}

export function initialState(role: PairState['role']): PairState {
  return { version: 1, nodeId: randomUUID(), role, gi: freshTuple(), epoch: 0, committing: null, diskState: 'Inconsistent', cleanShutdown: true };
}

export class PairStateFile {
  private constructor(
    readonly path: string,
    private current: PairState,
  ) {}

  /** Load the state at `path`, or create it with `init()` when there is none. */
  static async open(path: string, init: () => PairState): Promise<PairStateFile> {
    let text: string | undefined;
    try {
      text = await readFile(path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new BlkrepError('ERR_PAIR_STATE', `cannot read the pair state ${path}: ${(err as Error).message}`, { cause: err });
    }
    if (text === undefined) {
      const f = new PairStateFile(path, init());
      await f.write();
      return f;
    }
    let v: PairState;
    try {
      v = JSON.parse(text) as PairState;
    } catch {
      throw new BlkrepError('ERR_PAIR_STATE', `the pair state ${path} is not JSON (not written by blkrep, or damaged)`);
    }
    if (v?.version !== 1 || typeof v.nodeId !== 'string' || typeof v.epoch !== 'number') {
      throw new BlkrepError('ERR_PAIR_STATE', `the pair state ${path} is not a version 1 blkrep pair state`);
    }
    return new PairStateFile(path, v);
  }

  get state(): Readonly<PairState> {
    return this.current;
  }

  /** Change the state and make it durable before resolving. */
  async update(change: (s: PairState) => PairState): Promise<void> {
    this.current = change(structuredClone(this.current));
    await this.write();
  }

  private async write(): Promise<void> {
    await replaceFile(this.path, JSON.stringify(this.current, null, 2) + '\n', { mode: 0o600, what: 'pair state' });
  }
}
