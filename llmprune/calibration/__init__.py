"""Calibration: token windows (``data``), capture of every argument each decoder layer receives
(``capture``), the statistics accumulated from matrix inputs (``statistics``) and the hooks that
feed them (``collector``).
"""
