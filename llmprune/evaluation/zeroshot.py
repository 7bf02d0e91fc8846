"""Zero-shot task accuracy through EleutherAI's lm-evaluation-harness, on a model in memory.

Two steps, so that bad input fails before any pruning starts:

1. :func:`prepare_tasks` checks the options and task names and reads every task's data once:
   a one-line :class:`~llmprune.errors.UsageError` when lm-eval is missing ("pip install
   llmprune[eval]"), a name is unknown to lm-eval, or a task reads a Hub dataset while the
   Hub cannot be reached (and the datasets cache cannot supply it).
2. :func:`evaluate_tasks` wraps the model and tokenizer in ``lm_eval.models.huggingface.HFLM``
   (no reload, no copy of the weights; the tokenizer is copied because lm-eval may set a pad
   token on it) and runs ``lm_eval.simple_evaluate``. It returns a plain JSON-ready dict::

       {"lm_eval_version": "0.4.13", "tasks": ["offline"], "num_fewshot": 0, "limit": 100,
        "batch_size": 8,
        "results": {"offline_ptb_nextsent": {"alias": ..., "acc,none": 0.41, "acc_stderr,none": 0.05,
                                             "acc_norm,none": 0.39, "acc_norm_stderr,none": 0.05}, ...},
        "versions": {"offline_ptb_nextsent": 1.0, ...}, "n-shot": {...}, "n-samples": {...},
        "higher_is_better": {...}}

   ``results``, ``versions``, ``n-shot``, ``n-samples`` and ``higher_is_better`` are lm-eval's
   own entries with lm-eval's keys (``"<metric>,<filter>"``; ``"acc,none"``,
   ``"acc_norm,none"`` and their ``_stderr`` twins), unchanged except for numbers made plain
   floats; group rows (``offline``) sit in ``results`` beside their tasks.

Shipped offline tasks (``llmprune/evaluation/tasks/``, built by
``scripts/build_offline_tasks.py`` from held-out text only): ``offline_wiki_cloze`` (last-word
cloze, ``acc``), ``offline_ptb_nextsent`` (next-sentence choice, ``acc``/``acc_norm``) and the
group ``offline`` running both. Any lm-eval task name (``boolq``, ``arc_easy``, ...) or the path
of a task YAML works too; indexing lm-eval's 14k built-in task configs takes ~20 s on a 2-core
CPU, so it only happens when a name is not an offline task.

Reuse in another entry point (the four options are plain config fields, so flags are generated
from them like every other field)::

    @dataclass(frozen=True)
    class MyConfig:
        ...
        eval_tasks: str | None = zeroshot.option_field("eval_tasks")
        eval_tasks_limit: int | None = zeroshot.option_field("eval_tasks_limit")
        eval_batch_size: int = zeroshot.option_field("eval_batch_size")
        num_fewshot: int = zeroshot.option_field("num_fewshot")

    tasks = zeroshot.prepare_tasks(zeroshot.ZeroShotOptions.from_config(config))  # before any work
    ...
    if tasks is not None:
        dense = zeroshot.evaluate_tasks(model, tokenizer, tasks)   # model on its compute device
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmprune.errors import UsageError, check_int

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_GROUP = "offline"
MIN_LM_EVAL = (0, 4, 13)
INSTALL_HINT = "pip install llmprune[eval]"
# `datasets` builders that read local files; any other dataset_path is a Hub dataset id.
_FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
ACCURACY_KEYS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")  # read as lm-eval's "<key>,none"


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ZeroShotOptions:
    """The zero-shot options of any run; field docs are the CLI help texts."""

    eval_tasks: str | None = _opt(
        None, "comma-separated lm-eval tasks to score the dense and the pruned model on (accuracy), e.g. "
        "'offline' (tasks shipped with llmprune, no network) or 'boolq,arc_easy'; needs pip install llmprune[eval]"
    )
    eval_tasks_limit: int | None = _opt(None,
                                        "evaluate at most this many documents per --eval-tasks task (the first N)")
    eval_batch_size: int = _opt(1, "batch size of the --eval-tasks evaluation")
    num_fewshot: int = _opt(0, "few-shot examples per --eval-tasks document (0: zero-shot)")

    @classmethod
    def from_config(cls, config) -> ZeroShotOptions:
        """The options of any config object with attributes of the same names."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @property
    def names(self) -> list[str]:
        return [] if self.eval_tasks is None else [s.strip() for s in self.eval_tasks.split(",")]


