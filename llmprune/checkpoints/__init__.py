"""Checkpoints: the versioned format (``format``), safetensors I/O (``safetensors_io``), atomic files
(``files``), saving (``save``), ``llmprune.load`` (``load``), the model card (``modelcard``) and the
Hub upload (``hub``).
"""
