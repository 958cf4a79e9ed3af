/** The mirror job moved to src/jobs/mirror/; this path stays for the code that imports it. */
export * from './mirror/mirror.js';