def option_field(name: str):
    """A fresh dataclass field with the default and help text of ``ZeroShotOptions.<name>``,
    to declare the same option in another config dataclass."""
    (source,) = [f for f in dataclasses.fields(ZeroShotOptions) if f.name == name]
    return field(default=source.default, metadata=dict(source.metadata))


@dataclass
class TaskSet:
    """Checked task names (lm-eval names or task YAML paths), ready for :func:`evaluate_tasks`,
    and the lm-eval ``TaskManager`` that resolves them (kept: indexing lm-eval's tasks is slow)."""

    names: list[str]
    manager: object
    options: ZeroShotOptions


def check_options(options: ZeroShotOptions) -> None:
    """Cheap checks of the numbers and the name list; raises UsageError."""
    check_int("--eval-tasks-limit", options.eval_tasks_limit, optional=True)
    check_int("--eval-batch-size", options.eval_batch_size)
    check_int("--num-fewshot", options.num_fewshot, minimum=0)
    if options.eval_tasks is not None and (not options.names or "" in options.names):
        raise UsageError(f"--eval-tasks {options.eval_tasks!r} is not valid: use comma-separated task names, "
                         f"e.g. '{OFFLINE_GROUP}' or 'boolq,arc_easy'")


def lm_eval_version() -> str:
    """The installed lm-eval's version; UsageError (one line, how to install) when it is
    missing or older than 0.4.13."""
    try:
        import lm_eval
    except ImportError:
        raise UsageError(f"--eval-tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None
    version = getattr(lm_eval, "__version__", "0")
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:3])
    if parts < MIN_LM_EVAL:
        raise UsageError(f"--eval-tasks needs lm-eval >= {'.'.join(map(str, MIN_LM_EVAL))}, found {version}: "
                         f"pip install -U 'lm-eval>=0.4.13'")
    return version


def prepare_tasks(options: ZeroShotOptions) -> TaskSet | None:
    """Check ``options`` and the task names, and read every task's data once; None when no
    tasks are asked for. Raises UsageError (one line) for every problem, before any work."""
    check_options(options)
    if not options.names:
        return None
    lm_eval_version()
    names = list(dict.fromkeys(options.names))
    manager = _task_manager(include_defaults=False)
    if not all(_known(manager, name) for name in names):
        start = time.perf_counter()
        logger.info("indexing lm-eval's task configs (about 20 s on a 2-core CPU)")
        manager = _task_manager(include_defaults=True)
        logger.info("indexed %d lm-eval tasks in %.1f s", len(manager.all_tasks), time.perf_counter() - start)
    unknown = [name for name in names if not _known(manager, name)]
    if unknown:
        close = sorted({m for name in unknown for m in difflib.get_close_matches(name, manager.all_tasks, n=3)})
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UsageError(
            f"--eval-tasks: unknown task {', '.join(map(repr, unknown))}{hint}; use an lm-eval task or group name "
            f"(`lm-eval ls tasks`), a task YAML file, or the offline tasks {', '.join(offline_task_names())}"
        )
    for name in names:
        _check_reachable(manager, name)
    tasks = TaskSet(names, manager, options)
    load(tasks)  # read every dataset now: a missing one fails here, not after the pruning
    return tasks


def offline_task_names() -> list[str]:
    """The group ``offline`` first, then the shipped tasks it runs."""
    import yaml

    group = yaml.safe_load((TASKS_DIR / f"{OFFLINE_GROUP}.yaml").read_text())
    return [OFFLINE_GROUP, *group["task"]]


