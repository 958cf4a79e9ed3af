#!/usr/bin/env node
'use strict';
// CommonJS (bin/package.json): an ES module as the program costs node its ESM loader and, for
// `import … from 'node:fs'`, the ESM facade that reads every export of fs (callgrind: 529 M
// instructions for a file importing fs, module and vm against 503 M for one requiring them; node
// -e 0 is ~500 M).
// Enough libuv threads for many requests in flight against files (default is 4);
// must be set before the thread pool is first used, so before anything else loads.
if (!process.env.UV_THREADPOOL_SIZE) process.env.UV_THREADPOOL_SIZE = '16';

// --max-semi-space-size=2: a small young generation for the commands that move data or stay
// running. serve-nbd allocates at a high rate and V8's default lets each semispace grow to 16 MiB,
// which is most of its memory under load (bench/serve-nbd: peak RSS 115 -> 96 MiB). V8 reads it
// only from the command line (v8.setFlagsFromString later leaves the young generation as it is:
// 32 MiB of new space against 4 MiB with the flag, for the same allocations). In the shebang it
// cost every command ~20 ms of CPU (any V8 flag makes node refuse its built-in modules' code
// cache), so these commands run node again with it, in the same process (the native addon's
// execv: the same PID for pid files, systemd and the tests that watch it) at ~50 ms more start-up,
// and the short commands do not pay it. Without the addon (or with BLKREP_NO_NATIVE=1) they run
// without the flag; the flag on node's command line or in NODE_OPTIONS is kept as given.
const SMALL_YOUNG_GENERATION = '--max-semi-space-size=2';
const DATA_COMMANDS = new Set(['serve-nbd', 'mirror', 'backup', 'commit', 'compare', 'check', 'make-empty', 'demo']);
function smallYoungGeneration() {
  const noNative = process.env.BLKREP_NO_NATIVE;
  if (!DATA_COMMANDS.has(process.argv[2]) || (noNative !== undefined && noNative !== '' && noNative !== '0')) return;
  if ([...process.execArgv, process.env.NODE_OPTIONS ?? ''].some((a) => a.includes('--max-semi-space-size'))) return;
  const addon = { exports: {} };
  try {
    process.dlopen(addon, join(__dirname, '..', 'native', 'build', 'Release', 'blkrep_native.node'));
  } catch {
    return; // no addon: run without the flag
  }
  if (typeof addon.exports.execv !== 'function') return; // an addon built before execv
  try {
    addon.exports.execv(process.execPath, [process.argv0, ...process.execArgv, SMALL_YOUNG_GENERATION, ...process.argv.slice(1)]);
  } catch {
    // execv failed (the program is gone?): this process goes on without the flag
  }
}
const { dirname, join, sep } = require('node:path');
smallYoungGeneration();

// oclif.manifest.json (written by `npm run build`) lets oclif import only the command that runs
// instead of every command (about 50 ms of CPU at each start). A manifest older than a compiled
// command is stale (dist/ rebuilt by tsc alone): write it again first, when the tree is writable.
const { existsSync, fstatSync, readFileSync, readdirSync, realpathSync, renameSync, statSync, unlinkSync, writeFileSync, writeSync } = require('node:fs');
const Module = require('node:module');
const { createRequire } = Module;
const vm = require('node:vm');

const root = dirname(__dirname) + sep;

