/**
 * Man pages from the command definitions (summary, description, args, flags, examples) plus
 * hand-written roff prose in man/prose/<page>.roff, in nbdkit's section order. oclif has no
 * generator of its own; the test in test/man checks the pages in man/ are what this produces.
 */

export interface FlagDef {
  name: string;
  char?: string;
  description?: string;
  helpValue?: string | string[];
  type: 'boolean' | 'option';
  multiple?: boolean;
  default?: unknown;
  hidden?: boolean;
}

export interface ArgDef {
  name: string;
  description?: string;
  required?: boolean;
}

export interface CommandDef {
  id: string;
  summary?: string;
  description?: string;
  args: ArgDef[];
  flags: FlagDef[];
  examples: Array<{ description: string; command: string }>;
}

export const SECTION_ORDER = ['NAME', 'SYNOPSIS', 'DESCRIPTION', '*', 'OPTIONS', 'EXAMPLES', 'EXIT STATUS', 'SEE ALSO'];

/** Escape text for roff: backslashes, hyphens, and control characters at line starts. */
export function roff(text: string): string {
  return text
    .replace(/\\/g, '\\e')
    .replace(/-/g, '\\-')
    .split('\n')
    .map((line) => (/^[.']/.test(line) ? `\\&${line}` : line))
    .join('\n');
}

function paragraphs(text: string): string {
  return text
    .trim()
    .split(/\n\s*\n/)
    .map((p) => roff(p.replace(/\s*\n\s*/g, ' ').trim()))
    .join('\n.PP\n');
}

/** Split prose into sections keyed by their .SH title. */
export function parseProse(prose: string): Map<string, string> {
  const sections = new Map<string, string>();
  let title: string | undefined;
  let body: string[] = [];
  const flush = () => {
    if (title) sections.set(title, body.join('\n').trim());
  };
  for (const line of prose.split('\n')) {
    const m = /^\.SH\s+"?([^"]+?)"?\s*$/.exec(line);
    if (m) {
      flush();
      title = m[1]!.toUpperCase();
      body = [];
    } else if (title) {
      body.push(line);
    }
  }
  flush();
  return sections;
}

function flagSynopsis(f: FlagDef): string {
  const value = f.type === 'option' ? ` \\fI${roff(String(f.helpValue ?? f.name.toUpperCase()))}\\fR` : '';
  return `\\fB\\-\\-${roff(f.name)}\\fR${value}`;
}

function header(page: string, date: string): string {
  return `.TH ${page.toUpperCase()} 1 "${date}" "blkrep" "blkrep manual"\n`;
}

export function renderCommandPage(cmd: CommandDef, prose: string, date: string): string {
  const page = `blkrep-${cmd.id.replace(/[ :]/g, '-')}`;
  const extra = parseProse(prose);
  const flags = cmd.flags.filter((f) => !f.hidden);
  const out: string[] = [header(page, date)];
  out.push('.SH NAME', `${roff(page)} \\- ${roff((cmd.summary ?? '').replace(/\.$/, ''))}`);
  const args = cmd.args.map((a) => (a.required ? `\\fI${roff(a.name.toUpperCase())}\\fR` : `[\\fI${roff(a.name.toUpperCase())}\\fR]`));
  out.push('.SH SYNOPSIS', '.nf', `\\fBblkrep ${roff(cmd.id)}\\fR [\\fIOPTIONS\\fR]${args.length ? ' ' + args.join(' ') : ''}`, '.fi');
  out.push('.SH DESCRIPTION', paragraphs(cmd.description ?? cmd.summary ?? ''));
  if (cmd.args.length) {
    for (const a of cmd.args) out.push('.TP', `\\fI${roff(a.name.toUpperCase())}\\fR`, roff(a.description ?? ''));
  }
  if (extra.has('DESCRIPTION')) out.push('.PP', extra.get('DESCRIPTION')!);
  for (const [title, body] of extra) {
    if (SECTION_ORDER.includes(title)) continue;
    out.push(`.SH ${title.includes(' ') ? `"${title}"` : title}`, body);
  }
  out.push('.SH OPTIONS');
  for (const f of flags) {
    const names = [f.char ? `\\fB\\-${roff(f.char)}\\fR` : undefined, flagSynopsis(f)].filter(Boolean).join(', ');
    let text = (f.description ?? '').trim();
    if (text && !/[.!?]$/.test(text)) text += '.';
    text = text.charAt(0).toUpperCase() + text.slice(1);
    if (f.multiple) text += ' May be given more than once.';
    if (f.default !== undefined && f.default !== false && f.default !== '') text += ` Default: ${String(f.default)}.`;
    out.push('.TP', names, roff(text.trim()));
  }
  if (cmd.examples.length) {
    out.push('.SH EXAMPLES');
    for (const e of cmd.examples) {
      out.push('.PP', roff(e.description) + ':', '.PP', '.RS', '.nf', roff(e.command.replace(/<%= config.bin %>/g, 'blkrep').replace(/<%= command.id %>/g, cmd.id)), '.fi', '.RE');
    }
  }
  out.push('.SH "EXIT STATUS"', extra.get('EXIT STATUS') ?? '0 on success, 1 on failure, 2 on a usage error (bad flags or arguments).');
  out.push('.SH "SEE ALSO"', extra.get('SEE ALSO') ?? '\\fBblkrep\\fR(1)');
  return `${out.join('\n')}\n`;
}

export function renderIndexPage(commands: CommandDef[], prose: string, date: string): string {
  const extra = parseProse(prose);
  const out: string[] = [header('blkrep', date)];
  out.push('.SH NAME', 'blkrep \\- continuous block\\-device replication over NBD');
  out.push('.SH SYNOPSIS', '.nf', '\\fBblkrep\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]', '.fi');
  out.push('.SH DESCRIPTION', extra.get('DESCRIPTION') ?? '');
  out.push('.SH COMMANDS');
  for (const c of [...commands].sort((a, b) => a.id.localeCompare(b.id))) {
    out.push('.TP', `\\fBblkrep ${roff(c.id)}\\fR`, `${roff(c.summary ?? '')} See \\fBblkrep\\-${roff(c.id.replace(/[ :]/g, '-'))}\\fR(1).`);
  }
  for (const [title, body] of extra) {
    if (SECTION_ORDER.includes(title) || title === 'COMMANDS') continue;
    out.push(`.SH ${title.includes(' ') ? `"${title}"` : title}`, body);
  }
  out.push('.SH "EXIT STATUS"', extra.get('EXIT STATUS') ?? '0 on success, 1 on failure, 2 on a usage error.');
  const seeAlso = commands.map((c) => `\\fBblkrep\\-${roff(c.id.replace(/[ :]/g, '-'))}\\fR(1)`).sort().join(',\n');
  out.push('.SH "SEE ALSO"', extra.get('SEE ALSO') ? `${seeAlso},\n${extra.get('SEE ALSO')}` : seeAlso);
  return `${out.join('\n')}\n`;
}

/** Read an oclif command class's static definition into a CommandDef. */
export function describeCommand(id: string, cls: {
  summary?: string;
  description?: string;
  args?: Record<string, { description?: string; required?: boolean }>;
  flags?: Record<string, { char?: string; description?: string; helpValue?: string | string[]; type: string; multiple?: boolean; default?: unknown; hidden?: boolean }>;
  enableJsonFlag?: boolean;
  examples?: Array<string | { description: string; command: string }>;
}): CommandDef {
  const flags: FlagDef[] = Object.entries(cls.flags ?? {}).map(([name, f]) => ({
    name,
    char: f.char,
    description: f.description,
    helpValue: f.helpValue,
    type: f.type === 'boolean' ? 'boolean' : 'option',
    multiple: f.multiple,
    default: typeof f.default === 'function' ? undefined : f.default,
    hidden: f.hidden,
  }));
  if (cls.enableJsonFlag) flags.push({ name: 'json', type: 'boolean', description: 'Print the result as JSON on stdout; errors as {"error":{"code","message"}}.' });
  flags.sort((a, b) => a.name.localeCompare(b.name));
  return {
    id,
    summary: cls.summary,
    description: cls.description,
    args: Object.entries(cls.args ?? {}).map(([name, a]) => ({ name, description: a.description, required: a.required })),
    flags,
    examples: (cls.examples ?? []).map((e) => (typeof e === 'string' ? { description: 'Example', command: e } : e)),
  };
}