def load(tasks: TaskSet) -> dict:
    """Fresh lm-eval Task/Group objects for ``tasks`` (``TaskManager.load``'s dict); a dataset
    that cannot be read becomes a one-line UsageError."""
    try:
        return tasks.manager.load(tasks.names)
    except ConnectionError as error:
        raise UsageError(f"--eval-tasks {','.join(tasks.names)}: a task's dataset is not in the local datasets cache "
                         f"and the Hugging Face Hub cannot be reached ({_first_line(error)}); "
                         f"use --eval-tasks {OFFLINE_GROUP} (shipped with llmprune, no network)") from None
    except Exception as error:  # datasets/lm-eval raise many types (OSError, ValueError, DatasetsError, ...)
        raise UsageError(f"--eval-tasks {','.join(tasks.names)}: lm-eval could not load the tasks: "
                         f"{type(error).__name__}: {_first_line(error)}") from None


def evaluate_tasks(model, tokenizer, tasks: TaskSet | str, *, limit: int | None = None, batch_size: int | None = None,
                   num_fewshot: int | None = None, add_bos: bool | None = None) -> dict:
    """Score ``model`` (a transformers causal LM, already on its compute device, not moved or
    copied) on ``tasks`` (a :class:`TaskSet` or a comma-separated string, prepared here) with
    lm-eval; the keywords override the TaskSet's options. ``add_bos`` makes lm-eval put BOS
    before every request (None: the tokenizer's default). Global RNGs are not reseeded.
    Returns the plain dict described in the module docstring."""
    if isinstance(tasks, str):
        tasks = prepare_tasks(ZeroShotOptions(eval_tasks=tasks))
    if tasks is None:
        raise UsageError("evaluate_tasks needs task names, e.g. 'offline'")
    options = dataclasses.replace(
        tasks.options,
        eval_tasks_limit=tasks.options.eval_tasks_limit if limit is None else limit,
        eval_batch_size=tasks.options.eval_batch_size if batch_size is None else batch_size,
        num_fewshot=tasks.options.num_fewshot if num_fewshot is None else num_fewshot,
    )
    check_options(options)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    # lm-eval warns on every call about things that are intended here (a model object instead
    # of a name, num_fewshot set from the CLI): shown with --log-level INFO only.
    lm_eval_logger = logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    if not logger.isEnabledFor(logging.INFO):
        lm_eval_logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=options.eval_batch_size,
                  add_bos_token=add_bos)
        output = simple_evaluate(
            model=lm, tasks=tasks.names, task_manager=tasks.manager, num_fewshot=options.num_fewshot,
            limit=options.eval_tasks_limit, log_samples=False,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,
        )
    finally:
        lm_eval_logger.setLevel(level)
        model.train(was_training)
    return summarize(output, tasks.names, options)


def summarize(output: dict, names: list[str], options: ZeroShotOptions) -> dict:
    """The JSON-ready subset of ``simple_evaluate``'s output (see the module docstring)."""
    import lm_eval

    summary = {
        "lm_eval_version": lm_eval.__version__,
        "tasks": list(names),
        "num_fewshot": options.num_fewshot,
        "limit": options.eval_tasks_limit,
        "batch_size": options.eval_batch_size,
    }
    for key in ("results", "versions", "n-shot", "n-samples", "higher_is_better"):
        summary[key] = _plain(output.get(key) or {})
    return summary


def accuracy_rows(summary: dict) -> list[dict]:
    """One row per task of a summary: ``{"task", "acc", "acc_stderr", "acc_norm",
    "acc_norm_stderr", "n"}`` (None where lm-eval has no such metric), tasks in result order."""
    rows = []
    for task, metrics in (summary.get("results") or {}).items():
        n = (summary.get("n-samples") or {}).get(task, {}).get("effective")
        rows.append({
            "task": task,
            **{key: _number(metrics.get(f"{key},none")) for key in ACCURACY_KEYS},
            "n": n,
        })
    return rows


# ------------------------------------------------------------------------------ helpers


def _known(manager, name: str) -> bool:
    return name in manager.task_index or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


