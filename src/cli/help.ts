/**
 * oclif's help, with one fix: a topic is listed only when some command's id starts with
 * "TOPIC:". oclif tests `includes`, so `map` (a command) was listed as a topic because
 * `bitmap:add` contains "map:".
 */
import { Help, type Interfaces } from '@oclif/core';

export default class BlkrepHelp extends Help {
  protected override get sortedTopics(): Interfaces.Topic[] {
    return super.sortedTopics.filter((t) => this.config.commandIDs.some((id) => id.startsWith(`${t.name}:`)));
  }
}
