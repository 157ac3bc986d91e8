"""Train an Arctic-style MoE: the Hydra entry point around floe.run.entry.

    python launch/train.py                                     # tiny model, embedded data, this machine
    torchrun --standalone --nproc_per_node=8 launch/train.py model=small parallel.ep_size=8 \
        parallel.zero_stage=2 optim.lr=2e-4 train.max_steps=2000
    python launch/train.py -m model.capacity_factor=1.0,1.25,2.0   # an ablation sweep

Everything a run writes goes to run.dir (deterministic, so every rank agrees and a relaunch
resumes): config.yaml, metrics.jsonl (one line per optimizer step), checkpoints/, wandb/.
`train(cfg)` is importable: tests call it with a composed config. This file only turns the
composed config into floe's dataclasses; model presets come from floe.config.PRESETS,
registered below as the `model` group (there are no conf/model/*.yaml files).
"""
from __future__ import annotations

import os
import sys


def _die_with_the_torchrun_agent() -> None:
    """Under torchrun, have the kernel kill this worker when its agent dies (Linux PR_SET_PDEATHSIG).

    Runs before anything else is imported: a worker whose agent is killed while it is still starting
    (importing torch takes seconds) would otherwise live on with parent 1 and take the run dir's lock.
    The agent may already be gone by the time this runs: then the parent is already init (pid 1).
    floe.run.run_dir.AgentWatch covers systems without prctl (and a subreaper as new parent)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before the call above
        os._exit(1)


_die_with_the_torchrun_agent()

import dataclasses  # noqa: E402 -- after the guard above, on purpose
import errno  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import traceback  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from floe.config import PRESETS, ModelConfig
from floe.data import DataConfig
from floe.errors import ConfigError
from floe.lora import LoRAConfig
from floe.optim import OptimConfig
from floe.parallel import LaunchEnv, ParallelConfig, read_launch_env
from floe.run import entry
from floe.run.config import Configs, TrainConfig, config_errors
from floe.run.context import RunStopped
from floe.run.dpo import DPOConfig
from floe.run.init_from import init_data_config, init_model_config
from floe.run.trainer import NonFiniteTraining
from hydra.errors import HydraException
from launch.errors import EXIT_CODE, one_line, report
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def register_presets() -> None:
    """`model=<name>` selects floe.config.PRESETS[name]: the presets live in one place."""
    store = ConfigStore.instance()
    for name, preset in PRESETS.items():
        store.store(group="model", name=name, node=dataclasses.asdict(preset))


register_presets()

MAX_RUN_NAME = 120  # longer override sets get a hashed name (a path component is at most 255 bytes)


def run_name(override_dirname: str) -> str:
    """The run's directory name from Hydra's override_dirname: "default" for no overrides (so a
    default run and an override run are siblings, not parent and child); the overrides themselves
    when short and free of path separators; otherwise a readable prefix and a stable hash of them,
    e.g. data.paths=[/d/a.jsonl] -> "data.paths=_d_a.jsonl-<10 hex digits>"."""
    if not override_dirname:
        return "default"
    if len(override_dirname) <= MAX_RUN_NAME and re.fullmatch(r"[\w.,=+:@\-\[\]]+", override_dirname):
        return override_dirname
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    prefix = re.sub(r"[^\w.,=+-]+", "_", override_dirname)[:60].strip("_")
    return f"{prefix}-{digest}"


def run_dir(mode, model: str, name: str, sweep_dir: str) -> str:
    """runs/<model>/<name>; in a -m sweep <hydra.sweep.dir>/<name>, so a sweep's runs sit together."""
    return os.path.join(sweep_dir, name) if str(mode).endswith("MULTIRUN") else os.path.join("runs", model, name)


HYDRA_FLAGS_WITH_VALUE = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--info",
                          "--experimental-rerun")


def sweep_name(exclude_keys=None, argv: list[str] | None = None) -> str:
    """The directory name of a -m sweep (under runs/multirun/): its overrides as typed on the command
    line, named by run_name's rules (a readable prefix and a hash when long or holding paths), so a
    second sweep never writes into the first's directory and the same sweep again resumes its runs.
    Read from sys.argv, not Hydra's overrides: each job of a sweep sees only its own overrides, and
    every job must agree on the sweep's directory. exclude_keys: as for run names (log.*, run.dir, ...;
    default: conf/config.yaml's hydra.job.config.override_dirname.exclude_keys)."""
    if exclude_keys is None:  # read from the file: the launcher resolves sweep.dir before HydraConfig is set
        exclude_keys = OmegaConf.load(os.path.join(CONF_DIR, "config.yaml")).hydra.job.config.override_dirname.exclude_keys
    args, skip = [], False
    for a in sys.argv[1:] if argv is None else argv:
        if skip or a.startswith("-"):
            skip = not skip and a in HYDRA_FLAGS_WITH_VALUE
            continue
        if a.split("=", 1)[0].lstrip("+~") not in set(exclude_keys) | {"hydra.sweep.dir"}:
            args.append(a)
    return run_name(",".join(sorted(args)))


