/** The backup job moved to src/jobs/backup/; this path stays for the code that imports it. */
export * from './backup/backup.js';
