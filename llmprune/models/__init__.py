"""Models: where a model comes from (``sources``: alias, folder, .gguf, Hub id), the one loader
(``loader``), the meta-device skeleton filled from safetensors shards (``skeleton``), and the
architecture facts the loop needs (``architecture``: decoder layers, prunable matrices).
"""