// Output without process.stdout (blkrep.stdio below): the first read of process.stdout or
// process.stderr builds node's stream for that descriptor (a net.Socket for a pipe, a
// tty.WriteStream, a SyncWriteStream for a file or /dev/null) and loads the modules behind it
// (net, tty, the streams: ~24 M instructions of callgrind's ~90 M for node -e 0, for one
// console.log). oclif read both at its start (the terminal width, colour support, its EPIPE
// handler) and printed through console.log; scripts/bundle-oclif.mjs points those places at
// globalThis[Symbol.for('blkrep.stdio')], and blkrep's own output (src/cli/stdio.ts) uses it too:
// - write(fd, text): fs.writeSync to 1 or 2 until all of it is written, as the stream's write does
//   for a file, a terminal or a blocking pipe. The stream takes over for the rest, and for every
//   write after it, on any error: EAGAIN (a non-blocking pipe to a slow reader: libuv waits for
//   it, and node's exit waits for the queue), EPIPE (the reader went away: the stream's error
//   goes to the handlers below, as before) … Once a stream exists, whoever built it, everything
//   goes through it, so the order of the bytes is the order of the calls.
// - isatty(fd): false without the stream for what fstat says is no terminal (a pipe, a file, a
//   socket, /dev/null); anything else asks the stream.
// - isOpen(fd): whether the stream exists (oclif's flush at the end waits for it only then).
// - whenOpen(fd): the stream if it exists, else something whose .on(event, fn) is applied when it
//   is built (oclif's EPIPE handler, bitmap dump's): an error can only come from a stream.
const stdio = (() => {
  const names = { 1: 'stdout', 2: 'stderr' };
  const open = { 1: false, 2: false };
  const pending = { 1: [], 2: [] };
  for (const fd of [1, 2]) {
    const name = names[fd];
    const node = Object.getOwnPropertyDescriptor(process, name);
    if (!node?.get || !node.configurable) {
      open[fd] = true;
      continue;
    }
    Object.defineProperty(process, name, {
      configurable: true,
      enumerable: node.enumerable,
      get() {
        Object.defineProperty(process, name, node); // node's own getter from now on
        open[fd] = true;
        const stream = process[name];
        for (const [event, fn] of pending[fd].splice(0)) stream.on(event, fn);
        return stream;
      },
    });
  }
  const DEV_NULL = 0x103; // makedev(1, 3)
  const noop = () => {};
  return {
    isOpen: (fd) => open[fd],
    isatty(fd) {
      if (!open[fd]) {
        try {
          const st = fstatSync(fd);
          if (!st.isCharacterDevice() || st.rdev === DEV_NULL) return false;
        } catch {
          // a closed descriptor: node's stream decides, as before
        }
      }
      return process[names[fd]].isTTY === true;
    },
    write(fd, text) {
      if (!open[fd]) {
        const buf = typeof text === 'string' ? Buffer.from(text) : text;
        let off = 0;
        try {
          while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
          return;
        } catch {
          text = buf.subarray(off);
        }
      }
      const stream = process[names[fd]];
      // as console.log: an error of the write is not the program's (EPIPE after `| head`)
      if (stream.listenerCount('error') === 0) stream.once('error', noop);
      stream.write(text, noop);
    },
    whenOpen(fd) {
      if (open[fd]) return process[names[fd]];
      const later = {
        on(event, fn) {
          if (open[fd]) process[names[fd]].on(event, fn);
          else pending[fd].push([event, fn]);
          return later;
        },
      };
      return later;
    },
  };
})();
globalThis[Symbol.for('blkrep.stdio')] = stdio;

// dist/vendor/oclif-core-VERSION.cjs (scripts/bundle-oclif.mjs, written by `npm run build`): all of
// @oclif/core in one file, about 120 ms of CPU less at each start than its ~200 modules. Placed in
// require's cache under the installed index's own path, so every import of '@oclif/core' — blkrep's
// commands, the oclif plugins — gets this one copy. Only the bundle of the installed version;
// BLKREP_OCLIF_BUNDLE=0 loads node_modules' files instead (bench/cli-startup compares the two).
//
// Files in dist/vendor/ are compiled with V8's code cache (FILE.FLAGS.v8cache beside them):
// compiling the bundle and the functions a command runs is about half of loading it. The cache is
// written once, at the exit of the first run without one (npm run build makes one), and only where
// the directory is writable; V8 refuses a cache from another node or other V8 flags (hence FLAGS,
// a hash of node's version and flags: the bin's own --max-semi-space-size vs `node bin/run.js`),
// and then the file is simply compiled.
const bundled = process.env.BLKREP_OCLIF_BUNDLE !== '0';
const vendorDir = join(root, 'dist', 'vendor');

function flagsKey() {
  const text = [process.version, process.arch, ...process.execArgv, process.env.NODE_OPTIONS ?? ''].join('\0');
  let h = 0x811c9dc5; // FNV-1a
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193);
  return (h >>> 0).toString(16).padStart(8, '0');
}

const uncached = [];
function compileCached(module, filename) {
  const source = readFileSync(filename, 'utf8');
  const cacheFile = `${filename}.${flagsKey()}.v8cache`;
  let cachedData;
  try {
    cachedData = readFileSync(cacheFile);
  } catch {
    // none yet
  }
  // __import: the bundle's import() calls (scripts/bundle-oclif.mjs rewrites them), since import()
  // in a vm.Script needs node's experimental vm-modules API
  const wrapped = `(function (exports, require, module, __filename, __dirname, __import) {${source}\n})`;
  const script = new vm.Script(wrapped, { filename, cachedData });
  if (!cachedData || script.cachedDataRejected) uncached.push({ script, cacheFile });
  const wrapper = script.runInThisContext();
  const importer = (specifier) => import(specifier);
  wrapper.call(module.exports, module.exports, createRequire(filename), module, filename, dirname(filename), importer);
}
function writeCodeCaches() {
  for (const { script, cacheFile } of uncached) {
    const tmp = `${cacheFile}.${process.pid}.tmp`;
    try {
      writeFileSync(tmp, script.createCachedData());
      renameSync(tmp, cacheFile);
    } catch {
      try {
        unlinkSync(tmp);
      } catch {
        // read-only install: nothing written
      }
    }
  }
}

