"""Integrations of cockpit-lite with training frameworks that own the training loop.

* :mod:`cockpit_lite.integrations.lightning`: ``CockpitCallback`` for PyTorch Lightning's ``Trainer``
  (``pip install "cockpit-lite[lightning]"``);
* :mod:`cockpit_lite.integrations.transformers`: ``CockpitTrainerCallback`` for Hugging Face
  ``transformers.Trainer`` (``pip install "cockpit-lite[transformers]"``).

Each is a thin layer over :func:`cockpit_lite.watch`: it finds the model, the torch optimizer and the
loss module inside the framework and attaches a cockpit for the length of the training run. This
package imports neither framework; only importing one of the submodules does (see
docs/integrations.md).
"""
