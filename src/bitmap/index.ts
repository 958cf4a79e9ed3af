/** Dirty bitmaps: in memory, persistent (with activity log and checkpoints), the tracking filter, the NBD context. */
export * from './dirty-bitmap.js';
export { crc32c } from './crc32c.js';
export { ActivityLog, type ActivityLogIo, type ActivityLogStats } from './activity-log.js';
export {
  PersistentBitmap, type CheckpointInfo, type CreateOptions, type OpenOptions, type OpenResult, type PersistentBitmapInfo, type WriteTicket,
  type LoadState, type BitmapFault,
} from './persistent.js';
export { DirtyTrackingNode, volatileTracker, type WriteTracker } from '../block/filters/tracking.js';
export { dirtyBitmapContext, DIRTY_BITMAP_CONTEXT_PREFIX, STATE_DIRTY, MAX_DESCRIPTORS, type DirtyBitmapContextOptions } from './meta-context.js';
export {
  DEFAULT_EXTENT_SIZE, DEFAULT_HOT_EXTENTS, DEFAULT_AL_SLOTS, MAGIC, VERSION, FLAG_ENABLED, FLAG_IN_USE, FLAG_FROZEN,
} from './format.js';
