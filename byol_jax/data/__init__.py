"""Where images and labels come from, and the order they are read in.

`sources` (the source types and split strings), one module per kind
(`folder_source`, `tfds_source`, `array_source`), `datasets` (which kind a
config asks for), `stream_index` (which example sits at each stream position),
`input_pipeline` (tf.data for encoded files) and `array_pipeline` (in-memory
arrays). May import `views`, `configs` and the shared utilities.
"""