// The index the bundle is cached under. require('@oclif/core') from the files in dist/vendor/ (the
// command bundles: five times for bitmap dump) returns it without resolving the package again
// (node_modules looked up, package.json and its exports read): from there require finds the root's
// node_modules, where the index is (installedOclifIndex). Anyone else's require resolves as usual.
let oclifIndex;
function vendoredOclif() {
  const resolve = Module._resolveFilename;
  Module._resolveFilename = function (request, parent, ...rest) {
    if (request === '@oclif/core' && parent?.filename?.startsWith(vendorDir + sep)) return oclifIndex;
    return resolve.call(this, request, parent, ...rest);
  };
}

// dist/vendor/oclif-core.json (the bundle script): the index's path below the root's node_modules,
// where require would find it from here. Without it (or the index), require resolves it.
function installedOclifIndex() {
  try {
    const { index } = JSON.parse(readFileSync(join(vendorDir, 'oclif-core.json'), 'utf8'));
    const file = join(root, ...index);
    // the real path, as require gives it (node_modules may be a link)
    if (index[0] === 'node_modules' && !index.includes('..')) return realpathSync(file);
  } catch {
    // none (a build without it): resolve
  }
  return require.resolve('@oclif/core');
}

if (bundled) {
  const plain = Module._extensions['.js'];
  Module._extensions['.cjs'] = (module, filename) =>
    filename.startsWith(vendorDir + sep) ? compileCached(module, filename) : plain(module, filename);
  process.once('exit', writeCodeCaches);
  try {
    const index = installedOclifIndex();
    const { version } = JSON.parse(readFileSync(join(dirname(index), '..', 'package.json'), 'utf8'));
    const bundle = join(vendorDir, `oclif-core-${version}.cjs`);
    if (!require.cache[index] && existsSync(bundle)) {
      require(bundle);
      require.cache[index] = require.cache[bundle];
      oclifIndex = index;
    }
  } catch {
    // anything unexpected: oclif loads from node_modules as usual
  }
}

// dist/.tsbuildinfo (tsconfig.build.json: incremental) is rewritten by every tsc run that emits:
// a manifest or a command bundle newer than it is current without looking at each compiled file.
const mtime = (file) => statSync(file, { throwIfNoEntry: false })?.mtimeMs;
const compiled = mtime(join(root, 'dist', '.tsbuildinfo'));

function manifestStale() {
  const built = mtime(join(root, 'oclif.manifest.json'));
  if (built === undefined) return false; // none: oclif finds the commands itself
  if (compiled !== undefined && compiled <= built) return false;
  const newer = (dir) => {
    let entries;
    try {
      entries = readdirSync(dir, { withFileTypes: true });
    } catch {
      return false;
    }
    for (const e of entries) {
      const p = join(dir, e.name);
      if (e.isDirectory() ? newer(p) : e.name.endsWith('.js') && statSync(p).mtimeMs > built) return true;
    }
    return false;
  };
  return newer(join(root, 'dist', 'src', 'commands'));
}
async function rewriteStaleManifest() {
  if (!manifestStale()) return;
  try {
    const { writeManifest } = await import('../scripts/oclif-manifest.mjs');
    await writeManifest(root);
  } catch {
    // a read-only install is never stale; anything else: oclif runs with what it finds
  }
}

// `--version --json` (oclif's --version has no JSON form): the version command's JSON.
const argv = process.argv.slice(2);
const args = argv.length === 2 && argv.includes('--version') && argv.includes('--json') ? ['version', '--json'] : undefined;

// dist/vendor/commands/ID.cjs (scripts/bundle-oclif.mjs): each command with everything it imports
// from dist/src and node_modules in one file, compiled with the code cache like the oclif bundle.
// oclif finds a command through the root plugin's manifest; for the command it is about to load,
// its entry is pointed at the bundle when the bundle is at least as new as every dist/src file
// it was built from (a tree rebuilt by tsc alone runs its new modules, not an old bundle).
function readIndex() {
  try {
    return JSON.parse(readFileSync(join(vendorDir, 'commands', 'index.json'), 'utf8'));
  } catch {
    return undefined; // no bundles: the modules in dist/src
  }
}
function bundleFresh({ file, inputs }) {
  const built = mtime(join(vendorDir, 'commands', file));
  if (built === undefined) return false;
  if (compiled !== undefined && compiled <= built) return true;
  return inputs.every((input) => (mtime(join(root, input)) ?? Infinity) <= built);
}
function useCommandBundles(Plugin, index) {
  const findCommand = Plugin.prototype.findCommand;
  Plugin.prototype.findCommand = function (id, options) {
    const entry = this.isRoot && !this.options.ignoreManifest ? this.manifest?.commands?.[id] : undefined;
    const bundle = Object.hasOwn(index.commands, id) ? index.commands[id] : undefined;
    if (entry && bundle && entry.isESM !== false && bundleFresh(bundle)) {
      entry.relativePath = ['dist', 'vendor', 'commands', bundle.file];
      entry.isESM = false;
    }
    return findCommand.call(this, id, options);
  };
}

