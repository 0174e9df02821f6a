"""Mixture-of-experts models built from dense experts (mergekit-moe's configuration and semantics).

    load_moe_config(path) -> MoEConfig                  read a mergekit-moe YAML file (schema only)
    build_moe(config, out_dir, ...) -> MoEResult        checked, streamed, atomic build on disk
    build_moe_in_memory(config, ...) -> MoEState        the same tensors as a dict, no file written
    MoEBuilder(...).build(config) -> MoEState           many in-memory builds over the same models
    load_moe_model(state) -> transformers model         a MoEState as a runnable model
    apply.write_moe_into(model, state) -> bool          a MoEState into a loaded MoE of its shape, in place

See docs/moe.md. Modules: config (the file's schema and rules), arch (output architectures),
plan (checks against the models, output layout), router (router rows), build (disk / memory), apply (into a resident model).
"""

from merge_engine.moe.build import (MoEBuilder, MoEResult, MoEState, build_moe, build_moe_in_memory,
                                   load_moe_model)
from merge_engine.moe.config import MoEConfig, load_moe_config, parse_moe_config

__all__ = ["MoEBuilder", "MoEConfig", "MoEResult", "MoEState", "build_moe", "build_moe_in_memory", "load_moe_config",
           "load_moe_model", "parse_moe_config"]
