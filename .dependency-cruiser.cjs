/**
 * The layers of src/, checked by `npx depcruise src plugins --config .dependency-cruiser.cjs`
 * and by test/layers/layers.test.ts (README.md "Layout" says what each folder is).
 *
 *   src/commands, src/cli     the oclif CLI: may import anything below
 *   src/serve, src/control    the serve-nbd daemon and its control socket
 *   the engine                src/api, src/engine, src/nbd, src/block, src/image, src/bitmap,
 *                             src/jobs, src/util, src/heartbeat: never imports the layers above
 *   src/api                   the contracts plugins import: imports nothing else of blkrep
 *
 * Dynamic `await import()` counts as an import: a lazy load that closes a cycle is a cycle.
 * Type-only imports count too (a layer that knows another's types depends on it).
 */
const ENGINE = '^src/(api|engine|nbd|block|image|bitmap|jobs|util|heartbeat)/';

module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      severity: 'error',
      comment: 'no import cycle, lazy (await import()) or not: break it with a table that both sides import (src/block/formats.ts, src/bitmap/store.ts)',
      from: {},
      to: { circular: true },
    },
    {
      name: 'oclif-only-in-cli',
      severity: 'error',
      comment: 'oclif is the CLI: only src/cli/, src/commands/ and the plugins\' hook files import it; the engine and the daemon are a library',
      from: { path: '^(src|plugins)/', pathNot: ['^src/(cli|commands)/', '^plugins/[^/]+/src/hook\\.ts$'] },
      to: { path: '(^|/)node_modules/@oclif/' },
    },
    {
      name: 'engine-not-daemon-or-cli',
      severity: 'error',
      comment: 'the engine never imports the daemon (src/serve), the control socket (src/control; its pure wire format protocol.ts and the verb table types and schemas verb.ts excepted) or the CLI (src/cli, src/commands)',
      from: { path: ENGINE },
      to: { path: '^src/(serve|control|cli|commands)/', pathNot: '^src/control/(protocol|verb)\\.ts$' },
    },
    {
      name: 'daemon-not-cli',
      severity: 'error',
      comment: 'the daemon and the control socket are a library too: they never import the CLI',
      from: { path: '^src/(serve|control)/' },
      to: { path: '^src/(cli|commands)/' },
    },
    {
      name: 'api-is-a-contract',
      severity: 'error',
      comment: 'src/api is what plugins import: it imports nothing else of blkrep',
      from: { path: '^src/api/' },
      to: { path: '^(src|plugins)/', pathNot: '^src/api/' },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '(^|/)dist/' },
    tsConfig: { fileName: 'tsconfig.json' },
    tsPreCompilationDeps: true,
    enhancedResolveOptions: { exportsFields: ['exports'], conditionNames: ['import', 'require', 'node', 'default'] },
  },
};
