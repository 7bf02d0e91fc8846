"""Runtime: devices and every move between them (``devices``), where decoder layers wait
(``layers``) and hidden states live (``activations``), the work folder (``workdir``) and
torch.distributed (``distributed``).
"""
