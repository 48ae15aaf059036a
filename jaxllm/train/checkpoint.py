"""Checkpoints through orbax: the train state (params, optimizer, step, rng) plus the data
iterator's state, saved asynchronously and atomically (orbax writes to a temporary directory and
renames it on commit, so a crash mid-save never leaves a corrupt latest step)."""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxllm.config import CheckpointConfig


class CheckpointError(ValueError):
    pass


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaves_with_paths(tree):
    """{"params/layers/...": leaf}; namedtuple fields and dict keys spelled alike (orbax's
    metadata turns optimizer-state namedtuples into dicts)."""
    return {"/".join(_key_name(k) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep, create=True, enable_async_checkpointing=cfg.async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def check_compatible(self, step: int, abstract_state) -> None:
        """Refuse (with the first differing leaf named) a checkpoint of another shape."""
        saved = _leaves_with_paths(self.manager.item_metadata(step)["state"].tree)
        want = _leaves_with_paths(abstract_state)
        missing = sorted(set(want) - set(saved))
        extra = sorted(set(saved) - set(want))
        if missing or extra:
            raise CheckpointError(
                f"{self.directory}/{step}: checkpoint does not match the config: "
                f"{'missing ' + ', '.join(missing[:3]) if missing else ''}"
                f"{'; unexpected ' + ', '.join(extra[:3]) if extra else ''}")
        for key, leaf in want.items():
            if tuple(saved[key].shape) != tuple(leaf.shape):
                raise CheckpointError(
                    f"{self.directory}/{step}: {key} has shape {tuple(saved[key].shape)} in the "
                    f"checkpoint but {tuple(leaf.shape)} in the config (different model shape?)")

    def restore(self, step: int, abstract_state):
        """(state, data_state) with arrays placed per abstract_state's shardings."""
        self.check_compatible(step, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_run_params(run_dir: str | Path, step: int | None = None):
    """(Experiment, params) from a training run directory's latest (or given) checkpoint: the
    params its task trains (model params; {"lora": ...} adapters; plus heads such as "score")."""
    from jaxllm import config as config_lib
    from jaxllm import sharding
    from jaxllm.train import step as step_lib
    from jaxllm.train.optimizer import make_optimizer
    run_dir = Path(run_dir)
    if not (run_dir / "resolved.yaml").is_file():
        raise CheckpointError(f"{run_dir}: no resolved.yaml (not a jaxllm run directory?)")
    exp = config_lib.load(run_dir / "resolved.yaml")
    ckpt = Checkpointer(run_dir / "checkpoints", exp.checkpoint)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{run_dir}/checkpoints: no checkpoint")
    from jaxllm.tasks import get_task
    mesh = sharding.make_mesh(exp.mesh)
    abstract = step_lib.abstract_state(exp, make_optimizer(exp.optimizer, exp.train.steps), mesh,
                                       get_task(exp.task).param_spec(exp))
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    return exp, state["params"]


def write_run(exp, params, out: str | Path) -> Path:
    """A run directory holding `params` as its step-0 checkpoint (and resolved.yaml), ready for
    model.init_from=run:OUT, train.resume, convert or generate."""
    from jaxllm import config as config_lib
    from jaxllm import sharding
    from jaxllm.train import step as step_lib
    from jaxllm.train.optimizer import make_optimizer
    mesh = sharding.make_mesh(exp.mesh)
    state = step_lib.init_state(exp, make_optimizer(exp.optimizer, exp.train.steps), mesh, params)
    config_lib.save_resolved(exp, out)
    ckpt = Checkpointer(Path(out) / "checkpoints", exp.checkpoint)
    ckpt.save(0, state, {}, force=True)
    ckpt.close()
    return Path(out)