// A bundled command runs without oclif loading the plugins first (finding each of the 11 in
// node_modules, reading its package.json and manifest: ~25 ms of CPU) nor parsing the whole
// oclif.manifest.json (~200 KB): the root plugin gets the one command's manifest entry
// (dist/vendor/commands/ID.manifest.json), and the plugins are loaded, as oclif loads them, at
// the first hook that is not one of oclif's own around every command (the `blkrep:register` of
// serve-nbd, command_not_found …). Not for a command that reads the plugins or other commands
// itself (index: loadsAllPlugins), nor help, nor when a plugin has a hook on those every-command
// events (index: lifecycleHooks, none today) or user plugins are installed (DATA_DIR/package.json):
// then every plugin is loaded first, as before. Everything else — parsing, --json, errors, exit
// codes — is oclif's own path (execute with these load options).
const LIFECYCLE = new Set(['init', 'preparse', 'prerun', 'postrun', 'finally']);
const HELP_FLAGS = ['--help', '-h']; // package.json oclif.additionalHelpFlags
function fastLoadOptions(oclif, index) {
  if (index.lifecycleHooks?.length !== 0) return undefined;
  const dash = argv.indexOf('--');
  if (argv.slice(0, dash === -1 ? undefined : dash).some((a) => HELP_FLAGS.includes(a))) return undefined;
  // `--version` alone: oclif prints its user agent (name/version platform-arch node-VERSION, from
  // the root package.json) after the init hook, before it looks for a command: no command needed
  const versionOnly = argv.length === 1 && argv[0] === '--version';
  const words = [];
  for (const arg of versionOnly ? [] : argv) {
    if (arg.startsWith('-')) break;
    words.push(arg);
  }
  let id;
  for (let n = words.length; n > 0 && !id; n--) {
    const candidate = words.slice(0, n).join(':');
    if (Object.hasOwn(index.commands, candidate)) id = candidate;
  }
  const bundle = id && index.commands[id];
  if (!versionOnly && (!bundle || bundle.loadsAllPlugins || !bundleFresh(bundle))) return undefined;
  let commands, pjson;
  try {
    commands = versionOnly ? {} : { [id]: JSON.parse(readFileSync(join(vendorDir, 'commands', bundle.file.replace(/\.cjs$/, '.manifest.json')), 'utf8')) };
    pjson = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
  } catch {
    return undefined;
  }
  const plugin = new oclif.Plugin({ root, isRoot: true, pjson });
  plugin._manifest = async () => ({ version: pjson.version, commands });
  return { root, pjson, plugins: new Map([[pjson.name, plugin]]), blkrepRootPlugin: plugin };
}
function loadPluginsAtFirstHook(Config) {
  const runHook = Config.prototype.runHook;
  Config.prototype.runHook = async function (event, ...rest) {
    // (a Config that command.run() rebuilds from one whose plugins were loaded has them all)
    if (this.options.blkrepRootPlugin && !this.blkrepPlugins && this.plugins.size === 1) {
      this.blkrepUserPlugins ??= existsSync(join(this.dataDir, 'package.json'));
      if (this.blkrepUserPlugins || !LIFECYCLE.has(event)) this.blkrepPlugins = this.loadPluginsAndCommands({ force: true });
    }
    await this.blkrepPlugins;
    return runHook.call(this, event, ...rest);
  };
}

async function main() {
  await rewriteStaleManifest();
  // require, not import(): @oclif/core is CommonJS, and import() of it parses its source for its
  // export names (~10 ms for the bundle) where require returns the loaded module.
  if (oclifIndex) vendoredOclif();
  const oclif = oclifIndex ? require.cache[oclifIndex].exports : require('@oclif/core');
  let loadOptions;
  const index = bundled ? readIndex() : undefined;
  if (index) {
    useCommandBundles(oclif.Plugin, index);
    loadOptions = args ? undefined : fastLoadOptions(oclif, index);
    if (loadOptions) {
      await loadOptions.blkrepRootPlugin.load();
      loadPluginsAtFirstHook(oclif.Config);
    }
  }
  // dir: the root (oclif finds its package.json there; from bin/ it would find bin/package.json)
  await oclif.execute({ dir: root, ...(args ? { args } : {}), ...(loadOptions ? { loadOptions } : {}) });
}
// a rejection is unhandled: node prints it and exits with 1, as for the ES module's top-level await
main();
