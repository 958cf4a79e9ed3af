/** commit: an overlay's data into its backing (README.md of src/jobs). */
export * from './commit.js';
export * from './active.js';
