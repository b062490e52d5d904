import {Flags} from '@oclif/core'

/** `--layers DIR` of the commands that read a layer's chain. */
export const layersFlag = Flags.string({
  summary: "Where a layer's parents are, by the names recorded in it [default: the layer's own directory]. Each is checked against the identity the layer recorded.",
})
