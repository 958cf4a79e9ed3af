/**
 * blkrep as a library: the engine's public API (package.json `main`, `exports["."]`).
 *
 * Block nodes and openImage, the NBD server and client, dirty bitmaps and their stores, the
 * block jobs, the image operations, the transport registry, and the serve-nbd daemon. Plugins
 * import only the contracts (`blkrep/api`, src/api/); this entry point is for programs that
 * embed the engine. Importing it also fills the tables of image formats and bitmap stores.
 */
export * from './api/index.js';

// block nodes and images
export { openImage, MAX_CHAIN_DEPTH, type OpenImageOptions } from './block/open.js';
export { registerImageFormat, probeFormat, PROBE_BYTES, type ImageFormat, type ImageFormatDriver, type FormatOpenOptions } from './block/formats.js';
export { MemoryNode } from './block/memory.js';
export { RawNode, type RawOpenOptions } from './block/raw.js';
export { NbdNode, type NbdNodeOptions } from './block/nbd.js';
export { Qcow2Node, type Qcow2OpenOptions } from './block/qcow2/node.js';
export { completeNode } from './block/node.js';

// NBD
export { NbdServer, type NbdServerOptions, type ServerStatus, type Logger } from './nbd/server.js';
export { type TlsMode, type OptionExtension } from './nbd/server-handshake.js';
export { NbdClient, type NbdClientOptions, type ClientStatus } from './nbd/client.js';
export { parseNbdUri, isNbdUri, NBD_DEFAULT_PORT, type NbdUri } from './nbd/uri.js';

// transports
export { Transports } from './engine/registry.js';

// dirty bitmaps
export { DirtyBitmap, DEFAULT_GRANULARITY, type Run } from './bitmap/dirty-bitmap.js';
export { PersistentBitmap } from './bitmap/persistent.js';
export { DirtyTrackingNode } from './block/filters/tracking.js';
export { Filter } from './block/filter.js';
export { openBitmapStore, registerBitmapStore, type BitmapStore, type OpenStoreOptions, type StoreOpener } from './bitmap/store.js';

// jobs
export { JobManager, type JobEvent, type JobInfo, type JobStatus } from './jobs/job.js';
export { MirrorJob, type MirrorOptions } from './jobs/mirror.js';
export { BackupJob, type BackupOptions } from './jobs/backup.js';
export { CommitJob, ActiveCommitJob, type CommitJobOptions, type ActiveCommitOptions } from './jobs/commit.js';

// image operations (what the image commands do)
export { createImage, type CreateOptions, type CreateResult } from './image/create.js';
export { imageInfo, type ImageInfo } from './image/info.js';
export { mapImage, type MapEntry, type MapOptions } from './image/map.js';
export { compareImages, type CompareOptions, type CompareResult } from './image/compare.js';
export { commitImage, type CommitOptions, type CommitResult } from './image/commit.js';
export { makeEmpty, type MakeEmptyOptions, type MakeEmptyResult } from './image/make-empty.js';

// the serve-nbd daemon
export { Daemon, type DaemonOptions, type ExportSpec, type ListenSpec } from './serve/daemon.js';
export { ExportStack, SLOTS, type Slot, type MovableSlot, type SlotFactory } from './serve/export-stack.js';

// sizes as the CLI writes them (64K, 1G)
export { parseSize, formatSize } from './util/size.js';