@functools.lru_cache(maxsize=2)
def _task_manager(*, include_defaults: bool):
    """An lm-eval ``TaskManager`` that also knows the shipped tasks, their data files absolute;
    built once per process (the full index takes ~20 s) and shared by every :class:`TaskSet`.

    lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which reads
    relative paths from the working directory. Each shipped task's index entry is therefore
    replaced by its full config with absolute paths (``yaml_path=None``: lm-eval then builds
    the task from ``cfg``); groups keep naming their members, which resolve to those entries.
    (An inline group dict would not do: lm-eval 0.4.13 passes the group's own keys, such as
    ``aggregate_metric_list``, on to its tasks' configs.)"""
    import yaml
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    index = manager.task_index  # the manager's own dict, not a copy
    for name, entry in list(index.items()):
        if entry.kind.name != "TASK" or entry.yaml_path is None or Path(entry.yaml_path).parent != TASKS_DIR:
            continue
        config = yaml.safe_load(Path(entry.yaml_path).read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / f) for split, f in files.items()}
        index[name] = dataclasses.replace(entry, yaml_path=None, cfg=config)
    return manager


def _leaf_configs(manager, name: str, seen: set | None = None):
    """The index configs of the tasks that ``name`` (task, group or tag) runs."""
    seen = set() if seen is None else seen
    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        if name.endswith((".yaml", ".yml")) and Path(name).is_file():
            yield from _yaml_file_configs(manager, Path(name), seen)
        return
    kind = entry.kind.name
    if kind == "TAG":
        for member in sorted(entry.tags):
            yield from _leaf_configs(manager, member, seen)
    elif kind == "GROUP":
        for member in (entry.cfg or {}).get("task") or []:
            if isinstance(member, str):
                yield from _leaf_configs(manager, member, seen)
            elif isinstance(member, dict) and isinstance(member.get("task") or member.get("group"), str):
                inner = member.get("task") or member.get("group")
                if inner in manager.task_index:
                    yield from _leaf_configs(manager, inner, seen)
                else:
                    yield inner, member
    else:
        yield name, entry.cfg or {}


def _yaml_file_configs(manager, path: Path, seen: set):
    """The task configs of a task or group YAML file given by path (``!function`` values,
    which only name code, are read as None)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    config = yaml.load(path.read_text(), Loader=Loader) or {}
    if "group" in config:
        for member in config.get("task") or []:
            if isinstance(member, str):
                yield from _leaf_configs(manager, member, seen)
            elif isinstance(member, dict):
                yield str(member.get("task") or member.get("group")), member
    else:
        yield str(config.get("task", path.name)), config


def _hub_dataset_of(config: dict) -> str | None:
    """The Hub dataset id a task config reads, or None when it reads local files (or its data
    comes from code, ``custom_dataset``)."""
    path = config.get("dataset_path")
    if not isinstance(path, str) or config.get("custom_dataset") is not None:
        return None
    if path in _FILE_BUILDERS:
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        values = files.values() if isinstance(files, dict) else files if isinstance(files, list) else [files]
        for value in values:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item.startswith("hf://datasets/"):
                    return "/".join(item[len("hf://datasets/"):].split("/")[:2])
        return None
    if Path(path).expanduser().is_dir():
        return None
    return path


def _check_reachable(manager, name: str) -> None:
    """UsageError when a task behind ``name`` reads a Hub dataset and the Hub cannot be reached.
    In offline mode (``HF_HUB_OFFLINE``) nothing is probed: the datasets cache is read instead."""
    from llmprune.calibration.data import _hub_offline, _hub_reachable

    if _hub_offline():
        return
    for task, config in _leaf_configs(manager, name):
        dataset = _hub_dataset_of(config)
        if dataset is not None and not _hub_reachable(dataset):
            from huggingface_hub import constants

            raise UsageError(
                f"--eval-tasks {name}: task {task!r} reads the Hub dataset {dataset!r} and the Hugging Face Hub "
                f"({constants.ENDPOINT}) cannot be reached: use --eval-tasks {OFFLINE_GROUP} (shipped with llmprune, "
                f"no network), or set HF_HUB_OFFLINE=1 to read the datasets cache"
            )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _plain(value):
    """Numbers as Python floats/ints (lm-eval returns numpy scalars), NaN as None, recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number) or math.isinf(number):
        return None
    return int(number) if isinstance(value, int) or (hasattr(value, "dtype") and "int" in str(value.dtype)) else number
