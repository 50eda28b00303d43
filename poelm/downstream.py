"""Downstream tasks of lm-evaluation-harness on every readout of a model (poelm.lm_eval_model):
the tasks checked before anything loads, one harness run per readout over one shared cache of
trunk passes, and the scores as a table task x readout.

    from poelm.downstream import evaluate_tasks
    result = evaluate_tasks("runs/poe", ["piqa"], include_path=None, limit=100)
    result["tasks"]["piqa"]["stage0"]["acc"]     # every metric lm-eval reports, per readout

The real tasks download their data sets (a network, once; later runs read HF_HOME's cache);
tasks of your own are YAML files in a directory given as include_path (`--include-path DIR`).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

# the metric a table shows per task, the first a task reports (all are in the JSON)
PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "word_perplexity", "perplexity")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("--tasks needs lm-evaluation-harness: pip install 'poelm[eval]'") from None


def check_task_files(include_path: str | None) -> None:
    """Every YAML file under include_path parses (lm-eval itself skips one that does not, silently)."""
    if include_path is None:
        return
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(include_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--include-path {include_path} is not a directory of task YAML files")
    for path in sorted(root.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=False)
        except Exception as e:  # yaml's errors have no common base with ValueError; any failure is the file's
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"task file {path} does not parse ({first}); fix it or move it out of --include-path") \
                from None


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager that knows every task in `tasks` (include_path alone when it holds them
    all: scanning lm-eval's own thousands of task files takes seconds); an unknown name is refused."""
    from lm_eval.tasks import TaskManager

    check_task_files(include_path)
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    for t in tasks:
        if t not in manager.all_tasks:
            close = difflib.get_close_matches(t, manager.all_tasks, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            where = f" or in --include-path {include_path}" if include_path else ""
            raise ValueError(f"unknown task {t!r}: not among lm-eval's tasks{where}; {hint}"
                             "`lm_eval ls tasks` lists them")
    return manager


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks {text!r}: give task names, comma separated (e.g. piqa,lambada_openai)")
    return tasks


def evaluate_tasks(spec: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                   device: str = "cpu", batch_size: int = 8, force: bool = False, manager=None) -> dict:
    """Every readout of MODEL `spec` on `tasks`: {"model", "readouts", "labels", "tasks": {task:
    {readout: {metric: value}}}, "primary": {task: metric}, "trunk_passes"}."""
    from poelm.lm_eval_model import PoelmLM, load_scorer, readout_label

    require_lm_eval()
    manager = manager or task_manager(tasks, include_path)
    scorer = load_scorer(spec, device, batch_size, force)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    table: dict[str, dict[str, dict]] = {t: {} for t in tasks}
    for readout in scorer.readouts:
        out = run_harness(PoelmLM(readout=readout, scorer=scorer), tasks, manager, limit)
        for task in tasks:
            table[task][readout] = metrics_of(out["results"].get(task, {}))
    return {"model": str(spec), "readouts": scorer.readouts,
            "labels": {r: readout_label(r, scorer.model) for r in scorer.readouts}, "tasks": table,
            "primary": {t: primary_metric(next(iter(table[t].values()))) for t in tasks},
            "trunk_passes": scorer.passes}


def run_harness(lm, tasks: list[str], manager, limit: int | None) -> dict:
    """lm-eval's evaluation of `lm` on freshly built tasks, zero-shot unless a task sets its own
    shots, few-shot examples drawn with lm-eval's default seed (what simple_evaluate does, without
    its environment report, which runs `pip list` once per call)."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.evaluator import evaluate

    loaded = manager.load(tasks)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")


def metrics_of(result: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...} as {"acc": 0.5}."""
    out = {}
    for key, value in result.items():
        name, _, _ = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_stderr"):
            out[name] = float(value)
    return out


def primary_metric(metrics: dict[str, float]) -> str | None:
    return next((m for m in PRIMARY_METRICS if m in metrics), next(iter(metrics), None))


def task_table(result: dict) -> str:
    """The text table: a row per task, a column per readout, the task's primary metric."""
    readouts = result["readouts"]
    width = max(8, *(len(result["labels"][r]) for r in readouts))
    lines = [f"{'task':<24} {'metric':<12} " + " ".join(f"{result['labels'][r]:>{width}}" for r in readouts)]
    for task, per in result["tasks"].items():
        metric = result["primary"][task]
        cells = [f"{per[r].get(metric, float('nan')):>{width}.4f}" for r in readouts]
        lines.append(f"{task:<24} {str(metric):<12} " + " ".join(cells))
    return "\n".join(lines)
