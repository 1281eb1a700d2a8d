"""A site's own FedML-style trainer (FedML's `ClientTrainer` interface) as the local training step.

Teams coming from FedML Octopus have a trainer written against `ClientTrainer`: `get_model_params()`,
`set_model_params(params)`, `train(train_data, device, args)`, `test(test_data, device, args)`. A site may keep
it, without weakening the trust boundary:

- The code is the site's. It is installed on the site and registered in the site's policy (`trainers:`) by
  import path and the sha256 of its module's source file; a job only names the registration, the aggregator
  never ships code. The bytes that are hashed are the bytes that run (compiled from memory: never re-read after
  the check, never a stale `.pyc`), so a module that changed since it was pinned is refused, not loaded.
- The interface is duck-typed: the core install never imports `fedml`.
- The trainer gets a freshly built registered model, this site's encoded training split as a DataLoader of
  (x, y) batches and an `args` namespace. It gets no handle on the privacy engine, the ledger, the egress gate
  or the network session: it returns a state dict, which is checked here against the job's registered model
  (names, shapes, dtypes, all finite) and loaded into the daemon's model. The daemon then takes the delta and
  clips, noises, accounts and sends it exactly as for the built-in trainer. Whatever the trainer did, the clip
  bounds the update, so the update-level ε holds. Record-level DP (`unit: record`) is refused: its guarantee
  depends on the training loop (DP-SGD), which a foreign trainer does not run.
- With `python:` in the registration the trainer runs in a separate interpreter (e.g. a virtualenv holding
  `fedml`, whose pins clash with fedsilo's), with an empty environment, this job's round deadline, and one
  request/response over stdin/stdout as numpy archives (never pickle). The trainer process then cannot reach
  the agent's memory either. An in-process trainer is as trusted as any package the site installs.
- What a trainer raises or prints stays in the site's log: refusal reasons leave the site (events), so they
  carry only the adapter's own words, the exception's type and tensor names.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from federation.models import Weights, build_model, get_weights, set_weights
from federation.schema import Frozen

if TYPE_CHECKING:
    from federation.jobs import JobSpec

INTERFACE = ("get_model_params", "set_model_params", "train", "test")
_MAX_NAME = 64  # tensor names in reasons are cut to this many characters


class TrainerRegistration(Frozen):
    """A trainer installed on this site, registered under a name that jobs may ask for (`trainer:` in a job)."""

    import_path: str = Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$",
                             description="module:ClassName of a class with FedML's ClientTrainer interface")
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$",
                               description="sha256 of the module's source file (`sha256sum FILE`); other content "
                                           "is refused")
    models: list[str] = Field(min_length=1, description="Registered model names it may train")
    datasets: list[str] = Field(min_length=1, description="Dataset names (of this policy) it may train on")
    search_path: Path | None = Field(default=None, description="Absolute folder the module is found in (default: "
                                                               "the agent's import path)")
    python: Path | None = Field(default=None, description="Absolute path of an interpreter to run it in a separate "
                                                          "process (e.g. a virtualenv with fedml); default: inside "
                                                          "the agent's process")

    @field_validator("search_path", "python")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError(f"{v} must be an absolute path")
        return v


class TrainerRefusedError(Exception):
    """The registered trainer may not run, failed, or returned parameters that do not fit the job's model."""


@dataclass(frozen=True)
class TrainerSource:
    """The module a registration points at, located without importing it, with the bytes that were hashed."""

    module: str
    qualname: str
    origin: Path
    root: Path  # the folder its top-level package (or the module itself) was found in
    code: bytes
    sha256: str


def locate(reg: TrainerRegistration) -> TrainerSource:
    """Find the module's source file without executing anything, and read and hash it once."""
    module, _, qualname = reg.import_path.partition(":")
    parts = module.split(".")
    search: list[str] = [str(reg.search_path)] if reg.search_path else [p or os.getcwd() for p in sys.path]
    where = str(reg.search_path) if reg.search_path else "the agent's import path"
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        spec = importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None:
            raise TrainerRefusedError(f"trainer module {name!r} is not found in {where}")
        if i < len(parts) - 1:
            if spec.submodule_search_locations is None:
                raise TrainerRefusedError(f"{name!r} is not a package, so {module!r} cannot be in it")
            search = list(spec.submodule_search_locations)
    assert spec is not None
    if spec.origin is None or not spec.origin.endswith(".py"):
        raise TrainerRefusedError(f"trainer module {module!r} is not a Python source file ({spec.origin}); "
                                  "only source can be pinned by its hash")
    origin = Path(spec.origin)
    depth = len(parts) if spec.submodule_search_locations is not None else len(parts) - 1
    code = origin.read_bytes()
    return TrainerSource(module, qualname, origin, origin.parents[depth], code, hashlib.sha256(code).hexdigest())


