// The module esbuild puts in a bundle in place of a builtin that loads at first use
// (scripts/bundle-oclif.mjs: node:child_process, node:zlib …): a proxy that requires the real one
// when a property is read.
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

// A function of such a module (a name in lower case: execFile, inflateRaw, createHash …) is a stub
// that loads the module when called, so that a module that only wraps one at its start
// (`promisify(execFile)` in oclif's os utilities, `promisify(inflateRaw)` in the qcow2 reader) does
// not load the builtin then: child_process alone brings net, dgram and the streams, zlib its binding
// and the streams. A function with its own promisify (execFile, exec, lookup, generateKeyPair …)
// gets a stub of that too. Classes (ChildProcess, Inflate …) and everything else load the module
// when read.
export function lazyBuiltin(name) {
  const real = require(name);
  const custom = Symbol.for('nodejs.util.promisify.custom');
  const names = Object.keys(real).filter((k) => k !== 'default');
  const stubbed = names.filter((k) => typeof real[k] === 'function' && /^[a-z]/.test(k));
  const promisified = stubbed.filter((k) => typeof real[k][custom] === 'function');
  return `"use strict";
let real;
const load = () => (real ??= require("node:${name}"));
const names = ${JSON.stringify(names)};
const custom = Symbol.for("nodejs.util.promisify.custom");
const stubs = new Map();
function stub(key, promisified) {
  const f = function (...args) {
    return new.target ? Reflect.construct(load()[key], args, new.target) : load()[key].apply(this, args);
  };
  Object.defineProperty(f, "name", { value: key });
  if (promisified) f[custom] = function (...args) { return load()[key][custom].apply(this, args); };
  return f;
}
for (const key of ${JSON.stringify(stubbed)}) stubs.set(key, stub(key, ${JSON.stringify(promisified)}.includes(key)));
const get = (key) => (stubs.has(key) ? stubs.get(key) : load()[key]);
module.exports = new Proxy({}, {
  get: (_, key) => get(key),
  has: (_, key) => stubs.has(key) || key in load(),
  ownKeys: () => names,
  getOwnPropertyDescriptor: (_, key) =>
    names.includes(key) ? { configurable: true, enumerable: true, get: () => get(key) } : undefined,
});
`;
}
