"""One-shot pruning: the method registry (``methods``: each method bound to its statistic and its
typed config), the layer loop (``loop``) and its reports (``reports``).
"""
