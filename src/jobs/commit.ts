/** The commit jobs moved to src/jobs/commit/; this path stays for the code that imports it. */
export * from './commit/index.js';
