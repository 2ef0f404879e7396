"""``gradguard doctor``: the command line over :func:`~lightning_gradguard.doctor.diagnose`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_gradguard.doctor.checkup import diagnose
from lightning_gradguard.doctor.report import FAIL_ON

__all__ = ["main"]

# --------------------------------------------------------------------------- command line


class _UsageError(Exception):
    """A mistake in the command line or the config: reported in one line, exit code 2."""


def _import_object(path: str, argument: str) -> Any:
    """Import ``"package.module:Name"`` (or ``"package.module.Name"``).

    Raises:
        _UsageError: naming ``argument`` when the module or the name cannot be found.

    Example:
        >>> _import_object("torch.nn:Linear", "--model").__name__
        'Linear'
    """
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise _UsageError(
            f"{argument} {path!r} is not an import path: use 'package.module:ClassName'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise _UsageError(
            f"{argument} {path!r}: cannot import {module_name!r} ({error})."
        ) from None
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise _UsageError(f"{argument} {path!r}: module {module_name!r} has no {attribute!r}.")
        obj = getattr(obj, part)
    return obj


def _json_arguments(text: str | None, argument: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise _UsageError(f"{argument} is not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise _UsageError(f"{argument} must be a JSON object of keyword arguments, got {text!r}.")
    return value


def _construct(cls: Any, kwargs: dict[str, Any], argument: str) -> Any:
    if not callable(cls):
        raise _UsageError(f"{argument}: {cls!r} is not a class.")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise _UsageError(
            f"{argument}: {getattr(cls, '__name__', cls)}(**{kwargs}) failed: {error}"
        ) from None


def _lightning_bases(kind: str) -> tuple[type, ...]:
    import pytorch_lightning as pl

    bases: list[type] = [getattr(pl, kind)]
    try:
        import lightning.pytorch as lp

        bases.append(getattr(lp, kind))
    except ImportError:  # pragma: no cover - the unified package is optional
        pass
    return tuple(bases)


def _from_config(path: str, model_class: Any, data_class: Any) -> tuple[Any, Any, Any]:
    """Model, datamodule and seed from a LightningCLI config, typed and built by jsonargparse.

    Only the ``model``, ``data`` and ``seed_everything`` sections are read: the
    trainer (its loggers, callbacks) is never built.
    """
    import yaml

    try:
        from jsonargparse import ArgumentParser
    except ImportError:  # pragma: no cover - jsonargparse comes with lightning's CLI extra
        raise _UsageError(
            "--config needs jsonargparse: pip install 'jsonargparse[signatures]'."
        ) from None
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise _UsageError(f"--config {path!r}: {error.strerror or error}.") from None
    except yaml.YAMLError as error:
        raise _UsageError(f"--config {path!r} is not valid YAML: {error}".splitlines()[0]) from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise _UsageError(f"--config {path!r} has no 'model' section (class_path and init_args).")
    for section in ("model", "data"):  # a clear message for a bad class_path
        entry = raw.get(section)
        if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
            _import_object(entry["class_path"], f"--config {section}.class_path")
    parser = ArgumentParser(exit_on_error=False)
    if model_class is not None:
        parser.add_class_arguments(model_class, "model", fail_untyped=False, sub_configs=True)
    else:
        parser.add_subclass_arguments(
            _lightning_bases("LightningModule"), "model", fail_untyped=False, required=True
        )
    if data_class is not None:
        parser.add_class_arguments(data_class, "data", fail_untyped=False, sub_configs=True)
    elif raw.get("data"):
        parser.add_subclass_arguments(
            _lightning_bases("LightningDataModule"), "data", fail_untyped=False, required=False
        )
    wanted = {"model": raw.get("model")}
    if raw.get("data") is not None or data_class is not None:
        wanted["data"] = raw.get("data") or {}
    try:
        config = parser.parse_object(wanted)
        built = parser.instantiate_classes(config)
    except Exception as error:  # jsonargparse reports bad paths and arguments this way
        first = " ".join(str(error).split()) or type(error).__name__  # one line
        raise _UsageError(f"--config {path!r}: {first}") from None
    seed = raw.get("seed_everything")
    return (
        built.get("model"),
        built.get("data"),
        seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard doctor",
        description=(
            "Run a few forward/backward passes of a LightningModule (no optimizer step) and "
            "print a per-layer gradient health table with findings and fixes. Exit code: 0 "
            "healthy, 1 problems found (see --fail-on), 2 usage error."
        ),
    )
    parser.add_argument("--model", help="LightningModule class, 'package.module:ClassName'")
    parser.add_argument("--model-args", help="JSON object of keyword arguments for --model")
    parser.add_argument(
        "--datamodule",
        help="LightningDataModule class (its train_dataloader() gives the batches; default: "
        "the model's own train_dataloader())",
    )
    parser.add_argument(
        "--datamodule-args", help="JSON object of keyword arguments for --datamodule"
    )
    parser.add_argument(
        "--config", help="LightningCLI YAML config; its 'model' and 'data' sections are used"
    )
    parser.add_argument("--steps", type=int, default=3, help="forward/backward passes (default 3)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for building the model and the passes"
    )
    parser.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    parser.add_argument(
        "--fail-on",
        choices=FAIL_ON,
        default="warning",
        help="least severity that makes the exit code 1 (default: warning)",
    )
    return parser


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    model_class = _import_object(args.model, "--model") if args.model else None
    data_class = _import_object(args.datamodule, "--datamodule") if args.datamodule else None
    torch.manual_seed(args.seed)
    if args.config:
        if args.model_args or args.datamodule_args:
            raise _UsageError(
                "--model-args/--datamodule-args do not combine with --config: "
                "put init_args in the config."
            )
        model, datamodule, seed = _from_config(args.config, model_class, data_class)
        if seed is not None and seed != args.seed:  # the config's seed_everything, as LightningCLI
            torch.manual_seed(seed)
            model, datamodule, _ = _from_config(args.config, model_class, data_class)
    else:
        if model_class is None:
            raise _UsageError("give --model package.module:ClassName (or --config config.yaml).")
        model = _construct(model_class, _json_arguments(args.model_args, "--model-args"), "--model")
        datamodule = None
        if data_class is not None:
            kwargs = _json_arguments(args.datamodule_args, "--datamodule-args")
            datamodule = _construct(data_class, kwargs, "--datamodule")
    if not isinstance(model, nn.Module):
        raise _UsageError(f"--model built a {type(model).__name__}, not a torch.nn.Module.")
    source: Any = datamodule if datamodule is not None else model
    hook_owners: tuple[Any, ...] = (datamodule, model)  # Lightning's order in fit
    for owner in hook_owners:
        if owner is not None and callable(getattr(owner, "prepare_data", None)):
            owner.prepare_data()
    for owner in hook_owners:
        if owner is not None and callable(getattr(owner, "setup", None)):
            owner.setup("fit")
    if not callable(getattr(source, "train_dataloader", None)):
        raise _UsageError(f"{type(source).__name__} has no train_dataloader(): give --datamodule.")
    try:
        loader = source.train_dataloader()
    except Exception as error:
        # NotImplementedError, or Lightning's MisconfigurationException ("`train_dataloader`
        # must be implemented"): no data is a usage error (exit 2), not a finding (exit 1).
        if not isinstance(error, NotImplementedError) and "implemented" not in str(error):
            raise
        raise _UsageError(
            f"{type(source).__name__}.train_dataloader() is not implemented: give --datamodule."
        ) from None
    return model, loader


def main(argv: list[str] | None = None) -> int:
    """``gradguard doctor``: diagnose a LightningModule from the command line.

    Args:
        argv: the arguments after ``doctor`` (default: ``sys.argv[1:]``).

    Returns:
        0 when healthy, 1 when a finding reaches ``--fail-on``, 2 on a usage error
        (bad import path, bad arguments or config, a model that cannot be run).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the message (or --help)
        return int(exit_.code) if isinstance(exit_.code, int) else 2
    if args.steps < 1:
        print(f"gradguard doctor: error: --steps {args.steps} must be at least 1.", file=sys.stderr)
        return 2
    if os.getcwd() not in sys.path and "" not in sys.path:  # like `python -m`: cwd is importable
        sys.path.insert(0, os.getcwd())
    try:
        model, loader = _load(args)
        diagnosis = diagnose(model, loader, steps=args.steps, seed=args.seed)
    except _UsageError as error:
        print(f"gradguard doctor: error: {error}", file=sys.stderr)
        return 2
    except (TypeError, ValueError, RuntimeError) as error:
        print(f"gradguard doctor: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(diagnosis.to_dict(), indent=2, allow_nan=False))
    else:
        print(diagnosis)
    return diagnosis.exit_code_for(args.fail_on)
