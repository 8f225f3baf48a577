"""The app layer: the one Hydra entry every stage uses, user errors and exit codes, the config
resolvers and the sweep callback.

    if __name__ == "__main__":
        from pipeline.app import main
        main("dedup", run)          # run(cfg: PipelineConfig) -> StageResult

A stage's `run` computes and returns its result; `main` composes and types the config, opens
the tracking run, hands the result to tracking and turns user errors into one line and an exit
code. Tracking (and MLflow) is imported only here, when a stage runs as a command.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.config import (
    RECORDED_ONLY,
    Engine,
    PipelineConfig,
    check_key,
    key_type,
    validate,
)
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python 3.11+; only named in annotations

log = logging.getLogger(__name__)
JOB_ERROR_FILE = ".job_error"  # in a sweep job's folder: the exit code of a user error
INTERRUPTED = "interrupted; rerun the same command to resume"  # Ctrl-C's one line
_sweep_dir: Path | None = None  # set in the launching process when a multirun starts

# Where Hydra reads the configs. In a source tree (src/ on PYTHONPATH, or an editable install)
# it is the clone's top-level conf/, read as files: a clone runs its own configs even where the
# environment has another checkout installed, or none. Installed from a wheel, it is the package
# `pipeline.conf` (pyproject.toml ships conf/ under that name), found through the import system.
_TREE = Path(__file__).resolve().parents[2]  # the clone, when this file is src/pipeline/app.py
CONFIG_PATH = (
    str(_TREE / "conf")
    if Path(__file__).resolve().parent == _TREE / "src" / "pipeline"
    and (_TREE / "conf" / "config.yaml").is_file()
    else "pkg://pipeline.conf"
)


def main(
    stage: str,
    run: Callable[[PipelineConfig], Any],
    track: bool = True,
    config: str = "config",
    check: Callable[[PipelineConfig], object] | None = None,
) -> None:
    """Run `stage` as a command: `python -m pipeline.<stage> [overrides]`; `track=False` for
    commands that only print; `config` names the stage's own top config in conf/ when its
    defaults differ (it builds on config.yaml). `check` refuses what it can of the config and
    its inputs (paths, values) before tracking and the stage's heavy libraries load: a config
    error answers in a second, and leaves no MLflow run behind."""

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config)
    def task(cfg: DictConfig) -> None:
        with user_errors():
            config = typed(cfg)
            if check is not None:
                check(config)
            if not track or config.tracking.backend == "none":
                run(config)  # nothing to record: MLflow is not even imported (seconds saved)
                return
            from pipeline import tracking  # MLflow loads only when a stage runs as a command

            with tracking.tracked(config.tracking, stage, run_name(stage, config), cfg) as record:
                record(run(config))

    sys.argv[1:] = shell_paths(sys.argv[1:])  # hydra.main parses sys.argv when task() runs
    with user_errors():
        check_overrides(sys.argv[1:])
    try:
        task()
    except KeyboardInterrupt:  # outside the job: while Hydra starts or ends it
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except SystemExit as exit:
        # Hydra ends a sweep with a failed job as exit 1; a user error in a job means 2 or 3.
        codes = (
            [int(p.read_text()) for p in _sweep_dir.glob(f"*/{JOB_ERROR_FILE}")]
            if (exit.code == 1 and _sweep_dir is not None)
            else []
        )
        sys.exit(max(codes) if codes else exit.code)


def sleeping_openmp() -> None:
    """Have torch's OpenMP threads sleep as soon as they run out of work; libgomp's default
    is to spin for a while first. On the CPU the loader processes share the model's cores,
    and a thread spinning at the end of an operator, waiting for one a loader preempted,
    takes a core from the loaders: measured with resnet18 on 2 shared cores, 25% of the
    model's CPU time. libgomp reads this when torch loads, so an entry point calls it before
    importing torch; a value already set is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def compose_config(overrides: Sequence[str] = (), config: str = "config") -> PipelineConfig:
    """The typed config `python -m pipeline[.<stage>] overrides...` runs with (`config` names
    the stage's top config), composed in this process from the same configs."""
    configs = (
        initialize_config_module(CONFIG_PATH.removeprefix("pkg://"), version_base="1.3")
        if CONFIG_PATH.startswith("pkg://")
        else initialize_config_dir(CONFIG_PATH, version_base="1.3")
    )
    with configs:
        return typed(compose(config, overrides=list(overrides)))


