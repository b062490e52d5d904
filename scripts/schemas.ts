// Writes docs/schemas/*.json from the TypeBox definitions the code validates with.
import fs from 'node:fs'
import path from 'node:path'

import {PUBLISHED_SCHEMAS, schemaJson} from '../src/format/schemas.js'

for (const [name, schema] of Object.entries(PUBLISHED_SCHEMAS)) fs.writeFileSync(path.join('docs/schemas', name), schemaJson(schema))
