"""Per-step overhead of gradient monitoring, clipping and dead-unit tracking in Lightning.

Runs, in one process and interleaved (round-robin over the variants, the order
rotated every round so that drift and position effects hit every variant
equally), a bare Lightning training step against the same step with one thing
added. The variants (``VARIANTS``) come in four groups:

- reference: ``bare_again``, a second bare run, whose ratio to ``bare`` is the
  noise floor of the measurement (an A/A test);
- monitoring: ``GradNormMonitor(log_every_n_steps=1)``, Lightning's documented
  ``self.log_dict(grad_norm(self, norm_type=2))`` and ``wandb.watch(model,
  log="gradients", log_freq=1)`` with an offline ``WandbLogger``;
- clipping: ``AdaptiveGradClip`` with each policy (default arguments, default
  non-finite skipping, ``log_every_n_steps=50``; one variant logs every step),
  and the baselines it replaces: ``Trainer(gradient_clip_val=1.0)``, the ``zclip``
  package's Lightning callback, ``smartclip``'s AutoClip and timm's
  ``adaptive_clip_grad`` (optional: skipped, with a note, when not installed);
- dead units: ``DeadUnitMonitor`` inside and outside its measuring windows,

on three synthetic workloads (a 12-layer MLP, a 6-layer transformer encoder and
200 small Linear layers), and on request (``--workloads gpt2``) a Hugging Face
GPT-2 from a tiny config (needs ``transformers``). Every variant is a fresh ``Trainer.fit`` of
``warmup + steps`` optimizer steps; the first ``warmup`` steps are discarded.
The transformer step is ~15 times slower than the others, so by default it
runs fewer steps and rounds (see ``WORKLOADS``).

A step's time (wall time, or with ``--clock cpu`` the training thread's CPU
time) runs from one ``on_train_batch_start`` to the next: everything the loop
does for one batch, including what Lightning does *after*
``on_train_batch_end`` (handing ``self.log`` metrics to the loggers), which a
start-to-end timer would miss. The figure reported is, per workload and
variant, the median over rounds of ``median(variant step) / median(bare step)``
with both medians taken in the same round. The same figure for mean step times
(which counts work done only every n-th step) is reported next to it.

Every variant has the same cheap in-memory logger attached (``wandb_watch``
adds its ``WandbLogger`` next to it) and the same Trainer flags
(``log_every_n_steps=1``), and the module logs its loss every step as a real
training step does.

The package: ``workloads`` (the models, their batches and the Lightning module),
``variants`` (what each variant adds; the ``VARIANTS`` registry), ``runner``
(one fit, the interleaved rounds, the summary, cProfile), ``report`` (the
targets, the tables) and ``__main__`` (the command line). Adding a variant is
one entry in ``variants.VARIANTS``: a factory taking a :class:`BenchContext`
and returning a :class:`VariantSetup`.

Usage, from the repository root::

    python -m benchmarks.overhead                      # full run, ~20 min on 2 cores
    python -m benchmarks.overhead --quick              # smoke run, tiny models, ~30 s
    python -m benchmarks.overhead --workloads mlp --variants bare,gradguard --rounds 9
    python -m benchmarks.overhead --timm-agc timm-1.0.31-py3-none-any.whl   # timm's AGC too
    python -m benchmarks.overhead --json results.json
    python -m benchmarks.overhead --profile gradguard --workloads mlp   # cProfile one fit
    python -m benchmarks.overhead --workloads gpt2,transformer --variants dead_window,dead_idle
    python -m benchmarks.overhead --clock cpu --workloads mlp   # CPU time, not wall time
"""

import os

# wandb reads these when it is imported and when a run starts.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