OmegaConf.register_new_resolver("floe_run_name", run_name, replace=True)
OmegaConf.register_new_resolver("floe_sweep_name", sweep_name, replace=True)
OmegaConf.register_new_resolver("floe_run_dir", run_dir, replace=True)


def _build(cls, section: DictConfig | dict, key: str):
    """Instantiate dataclass `cls` from a config section; unknown keys are named along with every
    problem of the known ones (one ValueError)."""
    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    errors = [f"unknown config key(s) {', '.join(f'{key}.{u}' for u in unknown)}; "
              f"known: {', '.join(sorted(known))}"] if unknown else []
    try:
        built = cls(**{k: v for k, v in values.items() if k in known})
    except (ValueError, TypeError) as e:
        errors.append(str(e))
    if errors:
        raise ValueError("\n".join(errors))
    return built


def model_overrides(cfg: DictConfig) -> dict:
    """The model.* values set on purpose (command line or experiment): those that differ from the
    chosen preset, plus every model.* key on the command line. Hydra names the preset; through the
    compose API (no Hydra runtime) it is the default one, tiny."""
    from hydra.core.hydra_config import HydraConfig

    preset, named = "tiny", set()
    if HydraConfig.initialized():
        preset = HydraConfig.get().runtime.choices.get("model", preset)
        named = {o.split("=", 1)[0].lstrip("+~")[len("model."):] for o in HydraConfig.get().overrides.task
                 if o.lstrip("+~").startswith("model.")}
    base = dataclasses.asdict(PRESETS[preset]) if preset in PRESETS else {}
    values = OmegaConf.to_container(cfg.model, resolve=True)
    return {k: v for k, v in values.items() if k in named or k not in base or base[k] != v}


def _build_section(cfg: DictConfig, key: str, cls):
    init_from = cfg.train.get("init_from")
    if init_from and not os.path.isdir(str(init_from)):
        if key == "train":
            raise ValueError(f"train.init_from={init_from}: not a directory (a Hugging Face Arctic directory, "
                             "e.g. tools/export.py's output)")
        init_from = None  # the other sections build as if unset; train names the problem once
    if key == "model" and init_from:
        return init_model_config(str(init_from), model_overrides(cfg))
    built = _build(cls, cfg[key], key)
    if key == "data" and init_from:
        return init_data_config(built, str(init_from))
    return built


def parse_config(cfg: DictConfig, launch: LaunchEnv | None = None) -> Configs:
    """Turn the composed Hydra config into floe's dataclasses; all problems in one ConfigError. With
    `launch`, also the one check of the whole run (floe.run.config.config_errors: the launch, every
    file and path), before anything is read or written."""
    errors, built = [], {}
    for key, cls in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
                     ("parallel", ParallelConfig), ("train", TrainConfig), ("dpo", DPOConfig),
                     ("lora", LoRAConfig)):
        try:
            built[key] = _build_section(cfg, key, cls)
        except (ValueError, TypeError) as e:
            errors.append(str(e))
    errors += _root_errors(cfg)
    built["run_dir"] = str(cfg.run.dir)
    errors += config_errors(built, launch)
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(errors))
    return Configs(run_dir=str(cfg.run.dir), wandb=str(cfg.log.wandb), wandb_project=str(cfg.log.project),
                   log_every=int(cfg.log.every), tensorboard=bool(cfg.log.get("tensorboard", False)),
                   expert_load_every=int(cfg.log.get("expert_load_every", 10)),
                   console_every=int(cfg.log.get("console_every", 10)),
                   **{k: v for k, v in built.items() if k != "run_dir"})


def _root_errors(cfg: DictConfig) -> list[str]:
    """Unknown root, run.* and log.* keys (the dataclass sections name their own) and the log.* values."""
    errors = []
    known = {"": ("model", "data", "optim", "parallel", "train", "dpo", "lora", "run", "log", "hydra"),
             "run": ("name", "dir"),
             "log": ("wandb", "project", "every", "console_every", "expert_load_every", "tensorboard")}
    for section, keys in known.items():
        node = cfg[section] if section else cfg
        if unknown := sorted(set(node) - set(keys)):
            where = ", ".join(f"{section}.{k}" if section else k for k in unknown)
            errors.append(f"unknown config key(s) {where}; known{' in ' + section if section else ''}: "
                          f"{', '.join(keys)}")
    if cfg.log.wandb not in ("offline", "online", "disabled"):
        errors.append(f"log.wandb must be offline, online or disabled, got {cfg.log.wandb!r}")
    for key, low in (("every", 1), ("expert_load_every", 0), ("console_every", 1)):
        every = cfg.log.get(key, 10)
        if not isinstance(every, int) or isinstance(every, bool) or every < low:
            errors.append(f"log.{key} must be an integer >= {low}, got {every!r}")
    tensorboard = cfg.log.get("tensorboard", False)
    if not isinstance(tensorboard, bool):
        errors.append(f"log.tensorboard must be true or false, got {tensorboard!r}")
    elif tensorboard and importlib.util.find_spec("tensorboard") is None:
        errors.append("log.tensorboard=true needs the tensorboard package: pip install 'tensorboard>=2.17,<3' "
                      "(or floe[tensorboard])")
    return errors


