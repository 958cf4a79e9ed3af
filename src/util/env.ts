/** An on/off environment switch (the BLKREP_NO_* comparisons of the benches): set, not empty, not "0". */
export function envFlag(name: string): boolean {
  const v = process.env[name];
  return v !== undefined && v !== '' && v !== '0';
}