GROUPS = ("dataset", "model", "tracking", "engine")


def config_folders(arguments: Sequence[str]) -> list[Traversable]:
    """The folders a command's presets come from: the user's `--config-dir` (`-cd`), which
    Hydra searches first, then CONFIG_PATH's (a package's through importlib.resources, which
    reads an installed or zipped package alike)."""
    users = [
        Path(v) for flag, v in itertools.pairwise(arguments) if flag in ("--config-dir", "-cd")
    ]
    users += [
        Path(a.removeprefix("--config-dir=")) for a in arguments if a.startswith("--config-dir=")
    ]
    if CONFIG_PATH.startswith("pkg://"):
        return [*users, resources.files(CONFIG_PATH.removeprefix("pkg://"))]
    return [*users, Path(CONFIG_PATH)]


def presets(folders: Sequence[Traversable], group: str) -> list[str]:
    """The names `group=<name>` can take: the YAML files in `group/` of any of the folders."""
    return sorted(
        {
            file.name.removesuffix(".yaml")
            for folder in folders
            if (folder / group).is_dir()
            for file in (folder / group).iterdir()
            if file.name.endswith(".yaml")
        }
    )


def check_overrides(arguments: Sequence[str]) -> None:
    """Presets that do not exist (`model=resnet5`) and keys that are not in the schema
    (`batch_szie=4`) as a ConfigError of one line naming the closest, before Hydra composes
    anything (Hydra would print a page and exit 1). Hydra's own keys and flags pass."""
    folders = config_folders(arguments)
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue  # a flag (-m, --cfg) or a flag's value
        key, _, values = argument.lstrip("~+").partition("=")
        key = key.partition("@")[0]  # key@package
        if key in GROUPS:
            known = presets(folders, key)
            for value in values.split(","):  # a sweep: model=a,b
                if value not in known:
                    raise ConfigError(f"no {key} preset {value!r}: use one of {', '.join(known)}")
        elif "/" not in key and key.split(".")[0] != "hydra":
            check_key(key)


# Keys that name files or folders: `~` and $VARIABLES in them are expanded, as a shell would.
PATH_KEYS = (
    "paths.root",
    "paths.data",
    "dataset.root",
    "dataset.path",
    "dataset.truth",
    "model.checkpoint",
    "output_dir",
    "embeddings",
    "images_root",
    "cluster.output_dir",
    "cluster.headline_file",
    "dedup.output_dir",
    "dedup.truth",
    "dedup.headline_file",
    "probe.output_dir",
    "probe.headline_file",
    "report.output_dir",
    "visualize.image",
    "visualize.output_dir",
    "explore.cluster_dir",
    "explore.dedup_dir",
    "explore.export",
    "explore.output_dir",
)
HYDRA_PATH_KEYS = ("hydra.run.dir", "hydra.sweep.dir")

# Where a bare word in a path key's value ends: Hydra's brackets, commas and quoted strings.
_VALUE_PARTS = re.compile(r"""('(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|[\[\]{}(),])""")


def shell_paths(arguments: Sequence[str]) -> list[str]:
    """The command line with `~` and $VARIABLES expanded in the values of path keys, as a shell
    does in `VAR=~/x` but not in `dataset.root=~/x` (not an assignment to bash), each expanded
    path quoted for Hydra's override grammar, which has no bare `~`. Lists and sweeps
    (`visualize.images=[~/a.jpg,~/b.jpg]`, `dataset.root=~/a,~/b`) are expanded word by word;
    quoted values and values with ${interpolations} are left as they are."""
    rewritten = []
    for argument in arguments:
        key, equals, value = argument.partition("=")
        path_key = key.lstrip("+") in (*PATH_KEYS, "visualize.images", *HYDRA_PATH_KEYS)
        if equals and path_key and "${" not in value:  # an interpolation is OmegaConf's
            parts = _VALUE_PARTS.split(value)
            argument = key + equals + "".join(_shell_path(p) for p in parts)
        rewritten.append(argument)
    return rewritten


