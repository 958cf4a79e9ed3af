export { Qcow2Node, resolveBackingSpec, type Qcow2OpenOptions } from './node.js';
export { createQcow2, type Qcow2CreateOptions } from './create.js';
export { HostFile, type Qcow2Container } from './file.js';