def train(cfg: DictConfig) -> dict:
    """Run training as configured; returns the last step's metrics (on every rank). Every problem of
    the config, the launch and the files it names is found here, before the run dir, the data or any
    process group is touched."""
    try:
        launch = read_launch_env()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    configs = parse_config(cfg, launch)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # What the run really is (train.init_from may have set both): tools/export.py reads these back.
    if configs.train.init_from:
        resolved["model"], resolved["data"] = dataclasses.asdict(configs.model), dataclasses.asdict(configs.data)
    return entry.train(configs, resolved, launch)


_task_started = False  # whether Hydra composed a config and called main (cli tells its errors apart)
_stderr_fd: int | None = None  # on a rank other than 0: the real stderr, set aside while Hydra composes


def _restore_stderr() -> None:
    global _stderr_fd
    if _stderr_fd is not None:
        sys.stderr.flush()
        os.dup2(_stderr_fd, 2)
        os.close(_stderr_fd)
        _stderr_fd = None


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    _restore_stderr()  # training's own output (warnings, errors) is every rank's again
    try:
        train(cfg)
    except BaseException as e:  # noqa: BLE001 -- each ending the user caused or expects is one line
        code, message = ending(e)
        if _in_sweep() and not isinstance(e, (KeyboardInterrupt, RunStopped)):
            return sweep_job_failed(cfg, e, message)  # the sweep goes on with its other jobs
        if code is None:
            raise  # a crash: the traceback is what its reader needs
        # Printed once under torchrun (every rank found the same problem, or agreed to stop), with an
        # exit code that says which ending it was; no traceback.
        if message:
            report(message)
        sys.exit(code)


# An OSError with one of these is about where the run writes (a full disk, a read-only mount), not a crash.
WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.ENAMETOOLONG)
SWEEP_FAILURES: list[tuple[str, str]] = []  # (run.dir, why) of each failed job of this -m sweep


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode).endswith("MULTIRUN")


def sweep_job_failed(cfg: DictConfig, e: BaseException, message: str) -> dict:
    """A job of a -m sweep failed: say why (a crash with its traceback) and let the sweep run the
    others; launch.callbacks lists the failed jobs at the end, and the sweep exits 1."""
    if not message:
        traceback.print_exception(e)
        message = f"{type(e).__name__}: {e}"
    print(f"floe: sweep job {cfg.run.dir} failed: {message}", file=sys.stderr)
    SWEEP_FAILURES.append((str(cfg.run.dir), message))
    return {"failed": message}


def ending(e: BaseException) -> tuple[int | None, str]:
    """(exit code, one line) for an ending that is not a crash: 2 for bad input (a config key, a file,
    a path that cannot be written: ConfigError, or an OSError naming its path), 1 for a run stopped by
    non-finite training, 128 + the signal for a stop on a signal (SIGTERM, SIGUSR1; SIGINT before
    training started). (None, "") for anything else."""
    if isinstance(e, ConfigError):
        return EXIT_CODE, str(e)
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return EXIT_CODE, one_line(e)
    if isinstance(e, RunStopped):
        return 128 + (e.signum or signal.SIGTERM), str(e)
    if isinstance(e, NonFiniteTraining):
        return 1, str(e)
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal.SIGINT, "interrupted (SIGINT) before training started; nothing was saved"
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        return 2, f"cannot write {e.filename}: {e.strerror}" if e.filename else f"cannot write: {e}"
    return None, ""


def cli() -> None:
    """The command line. Hydra reports its own errors (an unknown config group option such as
    model=nope, a malformed override, a key the config does not have) and exits 1, as it does for a
    crash inside training; those are config errors too, so they exit 2 like floe's own. Under
    torchrun every rank parses the same command line, so only rank 0 prints Hydra's message."""
    global _stderr_fd
    if os.environ.get("RANK", "0") != "0":
        sys.stderr.flush()
        _stderr_fd = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    try:
        main()
        if SWEEP_FAILURES:
            sys.exit(1)
    except SystemExit as e:
        if e.code == 1 and not _task_started:
            sys.exit(EXIT_CODE)
        raise
    finally:
        _restore_stderr()


if __name__ == "__main__":
    cli()
