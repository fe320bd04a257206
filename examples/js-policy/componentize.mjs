import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';
const [source, wit, world, out] = process.argv.slice(2);
const { component } = await componentize({
  sourcePath: source,
  witPath: wit,
  worldName: world,
  disableFeatures: ['random', 'stdio', 'clocks', 'http', 'fetch-event'],
});
await writeFile(out, component);
