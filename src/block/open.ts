/**
 * openImage, with every built-in format: the table and openImage are formats.ts; this module
 * adds the lazy loaders of the built-in drivers (the qcow2 driver compiles only when a qcow2
 * image is opened). Import openImage from here. Adding a format: a driver that calls
 * registerImageFormat() when it loads, and a lazy entry below.
 */
import { registerImageFormat } from './formats.js';
import { isQcow2Header } from './qcow2/probe.js';

export {
  MAX_CHAIN_DEPTH, openImage, PROBE_BYTES, probeFormat, registerImageFormat,
  type FormatOpenOptions, type ImageFormat, type ImageFormatDriver, type OpenImageOptions,
} from './formats.js';

registerImageFormat({
  name: 'qcow2',
  probe: isQcow2Header,
  // the driver registers itself again when it loads, with the same entry
  open: async (path, o) => (await import('./qcow2/node.js')).Qcow2Node.open(path, o),
});
