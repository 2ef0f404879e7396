"""The demo behind ``gradguard demo``: classic gradient pathologies without and with GradGuard.

It needs scikit-learn (the digits data) and matplotlib (the pictures):
``pip install 'lightning_gradguard[demo]'``.
"""

from lightning_gradguard.demo.run import main, run_demo

__all__ = ["main", "run_demo"]