def _shell_path(word: str) -> str:
    """One bare word of a path key's value, expanded and quoted if it has `~` or a $VARIABLE."""
    path = word.strip()
    if not ("~" in path or "$" in path) or path[:1] in ("'", '"'):
        return word
    expanded = os.path.expandvars(os.path.expanduser(path))
    return word.replace(path, QuotedString(text=expanded, quote=Quote.single).with_quotes())


def typed(cfg: DictConfig) -> PipelineConfig:
    """The composed config, checked against the schema and resolved, as dataclasses, its values
    validated (`pipeline.config.validate`)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), cfg)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        if isinstance(err, ConfigKeyError) and key:
            check_key(key)  # a key the schema lacks (from a preset file): the closest one named
        message = str(err).splitlines()[0]
        raise ConfigError(f"config: {message} (key {key or '?'})") from None
    for key in PATH_KEYS:
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = getattr(node, parent)
        if isinstance(value := getattr(node, name), str):
            setattr(node, name, os.path.expandvars(os.path.expanduser(value)))
    config.visualize.images = [
        os.path.expandvars(os.path.expanduser(p)) for p in config.visualize.images
    ]
    # Each layer once: the default names the embedding and the dedup layer, one and the same
    # on presets that name no dedup layer of their own.
    config.layers = list(dict.fromkeys(config.layers))
    validate(config)
    return config


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A ConfigError becomes one line on stderr and its exit code (2, or 3 for too many failed
    images); Ctrl-C one line and 130. In a sweep the job is marked failed and the others go on.
    """
    try:
        yield
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if not _in_sweep():
            sys.exit(err.exit_code)
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        (job_dir / JOB_ERROR_FILE).write_text(str(err.exit_code))
        raise SweepJobFailed(f"job #{HydraConfig.get().job.num}: {err}") from None
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)


class SweepJobFailed(CompactHydraException):
    """A sweep job's user error: Hydra reports it as one line, without a traceback."""


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode is RunMode.MULTIRUN


def run_name(stage: str, cfg: PipelineConfig) -> str:
    """What a run did, as the MLflow UI's runs table shows it."""
    if stage == "extract":
        engine = "" if cfg.engine.name is Engine.local else f" on {cfg.engine.name.value}"
        return f"extract {cfg.extraction_name} [{', '.join(cfg.layers)}]{engine}"
    if stage in ("report", "visualize"):
        return f"{stage} {cfg.extraction_name}"
    return f"{stage} {embeddings_key(cfg.embeddings)}"


class SweepRun(Callback):
    """Hydra callback: a multirun is one parent MLflow run, each job's run a child of it."""

    def on_multirun_start(self, config: DictConfig, **_: Any) -> None:
        global _sweep_dir
        _sweep_dir = Path(config.hydra.sweep.dir)
        from pipeline import tracking_sweeps

        tracking_sweeps.start_sweep(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **_: Any) -> None:
        if not _in_sweep():
            return  # a single run has no parent run (and MLflow takes seconds to import)
        from pipeline import tracking_sweeps

        tracking_sweeps.end_sweep_job(config, job_return)

    def on_multirun_end(self, config: DictConfig, **_: Any) -> None:
        from pipeline import tracking_sweeps

        tracking_sweeps.end_sweep(config)


# --- resolvers ---------------------------------------------------------------------------------


def embeddings_key(path: str) -> str:
    """`<dataset>/<model>/<layer>` of a layer's embeddings, so each input gets its own result
    folder: the path under `embeddings/`, or its last three parts."""
    parts = Path(path).with_suffix("").parts
    if "embeddings" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("embeddings") :])
    return "/".join(parts[-3:])


def path_name(path: str) -> str:
    """Last component of a path, for naming a dataset after its folder or manifest."""
    return Path(path).expanduser().resolve().stem