def verify(reg: TrainerRegistration) -> TrainerSource:
    """The trainer's source, if its hash is the one the policy pins."""
    src = locate(reg)
    if src.sha256 != reg.source_sha256:
        raise TrainerRefusedError(
            # No file path: refusal reasons leave the site, and where the code lives on it is nobody else's business.
            f"the source of {reg.import_path} has sha256 {src.sha256}, but this site's policy pins "
            f"{reg.source_sha256}: it changed since it was registered, so it is not loaded")
    return src


def trainer_refusals(trainers: Mapping[str, TrainerRegistration], spec: JobSpec) -> list[str]:
    """Every reason this site may not run the trainer `spec` names (none when it names none)."""
    if spec.trainer is None:
        return []
    reg = trainers.get(spec.trainer)
    if reg is None:
        return [f"trainer {spec.trainer!r} is not registered in this site's policy "
                f"(registered: {', '.join(sorted(trainers)) or 'none'})"]
    name, r = spec.trainer, []
    if spec.model.name not in reg.models:
        r.append(f"trainer {name!r} is registered for models {', '.join(reg.models)}, not {spec.model.name!r}")
    if spec.dataset.name not in reg.datasets:
        r.append(f"trainer {name!r} is registered for datasets {', '.join(reg.datasets)}, "
                 f"not {spec.dataset.name!r}")
    if spec.privacy.unit == "record":
        r.append(f"trainer {name!r} cannot give record-level DP (privacy.unit: record): that guarantee needs "
                 "fedsilo's DP-SGD training loop")
    if reg.python is not None and not (reg.python.is_file() and os.access(reg.python, os.X_OK)):
        r.append(f"trainer {name!r}: the interpreter its registration names is not an executable file")
    try:
        verify(reg)
    except (TrainerRefusedError, OSError) as exc:
        r.append(f"trainer {name!r}: {exc}")
    return r


# ---------------------------------------------------------------- running a trainer (both processes)
class _TrainerFailedError(Exception):
    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__} in {stage}")
        self.stage, self.error, self.detail = stage, type(exc).__name__, "".join(traceback.format_exception(exc))


