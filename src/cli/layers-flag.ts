import {Flags} from '@oclif/core'

/** `--layers DIR` of the commands that read a layer's chain. */
export const layersFlag = Flags.string({
  summary: "Where a layer's parents are, by the names recorded in it: a directory, s3://BUCKET/PREFIX/ or an http(s):// directory [default: next to the layer: its directory, bucket prefix or URL directory]. Each is checked against the identity the layer recorded.",
})
