#!/usr/bin/env node
// Writes dist/vendor/oclif-core-VERSION.cjs: @oclif/core's index and its dependencies as one
// minified CommonJS file. Loading @oclif/core from node_modules resolves, reads and compiles about
// 200 small modules, which is most of every command's start-up (bench/cli-startup); one file
// is about 120 ms of CPU less. bin/run.js puts it in require's cache under the installed
// @oclif/core's own path, so blkrep's commands and the oclif plugins (help, not-found,
// autocomplete) all get that one copy. The version in the name is the installed @oclif/core's:
// bin/run.js uses the file only when they match, and falls back to node_modules otherwise (a
// build without esbuild, an upgraded @oclif/core not yet rebuilt).
// `npm run build` runs it. typescript/ts-node/tsx stay outside: oclif loads them only to run
// commands from .ts sources in development.
// It also removes the code caches of the old bundle (they name it) and makes the new one's.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { lazyBuiltin } from './lazy-builtin.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(root, 'package.json'));

export function vendoredOclifPath(dir, version) {
  return path.join(dir, 'dist', 'vendor', `oclif-core-${version}.cjs`);
}

let esbuild;
try {
  esbuild = await import('esbuild');
} catch {
  console.log('esbuild not installed: no bundled @oclif/core (blkrep loads it from node_modules)');
  process.exit(0);
}
const { version } = require('@oclif/core/package.json');
const outfile = vendoredOclifPath(root, version);
mkdirSync(path.dirname(outfile), { recursive: true });
for (const old of readdirSync(path.dirname(outfile))) {
  if (old.startsWith('oclif-core-')) rmSync(path.join(path.dirname(outfile), old));
}
// Two changes to what oclif runs at every start, both the same behaviour for less CPU:
// - node:child_process, node:perf_hooks and node:readline (with the streams they pull in, ~10 ms)
//   are loaded at their first use instead of at start: oclif requires them at the top of modules
//   that a short command never calls into (os.getShell, Performance when OCLIF_PERFORMANCE is
//   unset, ux prompts). The module each gets is a proxy that loads the real one on first access.
// - finding the oclif.plugins among the dependencies ran minimatch (a new compiled pattern)
//   for every plugin × dependency pair (~10 ms for our 10 plugins); a name without glob
//   characters now is compared as a string, which is what minimatch concludes for it.
// And one that is no change at all: @oclif/core's index checks node's version against the
// engines of the package.json beside its lib/ (`require(__dirname/../package.json)`), which in
// the bundle is dist/package.json, absent, so the check always ended in its catch; it is not
// called (nor semver loaded for it). blkrep's own engines (node >= 20) are npm's to check.
// The commands' bundles (below) load these at first use too: node:crypto, node:tls … that a
// module imports for one function a short command may never call.
const LAZY_BUILTINS = /^(node:)?(child_process|perf_hooks|readline|tty|fs\/promises)$/;
const LAZY_BUILTINS_COMMANDS = /^(node:)?(child_process|perf_hooks|readline|tty|crypto|tls|zlib|http|https|dgram|dns|worker_threads|v8|inspector)$/;
const PLUGIN_MATCH = '(0, minimatch_1.minimatch)(p, w)';
const NODE_CHECK = '\ncheckNodeVersion();\n';
const PICOMATCH_CHECK = '\n\trequire.resolve("picomatch");\n';
const SAFE_READ_JSON = 'async function safeReadJson(path, useCache = true) {\n';
const CONFIG_RELOAD = '        if (isConfig(opts)) {\n';
// Output without node's process.stdout/process.stderr streams (bin/run.js's blkrep.stdio: the
// stream and the modules behind it, net, tty and the streams, are built at the first read of
// process.stdout, ~24 M instructions): oclif read both at its start and printed through
// console.log. Each place asks blkrep.stdio when bin/run.js installed it, and does as before when
// it did not. A file where the text is not found (a newer version) is bundled as it is, with a
// line saying so.
const STDIO = 'globalThis[Symbol.for("blkrep.stdio")]';
const STDIO_PATCHES = [
  // lilconfig took fs.promises.readFile at its start (node:fs/promises' internals, ~6 M
  // instructions; see safeReadJson below): now at its first read of a file
  [/[\\/]lilconfig[\\/]src[\\/]index\.js$/, [
    ['const fsReadFileAsync = fs.promises.readFile;', 'const fsReadFileAsync = (...args) => fs.promises.readFile(...args);'],
  ]],
  // the width of the terminal, at the start: 80 without a stream for what is no terminal
  [/[\\/]@oclif[\\/]core[\\/]lib[\\/]screen\.js$/, [
    ['termwidth(process.stdout);', `(${STDIO}?.isatty(1) === false ? 80 : termwidth(process.stdout));`],
    ['termwidth(process.stderr);', `(${STDIO}?.isatty(2) === false ? 80 : termwidth(process.stderr));`],
  ]],
  // ux.stdout / ux.stderr (this.log, this.logJson, this.logToStderr): console.log's text and newline
  [/[\\/]@oclif[\\/]core[\\/]lib[\\/]ux[\\/]write\.js$/, [
    ['const stdout = (str, ...args) => {', `const blkrepStdio = ${STDIO};\nconst blkrepLog = (fd, ...text) => blkrepStdio ? blkrepStdio.write(fd, \`\${text.length > 0 ? text[0] : ''}\\n\`) : fd === 1 ? console.log(...text) : console.error(...text);\nconst stdout = (str, ...args) => {`],
    [/console\.log\(/g, 'blkrepLog(1, '],
    [/console\.error\(/g, 'blkrepLog(2, '],
  ]],
  // EPIPE on stdout is ignored: the handler goes on the stream when there is one
  [/[\\/]@oclif[\\/]core[\\/]lib[\\/]command\.js$/, [
    ["process.stdout.on('error', ", `(${STDIO}?.whenOpen(1) ?? process.stdout).on('error', `],
  ]],
  // at the end of every command: nothing to wait for without a stream
  [/[\\/]@oclif[\\/]core[\\/]lib[\\/]flush\.js$/, [
    ['async function _flush() {\n', `async function _flush() {\n    if (${STDIO}?.isOpen(1) === false)\n        return;\n`],
  ]],
  // the action (spinner) kept the streams' write functions from its construction, at the start:
  // now from the first time it needs them (it replaces them while it spins)
  [/[\\/]@oclif[\\/]core[\\/]lib[\\/]ux[\\/]action[\\/]base\.js$/, [
    ['    stdmockOrigs = {\n        stderr: process.stderr.write,\n        stdout: process.stdout.write,\n    };\n',
      '    blkrepStdmockOrigs;\n    get stdmockOrigs() {\n        return (this.blkrepStdmockOrigs ??= { stderr: process.stderr.write, stdout: process.stdout.write });\n    }\n    set stdmockOrigs(origs) {\n        this.blkrepStdmockOrigs = origs;\n    }\n'],
  ]],
  // the spinner is for a terminal on stderr
  [/[\\/]@oclif[\\/]core[\\/]lib[\\/]ux[\\/]index\.js$/, [
    ['Boolean(process.stderr.isTTY)', `Boolean(${STDIO} ? ${STDIO}.isatty(2) : process.stderr.isTTY)`],
  ]],
  // colours (theme, --json's colours) for a terminal
  [/[\\/]ansis[\\/]index\.js$/, [['!!s.stdout?.isTTY', `!!(${STDIO} ? ${STDIO}.isatty(1) : s.stdout?.isTTY)`]]],
  [/[\\/]supports-color[\\/]index\.js$/, [
    ['tty.isatty(1)', `(${STDIO} ? ${STDIO}.isatty(1) : tty.isatty(1))`],
    ['tty.isatty(2)', `(${STDIO} ? ${STDIO}.isatty(2) : tty.isatty(2))`],
  ]],
  [/[\\/]debug[\\/]src[\\/]node\.js$/, [
    ['tty.isatty(process.stderr.fd)', `(${STDIO} ? ${STDIO}.isatty(2) : tty.isatty(process.stderr.fd))`],
  ]],
];
const startupPlugin = (lazy) => ({
  name: 'blkrep-startup',
  setup(build) {
    for (const [filter, edits] of STDIO_PATCHES) {
      build.onLoad({ filter }, (args) => {
        let source = readFileSync(args.path, 'utf8');
        for (const [from, to] of edits) {
          const found = typeof from === 'string' ? source.includes(from) : from.test(source);
          if (!found) {
            console.log(`${args.path}: no ${from} (a newer version?): bundled as it is`);
            return undefined;
          }
          source = typeof from === 'string' ? source.replace(from, to) : source.replace(from, to);
        }
        return { contents: source, loader: 'js' };
      });
    }
    build.onResolve({ filter: lazy }, (args) =>
      args.namespace === 'lazy-builtin' ? undefined : { path: args.path.replace(/^node:/, ''), namespace: 'lazy-builtin' });
    build.onLoad({ filter: /.*/, namespace: 'lazy-builtin' }, (args) => ({ contents: lazyBuiltin(args.path), loader: 'js' }));
    build.onLoad({ filter: /[\\/]@oclif[\\/]core[\\/]lib[\\/]index\.js$/ }, (args) => {
      const source = readFileSync(args.path, 'utf8');
      if (!source.includes(NODE_CHECK)) return undefined;
      return { contents: source.replace(NODE_CHECK, '\n'), loader: 'js' };
    });
    // fdir (tinyglobby's) checks that picomatch resolves before it requires it, at its start:
    // in the bundle picomatch is bundled, so the require always succeeds and the check only reads
    // node_modules/picomatch/package.json.
    // safeReadJson (the user's theme.json at every start, absent): a file that is not there is
    // undefined without node:fs/promises (with readline's interface and fs watchers behind it,
    // ~6 M instructions) loaded for a failing readFile
    build.onLoad({ filter: /[\\/]@oclif[\\/]core[\\/]lib[\\/]util[\\/]fs\.js$/ }, (args) => {
      const source = readFileSync(args.path, 'utf8');
      if (!source.includes(SAFE_READ_JSON)) {
        console.log(`${args.path}: no ${JSON.stringify(SAFE_READ_JSON)} (a newer @oclif/core?): bundled as it is`);
        return undefined;
      }
      return { contents: source.replace(SAFE_READ_JSON, `${SAFE_READ_JSON}    if (!(0, node_fs_1.existsSync)(path))\n        return undefined;\n`), loader: 'js' };
    });
    build.onLoad({ filter: /[\\/]fdir[\\/]dist[\\/]index\.cjs$/ }, (args) => {
      const source = readFileSync(args.path, 'utf8');
      if (!source.includes(PICOMATCH_CHECK)) return undefined;
      return { contents: source.replace(PICOMATCH_CHECK, '\n'), loader: 'js' };
    });
    // Command.run() loads the Config it is given again (a new Config with the same plugins: root
    // plugin, platform, shell, dirs, theme.json read, plugins' commands and topics indexed anew),
    // so that a command built against another @oclif/core gets a Config of its own version's class.
    // A Config of this very class (one @oclif/core for blkrep and the plugins: bin/run.js) is
    // returned as it is: the same values, loaded once. A Config of another copy is loaded again as
    // before.
    build.onLoad({ filter: /[\\/]@oclif[\\/]core[\\/]lib[\\/]config[\\/]config\.js$/ }, (args) => {
      const source = readFileSync(args.path, 'utf8');
      if (!source.includes(CONFIG_RELOAD)) {
        console.log(`${args.path}: no ${JSON.stringify(CONFIG_RELOAD)} (a newer @oclif/core?): Command.run() loads its Config again as before`);
        return undefined;
      }
      return { contents: source.replace(CONFIG_RELOAD, `        if (opts instanceof Config && opts.rootPlugin)\n            return opts;\n${CONFIG_RELOAD}`), loader: 'js' };
    });
    build.onLoad({ filter: /[\\/]@oclif[\\/]core[\\/]lib[\\/]config[\\/]plugin-loader\.js$/ }, (args) => {
      const source = readFileSync(args.path, 'utf8');
      if (!source.includes(PLUGIN_MATCH)) {
        console.log(`${args.path}: no ${PLUGIN_MATCH} (a newer @oclif/core?): plugins matched by minimatch as before`);
        return undefined;
      }
      return {
        contents: source.replaceAll(PLUGIN_MATCH, `(/[*?[\\]{}()!+\\\\]/.test(w) ? ${PLUGIN_MATCH} : p === w)`),
        loader: 'js',
      };
    });
  },
});
await esbuild.build({
  plugins: [startupPlugin(LAZY_BUILTINS)],
  entryPoints: [require.resolve('@oclif/core')],
  outfile,
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  minify: true,
  external: ['typescript', 'ts-node', 'tsx'],
  logLevel: 'error',
});
// bin/run.js compiles the bundle as a vm.Script (for V8's code cache), where import() works only
// with node's experimental vm-modules API (and its warning on stderr). oclif import()s the ESM
// commands and hooks: each import(...) calls __import(...) instead, a parameter of the wrapper
// bin/run.js compiles the bundle in, which import()s from bin/run.js's own module.
function rewriteImports(file) {
  let imports = 0;
  const code = readFileSync(file, 'utf8').replace(/(?<![\w$."'`])import\((?!\))/g, () => {
    imports++;
    return '__import(';
  });
  writeFileSync(file, code);
  return imports;
}
if (rewriteImports(outfile) === 0) throw new Error(`${outfile}: no import( found to rewrite; has @oclif/core changed how it loads commands?`);
// oclif-core.json: where the installed index is, below node_modules, so that bin/run.js need not
// resolve '@oclif/core' at each start (its package exports: ~4 ms of CPU) to know the path the
// bundle goes under in require's cache. bin/run.js resolves as before when the file is absent, or
// the index it names is not there.
const oclifIndex = path.relative(root, require.resolve('@oclif/core'));
const indexRecord = path.join(path.dirname(outfile), 'oclif-core.json');
rmSync(indexRecord, { force: true });
if (oclifIndex.split(path.sep)[0] === 'node_modules') writeFileSync(indexRecord, JSON.stringify({ index: oclifIndex.split(path.sep) }) + '\n');
console.log(`wrote ${path.relative(process.cwd(), outfile)}`);

// Each command as one file too: dist/vendor/commands/ID.cjs (ID with . for :), the command's
// module with all it imports from dist/src and from node_modules (zod, yaml …), minified
// CommonJS. Importing a command from dist/src resolves, reads and compiles its 10–70 modules
// as ESM (which node 20 cannot code-cache); bin/run.js loads this file instead, with V8's code
// cache, unless a module it was built from is newer than it (dist/ rebuilt by tsc alone) or
// BLKREP_OCLIF_BUNDLE=0. Outside stay: @oclif/core (the one copy above, which the oclif plugins
// share), the plugins (@blkrep/*, loaded by their hooks and by name), the native addon.
// index.json lists, per command id, its file and the files it was built from.
// zod (the control verbs' and config's schemas, ~450 KB of the bundles that have it) is one file of
// its own, dist/vendor/zod-VERSION.cjs, that the command bundles require() where they use it: a
// command that reaches zod only through a module it imports at first use (bitmap dump of a file:
// the live store's control verbs) does not read, compile or run it at all.
const zodVersion = require('zod/package.json').version;
const zodFile = `zod-${zodVersion}.cjs`;
for (const old of readdirSync(path.dirname(outfile))) {
  if (old.startsWith('zod-')) rmSync(path.join(path.dirname(outfile), old));
}
await esbuild.build({
  entryPoints: [require.resolve('zod')],
  outfile: path.join(path.dirname(outfile), zodFile),
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  minify: true,
  logLevel: 'error',
});
const zodOutside = {
  name: 'blkrep-zod',
  setup(build) {
    build.onResolve({ filter: /^zod$/ }, () => ({ path: `../${zodFile}`, external: true }));
  },
};
const commandsDir = path.join(root, 'dist', 'vendor', 'commands');
rmSync(commandsDir, { recursive: true, force: true });
const manifest = JSON.parse(readFileSync(path.join(root, 'oclif.manifest.json'), 'utf8'));
const idOf = new Map(Object.keys(manifest.commands).map((id) => [`${id.replaceAll(':', '.')}.cjs`, id]));
const entryPoints = Object.fromEntries(
  Object.entries(manifest.commands).map(([id, c]) => [id.replaceAll(':', '.'), path.join(root, ...c.relativePath)]),
);
const built = await esbuild.build({
  plugins: [startupPlugin(LAZY_BUILTINS_COMMANDS), zodOutside],
  entryPoints,
  outdir: commandsDir,
  outExtension: { '.js': '.cjs' },
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  minify: true,
  keepNames: true,
  external: ['@oclif/core', '@blkrep/*', '*.node'],
  // native.ts finds the addon above its own directory and require()s it from there
  define: { 'import.meta.url': '__importMetaUrl' },
  banner: { js: 'var __importMetaUrl = require("node:url").pathToFileURL(__filename).href;' },
  metafile: true,
  logLevel: 'error',
});
// What bin/run.js needs to run a bundled command without loading the plugins first (the
// plugins are loaded at the first hook that is not one of oclif's own around every command):
// - per command, its manifest entry (ID.manifest.json: the root plugin then has that one command
//   instead of parsing the whole manifest), and whether it reads the plugin list or other
//   commands itself (`static loadsAllPlugins = true`: version, config check, serve-nbd);
// - the plugins' hooks on those every-command events (LIFECYCLE_HOOKS, none today): while a plugin
//   has one, every command loads all the plugins first, as oclif does.
const LIFECYCLE = ['init', 'preparse', 'prerun', 'postrun', 'finally'];
const { Config } = require('@oclif/core');
const config = await Config.load({ root, userPlugins: false, devPlugins: false });
const lifecycleHooks = config
  .getPluginsList()
  .flatMap((p) => Object.keys(p.hooks ?? {}).filter((event) => LIFECYCLE.includes(event)).map((event) => `${p.name}:${event}`));
const index = { lifecycleHooks, commands: {} };
for (const [out, meta] of Object.entries(built.metafile.outputs)) {
  if (!meta.entryPoint) continue;
  const file = path.basename(out);
  const id = idOf.get(file);
  if (!id) throw new Error(`${out}: not the bundle of a command in oclif.manifest.json`);
  // the files of dist/src (not node_modules', not the lazy builtins' made-up modules)
  const inputs = Object.keys(meta.inputs).filter((i) => !i.includes('node_modules') && !i.includes(':')).map((i) => path.relative(root, path.resolve(i)));
  const entry = manifest.commands[id];
  index.commands[id] = { file, inputs, ...(entry.loadsAllPlugins ? { loadsAllPlugins: true } : {}) };
  writeFileSync(path.join(commandsDir, file.replace(/\.cjs$/, '.manifest.json')), JSON.stringify(entry));
  rewriteImports(path.join(commandsDir, file));
}
writeFileSync(path.join(commandsDir, 'index.json'), JSON.stringify(index) + '\n');
console.log(`wrote ${path.relative(process.cwd(), commandsDir)}/: ${Object.keys(index.commands).length} commands`);

// V8's code cache for the bundle (bin/run.js writes it at the exit of a run without one): made
// here by one run of the bin as an operator runs it (its shebang's node flags), so that an install
// that is read-only at run time has it too.
const warm = spawnSync(path.join(root, 'bin', 'run.js'), ['version', '--json'], { stdio: ['ignore', 'ignore', 'inherit'] });
if (warm.status !== 0) console.log(`bin/run.js version --json exited with ${warm.status ?? warm.signal}: no code cache for the bundle yet`);
