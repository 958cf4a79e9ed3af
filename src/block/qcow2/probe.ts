/**
 * Whether an image's first bytes are qcow2: "QFI\xfb" then a big-endian version ≥ 2, as QEMU
 * probes (the driver then refuses versions it does not know, rather than the header being
 * served as raw data). Apart from the driver so that probing does not load it.
 */
export function isQcow2Header(header: Buffer): boolean {
  return header.length >= 8 && header.readUInt32BE(0) === 0x514649fb && header.readUInt32BE(4) >= 2;
}