def weights_name(name: str, pretrained: bool, checkpoint: str | None, module: Any) -> str:
    """The model's folder name, telling its weights apart: `resnet18` (pretrained or a
    packaged checkpoint), `resnet18-random`, `resnet18-<checkpoint file stem>`."""
    if checkpoint:
        return name if checkpoint.startswith("pkg://") else f"{name}-{Path(checkpoint).stem}"
    if pretrained:
        return name
    if module is not None:
        return name  # a module's weights are its own code's business
    return f"{name}-random"


# Keys a sweep may vary while its jobs still write distinct files in the same folder: the layer
# or folder names differ, or the numbers do not.
SHARED_FOLDER_KEYS = {
    "layers",
    "model",
    "model.name",
    "dataset",
    "output_dir",
    "batch_size",
    "num_workers",
    "tracking",
    "layer",
    "embeddings",
}
SHARED_FOLDER_PREFIXES = (
    "dataset.",
    "tracking.",
    "hydra.",
    "hydra/",
    "model.pretrained",
    "model.checkpoint",
    "cluster.",
    "dedup.",
    "probe.",
    "report.",
    "visualize.",
    "explore.",
    "paths.",
)


def sweep_suffix() -> str:
    """In a Hydra multirun, `/key=value,...` of the swept keys that would otherwise make two
    jobs write the same file (pool, preprocessing, precision...); empty otherwise."""
    if not _in_sweep():
        return ""
    swept = _swept_keys(Path(HydraConfig.get().sweep.dir) / "multirun.yaml")
    distinct = sorted(
        o
        for o in HydraConfig.get().overrides.task
        if (key := o.split("=")[0]) in swept
        and key not in SHARED_FOLDER_KEYS
        and not key.startswith(SHARED_FOLDER_PREFIXES)
    )
    return "/" + ",".join(distinct) if distinct else ""


def _swept_keys(saved: Path) -> frozenset[str]:
    """The keys the sweep's command line varies: its own command line, with its comma lists, is
    saved beside the jobs. Read once per sweep (per version of the file): OmegaConf calls
    `sweep_suffix` for every key that interpolates `extraction_name`, some 30 times a job, and
    each parse took 0.1-0.5 s (Hydra's override parser)."""
    status = saved.stat()
    return _parse_swept_keys(str(saved), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=16)
def _parse_swept_keys(saved: str, mtime_ns: int, size: int) -> frozenset[str]:
    primary = OmegaConf.load(saved)
    return frozenset(
        o.key_or_group
        for o in OverridesParser.create().parse_overrides(list(primary.hydra.overrides.task))
        if o.is_sweep_override()
    )


# --- --help, from the schema and the presets: it lists what there is, so it cannot drift --------

CHOSEN = "*"  # marks, in --help, the value or preset this command would run with


def help_choices(key: str, _root_: DictConfig) -> str:
    """`a|b*|c`: every value of `key`'s Enum in the schema a user may choose, the one in effect
    marked (the default, or the command line's)."""
    kind = key_type(key)
    if not (isinstance(kind, type) and issubclass(kind, Enum)):
        raise TypeError(f"help_choices: {key} is a {kind}, not an Enum")
    current = OmegaConf.select(_root_, key, default=None)
    current = current.value if isinstance(current, Enum) else current
    return "|".join(
        m.value + (CHOSEN if m.value == current else "") for m in kind if m not in RECORDED_ONLY
    )


def help_presets(_root_: DictConfig) -> str:
    """A line per config group: its presets (conf/<group>/*.yaml, and the user's --config-dir),
    the one in effect marked."""
    folders = config_folders(sys.argv[1:])
    chosen = OmegaConf.select(_root_, "hydra.runtime.choices", default=None) or {}
    return "\n".join(
        f"  {group}: "
        + ", ".join(
            name + (CHOSEN if name == chosen.get(group) else "") for name in presets(folders, group)
        )
        for group in GROUPS
    )


def register_resolvers() -> None:
    """The resolvers the YAML uses; also registered in any Hydra process (DVC's composition of
    params.yaml among them) by the plugin in `hydra_plugins/pipeline_resolvers`."""
    for name, resolver in {
        "path_name": path_name,
        "weights_name": weights_name,
        "sweep_suffix": sweep_suffix,
        "embeddings_key": embeddings_key,
        "help_choices": help_choices,
        "help_presets": help_presets,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
