"""Every hook peftmed calls, in one place.

A plugin is a module (or object) with functions decorated ``@peftmed.hookimpl`` whose names are
hook names below. Each hook receives a ``register`` callback; the plugin calls it once per thing it
adds. A hook implementation may accept fewer arguments than the spec (pluggy's rule), so hooks grow
by adding arguments, never by changing them.

All register hooks are called once, when a registry is built (``peftmed.plugins.build_registry()``,
which the CLI and ``peftmed.default_registry()`` call lazily on first use). A plugin whose hook raises
or registers something invalid is reported (``peftmed plugins``) and skipped as a whole.
"""

from __future__ import annotations

import pluggy

PROJECT = "peftmed"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register):
    """Add fine-tuning methods.

    register(method: peftmed.methods.Method) -> None
        ``method.name`` is the name recipes use (an open string, e.g. ``"lora"``); ``method.family``
        is ``"inject"``, ``"select"`` or ``"prompt"`` and decides how the core applies it.
    """


@hookspec
def register_backbones(register):
    """Add model backbones (architectures with their components and role map).

    register(backbone: peftmed.backbones.Backbone) -> None
        ``backbone.name`` is what ``--backbone`` takes (e.g. ``"miss-tiny"``).
    """


@hookspec
def register_kernels(register):
    """Add implementations of kernel ops (``lora_linear``, ``layer_norm``, ``prefix_attention``...).

    register(impl: peftmed.kernels.KernelImpl) -> None
        ``impl.op`` names the op, ``impl.name`` the implementation (e.g. ``"triton"``); dispatch
        with ``impl="auto"`` tries implementations in ``impl.priority`` order (higher first).
    """


@hookspec
def register_datasets(register):
    """Add datasets.

    register(dataset: peftmed.data.DatasetSpec) -> None
        ``dataset.name`` is what ``--dataset`` takes (e.g. ``"vqa-rad"``).
    """


@hookspec
def register_metrics(register):
    """Add evaluation metrics.

    register(metric: peftmed.metrics.MetricSpec) -> None
        ``metric.name`` names it; ``metric.compute(predictions, references) -> dict[str, float]``.
    """


@hookspec
def register_tasks(register):
    """Add tasks (what a model is trained and scored on: Med-VQA, report generation...).

    register(task: peftmed.tasks.Task) -> None
        ``task.name`` is what ``--task`` and a dataset's ``task`` name (e.g. ``"report"``); the task
        supplies its torch Dataset, batches, tokenizer texts, model wrapper, generation, metric (by
        registered name), baseline and bench columns. train, eval and bench never branch on a task.
    """


@hookspec
def register_commands(register):
    """Add ``peftmed`` CLI sub-commands.

    register(command: peftmed.cli.Command) -> None
        ``command.name`` is the sub-command; ``command.configure(parser)`` adds its arguments to an
        ``argparse`` parser; ``command.run(args) -> int`` runs it and returns the exit code.
    """
