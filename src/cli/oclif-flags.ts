import {Flags, type Interfaces} from '@oclif/core'

import {type FlagSpec, type FlagValue} from './flag-specs.js'

type OclifFlag<S> = S extends {kind: 'boolean'} ? Interfaces.BooleanFlag<boolean> : Interfaces.OptionFlag<FlagValue<S>>

/** The oclif flags of `specs`: what --help shows and oclif parses, from the one definition. */
export function oclifFlags<T extends Record<string, FlagSpec>>(specs: T): {[K in keyof T]: OclifFlag<T[K]>} {
  const flags: Record<string, unknown> = {}
  for (const [name, spec] of Object.entries(specs) as [string, FlagSpec][]) {
    // oclif keeps these as mutable arrays.
    const common = {
      summary: spec.summary,
      ...(spec.helpGroup !== undefined && {helpGroup: spec.helpGroup}),
      ...(spec.exactlyOne && {exactlyOne: [...spec.exactlyOne]}),
      ...(spec.exclusive && {exclusive: [...spec.exclusive]}),
      ...(spec.dependsOn && {dependsOn: [...spec.dependsOn]}),
    }
    switch (spec.kind) {
      case 'boolean':
        flags[name] = Flags.boolean({...common, default: spec.default, ...(spec.allowNo && {allowNo: true})})
        break
      case 'integer':
        flags[name] = Flags.integer({...common, ...(spec.default !== undefined && {default: spec.default}), ...(spec.min !== undefined && {min: spec.min}), ...(spec.max !== undefined && {max: spec.max})})
        break
      case 'string':
        flags[name] = spec.multiple
          ? Flags.string({...common, multiple: true})
          : Flags.string({...common, ...(spec.default !== undefined && {default: spec.default}), ...(spec.options && {options: [...spec.options]})})
        break
    }
  }
  return flags as {[K in keyof T]: OclifFlag<T[K]>}
}