def _call(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        raise _TrainerFailedError(stage, exc) from exc


def _load_class(module: str, qualname: str, origin: Path, root: Path, code: bytes) -> type[Any]:
    """Execute the verified bytes as `module` (parent packages are imported normally) and return the class."""
    if str(root) not in sys.path:
        sys.path.append(str(root))  # after site-packages: the trainer's folder cannot shadow installed packages
    parent = module.rpartition(".")[0]
    if parent:
        _call("import of its package", importlib.import_module, parent)
    is_package = origin.name == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        module, origin, submodule_search_locations=[str(origin.parent)] if is_package else None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(module)
    sys.modules[module] = mod
    try:
        _call("module load", exec, compile(code, str(origin), "exec"), mod.__dict__)
    except _TrainerFailedError:
        if previous is None:
            sys.modules.pop(module, None)
        else:
            sys.modules[module] = previous
        raise
    cls = getattr(mod, qualname, None)
    if not isinstance(cls, type):
        raise TrainerRefusedError(f"{module}:{qualname} is not a class")
    missing = [m for m in INTERFACE if not callable(getattr(cls, m, None))]
    if missing:
        raise TrainerRefusedError(f"{module}:{qualname} lacks {', '.join(missing)} of FedML's ClientTrainer interface")
    return cls


def fedml_args(spec: JobSpec, seed: int, round_idx: int) -> dict[str, Any]:
    """The fields FedML trainers read from `args`, from the job (JSON-safe: it also crosses to a trainer process)."""
    hp = spec.hyperparameters
    return {
        "epochs": hp.epochs, "batch_size": hp.batch_size, "learning_rate": hp.learning_rate, "lr": hp.learning_rate,
        "client_optimizer": hp.optimizer, "weight_decay": hp.weight_decay, "momentum": hp.momentum,
        "max_steps": hp.max_steps, "comm_round": spec.rounds, "round_idx": round_idx, "random_seed": seed,
        "dataset": spec.dataset.name, "model": spec.model.name, "training_type": "cross_silo",
        "scenario": "horizontal", "role": "client", "using_gpu": False, "device": "cpu",
    }


def _run_trainer(cls: type[Any], model: nn.Module, x: np.ndarray, y: np.ndarray, args: dict[str, Any],
                 seed: int) -> Any:
    """FedML's client step: construct with the model, set the global params, train, read the params back."""
    ns = SimpleNamespace(**args)
    device = torch.device("cpu")
    data = TensorDataset(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                         torch.from_numpy(np.asarray(y, np.float32).reshape(-1, 1)))
    loader = DataLoader(data, batch_size=ns.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainer = _call("__init__", cls, model, ns)
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _call("set_model_params", trainer.set_model_params, params)
        if callable(getattr(trainer, "update_dataset", None)):
            _call("update_dataset", trainer.update_dataset, loader, None, len(data))
        for hook in ("on_before_local_training", "train", "on_after_local_training"):
            if callable(getattr(trainer, hook, None)):
                _call(hook, getattr(trainer, hook), loader, device, ns)
        return _call("get_model_params", trainer.get_model_params)


def _to_arrays(params: Any) -> tuple[dict[str, np.ndarray], list[str]]:
    """Tensors → numpy without any cast (so a wrong dtype is seen), with a reason for anything else."""
    if not isinstance(params, Mapping):
        return {}, [f"get_model_params() returned a {type(params).__name__}, not a state dict"]
    arrays: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for key, value in params.items():
        name = str(key)[:_MAX_NAME]
        if not isinstance(key, str):
            problems.append(f"a key of type {type(key).__name__} is not a tensor name")
        elif isinstance(value, torch.Tensor):
            try:
                arrays[key] = value.detach().cpu().numpy().copy()
            except (TypeError, RuntimeError):
                problems.append(f"tensor {name!r} has dtype {str(value.dtype).removeprefix('torch.')}")
        elif isinstance(value, np.ndarray):
            arrays[key] = value.copy()
        else:
            problems.append(f"{name!r} is a {type(value).__name__}, not a tensor")
    return arrays, problems


def check_params(arrays: Mapping[str, np.ndarray], problems: list[str], expected: Weights) -> list[str]:
    """Every way the returned parameters differ from the job's registered model: names, shapes, dtypes, finite."""
    r = list(problems)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(k[:_MAX_NAME] for k in set(arrays) - set(expected))
    if missing:
        r.append(f"missing tensor(s) {missing}")
    if extra:
        r.append(f"unexpected tensor(s) {extra[:10]}")
    for name in sorted(set(expected) & set(arrays)):
        got, want = arrays[name], expected[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            r.append(f"tensor {name!r} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
        elif got.dtype.kind == "f" and not np.isfinite(got).all():
            r.append(f"tensor {name!r} has {int((~np.isfinite(got)).sum())} NaN/Inf value(s)")
    return r


# ---------------------------------------------------------------- the agent's side
def train_registered(model: nn.Module, trainers: Mapping[str, TrainerRegistration], spec: JobSpec,
                     x: np.ndarray, y: np.ndarray, seed: int, round_idx: int) -> float:
    """Train `model` (holding the global weights) with the trainer the job names; return the training loss.

    Like `agent.trainer.train_local`, it leaves the trained weights in `model` and touches nothing else: the
    daemon computes the delta from them and privatizes it as it would any other."""
    reasons = trainer_refusals(trainers, spec)
    if reasons:
        raise TrainerRefusedError("; ".join(reasons))
    assert spec.trainer is not None
    name, reg = spec.trainer, trainers[spec.trainer]
    src = verify(reg)  # the bytes checked here are the bytes that run
    expected = get_weights(model)
    args = fedml_args(spec, seed, round_idx)
    try:
        if reg.python is None:
            cls = _load_class(src.module, src.qualname, src.origin, src.root, src.code)
            arrays, problems = _to_arrays(_run_trainer(cls, _fresh_model(spec, expected), x, y, args, seed))
        else:
            arrays, problems = _run_in_subprocess(reg.python, src, spec, expected, x, y, args, seed)
    except _TrainerFailedError as exc:
        _log().warning("trainer_failed", trainer=name, stage=exc.stage, error=exc.error, detail=exc.detail)
        raise TrainerRefusedError(f"trainer {name!r} raised {exc.error} in {exc.stage}; the traceback is in "
                                  "this site's log") from None
    bad = check_params(arrays, problems, expected)
    if bad:
        raise TrainerRefusedError(f"trainer {name!r} returned parameters that do not fit the job's model "
                                  f"{spec.model.name!r}: " + "; ".join(bad))
    set_weights(model, {k: arrays[k] for k in expected})
    _log().info("trained_with_registered_trainer", trainer=name, import_path=reg.import_path,
                source_sha256=src.sha256, separate_process=reg.python is not None)
    with torch.no_grad():
        model.eval()
        logits = model(torch.from_numpy(x)).squeeze(-1)
        return float(nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).float()))


def _fresh_model(spec: JobSpec, weights: Weights) -> nn.Module:
    """The trainer's own copy of the registered model, holding the global weights."""
    model = build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden)
    set_weights(model, weights)
    return model


def _log() -> Any:
    import structlog  # not at import time: a trainer process (another virtualenv) may not have it

    return structlog.get_logger(__name__)


def _run_in_subprocess(python: Path, src: TrainerSource, spec: JobSpec, weights: Weights, x: np.ndarray,
                    y: np.ndarray, args: dict[str, Any], seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Run the trainer in `python`: one request on its stdin, one response on its stdout, within the deadline."""
    request = {
        "module": src.module, "qualname": src.qualname, "origin": str(src.origin), "root": str(src.root),
        "source": src.code.decode("utf-8"), "args": args, "seed": seed,
        "model": {"name": spec.model.name, "input_dim": spec.features.input_dim(), "hidden": list(spec.model.hidden)},
    }
    body = io.BytesIO()
    _save(body, "__request__", request, {"x": x, "y": y, **{f"w:{k}": v for k, v in weights.items()}})
    with tempfile.TemporaryDirectory(prefix="fedsilo-trainer-") as tmp:
        lib = Path(tmp) / "lib"
        lib.mkdir()
        here = Path(__file__).resolve().parent
        (lib / "agent").symlink_to(here)  # only fedsilo's two packages, never the agent's site-packages
        (lib / "federation").symlink_to(here.parent / "federation")
        (Path(tmp) / "home").mkdir()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": f"{tmp}/home", "TMPDIR": tmp,
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        boot = (f"import sys; sys.path.insert(0, {str(lib)!r}); "
                "from agent.fedml_adapter import worker_main; worker_main()")
        proc = subprocess.Popen([str(python), "-I", "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=tmp, start_new_session=True)
        try:
            out, err = proc.communicate(body.getvalue(), timeout=spec.round_deadline_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TrainerRefusedError(f"trainer {spec.trainer!r} did not finish within the round deadline "
                                      f"({spec.round_deadline_s:g}s) and was stopped") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind
    tail = err.decode(errors="replace")[-4000:]
    try:
        with np.load(io.BytesIO(out), allow_pickle=False) as npz:
            response = json.loads(bytes(npz["__response__"]).decode())
            arrays = {k[2:]: npz[k] for k in npz.files if k.startswith("w:")}
    except Exception:
        _log().warning("trainer_process_failed", trainer=spec.trainer, returncode=proc.returncode, stderr=tail)
        raise TrainerRefusedError(f"the trainer process of {spec.trainer!r} exited with {proc.returncode} "
                                  "without a response; its output is in this site's log") from None
    if not response.get("ok"):
        _log().warning("trainer_failed", trainer=spec.trainer, stage=response.get("stage"),
                       error=response.get("error"), detail=response.get("detail"), stderr=tail)
        if response.get("refused"):
            raise TrainerRefusedError(str(response["refused"]))
        raise TrainerRefusedError(f"trainer {spec.trainer!r} raised {response.get('error')} in "
                                  f"{response.get('stage')}; the traceback is in this site's log")
    return arrays, [str(p) for p in response.get("problems", [])]


def _save(buf: io.BytesIO, key: str, message: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """One message between the agent and a trainer process: JSON plus named arrays in an .npz (never pickle)."""
    named: dict[str, Any] = {key: np.frombuffer(json.dumps(message).encode(), np.uint8), **arrays}
    np.savez(buf, **named)


# ---------------------------------------------------------------- the trainer process's side
def worker_main() -> None:
    """Entry point of a trainer process: the request on stdin, the response on the original stdout.

    Whatever the trainer prints goes to stderr, so it can never corrupt or forge the response."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=False) as npz:
            req = json.loads(bytes(npz["__request__"]).decode())
            x, y = npz["x"], npz["y"]
            weights = {k[2:]: npz[k] for k in npz.files if k.startswith("w:")}
        cls = _load_class(req["module"], req["qualname"], Path(req["origin"]), Path(req["root"]),
                          req["source"].encode())
        m = req["model"]
        model = build_model(m["name"], m["input_dim"], m["hidden"])
        set_weights(model, weights)
        arrays, problems = _to_arrays(_run_trainer(cls, model, x, y, req["args"], req["seed"]))
        response: dict[str, Any] = {"ok": True, "problems": problems}
    except _TrainerFailedError as exc:
        response = {"ok": False, "stage": exc.stage, "error": exc.error, "detail": exc.detail}
    except TrainerRefusedError as exc:
        response = {"ok": False, "refused": str(exc)}
    except Exception as exc:
        response = {"ok": False, "stage": "the trainer process", "error": type(exc).__name__,
                    "detail": traceback.format_exc()}
    buf = io.BytesIO()
    _save(buf, "__response__", response, {f"w:{k}": v for k, v in arrays.items()})
    out.write(buf.getvalue())
    out.flush()
