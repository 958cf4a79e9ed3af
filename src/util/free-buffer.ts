/**
 * Free a buffer's memory now instead of at a major GC. A buffer that lived long enough to be
 * promoted (a copy buffer of a finished job, a queue's slab, a pooled payload buffer) keeps its
 * backing store until a mark-compact, which V8 starts late for memory outside its heap: dropped
 * buffers of a busy daemon piled up to tens of MiB of its peak RSS (bench/pair, session 16).
 * Transferring the ArrayBuffer detaches it (every view of it becomes empty) and hands its backing
 * store to a new, young ArrayBuffer that nothing references: the next scavenge (milliseconds
 * away under load) frees it. ~2 µs each.
 *
 * Only for a buffer nothing uses any more, that owns its whole ArrayBuffer (not one cut from
 * Node's shared 8 KiB pool, which other buffers share): false, and nothing done, otherwise.
 */
export function freeBufferNow(buffer: Buffer): boolean {
  const ab = buffer.buffer;
  if (!(ab instanceof ArrayBuffer) || buffer.byteOffset !== 0 || buffer.byteLength !== ab.byteLength || ab.byteLength === 0) return false;
  structuredClone(ab, { transfer: [ab] });
  return true;
}
